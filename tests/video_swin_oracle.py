"""An independent, deliberately literal restatement of Video Swin Transformer's attention path.

It follows the original step by step (get_window_size, F.pad after the norm, torch.roll,
window_partition, compute_mask with slices, relative_position_index buffer built with meshgrid and
sliced ``[:N, :N]``, softmax, window_reverse, roll back, crop) so that the library's arithmetic
versions are checked against the original formulation rather than against themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def get_window_size(x_size, window_size, shift_size):
    use_window_size, use_shift_size = list(window_size), list(shift_size)
    for i in range(len(x_size)):
        if x_size[i] <= window_size[i]:
            use_window_size[i] = x_size[i]
            use_shift_size[i] = 0
    return tuple(use_window_size), tuple(use_shift_size)


def window_partition(x, window_size):
    b, d, h, w, c = x.shape
    x = x.view(
        b,
        d // window_size[0],
        window_size[0],
        h // window_size[1],
        window_size[1],
        w // window_size[2],
        window_size[2],
        c,
    )
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).contiguous().view(-1, window_size[0] * window_size[1] * window_size[2], c)


def window_reverse(windows, window_size, b, d, h, w):
    x = windows.view(
        b,
        d // window_size[0],
        h // window_size[1],
        w // window_size[2],
        window_size[0],
        window_size[1],
        window_size[2],
        -1,
    )
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).contiguous().view(b, d, h, w, -1)


def compute_mask(d, h, w, window_size, shift_size, device):
    img_mask = torch.zeros((1, d, h, w, 1), device=device)
    cnt = 0
    for ds in (slice(-window_size[0]), slice(-window_size[0], -shift_size[0]), slice(-shift_size[0], None)):
        for hs in (slice(-window_size[1]), slice(-window_size[1], -shift_size[1]), slice(-shift_size[1], None)):
            for ws in (slice(-window_size[2]), slice(-window_size[2], -shift_size[2]), slice(-shift_size[2], None)):
                img_mask[:, ds, hs, ws, :] = cnt
                cnt += 1
    mask_windows = window_partition(img_mask, window_size).squeeze(-1)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


def video_swin_relative_position_index(window_size):
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(window_size[0]), torch.arange(window_size[1]), torch.arange(window_size[2]), indexing="ij"
        )
    )
    coords_flatten = torch.flatten(coords, 1)
    relative_coords = (coords_flatten[:, :, None] - coords_flatten[:, None, :]).permute(1, 2, 0).contiguous()
    relative_coords[:, :, 0] += window_size[0] - 1
    relative_coords[:, :, 1] += window_size[1] - 1
    relative_coords[:, :, 2] += window_size[2] - 1
    relative_coords[:, :, 0] *= (2 * window_size[1] - 1) * (2 * window_size[2] - 1)
    relative_coords[:, :, 1] *= 2 * window_size[2] - 1
    return relative_coords.sum(-1)


def video_swin_window_attention(x_windows, qkv, proj, table, index, num_heads, scale, mask=None):
    """Video Swin ``WindowAttention3D.forward`` on ``(B*nW, N, C)`` windows."""
    b_, n, c = x_windows.shape
    q, k, v = qkv(x_windows).reshape(b_, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    attn = (q * scale) @ k.transpose(-2, -1)
    bias = table[index[:n, :n].reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)
    attn = attn + bias.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        attn = attn.view(b_ // nw, nw, num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, n, n)
    attn = attn.softmax(dim=-1)
    return proj((attn @ v).transpose(1, 2).reshape(b_, n, c))


def video_swin_block_attention(x, module, window_size, shift_size):
    """The attention half of ``SwinTransformerBlock3D.forward_part1`` on a normed ``(B, D, H, W, C)``
    volume, using ``module``'s qkv / proj / table and the meshgrid index buffer."""
    b, d, h, w, c = x.shape
    window_size, shift_size = get_window_size((d, h, w), window_size, shift_size)
    pad_d1 = (window_size[0] - d % window_size[0]) % window_size[0]
    pad_b = (window_size[1] - h % window_size[1]) % window_size[1]
    pad_r = (window_size[2] - w % window_size[2]) % window_size[2]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b, 0, pad_d1))
    _, dp, hp, wp, _ = x.shape
    if any(i > 0 for i in shift_size):
        shifted_x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1], -shift_size[2]), dims=(1, 2, 3))
        attn_mask = compute_mask(dp, hp, wp, window_size, shift_size, x.device)
    else:
        shifted_x, attn_mask = x, None
    x_windows = window_partition(shifted_x, window_size)
    index = video_swin_relative_position_index(module.window_size)
    attn_windows = video_swin_window_attention(
        x_windows,
        module.qkv,
        module.proj,
        module.relative_position_bias_table,
        index,
        module.num_heads,
        module.scale,
        attn_mask,
    )
    attn_windows = attn_windows.view(-1, *(window_size + (c,)))
    shifted_x = window_reverse(attn_windows, window_size, b, dp, hp, wp)
    x = torch.roll(shifted_x, shifts=shift_size, dims=(1, 2, 3)) if any(i > 0 for i in shift_size) else shifted_x
    return x[:, :d, :h, :w, :]

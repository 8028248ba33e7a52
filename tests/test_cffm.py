"""CFFM on the CPU: the rolled/unfolded key assembly against the coordinate loops of ``cffm_keys_reference``
(289 keys per window, the masks on the unfold positions outside the pooled maps, t-9's segment), the pooling
layers at initialisation, the block (reference frames untouched, the target reading them, gradcheck) and the
module's frame order, output and loss term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssltm.model.cffm import CFFM, MASKED, NUM_KEYS, CFFMBlock, cffm_keys, cffm_keys_reference
from ssltm.model.neck import resize

DIM, HEADS = 16, 2


def pooled_maps(nwh: int, nww: int, c: int, gen: torch.Generator, dtype=torch.float64) -> list[torch.Tensor]:
    """Random pooled maps of the four segments for an ``nWh x nWw`` window grid."""
    return [torch.randn(2, nwh * s, nww * s, c, generator=gen, dtype=dtype) for s in (1, 1, 2, 3)]


def block(seed: int = 0, dim: int = DIM, heads: int = HEADS) -> CFFMBlock:
    torch.manual_seed(seed)
    return CFFMBlock(dim, heads).double()


# ------------------------------------------------------------------------------------------ key assembly
@pytest.mark.parametrize(("h", "w"), [(19, 23), (7, 7)])
def test_keys_equal_the_coordinate_reference(h, w):
    """Stride-8 maps of 19x23 (padded to 21x28, 3x4 windows) and 7x7 (one window): every window's 289 keys and
    its mask equal the reference's; the masked positions hold zeros."""
    gen = torch.Generator().manual_seed(0)
    hp, wp = -(-h // 7) * 7, -(-w // 7) * 7
    x = torch.randn(2, hp, wp, 5, generator=gen, dtype=torch.float64)
    maps = pooled_maps(hp // 7, wp // 7, 5, gen)
    keys, mask = cffm_keys(x, maps)
    ref_keys, ref_mask = cffm_keys_reference(x, maps)
    assert keys.shape == (2, (hp // 7) * (wp // 7), NUM_KEYS, 5) and NUM_KEYS == 289
    assert torch.equal(keys, ref_keys) and torch.equal(mask, ref_mask)
    assert set(mask.unique().tolist()) <= {0.0, MASKED}
    assert not keys[:, mask == MASKED].any()
    assert not mask[:, :181].any()  # the window's own tokens and its rolled neighbours are never masked
    if (h, w) == (7, 7):
        # one window: the query's 5x5 and t-9's 7x7 unfold keep their centre alone, t-6's 5x5 (stride 2) and
        # t-3's 3x3 (stride 3) their 2x2 in range
        assert (mask == MASKED).sum() == 24 + 48 + 21 + 5


def test_far_frame_feeds_keys_206_to_254():
    """With t-9 constant, exactly keys 206-254 of every window (where not masked) take its value."""
    gen = torch.Generator().manual_seed(1)
    blk = block()
    frames = torch.randn(1, 4, 21, 28, DIM, generator=gen, dtype=torch.float64)
    value = torch.randn(DIM, generator=gen, dtype=torch.float64)
    frames[:, 0] = value
    maps = blk.pooled(frames)
    keys, mask = cffm_keys(frames[:, -1], maps)
    # (the pooling weights 1/49 were initialised in float32)
    is_value = torch.isclose(keys, value.expand_as(keys), rtol=0, atol=1e-6).all(-1)[0]  # (nW, 289)
    expected = torch.zeros_like(is_value)
    expected[:, 206:255] = mask[:, 206:255] == 0
    # 3x4 windows: each window's 7x7 unfold covers the whole 3x4 pooled map of t-9
    assert torch.equal(is_value, expected) and expected.sum() == 12 * 12


def test_pooling_starts_as_the_mean_of_each_sub_window():
    """Each Linear(s^2 -> 1) pooling equals avg_pool2d at initialisation: the query and t-9 7x7 on the padded
    map, t-6 3x3 and t-3 2x2 after the bilinear resize to 6 * (H / 7) per side."""
    blk = block()
    frames = torch.randn(2, 4, 14, 21, DIM, dtype=torch.float64)
    maps = blk.pooled(frames)
    chw = lambda x: x.permute(0, 3, 1, 2)  # noqa: E731
    expected = [
        F.avg_pool2d(chw(frames[:, -1]), 7),
        F.avg_pool2d(chw(frames[:, 0]), 7),
        F.avg_pool2d(resize(chw(frames[:, 1]), (12, 18)), 3),
        F.avg_pool2d(resize(chw(frames[:, 2]), (12, 18)), 2),
    ]
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(chw(got), want)
    assert [tuple(m.shape[1:3]) for m in maps] == [(2, 3), (2, 3), (4, 6), (6, 9)]


# ------------------------------------------------------------------------------------------------ block
def test_block_returns_the_reference_frames_and_reads_each_of_them():
    """The reference frames come back bit-identical; changing any one of them alone changes the target."""
    blk = block()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 9, 10, DIM, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = blk(x)
        assert torch.equal(out[:, :3], x[:, :3]) and not torch.allclose(out[:, 3], x[:, 3])
        for frame in range(3):
            changed = x.clone()
            changed[:, frame] += torch.randn(9, 10, DIM, generator=gen, dtype=torch.float64)
            other = blk(changed)
            assert torch.equal(other[:, :3], changed[:, :3])
            assert (other[:, 3] - out[:, 3]).abs().max() > 1e-4, frame


def position_bias_reference(blk: CFFMBlock) -> torch.Tensor:
    """``(heads, 49, 289)`` from the tables by explicit offsets: query ``(qi, qj)`` to a window token or to a
    ``k x k`` unfold position ``(di, dj)`` reads ``table[(qi - di + k - 1) * (7 + k - 1) + qj - dj + k - 1]``."""
    bias = torch.zeros(blk.heads, 49, NUM_KEYS, dtype=torch.float64)
    segments = [(blk.window_table, 7, 0)]
    offset = 49 + 132
    for table, kernel in zip(blk.segment_tables, (5, 7, 5, 3), strict=True):
        segments.append((table, kernel, offset))
        offset += kernel * kernel
    for qi in range(7):
        for qj in range(7):
            for table, kernel, start in segments:
                for di in range(kernel):
                    for dj in range(kernel):
                        index = (qi - di + kernel - 1) * (7 + kernel - 1) + qj - dj + kernel - 1
                        bias[:, qi * 7 + qj, start + di * kernel + dj] = table[:, index]
    bias[:, :, 49:181] = blk.neighbour_bias[0]
    return bias


def test_block_equals_attention_over_the_reference_keys():
    """The block's target equals a per-window, per-head float64 attention over the keys and values of
    ``cffm_keys_reference``, with the position bias built from explicit offsets."""
    blk = block(seed=3)
    x = torch.randn(1, 4, 9, 10, DIM, dtype=torch.float64)
    with torch.no_grad():
        frames = F.pad(blk.norm1(x), (0, 0, 0, 4, 0, 5))  # to 14 x 14: 2 x 2 windows
        q, k, v = blk.qkv(frames[:, -1]).chunk(3, dim=-1)
        pooled = [blk.qkv(p).chunk(3, dim=-1) for p in blk.pooled(frames)]
        keys, mask = cffm_keys_reference(k, [p[1] for p in pooled])
        values, _ = cffm_keys_reference(v, [p[2] for p in pooled])
        bias, d = position_bias_reference(blk), DIM // HEADS
        out = torch.zeros(14, 14, DIM, dtype=torch.float64)
        for n in range(4):
            y0, x0 = 7 * (n // 2), 7 * (n % 2)
            queries = q[0, y0 : y0 + 7, x0 : x0 + 7].reshape(49, DIM)
            for h in range(HEADS):
                part = slice(h * d, (h + 1) * d)
                logits = queries[:, part] @ keys[0, n, :, part].T * d**-0.5 + bias[h] + mask[n]
                out[y0 : y0 + 7, x0 : x0 + 7, part] = (logits.softmax(-1) @ values[0, n, :, part]).view(7, 7, d)
        target = x[0, 3] + blk.proj(out[:9, :10])
        target = target + blk.mlp(blk.norm2(target))
        torch.testing.assert_close(blk(x)[0, 3], target)


def test_block_gradcheck():
    torch.manual_seed(0)
    blk = CFFMBlock(4, 2).double()
    x = torch.randn(1, 4, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(blk, (x,), fast_mode=True)


def test_block_refuses_other_frame_counts():
    with pytest.raises(ValueError, match=r"CFFMBlock takes 4 frames \(B, 4, H, W, C\), got shape \(1, 3, 7, 7, 16\)"):
        block()(torch.zeros(1, 3, 7, 7, DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"dim \(16\) must be divisible by heads \(3\)"):
        CFFMBlock(DIM, 3)


# ----------------------------------------------------------------------------------------------- module
def module(**kwargs) -> CFFM:
    torch.manual_seed(0)
    return CFFM(12, 5, **{"dim": DIM, "depth": 1, "heads": HEADS, **kwargs})


def test_module_orders_the_frames_farthest_first_and_returns_both_query_features():
    """Frames are embedded, resized to (int(h/2), int(w/2)) and reversed (t-9 first, the query last); the
    output is cat(x_q, enhanced x_q) at the input size, and the farthest frame changes it."""
    cffm = module().eval()
    feats = torch.randn(2, 4, 12, 15, 18)
    with torch.no_grad():
        frames = cffm.frames(feats)
        assert frames.shape == (2, 4, DIM, 7, 9)
        for i in range(4):
            torch.testing.assert_close(frames[:, i], resize(cffm.embed(feats[:, 3 - i]), (7, 9)))
        out = cffm(feats)
        assert out.shape == (2, 2 * DIM, 15, 18) and cffm.out_channels == 2 * DIM
        torch.testing.assert_close(out[:, :DIM], resize(frames[:, -1], (15, 18)))
        far = feats.clone()
        far[:, 3] = torch.randn(2, 12, 15, 18)
        assert torch.equal(cffm(far)[:, :DIM], out[:, :DIM]) and not torch.allclose(cffm(far)[:, DIM:], out[:, DIM:])


def test_frame_loss_is_half_the_query_cross_entropy():
    cffm = module(dropout=0.0).train()
    feats = torch.randn(2, 4, 12, 14, 18)
    labels = torch.randint(0, 5, (2, 56, 72))
    labels[:, :5] = 255
    cffm(feats)
    (loss,) = cffm.losses(labels).values()
    with torch.no_grad():
        logits = resize(cffm.frame_head(cffm.frames(feats)[:, -1]), (56, 72))
    torch.testing.assert_close(loss, 0.5 * F.cross_entropy(logits, labels, ignore_index=255))
    assert tuple(cffm.losses(labels)) == cffm.loss_terms == ("cffm_frame",)
    cffm.zero_grad()
    cffm(feats)
    ignored = cffm.losses(torch.full_like(labels, 255))["cffm_frame"]
    ignored.backward()
    assert ignored.item() == 0 and all(not p.grad.any() for p in cffm.frame_head.parameters())


def test_module_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"dim \(16\) must be divisible by heads \(3\)"):
        module(heads=3)
    with pytest.raises(ValueError, match=r"depth must be a positive int, got 0"):
        module(depth=0)
    with pytest.raises(ValueError, match=r"feats must be \(B, 4, 12, h, w\) .* got shape \(1, 3, 12, 8, 8\)"):
        module()(torch.zeros(1, 3, 12, 8, 8))
    with pytest.raises(RuntimeError, match="CFFM.losses needs a training forward first"):
        module().losses(torch.zeros(1, 8, 8, dtype=torch.long))

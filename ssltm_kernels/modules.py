"""``nn.Module`` front ends of the ops; each calls the op's public function."""

from __future__ import annotations

import math

import torch
from torch import nn

from ssltm_kernels.ops.dwconv3x3 import dwconv3x3
from ssltm_kernels.ops.soft_region_pool import soft_region_pool
from ssltm_kernels.ops.window_attention_3d import (
    _triple,
    relative_position_index,
    window_attention_3d_qkvpacked,
    window_attention_3d_windows,
)

__all__ = [
    "WindowAttention3D",
    "ShiftedWindowAttention3d",
    "replace_torchvision_attention",
    "DWConv",
    "MixFFN",
    "SpatialGather",
]


class WindowAttention3D(nn.Module):
    """Drop-in for Video Swin's ``WindowAttention3D`` (same constructor, defaults, ``state_dict``).

    ``forward(x, mask=None)`` takes Video Swin's window batches ``(B*nW, N, C)`` with an optional
    ``(nW, N, N)`` mask (additive float, or a bool keep-mask), or whole volumes ``(B, T, H, W, C)``
    (``shift_size=`` keyword), for which padding, shift, window partition and reverse happen inside the
    fused kernel. Padded tokens of a volume are zero vectors before ``qkv``, exactly as in Video Swin's
    block, so they attend as the qkv bias. ``window_size`` is 3 ints or one int (a cube). ``rel_pos_mode``
    and ``backend`` are passed to the op; ``rel_pos_mode="exact"`` needs volumes wherever a window
    shrinks. Both paths hand the op the packed qkv projection, so the backward writes one packed gradient.
    """

    def __init__(
        self,
        dim: int,
        window_size,
        num_heads: int,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        rel_pos_mode: str = "swin",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.window_size = _triple(
            window_size if isinstance(window_size, int) else tuple(window_size), "window_size", minimum=1
        )
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.rel_pos_mode = rel_pos_mode
        self.backend = backend
        table_size = math.prod([2 * w - 1 for w in self.window_size])
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torchvision's Swin3D stores the index flattened; the kernels compute it from coordinates,
        # so a checkpoint whose index differs would silently attend with other biases: refuse it.
        key = prefix + "relative_position_index"
        if key in state_dict:
            state_dict[key] = self._checked_index(state_dict[key], key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _checked_index(self, loaded: torch.Tensor, key: str) -> torch.Tensor:
        """``loaded`` as the ``(N, N)`` relative position index of the window; an error if it is another."""
        expected = relative_position_index(self.window_size, device=loaded.device)
        if loaded.numel() != expected.numel() or not torch.equal(loaded.reshape(expected.shape), expected):
            raise ValueError(
                f"{key} in the checkpoint does not match the relative position index of window "
                f"{self.window_size} (shape {tuple(loaded.shape)})"
            )
        return loaded.reshape(expected.shape)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, shift_size=(0, 0, 0)) -> torch.Tensor:
        """``(B*nW, N, C) -> (B*nW, N, C)`` or ``(B, T, H, W, C) -> (B, T, H, W, C)``."""
        if x.dim() not in (3, 5) or x.shape[-1] != self.dim:
            raise ValueError(
                f"x must be (B*nW, N, {self.dim}) window batches or (B, T, H, W, {self.dim}) volumes, "
                f"got shape {tuple(x.shape)}"
            )
        heads, head_dim = self.num_heads, self.dim // self.num_heads
        qkv = self.qkv(x).unflatten(-1, (3, heads, head_dim))
        dropout_p = self.attn_drop.p if self.training else 0.0
        if x.dim() == 3:
            if any(shift_size):
                raise ValueError("shift_size applies to volumes; window batches take the shift mask as `mask`")
            out = window_attention_3d_windows(
                qkv,
                window_size=self.window_size,
                rel_pos_bias_table=self.relative_position_bias_table,
                scale=self.scale,
                rel_pos_mode=self.rel_pos_mode,
                attn_mask=mask,
                dropout_p=dropout_p,
                backend=self.backend,
            )
        else:
            if mask is not None:
                raise ValueError("mask applies to window batches; volumes build the shift mask from shift_size")
            pad_k = pad_v = None
            if self.qkv.bias is not None:
                pad_k, pad_v = self.qkv.bias.view(3, heads, head_dim)[1:].unbind(0)
            out = window_attention_3d_qkvpacked(
                qkv,
                window_size=self.window_size,
                rel_pos_bias_table=self.relative_position_bias_table,
                shift_size=shift_size,
                scale=self.scale,
                pad_k=pad_k,
                pad_v=pad_v,
                rel_pos_mode=self.rel_pos_mode,
                dropout_p=dropout_p,
                backend=self.backend,
            )
        return self.proj_drop(self.proj(out.flatten(-2)))


class ShiftedWindowAttention3d(WindowAttention3D):
    """Drop-in for torchvision's ``torchvision.models.video.swin_transformer.ShiftedWindowAttention3d``:
    same constructor, ``forward(x (B, T, H, W, C)) -> (B, T, H, W, C)`` and ``state_dict`` keys, run by
    the fused op on the volume (padding, the block's own ``shift_size``, partition and reverse inside the
    kernel). As torchvision does, an axis not larger than the window shrinks the window to it and drops
    its shift, and a shrunk window takes ``relative_position_index[:N, :N]`` (``rel_pos_mode="swin"``).

    :meth:`from_torchvision` takes over one module (its parameters and mode);
    :func:`replace_torchvision_attention` swaps every one of a model. ``backend`` is passed to the op.
    """

    def __init__(
        self,
        dim: int,
        window_size,
        shift_size,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            dim,
            window_size,
            num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attention_dropout,
            proj_drop=dropout,
            backend=backend,
        )
        self.shift_size = _triple(shift_size if isinstance(shift_size, int) else tuple(shift_size), "shift_size")
        if any(s >= w for s, w in zip(self.shift_size, self.window_size, strict=True)):
            raise ValueError(
                f"shift_size must satisfy 0 <= shift < window per axis, got {self.shift_size} for "
                f"window_size {self.window_size}"
            )
        if not proj_bias:
            self.proj = nn.Linear(dim, dim, bias=False)

    @property
    def attention_dropout(self) -> float:
        return self.attn_drop.p

    @attention_dropout.setter
    def attention_dropout(self, p: float) -> None:
        self.attn_drop.p = p

    @property
    def dropout(self) -> float:
        return self.proj_drop.p

    @dropout.setter
    def dropout(self, p: float) -> None:
        self.proj_drop.p = p

    @classmethod
    def from_torchvision(cls, module: nn.Module, *, backend: str | None = None) -> ShiftedWindowAttention3d:
        """This module in place of torchvision's ``ShiftedWindowAttention3d`` ``module``: its configuration,
        train/eval mode and its own ``qkv``, ``proj`` and ``relative_position_bias_table`` (the same
        parameters, so an optimizer built on the model goes on training them)."""
        with torch.device("meta"):  # nothing to initialise: the weights are module's
            new = cls(
                module.qkv.in_features,
                tuple(module.window_size),
                tuple(module.shift_size),
                module.num_heads,
                qkv_bias=module.qkv.bias is not None,
                proj_bias=module.proj.bias is not None,
                attention_dropout=module.attention_dropout,
                dropout=module.dropout,
                backend=backend,
            )
        new.qkv, new.proj = module.qkv, module.proj
        new.relative_position_bias_table = module.relative_position_bias_table
        new.relative_position_index = new._checked_index(module.relative_position_index, "relative_position_index")
        return new.train(module.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, H, W, C) -> (B, T, H, W, C)``."""
        if x.dim() != 5:
            raise ValueError(f"x must be (B, T, H, W, {self.dim}) volumes, got shape {tuple(x.shape)}")
        return super().forward(x, shift_size=self.shift_size)

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}, num_heads={self.num_heads}"


def replace_torchvision_attention(model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Swap every torchvision ``ShiftedWindowAttention3d`` in ``model`` (e.g. each block's ``attn`` of
    ``torchvision.models.video.swin3d_t``) for :class:`ShiftedWindowAttention3d` with the same shift,
    parameters (the same tensors) and mode, in place; returns ``model``. Raises ``ValueError`` when there is none."""
    from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d as TorchvisionAttention

    targets = [(name, m) for name, m in model.named_modules() if name and type(m) is TorchvisionAttention]
    if not targets:
        raise ValueError(
            f"model ({type(model).__name__}) holds no torchvision ShiftedWindowAttention3d submodule "
            "(convert a single one with ShiftedWindowAttention3d.from_torchvision)"
        )
    for name, module in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, ShiftedWindowAttention3d.from_torchvision(module, backend=backend))
    return model


def _check_layout(x: torch.Tensor, dim: int, H: int | None, W: int | None) -> None:
    """Tokens ``(B, H*W, dim)`` with H and W, or channels-last ``(B, [T,] H, W, dim)`` without them."""
    if (H is None) != (W is None):
        raise ValueError(f"give both H and W (tokens) or neither (channels-last frames), got H={H}, W={W}")
    if H is not None:
        if x.dim() != 3 or x.shape[1] != H * W or x.shape[2] != dim:
            raise ValueError(
                f"x must be (B, N = H*W = {H * W}, {dim}) tokens for H={H}, W={W}, got shape {tuple(x.shape)}"
            )
    elif x.dim() not in (4, 5) or x.shape[-1] != dim:
        raise ValueError(
            f"x must be (B, H, W, {dim}) or (B, T, H, W, {dim}) channels-last (or tokens with H and W),"
            f" got shape {tuple(x.shape)}"
        )


class DWConv(nn.Module):
    """SegFormer's ``DWConv``: a depthwise ``nn.Conv2d(dim, dim, 3, padding=1, groups=dim)`` named ``dwconv``
    (so ``state_dict`` keys match), run by :func:`~ssltm_kernels.dwconv3x3` on channels-last input.

    ``forward(x, H, W)`` takes SegFormer's tokens ``(B, N = H*W, C)``; ``forward(x)`` takes ``(B, H, W, C)``
    or ``(B, T, H, W, C)``. ``activation="gelu"`` fuses the GELU that follows it in the Mix-FFN."""

    def __init__(self, dim: int = 768, *, backend: str | None = None) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)
        self.backend = backend

    def forward(
        self, x: torch.Tensor, H: int | None = None, W: int | None = None, *, activation: str | None = None
    ) -> torch.Tensor:
        dim = self.dwconv.out_channels
        _check_layout(x, dim, H, W)
        if H is not None:
            frames = x.unflatten(1, (H, W))
            return dwconv3x3(frames, self.dwconv.weight, self.dwconv.bias, activation, self.backend).flatten(1, 2)
        return dwconv3x3(x, self.dwconv.weight, self.dwconv.bias, activation, self.backend)


class MixFFN(nn.Module):
    """SegFormer's Mix-FFN (``Mlp`` with ``DWConv``): fc1 -> depthwise 3x3 conv -> GELU -> dropout -> fc2 ->
    dropout, same constructor, initialisation and ``state_dict`` keys (``fc1``, ``dwconv.dwconv``, ``fc2``).

    The conv and the GELU run as one fused op (:func:`~ssltm_kernels.dwconv3x3` with ``activation="gelu"``)
    on the channels-last output of fc1, without permuted copies. ``forward(x, H, W)`` takes SegFormer's
    tokens ``(B, N = H*W, C)`` (row-major over H, W); ``forward(x)`` takes volumes ``(B, T, H, W, C)`` (the
    conv runs on every frame) or frames ``(B, H, W, C)``. The result has x's layout with ``out_features``
    channels. ``backend`` is passed to the op."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        drop: float = 0.0,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features, backend=backend)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)
        self.apply(self._init_weights)

    @property
    def backend(self) -> str | None:
        return self.dwconv.backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self.dwconv.backend = value

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # SegFormer's Mlp._init_weights
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, H: int | None = None, W: int | None = None) -> torch.Tensor:
        """tokens ``(B, N, C_in)`` with H, W -> ``(B, N, C_out)``;
        ``(B, [T,] H, W, C_in)`` -> ``(B, [T,] H, W, C_out)``."""
        _check_layout(x, self.fc1.in_features, H, W)
        x = self.dwconv(self.fc1(x), H, W, activation="gelu")
        return self.drop(self.fc2(self.drop(x)))


class SpatialGather(nn.Module):
    """OCRNet's ``SpatialGather_Module`` (mmsegmentation's ``SpatialGatherModule``): the object region
    representations of OCR, one feature vector per class.

    ``forward(feats (B, C, H, W), logits (B, K, H, W)) -> (B, C, K, 1)``: ``softmax(scale * logits)`` over
    the H*W positions of each class weighs the feature vectors (:func:`soft_region_pool`, whose ``(B, K, C)``
    result is returned as a ``(B, C, K, 1)`` view). ``backend`` is passed to the op. No parameters.
    """

    def __init__(self, scale: float = 1.0, *, backend: str | None = None) -> None:
        super().__init__()
        self.scale = scale
        self.backend = backend

    def forward(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``feats (B, C, H, W)``, ``logits (B, K, H, W)`` -> ``(B, C, K, 1)``."""
        return soft_region_pool(logits, feats, self.scale, self.backend).transpose(1, 2).unsqueeze(3)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"

"""Feature extraction trunks: torchvision's ResNet (paper §4.1.2) or Swin-S (supplementary Table 1) without its
classifier, four levels at strides 4..32; :func:`build_trunk` builds the one a backbone name gives."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torchvision import models

from .checkpointing import checkpointing_now, recomputed

# name -> (torchvision builder, channels of C2..C5)
RESNETS: dict[str, tuple[Callable[..., models.ResNet], tuple[int, int, int, int]]] = {
    "resnet18": (models.resnet18, (64, 128, 256, 512)),
    "resnet50": (models.resnet50, (256, 512, 1024, 2048)),
    "resnet101": (models.resnet101, (256, 512, 1024, 2048)),
}
SWIN_S = "swin_s"
SWIN_CHANNELS = (96, 192, 384, 768)  # Swin-S's widths at strides 4, 8, 16, 32 (dim 96, doubled per stage)
SWIN_S_DEPTHS = (2, 2, 18, 2)  # Swin-S's blocks per stage
BACKBONES = (*RESNETS, SWIN_S)  # the names model.backbone / SSLTM(backbone=...) take
# torchvision's weight files carry the start of their SHA-256 in their names: resnet101-63fe2227.pth
NAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")


@dataclass(frozen=True)
class PretrainedSource:
    """The file a backbone's ImageNet weights were loaded from.

    ``sha256`` is the digest of the file's bytes; ``name_hash`` the hex digits torchvision's file names carry
    after the last ``-`` (the start of that digest: ``resnet101-63fe2227.pth``), ``None`` when the name has none.
    """

    path: str
    sha256: str
    name_hash: str | None

    @property
    def prefix(self) -> str:
        """The first 8 hex digits of the SHA-256, as torchvision's file names give them."""
        return self.sha256[:8]

    def describe(self) -> str:
        return f"backbone ImageNet weights: {self.path} (SHA-256 {self.prefix}...)"

    def mismatch(self) -> str | None:
        """What is wrong when the file name gives a hash that does not start the content's SHA-256, else None."""
        if self.name_hash is None or self.sha256.startswith(self.name_hash):
            return None
        return (
            f"the name of {self.path} gives the hash {self.name_hash} but its content hashes to {self.prefix}...: "
            "not the file torchvision publishes under that name (an incomplete download or another file renamed)"
        )

    def as_dict(self) -> dict[str, str | None]:
        return {"path": self.path, "sha256": self.sha256, "name_hash": self.name_hash}


class ResNetTrunk(nn.Module):
    """torchvision's ResNet-18/50/101 up to ``layer4``: ``(N, 3, H, W)`` -> C2..C5 at strides 4, 8, 16, 32.

    The modules are torchvision's own (same attribute names, so ``state_dict`` keys are torchvision's
    without ``fc.*``). ``pretrained`` is a local path to a torchvision ImageNet checkpoint (the state dict
    torchvision's weights download, e.g. ``resnet101-63fe2227.pth``); it is loaded as it is, strictly,
    into the full torchvision model before the classifier is dropped. Nothing is downloaded.
    ``pretrained_source`` records that file and its SHA-256 (:class:`PretrainedSource`; ``None`` without one).

    ``dilated``: ``layer3`` and ``layer4`` dilate their convolutions instead of striding (torchvision's
    ``replace_stride_with_dilation=[False, True, True]``, the dilated FCN/OCRNet trunk): C2..C5 at strides
    4, 8, 8, 8 (``strides``), the same parameters, so the same checkpoint loads. Bottleneck ResNets only
    (torchvision's ResNet-18 blocks have no dilation).

    ``checkpointing``: in training, the stem and each of ``layer1..layer4`` recompute their activations in the
    backward instead of keeping them (:mod:`ssltm.model.checkpointing`); the outputs and gradients are those
    without it.
    """

    def __init__(
        self,
        name: str = "resnet101",
        pretrained: str | os.PathLike | None = None,
        checkpointing: bool = False,
        dilated: bool = False,
    ) -> None:
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"backbone must be one of {tuple(RESNETS)}, got {name!r}")
        build, self.channels = RESNETS[name]
        if dilated and name == "resnet18":
            raise ValueError(
                "dilated=True needs a bottleneck ResNet (resnet50, resnet101): resnet18's blocks have none"
            )
        self.strides = (4, 8, 8, 8) if dilated else (4, 8, 16, 32)
        # pretrained_source: where the weights came from, for the training log and the checkpoint
        resnet, self.pretrained_source = load_torchvision_model(
            lambda: build(weights=None, replace_stride_with_dilation=[False, dilated, dilated]), name, pretrained
        )
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(N, 3, H, W)`` -> ``[(N, C_i, ceil(H / s), ceil(W / s)) for s in self.strides]`` (sizes rounded as
        the strided convolutions round)."""
        checkpointed = self.checkpointing and checkpointing_now(self)
        x = recomputed(self.stem, x, norms=self.bn1) if checkpointed else self.stem(x)
        levels = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = recomputed(layer, x) if checkpointed else layer(x)
            levels.append(x)
        return levels

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 -> bn1 -> ReLU -> max pool: ``(N, 3, H, W)`` -> ``(N, 64, ceil(H / 4), ceil(W / 4))``."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class SwinTrunk(nn.Module):
    """torchvision's Swin-S (Liu et al. 2021; patch 4, dim 96, depths 2-2-18-2, heads 3-6-12-24, window 7) as a
    dense trunk: ``(N, 3, H, W)`` -> four levels of 96, 192, 384, 768 channels at strides 4, 8, 16, 32.

    ``features`` is torchvision's module (its ``state_dict`` keys); the output of each stage (``features[1]``,
    ``[3]``, ``[5]``, ``[7]``, channels last) goes through its own LayerNorm ``norms.{0..3}`` (torchvision's
    classifier has one final norm instead; mmsegmentation's Swin has these four) and is returned channels
    first. The input is zero-padded at the bottom and right to a multiple of 4 (the patch embedding's stride)
    so that the sizes are ResNet's, ``ceil(H / s)``: torchvision alone floors the first one (97 x 131 gives
    24 x 32 .. 3 x 4 instead of 25 x 33 .. 4 x 5; its patch merging already rounds up).

    ``pretrained``: a local torchvision ImageNet state dict of ``swin_s`` (``Swin_S_Weights.IMAGENET1K_V1``),
    loaded as it is, strictly, into the full torchvision model before its final norm and classifier are
    dropped (the out-norms start as LayerNorm's identity). Nothing is downloaded. ``pretrained_source`` records
    the file (:class:`PretrainedSource`). Stochastic depth (drop path) rises linearly over the 24 blocks
    from 0 to Swin-S's 0.3.

    ``checkpointing``: in training, each of the four stages (with the patch embedding or merging before it)
    recomputes its activations in the backward instead of keeping them (the stochastic-depth draws are
    replayed); outputs and gradients are those without it.

    ``depths``: blocks per stage (Swin-S's 2-2-18-2). Fewer give the same modules at Swin-S's widths, heads and
    window, at a fraction of the cost (the reduced models of ``python -m ssltm.smoke --reduced``); Swin-S's
    checkpoint fits only its own depths.
    """

    channels = SWIN_CHANNELS
    strides = (4, 8, 16, 32)

    def __init__(
        self,
        pretrained: str | os.PathLike | None = None,
        checkpointing: bool = False,
        depths: Sequence[int] = SWIN_S_DEPTHS,
    ) -> None:
        super().__init__()
        depths = tuple(depths)
        if len(depths) != 4 or not all(isinstance(d, int) and d >= 1 for d in depths):
            raise ValueError(f"depths must be 4 positive ints (blocks per stage), got {depths}")

        def build() -> models.SwinTransformer:
            if depths == SWIN_S_DEPTHS:
                return models.swin_s(weights=None)  # torchvision's swin_s fixes Swin-S's stochastic depth, 0.3
            return models.SwinTransformer(
                patch_size=[4, 4],
                embed_dim=SWIN_CHANNELS[0],
                depths=list(depths),
                num_heads=[3, 6, 12, 24],
                window_size=[7, 7],
                stochastic_depth_prob=0.3,
            )

        swin, self.pretrained_source = load_torchvision_model(build, SWIN_S, pretrained)
        self.features = swin.features
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(N, 3, H, W)`` -> ``[(N, C_i, ceil(H / s), ceil(W / s)) for s in (4, 8, 16, 32)]``."""
        checkpointed = self.checkpointing and checkpointing_now(self)
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % 4, 0, -h % 4))
        levels = []
        for i, norm in enumerate(self.norms):
            stage = self.features[2 * i : 2 * i + 2]  # patch embedding / merging, then the stage's blocks
            x = recomputed(stage, x) if checkpointed else stage(x)
            levels.append(norm(x).permute(0, 3, 1, 2).contiguous())
        return levels


def build_trunk(
    name: str,
    pretrained: str | os.PathLike | None = None,
    checkpointing: bool = False,
    dilated: bool = False,
    depths: Sequence[int] | None = None,
) -> ResNetTrunk | SwinTrunk:
    """The trunk of backbone ``name`` (one of ``BACKBONES``): :class:`ResNetTrunk` or :class:`SwinTrunk`; both
    give ``channels`` and ``strides`` of their four levels. ``dilated`` (C5 at stride 8) is a ResNet's only:
    a ValueError for Swin-S, whose levels a decoder resizes itself. ``depths`` (None: the backbone's own) are
    Swin-S's blocks per stage (:class:`SwinTrunk`); a ValueError for a ResNet."""
    if name == SWIN_S:
        if dilated:
            raise ValueError(f"dilated=True applies to the ResNets only, not backbone {SWIN_S!r}")
        return SwinTrunk(pretrained, checkpointing, SWIN_S_DEPTHS if depths is None else depths)
    if name not in RESNETS:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    if depths is not None:
        raise ValueError(f"backbone_depths applies to {SWIN_S!r} only, not backbone {name!r}")
    return ResNetTrunk(name, pretrained, checkpointing, dilated)


def load_torchvision_model(
    build: Callable[[], nn.Module], name: str, path: str | os.PathLike | None
) -> tuple[nn.Module, PretrainedSource | None]:
    """``build()``, a torchvision model ``name``, with the state dict of the local file ``path`` loaded into it
    strictly, and the file's path and SHA-256 (``None`` without a file; a file whose name gives another hash
    still loads: the caller reports it).

    The file's keys and shapes are compared with the model's (built on the meta device, at no cost) before the
    model is built: a file that does not fit is a ValueError naming it and the first mismatched key (missing,
    of another shape, or not the model's).
    """
    from ..checkpoint import state_dict_mismatches  # ssltm.checkpoint imports the config, which imports the model

    if path is None:
        return build(), None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained checkpoint {os.fspath(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"pretrained checkpoint {os.fspath(path)!r} is not a state dict (got {type(state).__name__})")
    with torch.device("meta"):
        expected = build().state_dict()
    mismatches = state_dict_mismatches(expected, state)
    if mismatches:
        more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
        raise ValueError(
            f"pretrained checkpoint {os.fspath(path)!r} does not fit torchvision's {name}: {mismatches[0]}{more}"
        )
    model = build()
    model.load_state_dict(state)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    named = NAME_HASH.search(os.path.basename(path))
    return model, PretrainedSource(os.fspath(path), digest.hexdigest(), named[1] if named else None)


def swin_from_microsoft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Microsoft's Swin checkpoint (``swin_small_patch4_window7_224.pth``, ``{"model": state dict}``, or the
    state dict itself) with torchvision's key names, a state dict ``SwinTrunk(pretrained=...)`` loads
    (``scripts/convert_swin_weights.py`` writes it to a file).

    The layers are the same (the qkv layout, the relative position table and index, the order of the four
    neighbours a patch merging concatenates); only names and two buffers differ: ``patch_embed.proj/norm`` ->
    ``features.0.0/0.2``, ``layers.i.blocks.j`` -> ``features.{2i+1}.j`` (``mlp.fc1/fc2`` -> ``mlp.0/mlp.3``),
    ``layers.i.downsample`` -> ``features.{2i+2}``, ``norm`` and ``head`` as they are; ``relative_position_index``
    (49, 49) is flattened to torchvision's (2401,), and the shifted blocks' ``attn_mask`` buffers (for 224 x 224
    inputs; torchvision builds the mask for each input size) are dropped. A key of another layout is a
    ValueError naming it.
    """
    state = state.get("model", state)
    converted = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"Microsoft's Swin state dict holds tensors only, got {type(value).__name__} at {key!r}")
        if key.endswith(".attn_mask"):
            continue
        block = re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", key)
        merging = re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key)
        if block:
            rest = block[3].replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3.")
            name = f"features.{2 * int(block[1]) + 1}.{block[2]}.{rest}"
        elif merging:
            name = f"features.{2 * int(merging[1]) + 2}.{merging[2]}"
        elif key.startswith(("patch_embed.proj.", "patch_embed.norm.")):
            name = key.replace("patch_embed.proj.", "features.0.0.").replace("patch_embed.norm.", "features.0.2.")
        elif key.startswith(("norm.", "head.")):
            name = key
        else:
            raise ValueError(f"{key!r} is not a key of Microsoft's Swin (patch_embed, layers, norm, head)")
        converted[name] = value.flatten() if key.endswith(".relative_position_index") else value
    return converted


def pretrained_source(model: nn.Module) -> PretrainedSource | None:
    """Where the ImageNet weights of ``model``'s trunk came from (``None``: none loaded)."""
    return next((m.pretrained_source for m in model.modules() if isinstance(m, (ResNetTrunk, SwinTrunk))), None)

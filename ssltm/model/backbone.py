"""Feature extraction trunk: torchvision's ResNet without its classifier (paper §4.1.2)."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision import models

from .checkpointing import checkpointing_now, recomputed

# name -> (torchvision builder, channels of C2..C5)
RESNETS: dict[str, tuple[Callable[..., models.ResNet], tuple[int, int, int, int]]] = {
    "resnet18": (models.resnet18, (64, 128, 256, 512)),
    "resnet50": (models.resnet50, (256, 512, 1024, 2048)),
    "resnet101": (models.resnet101, (256, 512, 1024, 2048)),
}
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

    ``checkpointing``: in training, the stem and each of ``layer1..layer4`` recompute their activations in the
    backward instead of keeping them (:mod:`ssltm.model.checkpointing`); the outputs and gradients are those
    without it.

    ``dilated``: ``layer3`` and ``layer4`` dilate their convolutions instead of striding (torchvision's
    ``replace_stride_with_dilation=[False, True, True]``, the dilated FCN/OCRNet trunk): C2..C5 at strides
    4, 8, 8, 8 (``strides``), the same parameters, so the same checkpoint loads. Bottleneck ResNets only
    (torchvision's ResNet-18 blocks have no dilation).
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
            raise ValueError("dilated=True needs a bottleneck ResNet (resnet50, resnet101), not resnet18")
        self.strides = (4, 8, 8, 8) if dilated else (4, 8, 16, 32)
        resnet = build(weights=None, replace_stride_with_dilation=[False, dilated, dilated])
        # where the weights came from, for the training log and the checkpoint (the model prints nothing)
        self.pretrained_source = None if pretrained is None else load_torchvision_checkpoint(resnet, pretrained)
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


def load_torchvision_checkpoint(resnet: models.ResNet, path: str | os.PathLike) -> PretrainedSource:
    """Load a torchvision ResNet state dict from ``path`` into ``resnet`` (strict: every key must match); return
    the file's path and SHA-256 (a file whose name gives another hash still loads: the caller reports it)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained checkpoint {os.fspath(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"pretrained checkpoint {os.fspath(path)!r} is not a state dict (got {type(state).__name__})")
    try:
        resnet.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"pretrained checkpoint {os.fspath(path)!r} does not fit torchvision's "
            f"{type(resnet).__name__} of this depth: {error}"
        ) from error
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    named = NAME_HASH.search(os.path.basename(path))
    return PretrainedSource(os.fspath(path), digest.hexdigest(), named[1] if named else None)


def pretrained_source(model: nn.Module) -> PretrainedSource | None:
    """Where the ImageNet weights of ``model``'s ResNet trunk came from (``None``: none loaded)."""
    return next((m.pretrained_source for m in model.modules() if isinstance(m, ResNetTrunk)), None)

"""From a run configuration to the objects a run uses: datasets, their classes and colours, and the model
(built afresh, or from a checkpoint)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import data as D
from .checkpoint import load_checkpoint, load_weights
from .config import ConfigError, crop_size, load_config
from .metrics import load_raft
from .model import SSLTM
from .visualize import make_palette

HOLDOUT = "holdout"  # split name of the frames data.holdout keeps out of training

CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
)  # fmt: skip
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
# VSPW ships its class names as {"others": 0, "wall": 1, ...}: raw id k is class k - 1.
VSPW_CLASS_FILE = "label_num_dic_final.json"


@dataclass(frozen=True)
class DatasetInfo:
    """What a checkpoint records about its classes: their number, names and display colours."""

    num_classes: int
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]

    def as_dict(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "palette": [list(c) for c in self.palette],
        }


def dataset_info(cfg: DictConfig) -> DatasetInfo:
    """Class count, names and palette of ``cfg.data.dataset``."""
    name = cfg.data.dataset
    if name == "camvid":
        return DatasetInfo(D.CamVid.num_classes, CAMVID_CLASSES, CAMVID_PALETTE)
    if name == "cityscapes":
        return DatasetInfo(D.CityscapesSequence.num_classes, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE)
    if name == "vspw":
        k = D.VSPW.num_classes
        return DatasetInfo(k, _vspw_class_names(Path(cfg.data.root), k), tuple(make_palette(k)))
    k = cfg.data.synthetic.num_classes
    return DatasetInfo(k, tuple(f"class_{i}" for i in range(k)), tuple(make_palette(k)))


def _vspw_class_names(root: Path, num_classes: int) -> tuple[str, ...]:
    names = [f"class_{k}" for k in range(num_classes)]
    for candidate in (root / "VSPW_480p" / VSPW_CLASS_FILE, root / VSPW_CLASS_FILE):
        if candidate.is_file():
            for name, raw in json.loads(candidate.read_text()).items():
                if 1 <= int(raw) <= num_classes:
                    names[int(raw) - 1] = name
            break
    return tuple(names)


def build_dataset(cfg: DictConfig, split: str, train: bool) -> tuple[D.ClipDataset, list[int]]:
    """The clips of ``split`` and the indices of the ones to use.

    ``train=True``: the training pipeline (random scale, crop and flip; a random reference frame);
    ``train=False``: evaluation (full frames, resized to ``data.eval_size`` if set; the farthest frame
    as the reference). Splits: a dataset's own split names; with ``data.holdout`` set, the training
    split loses its held-out frames and ``"holdout"`` names them; for ``"synthetic"``, ``"train"`` and
    ``"val"`` (the last ``data.synthetic.val_videos`` videos).

    Raises:
        ConfigError: an unknown split; FileNotFoundError from the dataset for a missing folder.
    """
    data = cfg.data
    if train:
        transform = D.train_transform(crop_size(cfg), tuple(data.scale_range))
    else:
        transform = D.eval_transform(data.eval_size)
    common = {
        "offsets": tuple(data.offsets),
        "reference": "random" if train else "farthest",
        "transform": transform,
    }
    if data.dataset == "synthetic":
        return _synthetic(cfg, split, common)
    if split == HOLDOUT:
        if data.holdout is None:
            raise ConfigError(f"split {HOLDOUT!r} needs data.holdout (the fraction of each video to hold out)")
        dataset = _file_dataset(cfg, data.train_split, common)
        D.hold_out(dataset, data.holdout, "holdout")
    else:
        dataset = _file_dataset(cfg, split, common)
        if data.holdout is not None and split == data.train_split:
            D.hold_out(dataset, data.holdout, "train")
    return dataset, list(range(len(dataset)))


def _file_dataset(cfg: DictConfig, split: str, common: dict) -> D.ClipDataset:
    data = cfg.data
    seed = cfg.train.seed
    if data.dataset == "camvid":
        return D.CamVid(data.root, split, seed=seed, **common)
    if data.dataset == "cityscapes":
        return D.CityscapesSequence(data.root, split, seed=seed, **common)
    return D.VSPW(data.root, split, mode=data.mode, seed=seed, **common)


def _synthetic(cfg: DictConfig, split: str, common: dict) -> tuple[D.ClipDataset, list[int]]:
    s = cfg.data.synthetic
    if split not in ("train", "val"):
        raise ConfigError(f"the synthetic dataset has splits 'train' and 'val', got {split!r}")
    size = s.size if isinstance(s.size, int) else tuple(s.size)
    dataset = D.SyntheticVideos(
        num_videos=s.num_videos,
        num_frames=s.num_frames,
        size=size,
        num_classes=s.num_classes,
        seed=s.seed,
        objects=tuple(s.objects),
        **common,
    )
    # Held-out videos come from the same seed: the seed also fixes every class's appearance.
    first_val = (s.num_videos - s.val_videos) * s.num_frames
    indices = range(first_val) if split == "train" else range(first_val, len(dataset))
    return dataset, list(indices)


def build_model(cfg: DictConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    """The SSLTM of ``cfg.model`` for ``num_classes`` classes.

    ``pretrained=False`` skips ``model.pretrained`` (the weights will come from a checkpoint).
    """
    m = cfg.model
    weights = m.pretrained if pretrained else None
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"model.pretrained: no checkpoint file at {weights}")
    kwargs = OmegaConf.to_container(m.kwargs, resolve=True)
    try:
        return SSLTM(
            num_classes,
            backbone=m.backbone,
            pretrained=weights,
            use_stt=m.use_stt,
            use_rfce=m.use_rfce,
            use_gcc=m.use_gcc,
            context=m.context,
            checkpointing=m.checkpointing,
            num_adjacent=len(cfg.data.offsets),
            **kwargs,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model settings (model.*, model.kwargs {kwargs}) rejected by SSLTM: {err}") from err


def load_model(
    checkpoint: str | Path,
    device: torch.device,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
):
    """The model of a checkpoint, its config and its meta (classes, palette), in eval mode on ``device``.

    The config is the one stored in the checkpoint, with the keys of the YAML file ``config`` and then
    ``overrides`` (``key=value``) over it.
    """
    ckpt = load_checkpoint(checkpoint)
    cfg = load_config(config, overrides, base=ckpt["config"])
    return model_from_checkpoint(cfg, ckpt, checkpoint).to(device).eval(), cfg, ckpt["meta"]


def model_from_checkpoint(cfg: DictConfig, ckpt: dict, path: str | Path) -> nn.Module:
    """The model of ``cfg`` with the weights of ``ckpt``, the checkpoint read from ``path`` (which errors name).

    Raises:
        ValueError: the weights do not fit the model (naming the config keys that differ from the checkpoint's).
    """
    model = build_model(cfg, ckpt["meta"]["num_classes"], pretrained=False)
    load_weights(model, ckpt, path, OmegaConf.to_container(cfg))
    return model


def eval_options(cfg: DictConfig) -> dict:
    """:func:`~ssltm.evaluate.evaluate`'s keyword arguments for TC and mVC from the config's ``eval`` section.

    With ``eval.flow: raft`` the weights file is loaded once here, so that a missing or wrong file is
    reported under its config key before any training or evaluation starts.

    Raises:
        ConfigError: ``eval.raft_weights`` names no file, or not a state dict of torchvision's raft_large.
    """
    e = cfg.eval
    if e.tc and e.flow == "raft":
        try:
            load_raft(e.raft_weights)
        except (OSError, ValueError) as err:
            raise ConfigError(f"eval.raft_weights = {e.raft_weights}: {err}") from None
    return {
        "mvc_lengths": tuple(e.mvc),
        "tc": e.tc,
        "tc_protocol": e.tc_protocol,
        "flow": e.flow,
        "raft_weights": e.raft_weights,
        "tc_videos": e.tc_videos,
    }

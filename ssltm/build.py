"""From a run configuration to the objects a run uses: datasets, their classes and colours, and the model
(built afresh, or from a checkpoint)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import data as D
from .checkpoint import load_checkpoint, load_weights
from .config import ConfigError, crop_size, load_config, require_unlabeled_frames, short_term
from .flow import DisFlowProvider, FlowProvider, load_raft, make_flow_provider
from .model import SSLTM
from .visualize import make_palette

HOLDOUT = "holdout"  # split name of the frames data.holdout keeps out of training


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
    """Class count, names and palette of ``cfg.data.dataset``: its class's ``metainfo(cfg)``, the palette
    :func:`~ssltm.visualize.make_palette`'s where it gives none.

    Raises:
        ValueError: ``data.dataset`` names no class (see :func:`ssltm.data.dataset_class`), or its metainfo is
            not a non-empty list of class names and (optionally) one RGB triple per class.
    """
    name = cfg.data.dataset
    meta = D.dataset_class(name).metainfo(cfg)
    classes = meta.get("classes") if isinstance(meta, dict) else None
    if isinstance(classes, str) or not (
        isinstance(classes, Sequence) and classes and all(isinstance(c, str) for c in classes)
    ):
        raise ValueError(
            f"data.dataset {name!r}: metainfo 'classes' must be a non-empty sequence of names, got {classes!r}"
        )
    k = len(classes)
    palette = meta.get("palette") or make_palette(k)
    if len(palette) != k or any(len(c) != 3 or not all(0 <= int(v) <= 255 for v in c) for c in palette):
        raise ValueError(f"data.dataset {name!r}: metainfo 'palette' must hold one (r, g, b) in 0..255 per class ({k})")
    return DatasetInfo(k, tuple(classes), tuple(tuple(int(v) for v in c) for c in palette))


def build_dataset(
    cfg: DictConfig,
    split: str,
    train: bool,
    labels: bool = True,
    strong_reference: bool = False,
    strong_frames: bool = False,
) -> tuple[D.ClipDataset, list[int]]:
    """The clips of ``split`` and the indices of the ones to use.

    ``train=True``: the training pipeline (random scale, crop and flip; a random reference frame);
    ``train=False``: evaluation (full frames, resized to ``data.eval_size`` if set; the farthest frame
    as the reference). Splits: a dataset's own split names; with ``data.holdout`` set, the training
    split loses its held-out frames and ``"holdout"`` names them; for ``"synthetic"``, ``"train"`` and
    ``"val"`` (the last ``data.synthetic.val_videos`` videos). ``labels=False``: every frame of the split is a
    query and no label is read (prediction of a split without labels). ``data.flow_in_loader``: samples carry
    ``"flow"`` (OpenCV DIS, :class:`~ssltm.flow.DisFlowProvider`). ``strong_reference``: samples carry
    ``"reference_strong"``; ``strong_frames``: ``"frames_strong"`` and ``"reference_strong"``, one distortion of the
    whole clip (see :class:`~ssltm.data.ClipDataset`).

    Raises:
        ConfigError: split ``"holdout"`` without ``data.holdout``, or ``data.holdout`` on a dataset that is not
            made of files. ValueError: ``data.dataset`` names no class, or one whose constructor does not take
            the arguments (see :meth:`ssltm.data.ClipDataset.from_config`), or an unknown split.
            FileNotFoundError from the dataset for a missing folder.
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
        "labels": labels,
        **({"strong_reference": True} if strong_reference else {}),
        **({"strong_frames": True} if strong_frames else {}),
    }
    if split == HOLDOUT:
        if data.holdout is None:
            raise ConfigError(f"split {HOLDOUT!r} needs data.holdout (the fraction of each video to hold out)")
        dataset = _held_out(_dataset(cfg, data.train_split, common), data.holdout, "holdout")
    else:
        dataset = _dataset(cfg, split, common)
        if data.holdout is not None and split == data.train_split:
            _held_out(dataset, data.holdout, "train")
    if data.flow_in_loader:
        dataset.flow_provider = DisFlowProvider()
    return dataset, list(range(len(dataset)))


def build_unlabeled_dataset(
    cfg: DictConfig, strong_reference: bool = False, strong_frames: bool = False
) -> D.UnlabeledClips:
    """The unlabelled clips of the training split (:class:`~ssltm.data.UnlabeledClips` of :func:`build_dataset`'s
    training set: the same augmentation, held-out frames left out), with the strong views asked for.

    Raises:
        ConfigError: naming ``data.dataset`` and ``data.mode``, the training split has no unlabelled frames.
    """
    require_unlabeled_frames(cfg, "unlabelled clips")
    dataset, _ = build_dataset(
        cfg, cfg.data.train_split, train=True, strong_reference=strong_reference, strong_frames=strong_frames
    )
    try:
        return D.UnlabeledClips(dataset)
    except ValueError as err:
        raise ConfigError(
            f"data.dataset {cfg.data.dataset!r} (data.mode {cfg.data.mode!r}), split {cfg.data.train_split!r}: {err}"
        ) from None


def _dataset(cfg: DictConfig, split: str, common: dict) -> D.ClipDataset:
    return D.dataset_class(cfg.data.dataset).from_config(cfg, split, **common)


def _held_out(dataset: D.ClipDataset, fraction: float, part: str) -> D.ClipDataset:
    if not isinstance(dataset, D.FileClipDataset):
        raise ConfigError(f"data.holdout needs a dataset of files (a FileClipDataset), not {type(dataset).__name__}")
    return D.hold_out(dataset, fraction, part)


def build_model(cfg: DictConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    """The SSLTM of ``cfg.model`` for ``num_classes`` classes, its decoder ``model.decoder``, its short-term module
    ``model.short_term`` (with ``model.netwarp`` / ``model.st_ocr`` / ``model.cffm`` as its arguments; with the
    ocrnet decoder ``model.st_ocr.memory`` alone) and, when that module reads optical
    flow, the flow provider of ``model.flow`` (:func:`build_flow_provider`) attached.

    ``pretrained=False`` skips ``model.pretrained`` (the weights will come from a checkpoint).
    """
    m = cfg.model
    weights = m.pretrained if pretrained else None
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"model.pretrained: no checkpoint file at {weights}")
    kwargs = OmegaConf.to_container(m.kwargs, resolve=True)
    name = short_term(cfg)
    module_args = OmegaConf.to_container(m[name], resolve=True) if name in ("netwarp", "st_ocr", "cffm") else {}
    if m.decoder == "ocrnet" and name == "st_ocr":  # TCB: the gather's memory; the layers are OCRNet's
        module_args = {"memory": m.st_ocr.memory}
    elif m.decoder != "ocrnet" and name == "netwarp":  # model.netwarp.c5 is the ocrnet decoder's (validated false)
        del module_args["c5"]
    if name == "sparse_tt":  # model.sparse_tt, and data.offsets: its key windows grow with the offsets' values
        module_args = {**OmegaConf.to_container(m.sparse_tt, resolve=True), "offsets": list(cfg.data.offsets)}
    try:
        model = SSLTM(
            num_classes,
            backbone=m.backbone,
            pretrained=weights,
            decoder=m.decoder,
            short_term=name,
            short_term_args=module_args,
            use_rfce=m.use_rfce,
            use_gcc=m.use_gcc,
            context=m.context,
            checkpointing=m.checkpointing,
            num_adjacent=len(cfg.data.offsets),
            **kwargs,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model settings (model.*, model.kwargs {kwargs}) rejected by SSLTM: {err}") from err
    model.set_flow_provider(build_flow_provider(cfg, model.short_term_module.needs_flow))
    return model


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
    """The model of ``cfg`` with the weights of ``ckpt``, the checkpoint read from ``path`` (which errors name):
    ``ckpt["model"]``, or a Mean Teacher run's teacher (:func:`~ssltm.objectives.mean_teacher.evaluated_weights`).
    ``ssltm eval``, ``infer`` and ``export`` load their model here.

    Raises:
        ValueError: the weights do not fit the model (naming the config keys that differ from the checkpoint's);
            the config evaluates a teacher the checkpoint does not hold.
    """
    from .objectives.mean_teacher import evaluated_weights  # the objectives import this module

    model = build_model(cfg, ckpt["meta"]["num_classes"], pretrained=False)
    load_weights(model, {**ckpt, "model": evaluated_weights(cfg, ckpt, path)}, path, OmegaConf.to_container(cfg))
    return model


def build_flow_provider(cfg: DictConfig, needs_flow: bool = True) -> FlowProvider | None:
    """The optical flow provider of ``model.flow`` (:func:`~ssltm.flow.make_flow_provider`), or None when the
    model needs no flow (``needs_flow=False``).

    Raises:
        ConfigError: ``model.flow_weights`` names no file, or not a state dict of torchvision's raft_large.
    """
    if not needs_flow:
        return None
    m = cfg.model
    try:
        return make_flow_provider(m.flow, m.flow_weights, m.flow_iters)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.flow_weights = {m.flow_weights}: {err}") from None


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

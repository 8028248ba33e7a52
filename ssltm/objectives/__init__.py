"""Training objectives beyond the model's own losses: ETC's temporal loss, IFR and Mean Teacher (the compared
systems of SSLTM's Tables 5 and 7 that change training, not the network).

``train.objectives`` lists them by name (:data:`OBJECTIVES`); each has its config section ``train.<name>``.
:class:`TrainStep` runs the model and the objectives for one micro-batch.
"""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from ..config import ConfigError
from .base import NEEDS, Objective, TrainStep
from .ifr import IFR
from .mean_teacher import MeanTeacher
from .temporal_loss import TemporalLoss, occlusion_mask, temporal_loss

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (TemporalLoss, IFR, MeanTeacher)}


def check_objectives(cfg: DictConfig) -> list[type[Objective]]:
    """The classes of ``train.objectives``, each checked against ``cfg``.

    Raises:
        ConfigError: an unknown name (with the choices), a name listed twice, or a config an objective does
            not fit.
    """
    names = list(cfg.train.objectives)
    for name in names:
        if name not in OBJECTIVES:
            raise ConfigError(f"train.objectives: unknown objective {name!r}; choices: {', '.join(OBJECTIVES)}")
        if names.count(name) > 1:
            raise ConfigError(f"train.objectives lists {name!r} twice: {names}")
    classes = [OBJECTIVES[name] for name in names]
    for cls in classes:
        cls.check(cfg)
    return classes


def build_objectives(cfg: DictConfig, model: nn.Module) -> list[Objective]:
    """The objectives of ``train.objectives`` for ``model`` (on its device, after any SyncBatchNorm conversion)."""
    return [cls(cfg, model) for cls in check_objectives(cfg)]


__all__ = [
    "IFR",
    "NEEDS",
    "MeanTeacher",
    "OBJECTIVES",
    "Objective",
    "TemporalLoss",
    "TrainStep",
    "build_objectives",
    "check_objectives",
    "occlusion_mask",
    "temporal_loss",
]

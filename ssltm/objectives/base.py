"""What a training objective is, and the module that runs a training step's passes (:class:`TrainStep`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

NEEDS = ("flow", "unlabeled", "strong", "strong_frames")  # what an objective can ask of the data


def rampup(step: int, length: int) -> float:
    """``r(t) = exp(-5 (1 - min(t, R) / R)^2)`` for ``R = length`` (1 when ``length`` is 0): the sigmoid-shaped
    ramp-up of Laine & Aila / Mean Teacher, from ``exp(-5)`` at ``t = 0`` to 1 from ``t = R`` on."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(step, 0), length) / length
    return math.exp(-5.0 * phase * phase)


class Objective:
    """A training objective: terms added to the model's own losses.

    Subclasses set ``name`` (the key of ``train.objectives`` and of its config section ``train.<name>``),
    ``terms`` (the names of the weighted terms :meth:`forward` returns, in order), ``needs`` (a subset of
    :data:`NEEDS`: query -> adjacent optical ``"flow"``, ``"unlabeled"`` clips in ``batch["unlabeled"]``, the
    photometric copy ``"reference_strong"`` of the reference frame, ``"strong_frames"``: the unlabelled clips carry
    ``"frames_strong"`` and ``"reference_strong"``, one distortion of all their frames and their reference) and
    ``model_outputs`` (the keyword arguments of the labelled pass, ``SSLTM.forward``'s ``all_frames`` /
    ``return_features``).

    An objective is not an ``nn.Module``: what it holds (a teacher model, a flow estimator) is in neither the
    optimizer nor DDP. It is built after the model is on its device (and converted to SyncBatchNorm).
    """

    name: ClassVar[str]
    terms: ClassVar[tuple[str, ...]]
    needs: ClassVar[frozenset[str]] = frozenset()
    model_outputs: ClassVar[Mapping[str, bool]] = {}

    def __init__(self, cfg: DictConfig, model: nn.Module) -> None:
        self.cfg = cfg

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        """Raise :class:`~ssltm.config.ConfigError` where ``cfg`` does not fit this objective."""

    def forward(self, model: nn.Module, batch: dict[str, Any], out: dict[str, Any], step: int) -> dict[str, Any]:
        """The weighted terms ``{name: scalar}`` for ``batch`` (on the device), given the model's output ``out``
        of the labelled pass, at iteration ``step`` (0-based)."""
        raise NotImplementedError

    def __call__(self, model, batch, out, step) -> dict[str, Any]:
        return self.forward(model, batch, out, step)

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after the optimizer applied iteration ``step`` (0-based)."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Entries this objective adds to the training checkpoint."""
        return {}

    def restore(self, ckpt: dict[str, Any], path) -> None:
        """Take this objective's entries back from the checkpoint ``ckpt`` read from ``path``."""

    def eval_model(self) -> nn.Module | None:
        """The model validation and the saved checkpoints' evaluation use in place of the trained one, or None."""
        return None


class TrainStep(nn.Module):
    """The model and its objectives: ``forward(batch, step)`` runs every pass of one micro-batch and returns the
    loss terms, keyed and ordered by :attr:`loss_terms` (the model's, then each objective's, then ``"total"``).

    DDP wraps this module, so that all passes of a step (the labelled one, an objective's extra ones) are one
    forward for its gradient synchronisation. The objectives are plain attributes, not submodules.
    """

    def __init__(self, model: nn.Module, objectives: Sequence[Objective] = ()) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "objectives", tuple(objectives))
        names = [term for term in model.loss_terms if term != "total"]
        for objective in self.objectives:
            clash = set(objective.terms) & set(names)
            if clash:
                raise ValueError(f"objective {objective.name!r} repeats the loss terms {sorted(clash)}")
            names += objective.terms
        self.loss_terms: tuple[str, ...] = (*names, "total")
        self.model_outputs = {
            key: True for objective in self.objectives for key, wanted in objective.model_outputs.items() if wanted
        }

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        out = self.model(
            batch["frames"], batch.get("reference"), batch["label"], batch.get("flow"), **self.model_outputs
        )
        losses = dict(out["losses"])
        total = losses.pop("total")
        for objective in self.objectives:
            terms = objective(self.model, batch, out, step)
            if tuple(terms) != objective.terms:
                raise RuntimeError(
                    f"objective {objective.name!r} returned the terms {tuple(terms)}, not its terms {objective.terms}"
                )
            losses.update(terms)
            for value in terms.values():
                total = total + value
        losses["total"] = total
        return losses

    def after_step(self, step: int) -> None:
        """After the optimizer applied iteration ``step``: each objective's :meth:`Objective.after_step`."""
        for objective in self.objectives:
            objective.after_step(self.model, step)

    def checkpoint_state(self) -> dict[str, Any]:
        """The objectives' entries of the training checkpoint."""
        return {key: value for objective in self.objectives for key, value in objective.checkpoint_state().items()}

    def restore(self, ckpt: dict[str, Any], path) -> None:
        """Each objective's entries back from the training checkpoint ``ckpt`` read from ``path``."""
        for objective in self.objectives:
            objective.restore(ckpt, path)

    def eval_model(self) -> nn.Module:
        """The model to validate and evaluate: an objective's (Mean Teacher's teacher) or the trained one."""
        for objective in self.objectives:
            if (model := objective.eval_model()) is not None:
                return model
        return self.model

    @property
    def needs(self) -> frozenset[str]:
        """What the objectives ask of the data (see :data:`NEEDS`)."""
        return frozenset().union(*(objective.needs for objective in self.objectives))

"""Mean Teacher (Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017) on the unlabelled
clips: the ``mean_teacher`` objective of SSLTM's Table 7 (SSLTM + Mean Teacher)."""

from __future__ import annotations

import copy
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from .. import distributed as dist
from ..checkpoint import load_weights
from ..config import MEAN_TEACHER_CONSISTENCY, MEAN_TEACHER_EVAL_MODELS, ConfigError, require_unlabeled_frames
from ..data.transforms import IGNORE_INDEX
from ..model.heads import cross_entropy
from .base import Objective, rampup

TEACHER_KEY = "teacher"  # the training checkpoint's entry of the teacher's state_dict
UPDATES_KEY = "teacher_updates"  # ... and of the number of EMA updates it has had


def consistency_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "mse", confidence: float = 0.95
) -> torch.Tensor:
    """The unweighted consistency of ``(B, K, H, W)`` student and teacher scores (no gradient reaches the teacher's).

    ``"mse"``: ``mean_{B,K,H,W} (softmax z_s - softmax z_t)^2``. ``"ce"``: the student's mean pixel cross entropy
    against the teacher's argmax, over the pixels where the teacher's top probability is at least ``confidence``
    (0, with a zero gradient, where there is none).
    """
    if kind not in MEAN_TEACHER_CONSISTENCY:
        raise ValueError(f"kind must be one of {MEAN_TEACHER_CONSISTENCY}, got {kind!r}")
    teacher = teacher_logits.detach().float().softmax(1)
    if kind == "mse":
        return (student_logits.float().softmax(1) - teacher).square().mean()
    top, label = teacher.max(1)
    return cross_entropy(student_logits, label.masked_fill(top < confidence, IGNORE_INDEX), IGNORE_INDEX)


def _state_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(chain(model.named_parameters(), model.named_buffers()))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """``theta' <- alpha theta' + (1 - alpha) theta`` for the floating-point parameters and buffers of ``teacher``
    (one ``torch._foreach_lerp_`` towards ``student``'s, weight ``1 - alpha``); integer buffers (BatchNorm's
    ``num_batches_tracked``) are copied. ``teacher`` is a copy of ``student`` (the same names and shapes)."""
    mine, theirs = _state_tensors(teacher), _state_tensors(student)
    if [name for name, _ in mine] != [name for name, _ in theirs]:
        raise ValueError("the teacher's parameters and buffers are not the student's")
    floats = [(a, b) for (_, a), (_, b) in zip(mine, theirs, strict=True) if a.is_floating_point()]
    if floats:
        targets, sources = zip(*floats, strict=True)
        torch._foreach_lerp_(list(targets), list(sources), 1.0 - alpha)
    for (_, a), (_, b) in zip(mine, theirs, strict=True):
        if not a.is_floating_point():
            a.copy_(b)


def evaluated_weights(cfg: DictConfig, ckpt: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict of the training checkpoint ``ckpt`` (read from ``path``) that evaluation, inference and export
    use for the config ``cfg``: the teacher's where ``cfg`` trains with ``mean_teacher`` and evaluates its teacher
    (``train.mean_teacher.eval_model``), else the trained model's ``ckpt["model"]``.

    Raises:
        ValueError: naming ``path``, the teacher is asked for and the checkpoint has none.
    """
    if "mean_teacher" not in cfg.train.objectives or cfg.train.mean_teacher.eval_model != "teacher":
        return ckpt["model"]
    if TEACHER_KEY not in ckpt:
        raise ValueError(
            f"checkpoint {path} has no Mean Teacher weights ({TEACHER_KEY!r}), which train.objectives "
            "[mean_teacher] with train.mean_teacher.eval_model 'teacher' evaluates: use a checkpoint of a "
            "mean_teacher run, or set train.mean_teacher.eval_model=student"
        )
    return ckpt[TEACHER_KEY]


class MeanTeacher(Objective):
    """The student (the trained model) learns to agree with its teacher, an exponential moving average of its
    weights, on unlabelled clips.

    - Teacher: a deep copy of the model (after any SyncBatchNorm conversion), without gradients, in neither the
      optimizer nor DDP; on the clean unlabelled clip ``batch["unlabeled"]`` in eval mode under ``no_grad``.
    - Student: the same clip with one photometric distortion on all its frames and its reference
      (``"frames_strong"``, ``"reference_strong"``: :func:`~ssltm.data.transforms.photometric_distortion`). Its
      losses on the clip (all-ignore labels: 0 with a zero gradient) are not added.
    - ``J = weight * r(t) * consistency``, :func:`~ssltm.objectives.base.rampup` ``r`` over ``rampup_iters`` and
      :func:`consistency_loss` of ``consistency`` (``mse`` or ``ce`` with ``confidence``), on the final logits.
    - EMA (:func:`ema_update`) after the optimizer applied 0-based iteration ``t``: decay ``alpha_rampup`` for
      ``t < rampup_iters``, then ``alpha`` (so the teacher after ``n`` iterations has had updates ``t = 0..n-1``).
    - Checkpoints carry the teacher's state_dict (``"teacher"``, which :func:`~ssltm.checkpoint.load_weights`
      loads into the same model) and its number of updates (``"teacher_updates"``); validation, ``best.pt`` and,
      through :func:`evaluated_weights`, ``ssltm eval`` / ``infer`` / ``export`` use the teacher
      (``eval_model: teacher``) or the student.

    ``train.mean_teacher`` (:class:`~ssltm.config.MeanTeacherConfig`) holds the settings.
    """

    name = "mean_teacher"
    terms = ("consistency",)
    needs = frozenset({"unlabeled", "strong_frames"})

    def __init__(self, cfg: DictConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        mt = cfg.train.mean_teacher
        self.weight, self.rampup_iters = float(mt.weight), int(mt.rampup_iters)
        self.alpha_rampup, self.alpha = float(mt.alpha_rampup), float(mt.alpha)
        self.consistency, self.confidence = str(mt.consistency), float(mt.confidence)
        self.evaluate_teacher = mt.eval_model == "teacher"
        # The flow provider is shared, not copied (a plain attribute of the model, outside its state_dict).
        provider = getattr(model, "flow_provider", None)
        memo = {} if provider is None else {id(provider): provider}
        self.teacher = copy.deepcopy(model, memo).eval().requires_grad_(False)
        self.updates = 0

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        mt = cfg.train.mean_teacher
        for key in ("alpha_rampup", "alpha"):
            if not 0 < mt[key] < 1:
                raise ConfigError(f"train.mean_teacher.{key} must be in (0, 1), got {mt[key]}")
        if mt.weight < 0:
            raise ConfigError(f"train.mean_teacher.weight must be >= 0, got {mt.weight}")
        if mt.rampup_iters < 0:
            raise ConfigError(f"train.mean_teacher.rampup_iters must be >= 0, got {mt.rampup_iters}")
        if mt.consistency not in MEAN_TEACHER_CONSISTENCY:
            raise ConfigError(
                f"train.mean_teacher.consistency must be one of {MEAN_TEACHER_CONSISTENCY}, got {mt.consistency!r}"
            )
        if not 0 <= mt.confidence <= 1:
            raise ConfigError(f"train.mean_teacher.confidence must be in [0, 1], got {mt.confidence}")
        if mt.eval_model not in MEAN_TEACHER_EVAL_MODELS:
            raise ConfigError(
                f"train.mean_teacher.eval_model must be one of {MEAN_TEACHER_EVAL_MODELS}, got {mt.eval_model!r}"
            )
        require_unlabeled_frames(cfg, "train.objectives 'mean_teacher'")

    def forward(self, model: nn.Module, batch: dict[str, Any], out: dict[str, Any], step: int) -> dict[str, Any]:
        clip = batch["unlabeled"]
        flow = clip.get("flow")  # computed on the clean frames; the distortion keeps the geometry
        self.teacher.eval()
        with torch.no_grad():
            target = self.teacher(clip["frames"], clip["reference"], None, flow)["logits"]
        student = model(clip["frames_strong"], clip["reference_strong"], clip["label"], flow)["logits"]
        loss = consistency_loss(student, target, self.consistency, self.confidence)
        return {"consistency": self.weight * rampup(step, self.rampup_iters) * loss}

    def decay(self, step: int) -> float:
        """The EMA decay of the update after iteration ``step`` (0-based)."""
        return self.alpha_rampup if step < self.rampup_iters else self.alpha

    def after_step(self, model: nn.Module, step: int) -> None:
        ema_update(self.teacher, model, self.decay(step))
        # Under DDP without SyncBatchNorm each process's running statistics are its own until the next forward
        # broadcasts the first's: the teacher takes the first process's buffers, so that every process (and a run
        # resumed from the first's checkpoint) holds the same teacher.
        dist.broadcast_tensors([buffer for _, buffer in self.teacher.named_buffers()])
        self.updates += 1

    def checkpoint_state(self) -> dict[str, Any]:
        return {TEACHER_KEY: self.teacher.state_dict(), UPDATES_KEY: self.updates}

    def restore(self, ckpt: dict[str, Any], path) -> None:
        missing = [key for key in (TEACHER_KEY, UPDATES_KEY) if key not in ckpt]
        if missing:
            raise ValueError(
                f"checkpoint {path} has no Mean Teacher state {missing}: it was not written by a run with "
                "train.objectives [mean_teacher] (start such a run afresh instead of resuming it)"
            )
        load_weights(self.teacher, {**ckpt, "model": ckpt[TEACHER_KEY]}, path)
        self.updates = int(ckpt[UPDATES_KEY])

    def eval_model(self) -> nn.Module | None:
        return self.teacher if self.evaluate_teacher else None

"""The optimizer and learning-rate schedule of a run: ``train.optimizer`` (SGD or AdamW) over ``train.param_groups``,
a linear warm-up, then poly.

Parameter groups: each ``train.param_groups`` entry takes the parameters whose names (``named_parameters()`` of
the bare model) its ``pattern`` matches (``re.search``) and that no earlier entry took; they train at
``train.lr * lr_mult`` with weight decay ``train.weight_decay * decay_mult``. The parameters no entry takes form
the default group, the optimizer's first: the learning rate a run logs is that group's (the first entry's when
the entries take every parameter). Each group's learning rate and weight decay live in the optimizer's
``param_groups``, so a checkpoint saves them and resume restores them.

Schedule (:class:`PolySchedule`, as mmcv's ``poly`` policy with ``linear`` warm-up, by iteration): at iteration
``it`` (counted from 0) a group with base learning rate ``lr_g = train.lr * lr_mult`` runs at ``lr_g * f(it)``,

    poly(it) = (1 - m) * (1 - min(it / max_iters, 1)) ** poly_power + m,          m = min_lr / lr
    f(it)    = poly(it) * (1 - (1 - it / warmup_iters) * (1 - warmup_ratio))       for it < warmup_iters
    f(it)    = poly(it)                                                           from warmup_iters on

so the warm-up starts at ``warmup_ratio`` of the poly value and reaches it at ``warmup_iters``. Unlike mmcv,
whose ``min_lr`` is one floor for every group, the floor here scales with each group's ``lr_mult``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .config import OPTIMIZERS, ConfigError


class PolySchedule:
    """The learning-rate factor ``f(it)`` of the module docstring: linear warm-up, then poly.

    A callable object rather than a function so that ``LambdaLR`` saves its state (``max_iters`` may be
    fitted to a time budget during the run); ``max_iters`` None (not fitted yet) holds the poly factor at 1.
    """

    def __init__(
        self, max_iters: int | None, power: float, min_ratio: float, warmup_iters: int = 0, warmup_ratio: float = 1.0
    ):
        self.max_iters, self.power, self.min_ratio = max_iters, power, min_ratio
        self.warmup_iters, self.warmup_ratio = warmup_iters, warmup_ratio

    def __call__(self, iteration: int) -> float:
        factor = 1.0
        if self.max_iters is not None:
            progress = min(iteration / self.max_iters, 1.0)
            factor = (1 - self.min_ratio) * (1 - progress) ** self.power + self.min_ratio
        if iteration < self.warmup_iters:
            factor *= 1 - (1 - iteration / self.warmup_iters) * (1 - self.warmup_ratio)
        return factor


def param_groups(train: Any, model: nn.Module) -> list[dict[str, Any]]:
    """The optimizer's parameter groups of ``train.param_groups`` over ``model``'s parameters: the default group
    (if any parameter is left to it) first, then one per entry, each with its ``lr`` and ``weight_decay``.

    Raises:
        ConfigError: an entry's pattern matches no parameter, or only parameters that earlier entries took.
    """
    specs = list(train.param_groups)
    patterns = [re.compile(spec.pattern) for spec in specs]
    members: list[list[nn.Parameter]] = [[] for _ in range(len(specs) + 1)]  # the default group's last
    matched = [0] * len(specs)
    for name, param in model.named_parameters():
        hits = [i for i, pattern in enumerate(patterns) if pattern.search(name)]
        for i in hits:
            matched[i] += 1
        members[hits[0] if hits else -1].append(param)
    for i, spec in enumerate(specs):
        if not members[i]:
            why = f"only parameters that earlier entries took ({matched[i]}; the first match wins)"
            raise ConfigError(
                f"train.param_groups[{i}].pattern {spec.pattern!r} matches "
                f"{why if matched[i] else 'no parameter of the model'}"
            )
    groups = [
        {"params": members[i], "lr": train.lr * spec.lr_mult, "weight_decay": train.weight_decay * spec.decay_mult}
        for i, spec in enumerate(specs)
    ]
    if members[-1]:
        groups.insert(0, {"params": members[-1], "lr": train.lr, "weight_decay": train.weight_decay})
    return groups


def build_optimizer(train: Any, model: nn.Module) -> torch.optim.Optimizer:
    """``train.optimizer`` over :func:`param_groups` of ``model`` (the bare model, not a DDP wrapper)."""
    groups = param_groups(train, model)
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)
    raise ConfigError(f"train.optimizer must be one of {OPTIMIZERS}, got {train.optimizer!r}")


def build_schedule(
    train: Any, optimizer: torch.optim.Optimizer
) -> tuple[PolySchedule, torch.optim.lr_scheduler.LambdaLR]:
    """The schedule of ``train`` (``max_iters`` left to the run to set) and the ``LambdaLR`` that applies it to
    every group's own base learning rate."""
    schedule = PolySchedule(None, train.poly_power, train.min_lr / train.lr, train.warmup_iters, train.warmup_ratio)
    return schedule, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def load_optimizer_state(optimizer: torch.optim.Optimizer, ckpt: dict[str, Any], train: Any, source: Any) -> None:
    """Restore ``optimizer``, built from the config section ``train``, from the training checkpoint ``ckpt``
    (read from ``source``): its state and every group's learning rate and weight decay.

    Raises:
        ConfigError: the checkpoint's run used another ``train.optimizer`` or other parameter groups.
    """
    saved = ckpt["config"].get("train", {}).get("optimizer", "sgd")  # older checkpoints: SGD, the only one then
    if saved != train.optimizer:
        raise ConfigError(f"{source} was trained with train.optimizer={saved!r}, this config has {train.optimizer!r}")
    state = ckpt["optimizer"]
    sizes = _group_sizes(state["param_groups"])
    if sizes != _group_sizes(optimizer.param_groups):
        raise ConfigError(
            f"{source} holds parameter groups of {sizes} parameters, train.param_groups here gives "
            f"{_group_sizes(optimizer.param_groups)}: resume with the checkpoint's train.param_groups"
        )
    optimizer.load_state_dict(state)


def _group_sizes(groups: Sequence[dict]) -> list[int]:
    return [len(group["params"]) for group in groups]

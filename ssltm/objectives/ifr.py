"""IFR: Inter-Frame feature Reconstruction (Zhuang et al., "Video Semantic Segmentation with Inter-Frame Feature
Reconstruction", CVPR 2022), the ``ifr`` objective of SSLTM's Table 5.

A frame's features are rebuilt from class prototypes of another frame of its video, and the rebuilt features
must be classified as the frame's label (labelled clips) or its own prediction (unlabelled clips). The features
are ``phi_seg``'s pre-classifier map (stride 4) of the per-frame model, in place of PSPNet's stride-8 features.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..config import ConfigError, require_unlabeled_frames, short_term
from ..model.heads import cross_entropy
from ..model.neck import resize
from .base import Objective, rampup

PROTOTYPE_SCOPES = ("batch", "image")
WEIGHTS = ("labeled_weight", "unlabeled_weight", "strong_weight")


def prototypes(
    features: torch.Tensor, classes: torch.Tensor, num_classes: int, scope: str = "batch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes of the reference frames: ``P (B, K, C)`` and ``present (B, K)``, class ``k`` occurs in
    image ``b``'s ``classes``.

    ``P[b, k]`` is the mean of ``features (B, C, h, w)`` over the pixels with ``classes (B, h, w) == k``: those of
    the whole batch (``scope="batch"``, IFR's mask) or of image ``b`` alone (``"image"``); 0 where there are none.
    Image ``b`` uses only the prototypes of the classes in its own ``classes`` (``present``). No gradient reaches
    ``classes``; the prototypes keep the features' gradient.
    """
    if scope not in PROTOTYPE_SCOPES:
        raise ValueError(f"scope must be one of {PROTOTYPE_SCOPES}, got {scope!r}")
    b, c = features.shape[:2]
    flat = features.float().flatten(2).transpose(1, 2)  # (B, hw, C)
    index = classes.flatten(1)  # (B, hw)
    present = torch.zeros(b, num_classes, dtype=torch.bool, device=features.device).scatter_(1, index, True)
    sums = flat.new_zeros(b, num_classes, c).scatter_add(1, index[..., None].expand(-1, -1, c), flat)
    counts = flat.new_zeros(b, num_classes).scatter_add(1, index, torch.ones_like(flat[..., 0]))
    if scope == "batch":
        sums, counts = sums.sum(0, keepdim=True), counts.sum(0, keepdim=True)
    return (sums / counts.clamp(min=1)[..., None]).expand(b, -1, -1), present


def reconstruct(
    features: torch.Tensor, prototypes: torch.Tensor, present: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``f~ = softmax(cos(f, P) / T) @ P`` per pixel of ``features (B, C, h, w)``, over the ``present (B, K)``
    classes' ``prototypes (B, K, C)`` (``P`` not normalised): ``(B, C, h, w)`` float32."""
    query = F.normalize(features.float().flatten(2).transpose(1, 2), dim=-1)  # (B, hw, C)
    similarity = query @ F.normalize(prototypes, dim=-1).transpose(1, 2) / temperature  # (B, hw, K)
    attention = similarity.masked_fill(~present[:, None], float("-inf")).softmax(-1)
    return (attention @ prototypes).transpose(1, 2).unflatten(2, features.shape[-2:])


class IFR(Objective):
    """IFR's four reconstruction terms on top of the per-frame model's losses:
    ``r(t) [w_L (L_L + w_s L_L^s) + w_U (L_U + w_s L_U^s)]`` (``train.ifr``: ``w_L = 1e-2``, ``w_U = 1e-3``,
    ``w_s = 0.1``, ``r`` of :func:`rampup` over ``rampup_iters = 4000``).

    ``L_L``: the labelled query's features rebuilt (:func:`reconstruct`, ``temperature`` 0.5) from the prototypes
    (:func:`prototypes`) of its clip's reference frame, whose classes are the argmax of its own stride-4 logits;
    the rebuilt features' logits, upsampled and divided by ``logit_scale`` (0.01), against the label.
    ``L_L^s``: the same with the prototypes of the reference's photometric copy (``"reference_strong"``) under the
    weak reference's classes. ``L_U``, ``L_U^s``: the same on an unlabelled clip (``batch["unlabeled"]``) against
    its query's own prediction (argmax of its upsampled logits). Gradients reach the query and reference
    features (the prototypes are not detached).

    Each of the five extra images (reference, strong reference; unlabelled query, reference, strong reference) is
    a batch-norm batch of its own, one :meth:`~ssltm.SSLTM.segment_images` pass each, as IFR's public code runs
    them. With ``train.ifr.unlabeled: false`` only the labelled terms (and no unlabelled clips) remain.
    """

    name = "ifr"
    terms = ("ifr_l", "ifr_l_strong", "ifr_u", "ifr_u_strong")
    needs = frozenset({"unlabeled", "strong"})
    model_outputs = {"return_features": True}

    def __init__(self, cfg: DictConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        section = cfg.train.ifr
        self.scope = section.prototype_scope
        self.unlabeled = bool(section.unlabeled)
        self.temperature = float(section.temperature)
        self.logit_scale = float(section.logit_scale)
        self.labeled_weight = float(section.labeled_weight)
        self.unlabeled_weight = float(section.unlabeled_weight)
        self.strong_weight = float(section.strong_weight)
        self.rampup_iters = int(section.rampup_iters)
        if not self.unlabeled:
            self.terms = IFR.terms[:2]
            self.needs = frozenset({"strong"})

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        name, use_rfce = short_term(cfg), cfg.model.use_rfce
        if name != "none" or use_rfce:
            raise ConfigError(
                "train.objectives 'ifr' reconstructs the per-frame image baseline's phi_seg features: it needs "
                f"model.short_term 'none' and model.use_rfce false, got model.short_term {name!r} and "
                f"model.use_rfce {use_rfce}"
            )
        section = cfg.train.ifr
        if section.prototype_scope not in PROTOTYPE_SCOPES:
            raise ConfigError(
                f"train.ifr.prototype_scope must be one of {PROTOTYPE_SCOPES}, got {section.prototype_scope!r}"
            )
        for key in WEIGHTS:
            if section[key] < 0:
                raise ConfigError(f"train.ifr.{key} must be >= 0, got {section[key]}")
        for key in ("temperature", "logit_scale"):
            if section[key] <= 0:
                raise ConfigError(f"train.ifr.{key} must be positive, got {section[key]}")
        if section.rampup_iters < 0:
            raise ConfigError(f"train.ifr.rampup_iters must be >= 0, got {section.rampup_iters}")
        if section.unlabeled:
            require_unlabeled_frames(cfg, "train.ifr.unlabeled: true")

    def forward(self, model: nn.Module, batch: dict[str, Any], out: dict[str, Any], step: int) -> dict[str, Any]:
        ramp = rampup(step, self.rampup_iters)
        labeled, strong = self._views(model, out["features"], batch, batch["label"], "the batch")
        weight = ramp * self.labeled_weight
        terms = {"ifr_l": weight * labeled, "ifr_l_strong": weight * self.strong_weight * strong}
        if self.unlabeled:
            clips = _get(batch, "unlabeled", "the batch")
            query = clips["frames"][:, 0]
            logits, features = model.segment_images(query)
            pseudo_labels = resize(logits, query.shape[-2:]).argmax(1)
            unlabeled, strong = self._views(model, features, clips, pseudo_labels, 'batch["unlabeled"]')
            weight = ramp * self.unlabeled_weight
            terms.update(ifr_u=weight * unlabeled, ifr_u_strong=weight * self.strong_weight * strong)
        return terms

    def _views(
        self,
        model: nn.Module,
        query_features: torch.Tensor,
        clips: dict[str, Any],
        target: torch.Tensor,
        where: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, L^s)``: the query's features rebuilt from the prototypes of the reference frame of ``clips`` and
        of the reference's strong copy, both under the reference's classes, scored against ``target (B, H, W)``."""
        reference_strong = _get(clips, "reference_strong", where)
        reference_logits, reference_features = model.segment_images(clips["reference"])
        classes = reference_logits.argmax(1)
        _, strong_features = model.segment_images(reference_strong)
        return tuple(
            self._loss(model, query_features, *prototypes(features, classes, model.num_classes, self.scope), target)
            for features in (reference_features, strong_features)
        )

    def _loss(self, model, query_features, prototypes, present, target) -> torch.Tensor:
        rebuilt = reconstruct(query_features, prototypes, present, self.temperature)
        logits = resize(model.seg_head.classify(rebuilt.to(query_features.dtype)), target.shape[-2:])
        return cross_entropy(logits.float() / self.logit_scale, target, model.ignore_index)


def _get(batch: dict[str, Any], key: str, where: str) -> Any:
    """``batch[key]``, or a ValueError saying that IFR reads it."""
    if key not in batch:
        raise ValueError(f"train.objectives 'ifr' reads {key!r}, which {where} lacks (keys: {sorted(batch)})")
    return batch[key]

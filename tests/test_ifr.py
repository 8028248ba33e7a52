"""IFR (the ``ifr`` objective): prototypes against brute-force class means for both scopes, the reconstruction at
a low temperature and against its formula, the ramp in closed form, the labelled and strong terms against a
recomputation (logits x 100, the weak view's classes), the gradient reaching the reference image through the
prototypes, the per-image path of the per-frame model, the unlabelled terms and the config errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_model import TINY

from ssltm import SSLTM
from ssltm.config import ConfigError, load_config
from ssltm.model.heads import cross_entropy
from ssltm.model.neck import resize
from ssltm.objectives import IFR, TrainStep, build_objectives, check_objectives
from ssltm.objectives.ifr import prototypes, rampup, reconstruct

ROOT = Path(__file__).resolve().parent.parent
K = 5
SIZE = (32, 48)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("SSLTM_BACKEND", "reference")


def cfg_of(*overrides: str):
    base = ["data.mode=sf", "data.offsets=[]", "model.short_term=none", "model.use_rfce=false", "model.use_gcc=false"]
    return load_config(None, [*base, *overrides])


def per_frame_model(num_adjacent: int = 0) -> SSLTM:
    torch.manual_seed(0)
    return SSLTM(K, **{**TINY, "short_term": "none", "use_rfce": False, "use_gcc": False, "num_adjacent": num_adjacent})


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


def labelled_batch(batch: int = 2, seed: int = 0, unlabeled: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    label = torch.randint(0, K, (batch, *SIZE), generator=gen)
    label[:, :2] = 255
    out = {"frames": images(batch, seed)[:, None], "reference": images(batch, seed + 1), "label": label}
    out["reference_strong"] = images(batch, seed + 2)
    if unlabeled:
        out["unlabeled"] = {
            "frames": images(batch, seed + 3)[:, None],
            "reference": images(batch, seed + 4),
            "reference_strong": images(batch, seed + 5),
            "label": torch.full((batch, *SIZE), 255),
        }
    return out


# ------------------------------------------------------------------------------------------------ the math
@pytest.mark.parametrize("scope", ["batch", "image"])
def test_prototypes_are_the_class_means(scope):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64)
    classes = torch.randint(0, 3, (3, 5, 6), generator=gen)
    classes[0][classes[0] == 1] = 0  # class 1 absent from image 0
    classes[1, 0, 0] = 3  # class 3 in image 1 alone
    protos, present = prototypes(features, classes, 5, scope)
    assert protos.shape == (3, 5, 4) and present.shape == (3, 5)
    for b in range(3):
        for k in range(5):
            assert present[b, k] == (classes[b] == k).any()
            if not present[b, k]:
                continue
            if scope == "batch":  # every image's pixels of class k
                expected = features.permute(0, 2, 3, 1)[classes == k].mean(0)
            else:
                expected = features[b].permute(1, 2, 0)[classes[b] == k].mean(0)
            torch.testing.assert_close(protos[b, k], expected.float())
    # the two scopes differ where a class occurs in several images
    other, _ = prototypes(features, classes, 5, "image" if scope == "batch" else "batch")
    assert not torch.allclose(protos[0, 0], other[0, 0])


def test_reconstruction_formula_and_nearest_prototype_at_low_temperature():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 4, 3, 5, generator=gen)
    protos = 3 * torch.randn(2, 6, 4, generator=gen)  # not unit vectors: P enters un-normalised
    present = torch.rand(2, 6, generator=gen) < 0.6
    present[:, 0] = True
    query = features.flatten(2).transpose(1, 2)  # (B, hw, C)
    cosine = F.cosine_similarity(query[:, :, None], protos[:, None], dim=-1)  # (B, hw, K)
    cosine = cosine.masked_fill(~present[:, None], -2.0)
    for temperature in (0.5, 1.0):
        weights = torch.where(present[:, None], torch.exp(cosine / temperature), 0.0)
        expected = (weights / weights.sum(-1, keepdim=True)) @ protos
        actual = reconstruct(features, protos, present, temperature)
        torch.testing.assert_close(actual.flatten(2).transpose(1, 2), expected)
    nearest = cosine.argmax(-1)  # (B, hw): an absent class never wins
    assert (torch.gather(present, 1, nearest)).all()
    unmasked_nearest = F.cosine_similarity(query[:, :, None], protos[:, None], dim=-1).argmax(-1)
    assert (nearest != unmasked_nearest).any()  # the mask matters for this draw
    expected = torch.stack([protos[b, nearest[b]] for b in range(2)])
    actual = reconstruct(features, protos, present, 1e-4)
    torch.testing.assert_close(actual.flatten(2).transpose(1, 2), expected)


@pytest.mark.parametrize("step", [0, 2000, 4000, 8000])
def test_rampup_closed_form(step):
    phase = 1 - min(step, 4000) / 4000
    assert rampup(step, 4000) == pytest.approx(math.exp(-5 * phase**2), rel=1e-12)
    assert {0: math.exp(-5), 2000: math.exp(-1.25), 4000: 1.0, 8000: 1.0}[step] == pytest.approx(rampup(step, 4000))
    assert rampup(step, 0) == 1.0


# ---------------------------------------------------------------------------------------------- the model
def test_segment_images_is_the_all_frames_path():
    model = per_frame_model(num_adjacent=1).eval()
    frames = torch.stack([images(2, 0), images(2, 1)], dim=1)  # (B, 2, 3, H, W)
    out = model(frames, all_frames=True, return_features=True)
    logits, features = model.segment_images(frames.flatten(0, 1))
    assert logits.shape == (4, K, SIZE[0] // 4, SIZE[1] // 4) and features.shape == (4, TINY["head_channels"], 8, 12)
    torch.testing.assert_close(features, out["frame_features"].flatten(0, 1))
    torch.testing.assert_close(resize(logits, SIZE), out["frame_logits"].flatten(0, 1))
    with pytest.raises(ValueError, match=r"images must be a float tensor \(N, 3, H, W\)"):
        model.segment_images(frames)
    with pytest.raises(ValueError, match="on its own, but short_term 'stt' reads adjacent frames"):
        SSLTM(K, **{**TINY, "use_rfce": False, "use_gcc": False}).segment_images(images(1, 0))
    with pytest.raises(ValueError, match="on its own, but use_rfce=True with context='reference' reads a reference"):
        SSLTM(K, **{**TINY, "short_term": "none", "use_gcc": False}).segment_images(images(1, 0))


def expected_views(model: SSLTM, query_features, batch, target, strong_classes: bool = False):
    """(L, L^s) recomputed from the formulas, CE(cls(f~) x 100), with the weak reference's classes for both views
    (or the strong view's own with ``strong_classes``); and the two views' classes."""
    ref_logits, ref_features = model.segment_images(batch["reference"])
    strong_logits, strong_features = model.segment_images(batch["reference_strong"])
    classes = ref_logits.argmax(1), strong_logits.argmax(1)
    losses = []
    for features, view_classes in ((ref_features, classes[0]), (strong_features, classes[strong_classes])):
        protos, present = prototypes(features, view_classes, K, "batch")
        logits = model.seg_head.classify(reconstruct(query_features, protos, present, 0.5))
        losses.append(cross_entropy(resize(logits, SIZE) * 100, target, 255))
    return losses, classes


def test_labelled_terms_against_the_formulas():
    """ifr_l = w_L r(t) CE(cls(f~) x 100, label) and ifr_l_strong = w_L w_s r(t) CE(...) with the strong view's
    prototypes under the weak view's classes (eval mode: no dropout, batch norm from running statistics)."""
    model = per_frame_model().eval()
    objective = IFR(cfg_of("train.ifr.unlabeled=false"), model)
    assert objective.terms == ("ifr_l", "ifr_l_strong") and objective.needs == {"strong"}
    batch = labelled_batch()
    out = model(batch["frames"], labels=batch["label"], return_features=True)
    terms = objective(model, batch, out, 2000)
    (labeled, strong), (weak, strong_classes) = expected_views(model, out["features"], batch, batch["label"])
    assert (weak != strong_classes).any()  # the two views' classes differ for this draw
    ramp = math.exp(-1.25)
    torch.testing.assert_close(terms["ifr_l"], 1e-2 * ramp * labeled)
    torch.testing.assert_close(terms["ifr_l_strong"], 1e-3 * ramp * strong)
    (_, other_strong), _ = expected_views(model, out["features"], batch, batch["label"], strong_classes=True)
    assert not torch.allclose(terms["ifr_l_strong"], 1e-3 * ramp * other_strong)  # the strong view's own classes
    unscaled = model.seg_head.classify(
        reconstruct(out["features"], *prototypes(model.segment_images(batch["reference"])[1], weak, K), 0.5)
    )
    assert not torch.allclose(labeled, cross_entropy(resize(unscaled, SIZE), batch["label"], 255))


def test_gradient_reaches_the_reference_images_through_the_prototypes():
    model = per_frame_model()
    objective = IFR(cfg_of("train.ifr.unlabeled=false", "train.ifr.rampup_iters=0"), model)
    batch = labelled_batch()
    for key in ("reference", "reference_strong"):
        batch[key].requires_grad_(True)
    out = model(batch["frames"], labels=batch["label"], return_features=True)
    terms = objective(model, batch, out, 0)
    (terms["ifr_l"] + terms["ifr_l_strong"]).backward()
    for key in ("reference", "reference_strong"):
        assert batch[key].grad is not None and batch[key].grad.abs().sum() > 0, key


def test_train_step_with_unlabelled_clips():
    """The four terms, each weighted, in TrainStep's total; the unlabelled terms use the clips' own predictions."""
    cfg = cfg_of("train.objectives=[ifr]", "train.ifr.rampup_iters=0")
    model = per_frame_model()
    (objective,) = build_objectives(cfg, model)
    step = TrainStep(model, [objective])
    assert step.needs == {"unlabeled", "strong"}
    assert step.loss_terms == ("sup", "mse", "aux", "ifr_l", "ifr_l_strong", "ifr_u", "ifr_u_strong", "total")
    batch = labelled_batch(unlabeled=True)
    losses = step(batch, 0)
    assert tuple(losses) == step.loss_terms
    assert all(losses[k] > 0 for k in ("ifr_l", "ifr_l_strong", "ifr_u", "ifr_u_strong"))
    torch.testing.assert_close(losses["total"], losses["sup"] + sum(losses[k] for k in objective.terms))
    losses["total"].backward()
    assert model.seg_head[2].weight.grad.abs().sum() > 0
    del batch["unlabeled"]["reference_strong"]
    with pytest.raises(ValueError, match=r"'ifr' reads 'reference_strong', which batch\[\"unlabeled\"\] lacks"):
        step(batch, 0)


# ------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (("model.short_term=stt",), r"model.short_term 'none' and model.use_rfce false, got model.short_term 'stt'"),
        (("model.use_rfce=true",), r"model.short_term 'none' and model.use_rfce false, .* model.use_rfce True"),
        (("train.ifr.prototype_scope=video",), r"train.ifr.prototype_scope must be one of \('batch', 'image'\)"),
        (("train.ifr.labeled_weight=-1",), "train.ifr.labeled_weight must be >= 0, got -1"),
        (("train.ifr.strong_weight=-0.1",), "train.ifr.strong_weight must be >= 0"),
        (("train.ifr.temperature=0",), "train.ifr.temperature must be positive"),
        (("train.ifr.rampup_iters=-1",), "train.ifr.rampup_iters must be >= 0"),
        (("data.mode=full",), "data.dataset 'synthetic' with data.mode 'full'"),
        (("data.dataset=vspw", "data.mode=full"), "data.dataset 'vspw' with data.mode 'full'"),
        (("data.dataset=camvid", "data.mode=full"), "data.dataset 'camvid'"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        cfg_of("train.objectives=[ifr]", *overrides)


def test_configs_without_unlabelled_terms_pass():
    cfg = cfg_of("train.objectives=[ifr]", "data.mode=full", "train.ifr.unlabeled=false")
    assert check_objectives(cfg) == [IFR]


def test_table5_config_is_the_image_baseline_with_ifr():
    path = ROOT / "configs" / "table5" / "ifr.yaml"
    header = path.read_text().splitlines()[:5]
    assert "SSLTM Table 5, IFR 36.26 mIoU / 83.05 mVC8" in header[0]
    assert any("PSPNet stride-8 features are replaced by the baseline's stride-4 phi_seg" in line for line in header)
    cfg, baseline = load_config(path), load_config(ROOT / "configs" / "table5" / "upernet.yaml")
    assert cfg.data == baseline.data and cfg.model == baseline.model
    assert list(cfg.train.objectives) == ["ifr"] and check_objectives(cfg) == [IFR]
    assert cfg.train.ifr == load_config(None).train.ifr  # the defaults, spelled out
    cfg.train.objectives, cfg.work_dir = baseline.train.objectives, baseline.work_dir
    assert cfg.train == baseline.train and cfg == baseline


def test_training_run_with_ifr_on_synthetic_sf(tmp_path):
    """``ssltm train`` with ``train.objectives=[ifr]`` on VSPW-SF-like synthetic videos: every logged step holds
    the four IFR terms (the unlabelled ones from the trainer's unlabelled clips), positive and finite, in ``total``."""
    from test_cli import log_records, train_cli

    work = tmp_path / "run"
    per_frame = ["data.mode=sf", "data.offsets=[]", "model.short_term=none", "model.use_rfce=false"]
    run = ["train.objectives=[ifr]", "train.ifr.rampup_iters=0", "train.max_iters=2", "train.batch_size=2"]
    assert train_cli(tmp_path, work, *per_frame, "model.use_gcc=false", *run, "train.validate=false") == 0
    steps = [r for r in log_records(work) if "total" in r]
    assert len(steps) == 2
    for step in steps:
        terms = [step[k] for k in ("ifr_l", "ifr_l_strong", "ifr_u", "ifr_u_strong")]
        assert all(0 < t < math.inf for t in terms)
        assert step["total"] == pytest.approx(step["sup"] + sum(terms), rel=1e-4)

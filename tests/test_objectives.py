"""The objectives API (TrainStep, train.objectives) and ETC's temporal loss: closed forms, masks, the gradient
paths, per-frame model outputs (all_frames / return_features), gradient accumulation under DDP's no_sync and
the configuration errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as torch_dist
from omegaconf import OmegaConf
from test_model import TINY, K, clip, tiny_model
from torch.nn.parallel import DistributedDataParallel

from ssltm.config import ConfigError, load_config
from ssltm.flow import ZeroFlowProvider, warp
from ssltm.model.neck import resize
from ssltm.objectives import OBJECTIVES, TemporalLoss, TrainStep, occlusion_mask, temporal_loss

PER_FRAME = dict(short_term="none", use_rfce=False, use_gcc=False, num_adjacent=1)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("SSLTM_BACKEND", "reference")


def shift_right(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """``x`` moved ``pixels`` columns to the right (the first columns repeat the edge)."""
    out = x.clone()
    out[..., pixels:] = x[..., :-pixels]
    out[..., :pixels] = x[..., :1]
    return out


# ------------------------------------------------------------------------------------- temporal loss
def test_temporal_loss_is_zero_for_identical_frames_and_zero_flow_and_its_mask_is_one():
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 9, 11, generator=gen)
    logits = torch.randn(2, 4, 9, 11, generator=gen)
    flow = torch.zeros(2, 2, 9, 11)
    assert torch.equal(occlusion_mask(image, image), torch.ones(2, 1, 9, 11))
    # zero flow samples every pixel centre: the warp is the identity up to grid_sample's float rounding
    assert temporal_loss(logits, logits.clone(), image, image.clone(), flow, 0.1).item() < 1e-12


def test_integer_shift_with_the_matching_flow_leaves_no_residual_where_the_source_is_inside():
    """The adjacent frame is the query moved 2 columns right; the flow query -> adjacent is +2 in x. Where
    ``x + 2`` lies inside the image the warped adjacent frame and scores equal the query's: M = 1 and the
    residual is 0; only the last two columns (their source outside) may differ."""
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(1, 3, 8, 12, generator=gen)
    query_logits = torch.randn(1, 3, 8, 12, generator=gen)
    adjacent, adjacent_logits = shift_right(query, 2), shift_right(query_logits, 2)
    flow = torch.zeros(1, 2, 8, 12)
    flow[:, 0] = 2.0
    mask = occlusion_mask(query, warp(adjacent, flow))
    residual = mask * query_logits - mask * warp(adjacent_logits, flow)
    inside = residual[..., :-2]
    assert torch.allclose(mask[..., :-2], torch.ones_like(mask[..., :-2]))
    assert inside.abs().max().item() < 1e-5
    assert residual[..., -2:].abs().max().item() > 1e-2  # the test would see a wrong shift
    # the loss is the mean over all B, K, H, W of the squared residual, times lambda
    expected = 0.1 * residual.square().mean()
    assert temporal_loss(query_logits, adjacent_logits, query, adjacent, flow, 0.1).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_temporal_loss_by_hand_on_a_2x2_image():
    """K = 1, zero flow: M = exp(-|sum_c (I_q - I_a)|) per pixel, L = lambda * mean((M o_q - M o_a)^2)."""
    query = torch.tensor([[[[0.0, 1.0], [2.0, 0.5]]]]).expand(1, 3, 2, 2).clone()
    adjacent = torch.tensor([[[[0.0, 0.5], [1.0, 0.5]]]]).expand(1, 3, 2, 2).clone()
    o_q = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    o_a = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    diffs = [0.0, 1.5, 3.0, 0.0]  # sum over the 3 channels of I_q - I_a
    masks = [math.exp(-abs(d)) for d in diffs]
    residuals = [m * (q - a) for m, q, a in zip(masks, [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 0.0], strict=True)]
    expected = 0.25 * sum(r * r for r in residuals) * 0.1
    got = temporal_loss(o_q, o_a, query, adjacent, torch.zeros(1, 2, 2, 2), 0.1)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_temporal_loss_reaches_both_logits_and_not_the_flow():
    gen = torch.Generator().manual_seed(2)
    query, adjacent = torch.randn(2, 1, 3, 6, 7, generator=gen)
    o_q = torch.randn(1, 3, 6, 7, generator=gen, requires_grad=True)
    o_a = torch.randn(1, 3, 6, 7, generator=gen, requires_grad=True)
    flow = torch.full((1, 2, 6, 7), 0.3, requires_grad=True)
    temporal_loss(o_q, o_a, query, adjacent, flow, 0.1).backward()
    assert o_q.grad.abs().sum() > 0 and o_a.grad.abs().sum() > 0
    assert flow.grad is None


# ------------------------------------------------------------------- per-frame outputs of the model
def test_all_frames_segments_every_frame_as_its_own_query_and_features_classify_to_the_logits():
    model = tiny_model(**PER_FRAME).eval()
    frames, _, _ = clip(2, (64, 48), n=1)
    with torch.no_grad():
        out = model(frames, all_frames=True, return_features=True)
        assert out["frame_logits"].shape == (2, 2, K, 64, 48)
        assert torch.equal(out["logits"], out["frame_logits"][:, 0])
        for t in range(2):
            alone = model(frames[:, [t, 1 - t]], return_features=True)  # frame t as the query
            assert torch.allclose(out["frame_logits"][:, t], alone["logits"], atol=1e-5)
            assert torch.allclose(out["frame_features"][:, t], alone["features"], atol=1e-5)
        features = out["features"]
        assert features.shape == (2, TINY["head_channels"], 16, 12)
        assert torch.allclose(resize(model.seg_head.classify(features), (64, 48)), out["logits"], atol=1e-6)


def test_all_frames_refuses_a_module_that_reads_the_adjacent_frames():
    model = tiny_model(use_rfce=False, use_gcc=False)
    frames, _, _ = clip(1)
    with pytest.raises(ValueError, match="all_frames=True .* short_term 'stt'"):
        model(frames, all_frames=True)


# ------------------------------------------------------------------------------------------ TrainStep
def per_frame_config(**train):
    cfg = load_config(
        overrides=[
            "model.short_term=none",
            "model.use_rfce=false",
            "model.use_gcc=false",
            "data.offsets=[1]",
            "train.objectives=[temporal_loss]",
            *[f"train.{k}={v}" for k, v in train.items()],
        ]
    )
    return cfg


def test_train_step_returns_its_loss_terms_and_the_total_adds_the_weighted_temporal_term():
    model = tiny_model(**PER_FRAME)
    model.set_flow_provider(ZeroFlowProvider())
    step = TrainStep(model, [TemporalLoss(per_frame_config(), model)])
    assert step.loss_terms == ("sup", "mse", "aux", "temporal", "total") and step.needs == {"flow"}
    frames, _, labels = clip(2, n=1)
    losses = step({"frames": frames, "label": labels}, 0)
    assert tuple(losses) == step.loss_terms
    assert losses["temporal"] > 0
    total = losses["sup"] + model.alpha * losses["mse"] + model.beta * losses["aux"] + losses["temporal"]
    assert torch.allclose(losses["total"], total)
    assert list(dict(step.named_parameters())) == [f"model.{n}" for n, _ in model.named_parameters()]


def test_loader_flow_is_used_when_the_batch_carries_it():
    model = tiny_model(**PER_FRAME)
    model.set_flow_provider(ZeroFlowProvider())
    step = TrainStep(model, [TemporalLoss(per_frame_config(), model)]).eval()
    frames, _, labels = clip(1, n=1)
    frames[:, 1] = shift_right(frames[:, 0], 3)
    flow = torch.zeros(1, 1, 2, 64, 64)
    flow[:, :, 0] = 3.0
    with torch.no_grad():
        zero = step({"frames": frames, "label": labels}, 0)["temporal"]
        matched = step({"frames": frames, "label": labels, "flow": flow}, 0)["temporal"]
    assert matched.item() != zero.item()


def test_accumulation_under_no_sync_equals_one_big_batch(tmp_path):
    """DDP (one gloo process) over TrainStep: two micro-batches, the first under ``no_sync``, give the gradient
    of the two clips as one batch (batch norm in eval mode, so that the statistics do not depend on the split)."""
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cfg = per_frame_config()
        grads = []
        frames, _, labels = clip(2, n=1)
        for split in (False, True):
            model = tiny_model(**PER_FRAME, dropout=0.0)
            model.set_flow_provider(ZeroFlowProvider())
            ddp = DistributedDataParallel(TrainStep(model, [TemporalLoss(cfg, model)]).eval())
            if split:
                with ddp.no_sync():
                    (ddp({"frames": frames[:1], "label": labels[:1]}, 0)["total"] / 2).backward()
                (ddp({"frames": frames[1:], "label": labels[1:]}, 0)["total"] / 2).backward()
            else:
                ddp({"frames": frames, "label": labels}, 0)["total"].backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
        for name in grads[0]:
            assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name
    finally:
        torch_dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.objectives=[nope]"], "unknown objective 'nope'; choices: "),
        (
            ["train.objectives=[temporal_loss,temporal_loss]", "model.short_term=none", "data.offsets=[1]"],
            "lists 'temporal_loss' twice",
        ),
        (["train.objectives=[temporal_loss]", "data.offsets=[1]"], "model.short_term must be 'none', got 'stt'"),
        (["train.objectives=[temporal_loss]", "model.short_term=none"], "data.offsets must hold one offset"),
        (
            [
                "train.objectives=[temporal_loss]",
                "model.short_term=none",
                "data.offsets=[1]",
                "train.temporal_loss.weight=-1",
            ],
            "train.temporal_loss.weight must be >= 0",
        ),
    ],
)
def test_objective_config_errors_name_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(overrides=overrides)


def test_every_objective_has_a_config_section():
    train = OmegaConf.structured(load_config().train)
    for name in OBJECTIVES:
        assert name in train, name

"""The SSLTM model on the CPU: every ablation switch and QFCE forward + backward at tiny sizes (ResNet-18,
narrow widths, 64x64 and the odd 65x97), gradient paths of G, the loss terms and the ignore index, loading a
torchvision checkpoint, eval determinism, streaming / whole-video prediction against clip prediction,
torch.compile without graph breaks, input errors, the paper configurations' parameter counts, and a CPU
smoke run of the model benchmark. The kernels' own tests live with the ops; here every op runs its
reference backend (conftest enables the Triton interpreter on CPU, far too slow for a whole model), except
in one test of the model on the dispatched kernels at 32x40."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from benchmark_runs import run_cpu_benchmark

from ssltm import SSLTM, VideoPredictor
from ssltm.checkpoint import load_weights
from ssltm.data import ClipSampler
from ssltm.model.backbone import ResNetTrunk
from ssltm.model.heads import cross_entropy, present_classes
from ssltm_kernels import gcc_assign

ROOT = Path(__file__).resolve().parent.parent
K = 5
# ResNet-18 with narrow heads: the structure of the paper's model at a fraction of the cost. Two units at
# stride 4 so that shifted windows have a unit to shift.
TINY = dict(
    backbone="resnet18",
    fpn_dim=32,
    ppm_dim=32,
    stt_dims=(32, 32, 32, 32),
    stt_depths=(2, 1, 1, 1),
    context_dim=32,
    head_channels=16,
    aux_channels=16,
)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("SSLTM_BACKEND", "reference")


def tiny_model(seed: int = 0, **overrides) -> SSLTM:
    torch.manual_seed(seed)
    return SSLTM(K, **{**TINY, **overrides})


def clip(batch: int, size=(64, 64), seed: int = 0, n: int = 3):
    """frames (B, 1+n, 3, H, W), reference (B, 3, H, W), labels (B, H, W) with every class and some ignore."""
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randn(batch, 1 + n, 3, *size, generator=gen)
    reference = torch.randn(batch, 3, *size, generator=gen)
    labels = torch.randint(0, K, (batch, *size), generator=gen)
    labels[:, :3] = 255
    return frames, reference, labels


def grads(model: SSLTM) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in model.named_parameters()}


# ----------------------------------------------------------------------- forward + backward, every switch
ABLATIONS = {
    "full": dict(),
    "baseline": dict(use_stt=False, use_rfce=False, use_gcc=False),  # Table 4 row 1: UperNet-style
    "stt": dict(use_rfce=False, use_gcc=False),
    "stt+rfce": dict(use_gcc=False),
    "rfce+gcc, no stt": dict(use_stt=False),
    "qfce": dict(context="query"),
    "shifted windows, reference through stt": dict(shifted_windows=True, reference_stt=True),
}


@pytest.mark.parametrize(
    ("name", "size", "batch"),
    [
        ("full", (64, 64), 2),
        ("full", (65, 97), 1),
        ("baseline", (65, 97), 2),
        ("stt", (64, 64), 1),
        ("stt+rfce", (64, 64), 1),
        ("rfce+gcc, no stt", (64, 64), 1),
        ("qfce", (64, 64), 1),
        ("shifted windows, reference through stt", (65, 97), 1),
    ],
)
def test_training_step_every_switch(name, size, batch):
    """Logits at input size, Eq. 10, finite losses, and a nonzero gradient for every parameter."""
    model = tiny_model(**ABLATIONS[name]).train()
    frames, reference, labels = clip(batch, size)
    out = model(frames, None if name == "qfce" else reference, labels)
    assert out["logits"].shape == (batch, K, *size)
    losses = out["losses"]
    assert set(losses) == {"sup", "mse", "aux", "total"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    torch.testing.assert_close(losses["total"], losses["sup"] + 1.0 * losses["mse"] + 0.5 * losses["aux"])
    assert losses["sup"] > 0
    assert (losses["aux"] > 0) == model.use_rfce and (losses["mse"] > 0) == model.use_gcc
    assert hasattr(model, "ocr") == model.use_rfce and hasattr(model, "gcc") == model.use_gcc
    losses["total"].backward()
    no_grad = [n for n, g in grads(model).items() if g is None or not torch.isfinite(g).all() or not g.any()]
    assert not no_grad, f"parameters without a (finite, nonzero) gradient: {no_grad}"


def test_alpha_beta_weigh_the_terms():
    model = tiny_model(alpha=0.25, beta=2.0)
    losses = model(*clip(1))["losses"]
    torch.testing.assert_close(losses["total"], losses["sup"] + 0.25 * losses["mse"] + 2.0 * losses["aux"])


# ------------------------------------------------------------------------------------------ G and MSE
def test_gcc_gradient_paths_and_mse_classes():
    """The MSE term is Eq. 8-9 over the classes present in the label (ignore pixels mark none); its gradient
    reaches G only, and only the nearest centres of present classes; the other terms reach G through the
    attention; in eval mode G gets no gradient but still shapes the logits."""
    model = tiny_model().train()
    frames, reference, labels = clip(2)
    labels[0] = torch.where(labels[0] == 255, 255, labels[0] % 2 * 2)  # image 0: classes {0, 2} + ignore
    labels[1, 3:] = 4  # image 1: class 4 + ignore
    captured = {}
    model.ocr.register_forward_hook(lambda m, args, out: captured.__setitem__("query", out[1]))  # last: query
    losses = model(frames, reference, labels)["losses"]

    valid = torch.zeros(2, K, dtype=torch.bool)
    valid[0, [0, 2]] = True
    valid[1, 4] = True
    assert torch.equal(present_classes(labels, K, 255), valid)
    categories = captured["query"].detach()
    index, _, expected = gcc_assign(categories, model.gcc.centers.detach(), valid)
    torch.testing.assert_close(losses["mse"], expected)

    params = dict(model.named_parameters())
    mse_grads = torch.autograd.grad(losses["mse"], list(params.values()), retain_graph=True, allow_unused=True)
    reached = [n for n, g in zip(params, mse_grads, strict=True) if g is not None and g.any()]
    assert reached == ["gcc.centers"], f"the MSE term's gradient reached {reached}: stop-gradient broken"
    g_mse = mse_grads[list(params).index("gcc.centers")]
    hit = torch.zeros_like(g_mse, dtype=torch.bool)
    for b, j in valid.nonzero().tolist():
        hit[index[b, j], j] = True
    assert g_mse[hit].abs().sum(-1).gt(0).all() and not g_mse[~hit].any()  # only present classes' nearest

    rest = losses["sup"] + 0.5 * losses["aux"]
    (g_rest,) = torch.autograd.grad(rest, [model.gcc.centers], retain_graph=True)
    assert g_rest.abs().sum(-1).gt(0).all()  # the attention uses every centre of every class
    losses["total"].backward()
    torch.testing.assert_close(model.gcc.centers.grad, g_mse + g_rest)

    model.eval()
    model.zero_grad(set_to_none=True)
    out = model(frames, reference, labels)
    out["losses"]["total"].backward()
    assert model.gcc.centers.grad is None
    with torch.no_grad():
        model.gcc.centers.add_(1.0)
        assert not torch.allclose(model(frames, reference)["logits"], out["logits"])


def test_all_ignore_label_gives_finite_zero_losses():
    model = tiny_model()
    frames, reference, labels = clip(1)
    losses = model(frames, reference, torch.full_like(labels, 255))["losses"]
    for name, value in losses.items():
        assert torch.isfinite(value) and value == 0, name
    losses["total"].backward()
    assert all(g is None or torch.isfinite(g).all() for g in grads(model).values())


def test_cross_entropy_and_present_classes_honour_the_ignore_index():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, K, 6, 7, generator=gen)
    labels = torch.randint(0, K, (2, 6, 7), generator=gen)
    labels[0, 0] = 3  # ignore_index inside [0, K): those pixels are still ignored
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=3)
    torch.testing.assert_close(cross_entropy(logits, labels, 3), expected)
    present = present_classes(labels, K, 3)
    assert not present[:, 3].any()
    assert torch.equal(
        present[:, [0, 1, 2, 4]], torch.stack([(labels == k).flatten(1).any(1) for k in (0, 1, 2, 4)], 1)
    )


# ---------------------------------------------------------------------------------- pretrained backbone
def test_torchvision_checkpoint_loads_through_pretrained(tmp_path):
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18(weights=None)
    resnet.bn1.running_mean.uniform_()  # buffers load too
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    model = SSLTM(K, **{**TINY, "pretrained": path})
    ours = model.backbone.state_dict()
    theirs = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    with pytest.raises(ValueError, match="resnet18.pth.*does not fit"):
        ResNetTrunk("resnet50", path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ResNetTrunk("resnet18", tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------- inference
def test_eval_is_deterministic_and_predict_restores_the_mode():
    model = tiny_model().train()
    frames, reference, _ = clip(1, (65, 97))
    pred = model.predict(frames, reference)
    assert model.training and pred.shape == (1, 65, 97) and pred.dtype == torch.int64
    model.eval()
    with torch.no_grad():
        first, second = model(frames, reference)["logits"], model(frames, reference)["logits"]
    assert torch.equal(first, second)
    assert torch.equal(pred, first.argmax(1))


def _clips(video: torch.Tensor, sampler: ClipSampler):
    length = video.shape[0]
    frames = torch.stack([video[[q, *sampler.adjacent(q, length)]] for q in range(length)])
    reference = torch.stack([video[sampler.reference_index(q, length)] for q in range(length)])
    return frames, reference


def _assert_same_maps(actual: torch.Tensor, model: SSLTM, frames, reference):
    """Same class maps as clip prediction; a pixel may differ only where the clip's top two logits are
    closer than the float noise of encoding frames in another batch."""
    model.eval()
    with torch.no_grad():
        logits = model(frames, reference)["logits"]
    top2 = logits.topk(2, dim=1).values
    differ = actual != logits.argmax(1)
    assert not (differ & (top2[:, 0] - top2[:, 1] > 1e-4)).any()


@pytest.mark.parametrize("context", ["reference", "query"])
def test_streaming_and_whole_video_equal_clip_prediction(context):
    """Frame by frame (causal clips, reference frame 0) and the whole video (adjacent frames after the query
    at the start, farthest reference) against clip-at-a-time prediction, one backbone pass per frame."""
    model = tiny_model(context=context)
    offsets = (1, 2, 3)
    video = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    passes = []
    model.backbone.register_forward_hook(lambda m, args, out: passes.append(args[0].shape[0]))

    predictor = VideoPredictor(model, offsets)
    streamed = torch.stack([predictor.step(frame) for frame in video])
    assert streamed.shape == (6, 64, 64) and sum(passes) == 6
    _assert_same_maps(streamed, model, *_clips(video, ClipSampler(offsets, causal=True, reference="farthest")))

    passes.clear()
    offline = torch.stack(list(predictor.predict_video(video)))
    assert sum(passes) == 6
    _assert_same_maps(offline, model, *_clips(video, ClipSampler(offsets, causal=False, reference="farthest")))

    predictor.reset()  # batched frames: two videos in lockstep
    pair = torch.stack([video, video.flip(0)], 1)
    both = torch.stack([predictor.step(frames) for frames in pair], 1)
    assert torch.equal(both[0], streamed)


# --------------------------------------------------------------------------------- kernels in the model
def _step(model: SSLTM, inputs, dtype=None):
    """Logits and every parameter's gradient of one training step (under autocast to ``dtype`` if given)."""
    model.zero_grad(set_to_none=True)
    device = inputs[0].device.type
    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        out = model(*inputs)
    out["losses"]["total"].backward()
    return out["logits"].float(), {n: p.grad.float() for n, p in model.named_parameters()}


def test_kernel_dispatch_matches_the_reference_backend(monkeypatch):
    """The model on the dispatched kernels (Triton through the interpreter on CPU) against the reference
    backend: the ops compose (strided views, layouts, dtypes) and every gradient agrees. 32x40 keeps the
    interpreter to a few windows."""
    model = tiny_model(dropout=0.0).train()
    inputs = clip(1, (32, 40))
    ref_logits, ref_grads = _step(model, inputs)
    monkeypatch.delenv("SSLTM_BACKEND")
    logits, grads_ = _step(model, inputs)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    for name, g in grads_.items():
        scale = ref_grads[name].abs().max().clamp(min=1e-6)
        assert (g - ref_grads[name]).abs().max() <= 1e-4 * scale, name


@pytest.mark.gpu
def test_gpu_kernels_bf16_within_twice_the_reference_error(monkeypatch):
    """On a GPU under bf16 autocast: the kernels' logits and gradients are at most twice as far from the fp32
    reference as the reference backend's own bf16 run (plus a small floor)."""
    model = tiny_model(dropout=0.0).cuda().train()
    inputs = tuple(x.cuda() for x in clip(2, (65, 97)))
    exact_logits, exact_grads = _step(model, inputs)
    ref_logits, ref_grads = _step(model, inputs, torch.bfloat16)
    monkeypatch.delenv("SSLTM_BACKEND")
    logits, grads_ = _step(model, inputs, torch.bfloat16)
    err = lambda a, b: (a - b).abs().max().item()
    assert err(logits, exact_logits) <= 2 * err(ref_logits, exact_logits) + 1e-3
    for name, g in grads_.items():
        scale = exact_grads[name].abs().max().item()
        assert err(g, exact_grads[name]) <= 2 * err(ref_grads[name], exact_grads[name]) + 1e-3 * scale, name


# ------------------------------------------------------------------------------------------ torch.compile
def test_torch_compile_has_no_graph_break():
    """fullgraph=True fails on any graph break: a training step and an inference step trace whole, kernel
    ops included (the "eager" backend proves it without an inductor compile)."""
    torch._dynamo.reset()
    model = tiny_model().train()
    frames, reference, labels = clip(1)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.manual_seed(0)
    losses = compiled(frames, reference, labels)["losses"]
    losses["total"].backward()
    assert all(g is not None for g in grads(model).values())
    model.eval()
    with torch.no_grad():
        logits = compiled(frames, reference)["logits"]
        torch.testing.assert_close(logits, model(frames, reference)["logits"])
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def checked_model():
    torch.manual_seed(0)
    return SSLTM(K, **TINY)


F5 = torch.zeros(1, 4, 3, 64, 64)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.zeros(4, 3, 64, 64),), ValueError, r"frames must be \(B, 4, 3, H, W\).*got shape \(4, 3, 64, 64\)"),
        (
            (torch.zeros(1, 3, 3, 64, 64),),
            ValueError,
            r"frames must be \(B, 4, 3, H, W\).*got shape \(1, 3, 3, 64, 64\)",
        ),
        ((torch.zeros(1, 4, 1, 64, 64),), ValueError, r"frames .*got shape \(1, 4, 1, 64, 64\)"),
        ((torch.zeros(1, 4, 3, 31, 64),), ValueError, r"at least 32x32.*\(1, 4, 3, 31, 64\)"),
        ((torch.zeros(1, 4, 3, 64, 64, dtype=torch.uint8),), TypeError, "frames must be a floating-point"),
        (([0.0],), TypeError, "frames must be a tensor"),
        ((F5,), ValueError, r"reference \(B, 3, H, W\) = \(1, 3, 64, 64\) is required"),
        (
            (F5, torch.zeros(1, 3, 64, 65)),
            ValueError,
            r"reference must have shape \(1, 3, 64, 64\).*got \(1, 3, 64, 65\)",
        ),
        ((F5, torch.zeros(1, 1, 64, 64)), ValueError, r"reference must have shape.*got \(1, 1, 64, 64\)"),
        ((F5, torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64)), TypeError, "labels must be an integer tensor"),
        (
            (F5, torch.zeros(1, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.long)),
            ValueError,
            r"labels must have shape \(1, 64, 64\).*got \(2, 64, 64\)",
        ),
    ],
)
def test_bad_inputs_name_the_argument_and_shape(checked_model, args, error, match):
    with pytest.raises(error, match=match):
        checked_model(*args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(context="neighbour"), "context must be one of"),
        (dict(use_rfce=False), "use_gcc=True needs use_rfce=True"),
        (dict(backbone="resnet34"), "backbone must be one of"),
        (dict(stt_dims=(32, 48, 64, 128)), "STT dim 48 must be a multiple of the head dim 32"),
        (dict(context_dim=40), "context_dim 40 must be a multiple of the head dim 32"),
    ],
)
def test_bad_configurations(kwargs, match):
    with pytest.raises(ValueError, match=match), torch.device("meta"):
        SSLTM(K, **{**TINY, **kwargs})


def test_predictor_errors(checked_model):
    with pytest.raises(ValueError, match=r"offsets \(3, 6\) must give one distance per adjacent frame"):
        VideoPredictor(checked_model, (3, 6))
    predictor = VideoPredictor(checked_model, (1, 2, 3))
    with pytest.raises(ValueError, match=r"frame must be \(3, H, W\) or \(B, 3, H, W\).*got shape \(4, 64, 64\)"):
        predictor.step(torch.zeros(4, 64, 64))
    predictor.step(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"frame has shape \(3, 64, 96\) but this video's frames are"):
        predictor.step(torch.zeros(3, 64, 96))


# --------------------------------------------------------------------------------------------- size
# The paper's counts (Tables 1 and 3): UperNet, its image baseline, and SSLTM, per scale.
PAPER_SCALES = [(124, "resnet101", 60.9e6, 62.1e6), (19, "resnet50", 41.9e6, 43.1e6)]
BASELINE = dict(use_stt=False, use_rfce=False, use_gcc=False)


def upernet_head_parameters(in_channels, num_classes, fpn_dim=256, ppm_dim=512, scales=4):
    """VSPW's UPerNet head counted from its layer list (every conv bias-free and followed by BN, but the
    classifier): PPM branches (1x1), ppm_last_conv (3x3), fpn_in (1x1), fpn_out (3x3), conv_last (3x3 over the
    four concatenated levels), classifier (1x1 with bias)."""
    conv_bn = lambda c_in, c_out, k: c_in * c_out * k * k + 2 * c_out
    *fine, coarse = in_channels
    return (
        scales * conv_bn(coarse, ppm_dim, 1)
        + conv_bn(coarse + scales * ppm_dim, fpn_dim, 3)
        + sum(conv_bn(c, fpn_dim, 1) for c in fine)
        + len(fine) * conv_bn(fpn_dim, fpn_dim, 3)
        + conv_bn(len(in_channels) * fpn_dim, fpn_dim, 3)
        + fpn_dim * num_classes
        + num_classes
    )


@pytest.mark.parametrize(("num_classes", "backbone", "paper_baseline", "paper_ssltm"), PAPER_SCALES)
def test_baseline_is_vspw_upernet_and_ssltm_adds_the_paper_budget(num_classes, backbone, paper_baseline, paper_ssltm):
    with torch.device("meta"):
        baseline = SSLTM(num_classes, backbone, **BASELINE)
        model = SSLTM(num_classes, backbone)
        resnet = torchvision.models.get_model(backbone)
    trunk = sum(p.numel() for n, p in resnet.named_parameters() if not n.startswith("fc."))
    base, full = baseline.parameter_breakdown(), model.parameter_breakdown()
    for counts in (base, full):
        assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
        assert counts["backbone"] == trunk
    # VSPW's UPerNet layer for layer; its ResNet's deep stem is the 123,776 parameters more of the paper's count
    assert base["total"] == trunk + upernet_head_parameters((256, 512, 1024, 2048), num_classes)
    assert base["total"] + 123_776 == {124: 60_883_004, 19: 41_863_891}[num_classes]
    assert abs(base["total"] / paper_baseline - 1) < 0.005, base
    assert abs(full["total"] / paper_ssltm - 1) < 0.01, full
    # SSLTM reuses the trunk, PPM and FPN and is 1.2M above the baseline, as in the paper
    assert full["backbone"] == base["backbone"] and full["neck (PPM + FPN)"] == base["neck (PPM + FPN)"]
    assert abs(full["total"] - base["total"] - 1.2e6) < 0.3e6, (full, base)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ppm_dim=0), "ppm_dim must be a positive integer, got 0"),
        (dict(fpn_dim=2.5), "fpn_dim must be a positive integer, got 2.5"),
        (dict(pool_scales=(1, 0)), r"pool_scales must be positive integers, got \(1, 0\)"),
        (dict(ocr_kernel_size=2), "ocr_kernel_size must be a positive odd integer"),
        (dict(head_channels=0), "head_channels must be a positive integer, got 0"),
    ],
)
def test_impossible_widths_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match), torch.device("meta"):
        SSLTM(K, **{**TINY, **kwargs})


def test_checkpoint_of_other_widths_fails_before_loading_anything(tmp_path):
    old = tiny_model(seed=1, ppm_dim=16)  # a checkpoint of other PPM widths
    model = tiny_model(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = {"model": old.state_dict()}
    first = next(k for k, v in model.state_dict().items() if old.state_dict()[k].shape != v.shape)
    with pytest.raises(
        ValueError,
        match=rf"key '{re.escape(first)}' has shape \(16, 512, 1, 1\) in the checkpoint "
        r"but \(32, 512, 1, 1\) in the model",
    ):
        load_weights(model, ckpt, tmp_path / "old.pt")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was copied
    state = model.state_dict()
    with pytest.raises(ValueError, match=r"key 'seg_head.2.bias' \(5,\) is missing from the checkpoint"):
        load_weights(model, {"model": {k: v for k, v in state.items() if k != "seg_head.2.bias"}}, "x")
    with pytest.raises(ValueError, match="key 'extra' of the checkpoint is not in the model"):
        load_weights(model, {"model": {**state, "extra": torch.zeros(1)}}, "x")


# ------------------------------------------------------------------------------------------- benchmark
def test_benchmark_targets_from_measured_numbers():
    from benchmarks import ssltm_model as bench
    from benchmarks.harness import Row

    def row(case, provider, mode, ms, **kw):
        return Row(case, provider, mode, {}, "bfloat16", ms=ms, ms_p20=ms, ms_p80=ms, **kw)

    rows = [
        row("train", "kernels", "fwd+bwd", 100.0, peak_mib=600.0, correct=True),
        row("train", "reference", "fwd+bwd", 160.0, peak_mib=1000.0, correct=True),
        row("stream", "kernels", "fwd", 50.0, items_per_s=20.0, correct=False),
    ]
    results = {r.target: r for r in bench.evaluate_targets(rows)}
    assert [(r.value, r.status) for r in results.values()] == [
        ("1.60x", "PASS"),
        ("0.60x (600 / 1000 MiB)", "PASS"),
        ("20.0 frames/s", "FAIL (incorrect)"),
    ]
    rows[0].ms, rows[0].peak_mib = 120.0, 800.0
    statuses = [r.status for r in bench.evaluate_targets(rows[:2])]
    assert statuses == ["FAIL", "FAIL", "n/a (no streaming time)"]


def test_benchmark_backbone_and_size_options_change_the_step_cases_only():
    from benchmarks import ssltm_model as bench

    parse_args = bench.SPEC.parse_args
    gpu = bench.chosen_setup(parse_args(["--backbone", "resnet101", "--size", "479"]), on_gpu=True)
    assert gpu.model == {"backbone": "resnet101"} and gpu.size == (479, 479) and gpu.clips == 2
    assert gpu.stream_model == bench.GPU.stream_model and gpu.stream_size == (480, 854)
    cpu = bench.chosen_setup(parse_args(["--size", "48"]), on_gpu=False)
    assert cpu.size == (48, 48) and cpu.model == bench.TINY and cpu.stream_size == bench.CPU.stream_size
    assert bench.chosen_setup(parse_args([]), on_gpu=True) == bench.GPU
    for bad in (["--size", "0"], ["--backbone", "resnet34"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_benchmark_cpu_smoke(tmp_path):
    proc, rows = run_cpu_benchmark(
        "ssltm_model", "--quick", results_dir=tmp_path, timeout=300, unset=("SSLTM_BACKEND",)
    )
    assert "CPU comparison" in proc.stdout and "targets: defined for" in proc.stdout
    by = {(r["case"], r["provider"], r["mode"]): r for r in rows}
    assert all(r["device"] == "cpu" and r["benchmark"] == "ssltm_model" for r in rows)
    for provider in ("kernels", "reference"):
        train = by[("train-cpu", provider, "fwd+bwd")]
        assert train["error"] is None and train["ms"] > 0 and train["correct"] is True, train
        infer = by[("infer-cpu", provider, "fwd")]
        assert infer["error"] is None and infer["ms"] > 0 and infer["correct"] is True, infer
    stream = by[("stream-cpu", "kernels", "fwd")]
    assert stream["error"] is None and stream["items_per_s"] == pytest.approx(1e3 / stream["ms"]), stream
    assert stream["correct"] is True and stream["max_err"] == 0.0  # same class maps on the CPU

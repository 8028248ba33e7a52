"""The short-term module interface on the CPU: ``model.short_term`` / ``model.use_stt`` resolution and its
errors, the Table 5 configs (built at ResNet-101 size on the meta device), the loss-term contract of a
training step per module, the frames, flow and per-video state a module gets in training and from
:class:`VideoPredictor` (streaming and whole videos against clip prediction), and the errors of missing
images or a bad flow. A probe module stands in for a module that reads images and flow and adds a loss term;
NetWarp, Spatial-Temporal OCR, Sparse-TT and CFFM run as they are."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from ssltm import SSLTM, VideoPredictor
from ssltm.build import build_model
from ssltm.config import ConfigError, from_container, load_config
from ssltm.data import ClipSampler
from ssltm.model import short_term as st
from ssltm.model.short_term import SHORT_TERM, QueryOnly, ShortTermModule

ROOT = Path(__file__).resolve().parent.parent
K = 5
TINY = dict(
    backbone="resnet18",
    fpn_dim=16,
    ppm_dim=16,
    stt_dims=(16, 16, 16, 16),
    head_dim=16,
    window_size=(2, 3, 3),
    context_dim=16,
    head_channels=16,
    aux_channels=16,
    use_rfce=False,
    use_gcc=False,
)
SIZE = (32, 40)
SPARSE_TT = dict(offsets=(1, 2), r=1, heads=2)  # 4x5 pixels at stride 8, half of them queries


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("SSLTM_BACKEND", "reference")


# ------------------------------------------------------------------------------------------ probe module
class Probe(ShortTermModule):
    """Reads every frame's fused feature, the frames and the flow, and adds the loss term ``"probe"``: its
    output changes with each of them, so that a wrong frame, image or flow changes the logits."""

    needs_images = True
    needs_flow = True
    loss_terms = ("probe",)

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_channels = channels
        self.mix = nn.Parameter(torch.full((channels, 1, 1), 0.5))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, feats, images=None, flow=None, state=None):
        self.calls.append((images, flow))
        size = feats.shape[-2:]
        pooled = nn.functional.adaptive_avg_pool2d(images.flatten(0, 1), size).unflatten(0, images.shape[:2])
        motion = nn.functional.adaptive_avg_pool2d(flow.flatten(0, 1), size).unflatten(0, flow.shape[:2])
        extra = pooled.mean((1, 2))[:, None] + motion.mean((1, 2))[:, None]
        return feats[:, 0] + self.mix * feats[:, 1:].mean(1) + extra

    def losses(self, labels):
        return {"probe": 0.1 * self.mix.square().mean()}


@pytest.fixture
def probe(monkeypatch):
    """``short_term="netwarp"`` builds a :class:`Probe` (the name that reads images and flow)."""
    build = st.build_short_term

    def fake(name, fpn_dim, num_classes, **args):
        return Probe(st.NUM_LEVELS * fpn_dim) if name == "netwarp" else build(name, fpn_dim, num_classes, **args)

    monkeypatch.setattr("ssltm.model.ssltm.build_short_term", fake)


def shift_flow(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """A flow that depends on both frames (not a real one): pairs mixed up give other values."""
    return (dst[:, :2] - 0.5 * src[:, 1:]).float()


def tiny_model(short_term=None, seed: int = 0, **overrides) -> SSLTM:
    torch.manual_seed(seed)
    return SSLTM(K, **{**TINY, "short_term": short_term, **overrides})


def clip(batch: int = 1, n: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randn(batch, 1 + n, 3, *SIZE, generator=gen)
    labels = torch.randint(0, K, (batch, *SIZE), generator=gen)
    labels[:, :2] = 255
    return frames, labels


# ------------------------------------------------------------------------------------------------ config
def cfg_of(*overrides: str):
    return load_config(None, ["data.offsets=[3,6,9]", *overrides])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ((), "stt"),
        (("model.use_stt=true",), "stt"),
        (("model.use_stt=false",), "none"),
        (("model.short_term=none",), "none"),
        (("model.short_term=none", "model.use_stt=false"), "none"),
        (("model.short_term=stt", "model.use_stt=true"), "stt"),
        (("model.short_term=st_ocr",), "st_ocr"),
        (("model.short_term=netwarp", "data.offsets=[1]"), "netwarp"),
        (("model.short_term=netwarp", "data.offsets=[2]", "model.use_stt=false"), "netwarp"),
        (("model.short_term=sparse_tt", "data.offsets=[1,2]"), "sparse_tt"),
        (("model.short_term=cffm", "model.use_rfce=false", "model.use_gcc=false"), "cffm"),
    ],
)
def test_short_term_resolution(overrides, expected):
    from ssltm.config import short_term

    assert short_term(cfg_of(*overrides)) == expected


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ("model.short_term=netwarp", "model.use_stt=true", "data.offsets=[1]"),
            r"model.use_stt=true contradicts model.short_term='netwarp'",
        ),
        (("model.short_term=stt", "model.use_stt=false"), r"model.use_stt=false contradicts model.short_term='stt'"),
        (
            ("model.short_term=convlstm",),
            r"model.short_term must be one of \('none', 'stt', 'netwarp', 'st_ocr', 'sparse_tt', 'cffm'\) "
            r"or null, got 'convlstm'",
        ),
        (("model.short_term=netwarp",), r"data.offsets must hold one offset, got \[3, 6, 9\]"),
        (("model.short_term=netwarp", "data.offsets=[]"), r"data.offsets must hold one offset, got \[\]"),
        (("model.st_ocr.memory=fifo",), r"model.st_ocr.memory must be one of \('none', 'first_clip'\), got 'fifo'"),
        (("model.netwarp.flowcnn=maybe",), r"model.netwarp.flowcnn"),
        (
            ("model.short_term=cffm", "model.use_rfce=false", "model.use_gcc=false", "data.offsets=[3,6]"),
            r"model.short_term 'cffm' .*: data.offsets must hold three offsets .*got \[3, 6\]",
        ),
        (("model.short_term=cffm",), r"model.short_term 'cffm' reads exactly four frames: set model.use_rfce=false"),
        (("model.cffm.heads=3",), r"model.cffm.dim \(256\) must be divisible by model.cffm.heads \(3\)"),
        (("model.cffm.depth=0",), r"model.cffm.depth must be at least 1, got 0"),
    ],
)
def test_short_term_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        cfg_of(*overrides)


def test_old_checkpoint_configs_and_empty_offsets_load():
    """A config stored before ``short_term`` existed (``use_stt`` a bool, no ``short_term``) still loads, as the
    model it describes; the image baseline has no adjacent frames."""
    from ssltm.config import short_term

    old = OmegaConf.to_container(load_config())
    del old["model"]["short_term"], old["model"]["netwarp"], old["model"]["st_ocr"], old["model"]["cffm"]
    for use_stt, expected in ((True, "stt"), (False, "none")):
        old["model"]["use_stt"] = use_stt
        assert short_term(from_container(old)) == expected
    assert list(load_config(None, ["data.offsets=[]", "model.short_term=none"]).data.offsets) == []


def test_model_arguments_resolve_as_the_config():
    with torch.device("meta"):
        assert SSLTM(K, **TINY).short_term == "stt" and SSLTM(K, **TINY, use_stt=True).short_term == "stt"
        baseline = SSLTM(K, **TINY, use_stt=False)
        assert baseline.short_term == "none" and isinstance(baseline.short_term_module, QueryOnly)
        assert not baseline.use_stt and not any(k.startswith(("stt.", "none.")) for k in baseline.state_dict())
        assert set(SSLTM(K, **TINY, short_term="stt").state_dict()) == set(SSLTM(K, **TINY).state_dict())
        with pytest.raises(ValueError, match=r"use_stt=True contradicts short_term='none'"):
            SSLTM(K, **TINY, use_stt=True, short_term="none")
        choices = r"\('none', 'stt', 'netwarp', 'st_ocr', 'sparse_tt', 'cffm'\)"
        with pytest.raises(ValueError, match=rf"short_term must be one of {choices}"):
            SSLTM(K, **TINY, short_term="convlstm")
    assert SHORT_TERM == ("none", "stt", "netwarp", "st_ocr", "sparse_tt", "cffm")


# ---------------------------------------------------------------------------------------- Table 5 configs
TABLE5 = {
    "upernet": ("none", []),
    "stt": ("stt", [3, 6, 9]),
    "netwarp": ("netwarp", [1]),
    "st_ocr": ("st_ocr", [3, 6, 9]),
    "cffm": ("cffm", [3, 6, 9]),
}


@pytest.mark.parametrize("name", list(TABLE5))
def test_table5_configs_build_their_model(name):
    """Each row of Table 5 builds on the image baseline with its module; the baseline is VSPW's UperNet
    (60,759,228 parameters, the paper-count test's) and +STT adds the full model's STT."""
    path = ROOT / "configs" / "table5" / f"{name}.yaml"
    header = path.read_text().splitlines()[0]
    cfg = load_config(path)
    module, offsets = TABLE5[name]
    assert list(cfg.data.offsets) == offsets and (cfg.model.use_rfce, cfg.model.use_gcc) == (False, False)
    assert cfg.model.backbone == "resnet101" and cfg.data.mode == "sf"
    with torch.device("meta"):
        model = build_model(cfg, 124, pretrained=False)
        full = SSLTM(124, "resnet101")
    assert model.short_term == module and model.num_adjacent == len(offsets)
    counts = model.parameter_breakdown()
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
    published = {
        "upernet": "33.92 / 82.09",
        "stt": "36.72 / 87.06",
        "netwarp": "36.15 / 83.33",
        "cffm": "36.42 / 83.17",
    }
    assert published.get(name, "36.31 / 86.90") in header and "Table 5" in header
    if name == "upernet":
        assert counts["total"] == 60_759_228
    elif name == "stt":
        stt = ("stt projections", "stt blocks")
        assert [counts[k] for k in stt] == [full.parameter_breakdown()[k] for k in stt]
        trunk = sum(p.numel() for n, p in torchvision.models.resnet101().named_parameters() if not n.startswith("fc."))
        assert counts["backbone"] == trunk
    else:
        assert counts[f"short-term module ({name})"] > 0
    if name == "cffm":
        cffm = model.short_term_module
        # the fused levels (4 x fpn_dim) embedded to 256; cat(x_q, enhanced x_q) out
        assert cffm.embed.weight.shape == (256, 4 * 256, 1, 1) and cffm.out_channels == 512
        assert len(cffm.blocks) == 2 and cffm.blocks[0].heads == 8


# ------------------------------------------------------------------------------ training: the loss terms
@pytest.mark.parametrize("name", ["none", "stt", "probe", "netwarp", "st_ocr", "sparse_tt", "cffm"])
def test_training_step_returns_exactly_the_loss_terms(name, request, monkeypatch):
    """A CPU training step per module: the losses are ``model.loss_terms`` in order, ``total`` adds the
    module's terms to Eq. 10, and every parameter gets a gradient."""
    if name == "probe":
        request.getfixturevalue("probe")
    module = "netwarp" if name == "probe" else name
    args = {
        "st_ocr": dict(channels=16, key_channels=8),
        "sparse_tt": SPARSE_TT,
        "cffm": dict(dim=16, depth=1, heads=2),
    }.get(name)
    adjacent = {"netwarp": 1, "cffm": 3}.get(module, 2)
    rfce = name != "cffm"  # CFFM reads exactly four frames: RFCE's reference alone cannot pass it
    model = tiny_model(module, num_adjacent=adjacent, use_rfce=rfce, use_gcc=rfce, short_term_args=args)
    model.set_flow_provider(shift_flow)
    frames, labels = clip(2, model.num_adjacent)
    reference = torch.randn(2, 3, *SIZE)
    losses = model.train()(frames, reference, labels)["losses"]
    extra = model.short_term_module.loss_terms
    assert tuple(losses) == model.loss_terms == ("sup", "mse", "aux", *extra, "total")
    assert (extra == ("probe",)) == (name == "probe")
    expected = losses["sup"] + losses["mse"] + 0.5 * losses["aux"] + sum(losses[k] for k in extra)
    torch.testing.assert_close(losses["total"], expected)
    assert all(torch.isfinite(v) for v in losses.values()) and all(losses[k] > 0 for k in extra)
    losses["total"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not no_grad, no_grad
    assert "flow_provider" not in dict(model.named_modules())
    assert not any(k.startswith("flow_provider") for k in model.state_dict())


def test_probe_gets_the_clip_frames_and_the_flow(probe):
    """The module's images are the clip's frames and its flow the provider's from the query to each adjacent
    frame, or the flow passed to forward; the provider stays out of the state_dict even if it is a module."""
    model = tiny_model("netwarp", num_adjacent=1).eval()
    frames, _ = clip(2, 1)
    model.set_flow_provider(shift_flow)
    with torch.no_grad():
        computed = model(frames)["logits"]
        images, flow = model.short_term_module.calls[-1]
        assert torch.equal(images, frames)
        assert torch.equal(flow, shift_flow(frames[:, 0], frames[:, 1])[:, None])
        passed = model(frames, flow=flow.clone())["logits"]
        assert torch.equal(passed, computed)
        assert not torch.equal(model(frames, flow=torch.zeros_like(flow))["logits"], computed)

    class ModuleProvider(nn.Module):
        def forward(self, src, dst):
            return torch.zeros(src.shape[0], 2, *src.shape[-2:])

    keys = set(model.state_dict())
    model.set_flow_provider(ModuleProvider())
    assert set(model.state_dict()) == keys and "flow_provider" not in dict(model.named_modules())


# --------------------------------------------------------------------------------- streaming prediction
def _clips(video: torch.Tensor, sampler: ClipSampler) -> torch.Tensor:
    length = video.shape[0]
    return torch.stack([video[[q, *sampler.adjacent(q, length)]] for q in range(length)])


def _assert_same_logits(outputs: list[torch.Tensor], maps: torch.Tensor, model: SSLTM, frames: torch.Tensor):
    """The predictor's logits (``outputs``, one decode per frame) are clip prediction's, up to the float noise
    of encoding frames in another batch, and its class maps are their argmax."""
    logits = torch.cat(outputs)
    assert torch.equal(maps, logits.argmax(1))
    with torch.no_grad():
        torch.testing.assert_close(logits, model.eval()(frames)["logits"], atol=1e-5, rtol=1e-4)
    outputs.clear()


def _streaming_and_offline_match(model: SSLTM, offsets: tuple[int, ...], length: int = 5):
    video = torch.randn(length, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    passes, outputs = [], []
    model.backbone.register_forward_hook(lambda m, args, out: passes.append(args[0].shape[0]))
    decode = model.decode
    model.decode = lambda *args, **kwargs: outputs.append(decode(*args, **kwargs)) or outputs[-1]
    predictor = VideoPredictor(model, offsets)
    streamed = torch.stack([predictor.step(frame) for frame in video])
    assert sum(passes) == length
    _assert_same_logits(outputs, streamed, model, _clips(video, ClipSampler(offsets, causal=True)))
    passes.clear()
    offline = torch.stack(list(predictor.predict_video(video)))
    assert sum(passes) == length
    _assert_same_logits(outputs, offline, model, _clips(video, ClipSampler(offsets, causal=False)))
    del model.decode
    return predictor, video


def test_none_streams_like_clips_without_the_adjacent_frames():
    """``none`` encodes the query alone (no adjacent frame passes the backbone) and streams like clips."""
    model = tiny_model("none", num_adjacent=2)
    _streaming_and_offline_match(model, (1, 2))


def test_probe_streams_like_clips_with_cached_flow(probe):
    """Frames and flow reach the module as in clip prediction; the flow of each (query, adjacent) pair is
    computed once (frame 0's clamped adjacent frames are one pair)."""
    model = tiny_model("netwarp", num_adjacent=2)
    pairs = []

    def provider(src, dst):
        pairs.append((src.sum().item(), dst.sum().item()))
        return shift_flow(src, dst)

    model.set_flow_provider(provider)
    predictor, video = _streaming_and_offline_match(model, (1, 2))
    pairs.clear()
    predictor.reset()
    for frame in video[:3]:
        predictor.step(frame)
    # causal: frame 0 -> (0, 0); frame 1 -> (1, 0); frame 2 -> (2, 1), (2, 0)
    assert len(pairs) == 4 and not predictor._flows and set(predictor._frames) == {1, 2}
    model.set_flow_provider(None)
    predictor.reset()
    with pytest.raises(ValueError, match=r"short_term 'netwarp' needs flow: .*set_flow_provider"):
        predictor.step(video[0])


def test_netwarp_streams_like_clips_with_zero_flow():
    from ssltm.flow import make_flow_provider

    model = tiny_model("netwarp", num_adjacent=1)
    model.set_flow_provider(make_flow_provider("zero"))
    _streaming_and_offline_match(model, (1,))


def test_sparse_tt_streams_like_clips():
    model = tiny_model("sparse_tt", num_adjacent=2, short_term_args=SPARSE_TT)
    _streaming_and_offline_match(model, (1, 2))


def test_st_ocr_streams_like_clips():
    model = tiny_model("st_ocr", num_adjacent=2, short_term_args=dict(channels=16, key_channels=8))
    _streaming_and_offline_match(model, (1, 2))


def test_cffm_streams_like_clips():
    model = tiny_model("cffm", num_adjacent=3, short_term_args=dict(dim=16, depth=1, heads=2))
    _streaming_and_offline_match(model, (1, 2, 3))


def test_predictor_keeps_module_state_per_video():
    """The per-video dict reaches decode, lives in the predictor and is emptied by reset()."""
    model = tiny_model("none", num_adjacent=1)
    seen = []
    decode = model.decode

    def recording(*args, **kwargs):
        seen.append(kwargs.get("state", args[5] if len(args) > 5 else None))
        seen[-1]["calls"] = seen[-1].get("calls", 0) + 1
        return decode(*args, **kwargs)

    model.decode = recording
    predictor = VideoPredictor(model, (1,))
    video = torch.randn(2, 3, *SIZE)
    for frame in video:
        predictor.step(frame)
    assert seen[0] is seen[1] is predictor.state and predictor.state == {"calls": 2}
    predictor.reset()
    assert predictor.state == {}
    list(predictor.predict_video(video))
    assert seen[-1]["calls"] == 2 and predictor.state == {}


# ----------------------------------------------------------------------------------------------- errors
def test_missing_images_and_bad_flow_name_the_argument(probe):
    model = tiny_model("netwarp", num_adjacent=1).eval()
    frames, _ = clip(1, 1)
    levels = [torch.stack(x, 1) for x in zip(*(model.encode(frames[:, i]) for i in range(2)), strict=True)]
    with pytest.raises(ValueError, match=r"short_term 'netwarp' needs images: the clip's frames \(B, T, 3, H, W\)"):
        model.decode(levels, size=SIZE)
    with pytest.raises(ValueError, match=r"images must be float, the clip's frames \(B, T, 3, H, W\) = \(1, 2, 3"):
        model.decode(levels, size=SIZE, images=frames[:, :1])
    flow = torch.zeros(1, 1, 2, *SIZE)
    expected = r"flow must be float32 \(B, n, 2, H, W\) = \(1, 1, 2, 32, 40\) on cpu"
    for bad in (None, flow[..., :-1], flow.double(), flow[0], flow.to("meta")):
        with pytest.raises(ValueError, match=expected):
            model.decode(levels, size=SIZE, images=frames, flow=bad)
        if bad is not None:
            with pytest.raises(ValueError, match=expected):
                model(frames, flow=bad)
    with pytest.raises(ValueError, match=r"short_term 'netwarp' needs flow: pass flow \(B, n, 2, H, W\)"):
        model(frames)
    model.set_flow_provider(lambda src, dst: torch.zeros(src.shape[0], 2, 8, 8))
    with pytest.raises(ValueError, match=r"the flow provider's output must be float32 \(N, 2, H, W\) = \(1, 2, 32"):
        model(frames)
    with pytest.raises(TypeError, match="provider must be callable"):
        model.set_flow_provider("dis")
    with torch.no_grad():
        torch.testing.assert_close(
            model.decode(levels, size=SIZE, images=frames, flow=flow), model(frames, flow=flow)["logits"]
        )


def test_rfce_reference_of_a_module_that_needs_images_and_changes_the_width(monkeypatch):
    """RFCE passes the reference frame alone through a module whose output is not the fused levels' width
    (ST-OCR); one that reads images or flow cannot take it: refused when the model is built."""

    def narrow(name, fpn_dim, num_classes, **args):
        module = Probe(st.NUM_LEVELS * fpn_dim)
        module.out_channels = 8
        return module

    monkeypatch.setattr("ssltm.model.ssltm.build_short_term", narrow)
    with torch.device("meta"):
        tiny_model("netwarp", num_adjacent=1)  # without RFCE
        with pytest.raises(ValueError, match=r"use_rfce=True would pass the reference frame alone through short_term"):
            tiny_model("netwarp", num_adjacent=1, use_rfce=True, use_gcc=False)


def test_export_refuses_the_modules_it_cannot_trace():
    from ssltm.export import exportable

    with torch.device("meta"):
        model = tiny_model("st_ocr", num_adjacent=2, short_term_args=dict(channels=16, key_channels=8))
    with pytest.raises(ValueError, match=r"export: short_term 'st_ocr' is not supported .*supported: none, stt"):
        exportable(model)


@pytest.mark.parametrize(
    ("module", "overrides"),
    [
        ("st_ocr", ["model.st_ocr.channels=16", "model.st_ocr.key_channels=8"]),
        ("netwarp", ["data.offsets=[1]", "data.flow_in_loader=true"]),
        ("cffm", ["model.cffm.dim=16", "model.cffm.heads=2", "model.cffm.depth=1"]),
    ],
)
def test_training_run_logs_the_module_loss_terms(tmp_path, module, overrides, monkeypatch):
    """``ssltm train`` with a module: each logged step holds exactly ``model.loss_terms`` (ST-OCR's and CFFM's terms
    included, in ``total``); NetWarp trains on the loader's flow (the model's provider is never asked)."""
    from test_cli import log_records, train_cli

    def unused(self, src, dst):
        raise AssertionError("the model computed flow although the batch holds it")

    monkeypatch.setattr(SSLTM, "optical_flow", unused)
    work = tmp_path / "run"
    common = ["train.max_iters=1", "train.batch_size=2", "train.validate=false", "model.use_rfce=false"]
    assert train_cli(tmp_path, work, f"model.short_term={module}", "model.use_gcc=false", *common, *overrides) == 0
    (step,) = [r for r in log_records(work) if "total" in r]
    extra = {"st_ocr": ("st_ocr_aux",), "cffm": ("cffm_frame",)}.get(module, ())
    terms = ("sup", "mse", "aux", *extra, "total")
    assert [k for k in step if k in terms or k.endswith("_aux")] == list(terms)
    assert step["total"] == pytest.approx(step["sup"] + sum(step[k] for k in extra), rel=1e-4)

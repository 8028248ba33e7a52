"""The ocrnet decoder on the CPU (ResNet-50, dilated, with narrow OCR widths, 64x64 or smaller): a training step
of OCRNet, TCB and NetWarp-OCR (loss terms against their definition, gradients), TCB on identical frames against
OCRNet with the same weights, streaming and whole-video prediction against clip prediction, the dilated trunk
and its checkpoint, the ResNet-101 parameter count on the meta device, the config keys and their errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from test_short_term import _streaming_and_offline_match, shift_flow

from ssltm import SSLTM, VideoPredictor
from ssltm.build import build_model
from ssltm.config import ConfigError, load_config
from ssltm.model.backbone import ResNetTrunk
from ssltm.model.heads import cross_entropy
from ssltm.model.neck import resize
from ssltm.model.ocrnet import NetWarpOCR, OCRQueryOnly, TemporalContextBlock, stride8_levels
from ssltm.model.st_ocr import STATE_KEY

K = 5
TINY = dict(backbone="resnet50", decoder="ocrnet", use_rfce=False, use_gcc=False, ocr_channels=16, ocr_key_channels=8)
ADJACENT = {"none": 0, "st_ocr": 2, "netwarp": 1}


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("SSLTM_BACKEND", "reference")


def tiny_model(short_term: str, seed: int = 0, num_adjacent: int | None = None, **overrides) -> SSLTM:
    torch.manual_seed(seed)
    n = ADJACENT[short_term] if num_adjacent is None else num_adjacent
    model = SSLTM(K, **{**TINY, "short_term": short_term, "num_adjacent": n, **overrides})
    model.set_flow_provider(shift_flow)
    return model


def inputs(n: int, size=(64, 64), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randn(1, 1 + n, 3, *size, generator=gen)
    labels = torch.randint(0, K, (1, *size), generator=gen)
    labels[:, :4] = 255
    return frames, labels


@pytest.mark.parametrize(
    "short_term, args",
    [("none", {}), ("st_ocr", {}), ("netwarp", {}), ("netwarp", {"c5": True})],
    ids=["ocrnet", "tcb", "netwarp_ocr", "netwarp_ocr_c5"],
)
def test_training_step_losses_are_sup_plus_weighted_aux(short_term, args):
    model = tiny_model(short_term, short_term_args=args)
    frames, labels = inputs(model.num_adjacent)
    seen = []
    model.decode_head.aux_head.register_forward_hook(lambda m, a, out: seen.append(out))
    out = model(frames, labels=labels)
    assert out["logits"].shape == (1, K, 64, 64)
    losses = out["losses"]
    assert tuple(losses) == model.loss_terms == ("sup", "aux", "total")
    assert all(torch.isfinite(v) for v in losses.values())
    query_aux = seen[0][:1]  # the query is the first image the aux head sees
    assert query_aux.shape == (1, K, 8, 8)  # C4 at stride 8
    torch.testing.assert_close(losses["aux"], cross_entropy(resize(query_aux, (64, 64)), labels, 255))
    torch.testing.assert_close(losses["sup"], cross_entropy(out["logits"], labels, 255))
    torch.testing.assert_close(losses["total"], losses["sup"] + 0.4 * losses["aux"])
    losses["total"].backward()
    for name in ("backbone.layer4.2.conv3.weight", "decode_head.pixels.0.weight", "decode_head.aux_head.0.0.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    if short_term == "netwarp":
        grads = [p.grad for n, p in model.netwarp.named_parameters() if n.startswith("ocr.w")]
        assert len(grads) == 2 and all(g.abs().sum() > 0 for g in grads)
        assert (model.netwarp.c5 is not None) == bool(args) and (
            model.netwarp.c5 is None or model.netwarp.c5.w1.grad.abs().sum() > 0
        )


def test_all_frames_segments_every_frame_with_ocrnet():
    model = tiny_model("none", num_adjacent=1).eval()
    frames, _ = inputs(1)
    with torch.no_grad():
        out = model(frames, all_frames=True, return_features=True)
        second = model(frames[:, [1, 0]], return_features=True)
    assert out["frame_logits"].shape == (1, 2, K, 64, 64) and out["frame_features"].shape == (1, 2, 16, 8, 8)
    torch.testing.assert_close(out["frame_logits"][:, 1], second["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["features"], out["frame_features"][:, 0])
    assert not torch.allclose(out["frame_logits"][:, 0], second["logits"], atol=1e-3)
    with pytest.raises(ValueError, match="all_frames=True segments each frame on its own: short_term 'st_ocr'"):
        tiny_model("st_ocr")(inputs(2)[0], all_frames=True)


def test_tcb_on_identical_frames_is_ocrnet_with_the_same_weights():
    ocrnet, tcb = tiny_model("none").eval(), tiny_model("st_ocr", seed=1).eval()
    assert isinstance(tcb.st_ocr, TemporalContextBlock) and isinstance(ocrnet.none, OCRQueryOnly)
    tcb.load_state_dict(ocrnet.state_dict())  # strict: the same parameters (the gather has none)
    frames, _ = inputs(0)
    with torch.no_grad():
        alone = ocrnet(frames)["logits"]
        repeated = tcb(frames.expand(1, 3, 3, 64, 64))["logits"]
        other = tcb(torch.cat([frames, frames, inputs(1, seed=2)[0][:, 1:]], dim=1))["logits"]
    torch.testing.assert_close(repeated, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other, alone, atol=1e-3)


@pytest.mark.parametrize("short_term", ["none", "st_ocr", "netwarp"])
def test_streaming_and_whole_video_equal_clip_prediction(short_term):
    _streaming_and_offline_match(tiny_model(short_term), (1, 2)[: ADJACENT[short_term]])


def test_tcb_first_clip_memory_reaches_the_predictor_state():
    model = tiny_model("st_ocr", short_term_args={"memory": "first_clip"})
    predictor = VideoPredictor(model, (1, 2))
    video = inputs(3, size=(32, 40))[0][0]
    first = predictor.step(video[0])
    stored = predictor.state[STATE_KEY]
    assert stored.shape == (1, 3, K, 16)
    plain = tiny_model("st_ocr")
    assert torch.equal(first, plain.predict(video[None, [0, 0, 0]])[0])  # the first clip is the memory
    logits = []
    model.decode_head.classifier.register_forward_hook(lambda m, a, out: logits.append(out))
    predictor.step(video[1])
    plain.decode_head.classifier.register_forward_hook(lambda m, a, out: logits.append(out))
    plain.predict(video[None, [1, 0, 0]])
    assert predictor.state[STATE_KEY] is stored and not torch.allclose(logits[0], logits[1], atol=1e-4)


def test_dilated_trunk_puts_c5_at_stride_8_and_loads_the_same_checkpoint(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    plain, dilated = ResNetTrunk("resnet50", path), ResNetTrunk("resnet50", path, dilated=True)
    assert dilated.strides == (4, 8, 8, 8) and plain.strides == (4, 8, 16, 32)
    dilated_state = dilated.state_dict()
    assert plain.state_dict().keys() == dilated_state.keys()
    assert all(torch.equal(value, dilated_state[key]) for key, value in plain.state_dict().items())
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        shapes = [tuple(level.shape[-2:]) for level in dilated.eval()(x)]
    assert shapes == [(17, 25), (9, 13), (9, 13), (9, 13)]
    assert dilated.layer4[0].conv2.dilation == (2, 2) and dilated.layer4[1].conv2.dilation == (4, 4)
    with pytest.raises(ValueError, match="dilated=True needs a bottleneck ResNet"):
        ResNetTrunk("resnet18", dilated=True)


def test_a_trunk_striding_to_32_has_c4_and_c5_resized_to_stride_8():
    """The path a Swin trunk takes (C5 at stride 32): bilinear resizes to C3's size, no parameters."""
    levels = [torch.randn(1, c, 17 // s + 1, 25 // s + 1) for c, s in ((4, 1), (5, 2), (6, 4), (7, 8))]
    c4, c5 = stride8_levels(levels)
    assert c4.shape == (1, 6, 9, 13) and c5.shape == (1, 7, 9, 13)
    expected = torch.nn.functional.interpolate(levels[3], size=(9, 13), mode="bilinear", align_corners=False)
    torch.testing.assert_close(c5, expected)
    same = [torch.randn(1, 2, 9, 13) for _ in range(2)]
    assert all(a is b for a, b in zip(stride8_levels([levels[0], levels[1], *same]), same, strict=True))


def test_ocrnet_r101_parameter_count_matches_the_paper():
    with torch.device("meta"):
        models = {
            name: SSLTM(124, decoder="ocrnet", use_rfce=False, use_gcc=False, short_term=name, **args)
            for name, args in (("none", {}), ("st_ocr", {}), ("netwarp", {"short_term_args": {"c5": True}}))
        }
    counts = models["none"].parameter_breakdown()
    assert counts["total"] == 57_969_464 and abs(counts["total"] / 58.1e6 - 1) < 0.01
    assert counts["ocr pixel conv (C5)"] == 2048 * 512 * 9 + 2 * 512
    assert counts["ocr aux head (C4)"] == 1024 * 512 * 9 + 2 * 512 + 512 * 124 + 124
    assert models["st_ocr"].parameter_breakdown()["total"] == counts["total"]
    netwarp = models["netwarp"].parameter_breakdown()
    flowcnn = 2 * ((8 * 16 + 16 * 32 + 32 * 2) * 9 + 16 + 32 + 2 + 4 * 2 + 2)  # the OCR's and C5's
    assert netwarp["total"] - counts["total"] == flowcnn + 2 * (512 + 2048) and netwarp["total"] / 58.1e6 < 1.01


def test_ocrnet_swin_s_parameter_count_matches_the_paper():
    with torch.device("meta"):
        model = SSLTM(124, backbone="swin_s", decoder="ocrnet", use_rfce=False, use_gcc=False, short_term="none")
    counts = model.parameter_breakdown()
    assert counts["backbone"] == 48_838_602  # the resizes to stride 8 add none
    assert counts["ocr pixel conv (C5)"] == 768 * 512 * 9 + 2 * 512
    assert counts["ocr aux head (C4)"] == 384 * 512 * 9 + 2 * 512 + 512 * 124 + 124
    assert counts["total"] == 55_460_546 and abs(counts["total"] / 55.5e6 - 1) < 0.01


def test_swin_s_ocrnet_training_step_at_stride_8():
    torch.manual_seed(0)
    model = SSLTM(K, **{**TINY, "backbone": "swin_s", "short_term": "none", "num_adjacent": 0})
    frames, labels = inputs(0)
    seen = []
    model.decode_head.pixels.register_forward_hook(lambda m, a, out: seen.append(a[0].shape))
    out = model(frames, labels=labels)
    assert seen == [(1, 768, 8, 8)] and out["logits"].shape == (1, K, 64, 64)
    out["losses"]["total"].backward()
    assert torch.isfinite(out["losses"]["total"]) and model.backbone.norms[3].weight.grad.abs().sum() > 0


def test_config_builds_each_variant():
    base = ["model.decoder=ocrnet", "model.use_rfce=false", "model.use_gcc=false", "model.backbone=resnet50"]
    with torch.device("meta"):
        tcb = build_model(load_config(None, [*base, "model.short_term=st_ocr", "model.st_ocr.memory=first_clip"]), K)
        warp = build_model(
            load_config(None, [*base, "model.short_term=netwarp", "model.netwarp.c5=true", "data.offsets=[1]"]), K
        )
    assert tcb.decoder == "ocrnet" and tcb.st_ocr.memory == "first_clip" and tcb.loss_terms == ("sup", "aux", "total")
    assert tcb.backbone.strides == (4, 8, 8, 8) and tcb.beta == 0.4
    assert isinstance(warp.netwarp, NetWarpOCR) and warp.netwarp.c5 is not None and warp.flow_provider is not None


OFF = ["model.use_rfce=false", "model.use_gcc=false"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.use_gcc=false"], r"model.decoder 'ocrnet' has no RFCE or GCC: set model.use_rfce=false"),
        (["model.use_rfce=false"], r"model.decoder 'ocrnet' has no RFCE or GCC: set model.use_gcc=false"),
        ([*OFF, "model.short_term=stt"], r"model.decoder 'ocrnet' takes model.short_term one of .* got 'stt'$"),
        ([*OFF, "model.short_term=cffm"], r"model.decoder 'ocrnet' takes model.short_term one of .* got 'cffm'"),
        ([*OFF, "model.short_term=sparse_tt"], r"model.decoder 'ocrnet' takes model.short_term .* got 'sparse_tt'"),
        ([*OFF, "model.short_term=null"], r"model.short_term one of .* got 'stt' \(null resolves to 'stt'\)"),
        ([*OFF, "model.short_term=none", "model.backbone=resnet18"], r"'ocrnet' dilates .* model.backbone must be"),
    ],
)
def test_ocrnet_config_errors_name_both_keys(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.short_term=none", "model.decoder=ocrnet", *overrides])


def test_decoder_key_errors():
    with pytest.raises(ConfigError, match=r"model.decoder must be one of \('upernet', 'ocrnet'\), got 'fcn'"):
        load_config(None, ["model.decoder=fcn"])
    with pytest.raises(ConfigError, match=r"model.netwarp.c5=true needs model.decoder 'ocrnet', got 'upernet'"):
        load_config(None, ["model.netwarp.c5=true"])
    with pytest.raises(ValueError, match=r"decoder='ocrnet' has no RFCE or GCC: .* got use_rfce=True"):
        SSLTM(K, decoder="ocrnet")
    with pytest.raises(ValueError, match=r"decoder='ocrnet' takes short_term one of .* got 'stt'"):
        SSLTM(K, decoder="ocrnet", use_rfce=False, use_gcc=False)
    with pytest.raises(ValueError, match="decoder must be one of"):
        SSLTM(K, decoder="fcn")
    with pytest.raises(ValueError, match="memory must be one of none, first_clip"):
        tiny_model("st_ocr", short_term_args={"memory": "all"})
    from ssltm.export import exportable

    with pytest.raises(ValueError, match=r"export: decoder 'ocrnet' is not supported \(supported: upernet\)"):
        exportable(tiny_model("none"))

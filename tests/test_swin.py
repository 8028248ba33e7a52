"""The Swin-S trunk (``model.backbone: swin_s``, supplementary Table 1) and the dilated ResNet trunk: sizes against
ResNet's rounding and torchvision's own, the values against torchvision's modules run by hand, the parameter
count against torchvision's model, strict loading of torchvision's state dicts and the errors of a file that
does not fit, activation checkpointing, a CPU training step of SSLTM on Swin-S, and the counts of the full-size
models (meta device) against the paper's."""

from __future__ import annotations

import hashlib
import re
import runpy
from pathlib import Path

import pytest
import torch
import torchvision
from test_model import TINY, upernet_head_parameters
from torch import nn
from torch.nn import functional as F

from ssltm import SSLTM
from ssltm.checkpoint import state_dict_mismatches
from ssltm.config import ConfigError, load_config
from ssltm.model.backbone import (
    BACKBONES,
    ResNetTrunk,
    SwinTrunk,
    build_trunk,
    pretrained_source,
    swin_from_microsoft,
)

ROOT = Path(__file__).resolve().parent.parent
K = 5
SIZE = (97, 131)  # odd sides: the padding and every rounding matter
# swin_s's classifier (768 -> 1000) and final LayerNorm(768), which the trunk drops, and its four out-norms
HEAD, FINAL_NORM, OUT_NORMS = 768 * 1000 + 1000, 2 * 768, 2 * (96 + 192 + 384 + 768)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("SSLTM_BACKEND", "reference")


@pytest.fixture(scope="module")
def swin_file(tmp_path_factory):
    """torchvision's swin_s (random weights; buffers and all) and its state dict saved as a file."""
    torch.manual_seed(0)
    swin = torchvision.models.swin_s(weights=None).eval()
    path = tmp_path_factory.mktemp("swin") / "swin_s-0123abcd.pth"
    torch.save(swin.state_dict(), path)
    return swin, path


@pytest.fixture(scope="module")
def trunk(swin_file):
    """A SwinTrunk loaded from ``swin_file``, its out-norms made non-trivial (so that they show in the outputs)."""
    trunk = SwinTrunk(swin_file[1]).eval()
    with torch.no_grad():
        for norm in trunk.norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return trunk


def test_swin_levels_have_resnets_sizes_and_torchvisions_values(swin_file, trunk):
    swin, _ = swin_file
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        levels = trunk(x)
        # torchvision without the padding floors the patch embedding: 24 x 32 .. 3 x 4
        plain, h = [], x
        for i, stage in enumerate(swin.features):
            h = stage(h)
            if i % 2:
                plain.append(tuple(h.shape))
        # by hand: zero-pad bottom/right to 100 x 132, torchvision's stages, each stage's LayerNorm, NCHW
        expected, h = [], F.pad(x, (0, 1, 0, 3))
        for i, stage in enumerate(swin.features):
            h = stage(h)
            if i % 2:
                norm = trunk.norms[i // 2]
                expected.append(F.layer_norm(h, h.shape[-1:], norm.weight, norm.bias).permute(0, 3, 1, 2))
    assert [tuple(y.shape) for y in levels] == [
        (2, 96, 25, 33),
        (2, 192, 13, 17),
        (2, 384, 7, 9),
        (2, 768, 4, 5),
    ]
    assert [s[1:3] for s in plain] == [(24, 32), (12, 16), (6, 8), (3, 4)]
    assert trunk.channels == (96, 192, 384, 768) and trunk.strides == (4, 8, 16, 32)
    for i, (ours, ref) in enumerate(zip(levels, expected, strict=True)):
        assert ours.is_contiguous()
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), f"level {i}: {(ours - ref).abs().max():.3g}"


def test_swin_trunk_is_swin_s_without_its_classifier(swin_file, trunk):
    swin, path = swin_file
    total = sum(p.numel() for p in swin.parameters())
    assert sum(p.numel() for p in swin.head.parameters()) == HEAD
    assert sum(p.numel() for p in swin.norm.parameters()) == FINAL_NORM
    assert sum(p.numel() for p in trunk.parameters()) == total - HEAD - FINAL_NORM + OUT_NORMS == 48_838_602
    # Swin-S: depths 2-2-18-2, heads 3-6-12-24, window 7, stochastic depth rising to 0.3
    blocks = [block for i in (1, 3, 5, 7) for block in trunk.features[i]]
    assert [len(trunk.features[i]) for i in (1, 3, 5, 7)] == [2, 2, 18, 2]
    assert [trunk.features[i][0].attn.num_heads for i in (1, 3, 5, 7)] == [3, 6, 12, 24]
    assert blocks[0].attn.window_size == [7, 7]
    assert blocks[0].stochastic_depth.p == 0 and blocks[-1].stochastic_depth.p == pytest.approx(0.3)

    # strict: every torchvision key but the final norm's and the classifier's, equal; the out-norms are ours
    ours, theirs = trunk.state_dict(), swin.state_dict()
    assert set(ours) == {k for k in theirs if not k.startswith(("norm.", "head."))} | {
        f"norms.{i}.{p}" for i in range(4) for p in ("weight", "bias")
    }
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("norms."))
    source = pretrained_source(nn.Sequential(trunk))
    assert source.path == str(path) and source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source.name_hash == "0123abcd" and "0123abcd" in source.mismatch()  # not its content's hash
    assert pretrained_source(nn.Linear(1, 1)) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("shape", r"key 'features\.3\.0\.attn\.qkv\.weight' has shape \(576, 191\) in the checkpoint"),
        ("missing", r"key 'features\.1\.1\.attn\.relative_position_index' \(2401,\) is missing"),
        ("unexpected", r"key 'layers\.0\.blocks\.0\.attn_mask' of the checkpoint is not in the model"),
    ],
)
def test_a_file_that_does_not_fit_swin_s_names_the_file_and_the_first_key(swin_file, tmp_path, change, message):
    # swin_s's keys and shapes, each tensor a zero-stride view of one value: a small file (checked, never loaded)
    state = {k: torch.zeros(()).expand(v.shape) for k, v in swin_file[0].state_dict().items()}
    if change == "shape":
        state["features.3.0.attn.qkv.weight"] = torch.zeros(576, 191)
        state["features.5.0.attn.qkv.weight"] = torch.zeros(1, 1)  # a later mismatch: counted, not named
    elif change == "missing":
        del state["features.1.1.attn.relative_position_index"]
    else:
        state["layers.0.blocks.0.attn_mask"] = torch.zeros(1)  # Microsoft's checkpoints carry such keys
    path = tmp_path / "not-swin.pth"
    torch.save(state, path)
    more = r" \(and 1 more\)" if change == "shape" else ""
    with pytest.raises(ValueError) as error:
        SwinTrunk(path)
    assert re.fullmatch(
        rf"pretrained checkpoint '{re.escape(str(path))}' does not fit torchvision's swin_s: {message}.*{more}",
        str(error.value),
    ), error.value


def test_swin_checkpointing_recomputes_each_stage_with_the_same_gradients(trunk):
    # gradients of the input and of the small parameters of every stage (the large weights' gradients would only
    # make the test slow: the recomputation is the same for every parameter)
    small = [p for p in trunk.parameters() if p.numel() < 10_000]
    x = torch.randn(1, 3, 37, 45, requires_grad=True)
    runs = {}
    try:
        trunk.train().requires_grad_(False)  # training: stochastic depth draws, which the recomputation replays
        for p in small:
            p.requires_grad_(True)
        for checkpointing in (False, True):
            trunk.checkpointing = checkpointing
            calls: list[int] = []  # each stage module starting (a recomputation may stop before the end)
            hooks = [
                trunk.features[i].register_forward_pre_hook(lambda *_, i=i, calls=calls: calls.append(i))
                for i in range(8)
            ]
            torch.manual_seed(1)
            weights = [torch.linspace(-1, 1, c)[:, None, None] for c in trunk.channels]
            loss = sum((level * w).sum() for level, w in zip(trunk(x), weights, strict=True))
            grads = torch.autograd.grad(loss, [x, *small])
            for hook in hooks:
                hook.remove()
            runs[checkpointing] = loss.detach(), grads, calls
    finally:
        trunk.eval().requires_grad_(True)
        trunk.checkpointing = False
    (loss, grads, calls), (loss_c, grads_c, calls_c) = runs[False], runs[True]
    assert calls == list(range(8)) and sorted(calls_c) == sorted(list(range(8)) * 2)  # every stage twice
    assert torch.equal(loss, loss_c)
    # a block whose branch stochastic depth drops (the whole sample) has no gradient: most have one
    assert sum(bool(grad.any()) for grad in grads) > 0.6 * len(grads) > 100
    for i, (grad, grad_c) in enumerate(zip(grads, grads_c, strict=True)):
        assert torch.allclose(grad_c, grad, atol=1e-6, rtol=1e-5), i


def test_ssltm_on_swin_s_takes_a_training_step():
    torch.manual_seed(0)
    model = SSLTM(K, **{**TINY, "backbone": "swin_s"}).train()
    assert isinstance(model.backbone, SwinTrunk)
    gen = torch.Generator().manual_seed(0)
    frames, reference = torch.randn(1, 4, 3, 64, 64, generator=gen), torch.randn(1, 3, 64, 64, generator=gen)
    labels = torch.randint(0, K, (1, 64, 64), generator=gen)
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(frames, reference, labels)
    assert out["logits"].shape == (1, K, 64, 64)
    loss = out["losses"]["total"]
    assert torch.isfinite(loss), out["losses"]
    loss.backward()
    grads = {n: p.grad for n, p in model.backbone.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for name in ("features.0.0.weight", "features.5.17.attn.relative_position_bias_table", "norms.3.weight"):
        assert grads[name].abs().sum() > 0, name
    optimizer.step()
    assert not torch.equal(model.backbone.features[0][0].weight, before["features.0.0.weight"])


# The paper's counts with Swin-S (supplementary Table 1, 124 classes): UperNet 58.1M, SSLTM 59.3M.
PAPER_SWIN = {"upernet": 58.1e6, "ssltm": 59.3e6}


def test_swin_s_parameter_counts_against_the_paper():
    upernet_args = dict(short_term="none", use_rfce=False, use_gcc=False)
    with torch.device("meta"):
        upernet = SSLTM(124, "swin_s", **upernet_args).parameter_breakdown()
        ssltm = SSLTM(124, "swin_s").parameter_breakdown()
        narrow = {  # PPM branches 256 wide (mmsegmentation's UPerHead with 256 channels)
            "upernet": SSLTM(124, "swin_s", **upernet_args, ppm_dim=256).parameter_breakdown()["total"],
            "ssltm": SSLTM(124, "swin_s", ppm_dim=256).parameter_breakdown()["total"],
        }
    trunk = 48_838_602  # test_swin_trunk_is_swin_s_without_its_classifier
    for counts in (upernet, ssltm):
        assert counts["backbone"] == trunk and sum(v for k, v in counts.items() if k != "total") == counts["total"]
    # VSPW's UPerNet layer for layer over Swin-S's widths
    assert upernet["total"] == trunk + upernet_head_parameters((96, 192, 384, 768), 124) == 61_240_390
    assert ssltm["total"] == 62_482_003
    # SSLTM adds the paper's 1.2M (59.3M - 58.1M, each rounded to 0.1M) to UperNet
    assert abs(ssltm["total"] - upernet["total"] - (PAPER_SWIN["ssltm"] - PAPER_SWIN["upernet"])) < 0.1e6
    # The totals with VSPW's 512-wide PPM branches are 5.4% above the paper's (README "Swin-S backbone": the head
    # at Swin-S's widths is 12.40M, the paper's count leaves 9.26M): printed, not asserted. With 256-wide
    # branches the structure reproduces both.
    for name, counts in (("upernet", upernet), ("ssltm", ssltm)):
        paper, total = PAPER_SWIN[name], counts["total"]
        print(f"{name}-swin_s: {total:,} parameters, paper {paper / 1e6:.1f}M ({total / paper - 1:+.1%})")
        assert narrow[name] == total - 3_147_776 and abs(narrow[name] / paper - 1) < 0.005, narrow


# ------------------------------------------------------------------------------------------- dilated ResNet
def test_dilated_resnet_puts_c5_at_stride_8_and_loads_the_same_checkpoint(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(resnet.state_dict(), path)
    plain, dilated = ResNetTrunk("resnet50", path).eval(), build_trunk("resnet50", path, dilated=True).eval()
    assert plain.strides == (4, 8, 16, 32) and dilated.strides == (4, 8, 8, 8)
    theirs = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    ours = dilated.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert dilated.layer4[0].conv2.dilation == (2, 2) and dilated.layer4[1].conv2.dilation == (4, 4)
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        a, b = plain(x), dilated(x)
    assert [tuple(y.shape[1:]) for y in a] == [(256, 25, 33), (512, 13, 17), (1024, 7, 9), (2048, 4, 5)]
    assert [tuple(y.shape[1:]) for y in b] == [(256, 25, 33), (512, 13, 17), (1024, 13, 17), (2048, 13, 17)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # the same weights up to the dilated stages


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("swin_t",), r"backbone must be one of \('resnet18', 'resnet50', 'resnet101', 'swin_s'\), got 'swin_t'"),
        (("swin_s", None, False, True), "dilated=True applies to the ResNets only, not backbone 'swin_s'"),
        (("resnet18", None, False, True), "dilated=True needs a bottleneck ResNet"),
        (("resnet50", None, False, False, (1, 1, 1, 1)), "backbone_depths applies to 'swin_s' only"),
        (("swin_s", None, False, False, (1, 1, 1)), r"depths must be 4 positive ints .*got \(1, 1, 1\)"),
    ],
)
def test_build_trunk_errors(args, match):
    with pytest.raises(ValueError, match=match), torch.device("meta"):
        build_trunk(*args)


def test_reduced_swin_has_swin_s_modules_and_widths_with_fewer_blocks(swin_file):
    """``depths`` (the smoke test's reduced Swin-S): the same stages, widths, heads and window, one block per stage;
    Swin-S's checkpoint does not fit it (the first missing block is named)."""
    reduced = SwinTrunk(depths=(1, 1, 1, 1)).eval()
    full = SwinTrunk().eval()
    blocks = lambda trunk: [len(trunk.features[i]) for i in (1, 3, 5, 7)]
    assert blocks(reduced) == [1, 1, 1, 1] and blocks(full) == [2, 2, 18, 2]
    heads = lambda trunk: [trunk.features[i][0].attn.num_heads for i in (1, 3, 5, 7)]
    assert heads(reduced) == heads(full) == [3, 6, 12, 24]
    assert reduced.features[1][0].attn.window_size == full.features[1][0].attn.window_size == [7, 7]
    with torch.no_grad():
        levels = reduced(torch.randn(1, 3, *SIZE))
    assert [tuple(x.shape[1:]) for x in levels] == [(96, 25, 33), (192, 13, 17), (384, 7, 9), (768, 4, 5)]
    with pytest.raises(ValueError, match=r"does not fit .*features\.1\.1\."):
        SwinTrunk(swin_file[1], depths=(1, 1, 1, 1))


def test_config_accepts_swin_s_and_names_a_bad_backbone():
    assert BACKBONES == ("resnet18", "resnet50", "resnet101", "swin_s")
    assert load_config(None, ["model.backbone=swin_s"]).model.backbone == "swin_s"
    with pytest.raises(ConfigError, match=r"model\.backbone must be one of .*'swin_s'\), got 'swin_b'"):
        load_config(None, ["model.backbone=swin_b"])


# ------------------------------------------------------------------------------- Microsoft's checkpoint
def microsoft_swin_s(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A state dict in the layout of Microsoft's ``swin_small_patch4_window7_224.pth`` (its SwinTransformer at
    224 x 224: patch_embed, layers.i.blocks.j with mlp.fc1/fc2 and (49, 49) position indices, the shifted blocks'
    attention masks where the stage is larger than a window, layers.i.downsample, norm, head), random values."""
    coords = torch.stack(torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + 6
    index = relative[..., 0] * 13 + relative[..., 1]  # Microsoft's relative_position_index, (49, 49)
    shapes: dict[str, tuple[int, ...]] = {"patch_embed.proj.weight": (96, 3, 4, 4), "patch_embed.proj.bias": (96,)}
    shapes |= {"patch_embed.norm.weight": (96,), "patch_embed.norm.bias": (96,)}
    state = {}
    for i, (depth, heads) in enumerate(zip((2, 2, 18, 2), (3, 6, 12, 24), strict=True)):
        dim, side = 96 * 2**i, 56 // 2**i
        for j in range(depth):
            block = f"layers.{i}.blocks.{j}."
            shapes |= {block + k: (dim,) for k in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")}
            shapes |= {block + "attn.relative_position_bias_table": (169, heads)}
            shapes |= {block + "attn.qkv.weight": (3 * dim, dim), block + "attn.qkv.bias": (3 * dim,)}
            shapes |= {block + "attn.proj.weight": (dim, dim), block + "attn.proj.bias": (dim,)}
            shapes |= {block + "mlp.fc1.weight": (4 * dim, dim), block + "mlp.fc1.bias": (4 * dim,)}
            shapes |= {block + "mlp.fc2.weight": (dim, 4 * dim), block + "mlp.fc2.bias": (dim,)}
            state[block + "attn.relative_position_index"] = index
            if j % 2 and side > 7:
                state[block + "attn_mask"] = torch.zeros((side // 7) ** 2, 49, 49)
        if i < 3:
            shapes |= {f"layers.{i}.downsample.reduction.weight": (2 * dim, 4 * dim)}
            shapes |= {f"layers.{i}.downsample.norm.weight": (4 * dim,), f"layers.{i}.downsample.norm.bias": (4 * dim,)}
    shapes |= {"norm.weight": (768,), "norm.bias": (768,), "head.weight": (1000, 768), "head.bias": (1000,)}
    return state | {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}


def test_microsoft_checkpoint_converts_to_torchvisions_swin_s(swin_file, tmp_path):
    ms = microsoft_swin_s(torch.Generator().manual_seed(0))
    converted = swin_from_microsoft({"model": ms})
    theirs = swin_file[0].state_dict()
    assert state_dict_mismatches(theirs, converted) == []
    # the same position index (torchvision's own buffer), every tensor where it belongs
    for key in (k for k in theirs if k.endswith("relative_position_index")):
        assert torch.equal(converted[key], theirs[key]), key
    pairs = {
        "features.0.0.weight": "patch_embed.proj.weight",
        "features.0.2.bias": "patch_embed.norm.bias",
        "features.1.1.attn.qkv.weight": "layers.0.blocks.1.attn.qkv.weight",
        "features.5.17.mlp.0.weight": "layers.2.blocks.17.mlp.fc1.weight",
        "features.7.1.mlp.3.bias": "layers.3.blocks.1.mlp.fc2.bias",
        "features.6.reduction.weight": "layers.2.downsample.reduction.weight",
        "features.2.norm.weight": "layers.0.downsample.norm.weight",
        "features.3.0.attn.relative_position_bias_table": "layers.1.blocks.0.attn.relative_position_bias_table",
        "head.weight": "head.weight",
    }
    assert all(converted[ours] is ms[theirs] for ours, theirs in pairs.items())
    # each of Microsoft's parameters once (its 11 attention masks dropped, its 24 position indices flattened)
    kept = [id(v) for k, v in converted.items() if not k.endswith("index")]
    assert sorted(kept) == sorted(id(v) for k, v in ms.items() if not k.endswith(("index", "attn_mask")))
    assert sum(k.endswith("attn_mask") for k in ms) == 11 and sum(k.endswith("index") for k in converted) == 24

    # the script writes a file the trunk's loader accepts; a file of another layout is refused, naming the key
    convert = runpy.run_path(str(ROOT / "scripts" / "convert_swin_weights.py"))["main"]
    source, out = tmp_path / "swin_small_patch4_window7_224.pth", tmp_path / "swin_s-microsoft.pth"
    torch.save({"model": ms}, source)
    assert convert([str(source), str(out)]) == 0
    assert state_dict_mismatches(theirs, torch.load(out, weights_only=True)) == []
    mmseg = "backbone.stages.0.blocks.0.attn.w_msa.qkv.weight"  # mmsegmentation's layout
    with pytest.raises(ValueError, match=rf"'{re.escape(mmseg)}' is not a key of Microsoft's Swin"):
        swin_from_microsoft({mmseg: torch.zeros(1)})
    torch.save({k: v for k, v in ms.items() if not k.startswith("head.")}, source)
    with pytest.raises(SystemExit):
        convert([str(source), str(out)])

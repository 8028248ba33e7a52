"""Sparse Temporal Transformer: the key counts of the slides' ablation, the neighbouring similarity ``D`` and the
query selection, the gather path against the float64 loops of ``sparse_tt_reference``, the key windows of
offset values, and the module's bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssltm.build import build_model
from ssltm.config import ConfigError, load_config
from ssltm.model.sparse_tt import (
    SparseTemporalBlock,
    SparseTemporalTransformer,
    key_count,
    key_radii,
    sparse_tt_reference,
)

ROOT = Path(__file__).resolve().parent.parent
OFFSETS = (1, 2, 3, 4, 5, 6)


@pytest.mark.parametrize(
    ("s", "e", "eps", "keys"),
    [(1, 5, 1, 527), (2, 5, 1, 639), (3, 5, 1, 735), (1, 3, 1, 279), (1, 7, 1, 679), (1, 5, 2, 663), (1, 5, 3, 695)],
)
def test_key_count_gives_the_slides_ablation(s, e, eps, keys):
    assert key_count((0, *OFFSETS), s, e, eps) == keys
    block = SparseTemporalBlock(8, (0, *OFFSETS), s=s, e=e, eps=eps, heads=2)
    assert block.num_keys == keys


def test_full_attention_key_count():
    assert 7 * 64 * 128 == 57_344  # the slides' full attention: 7 frames of 64x128


def block_of(distances=(0, 1, 2), seed=0, dtype=torch.float64, **args):
    torch.manual_seed(seed)
    block = SparseTemporalBlock(8, distances, **{"r": 2, "s": 1, "e": 2, "eps": 1, "heads": 2, **args})
    for p in block.parameters():  # LayerNorms away from 1 / 0, so that every parameter matters
        torch.nn.init.normal_(p, std=0.5)
    return block.to(dtype)


def test_constant_map_has_zero_dissimilarity():
    block = block_of()
    x = torch.randn(1, 3, 8, 1, 1, dtype=torch.float64).expand(2, 3, 8, 6, 7)
    q = block.queries(x[:, 0])
    torch.testing.assert_close(block.dissimilarity(q), torch.zeros(2, 6, 7, dtype=torch.float64))
    block.float()
    torch.testing.assert_close(block.dissimilarity(q.float()), torch.zeros(2, 6, 7), atol=1e-6, rtol=0)
    _, d = sparse_tt_reference(block, x, torch.zeros(2, 6, 7, dtype=torch.bool))
    torch.testing.assert_close(d, torch.zeros(2, 6, 7, dtype=torch.float64))


def test_step_edge_selects_pixels_near_the_edge():
    """Columns 0..5 hold one vector, 6..11 another: with ``tr`` the fraction of pixels within ``r`` of the edge
    (columns 4..7), every selected pixel is one of them."""
    r, h, w = 2, 6, 12
    block = block_of(r=r, tr=(2 * r * h) / (h * w), dtype=torch.float32)
    x = torch.empty(1, 3, 8, h, w)
    x[..., :6] = torch.randn(8, 1, 1)
    x[..., 6:] = torch.randn(8, 1, 1)
    q = block.queries(x[:, 0])
    selected = block.select(q)[0]
    assert selected.numel() == 2 * r * h
    columns = selected % w
    assert ((columns >= 6 - r) & (columns <= 5 + r)).all(), columns
    assert q.requires_grad and not selected.is_floating_point()  # D's ranking carries no gradient


def test_dissimilarity_equals_the_loops():
    block = block_of()
    x = torch.randn(2, 3, 8, 5, 6, dtype=torch.float64)
    _, d = sparse_tt_reference(block, x, torch.zeros(2, 5, 6, dtype=torch.bool))
    torch.testing.assert_close(block.dissimilarity(block.queries(x[:, 0])), d)
    assert (d > 0).all()


def test_tr_one_equals_the_reference_at_every_pixel():
    block = block_of(tr=1.0)
    x = torch.randn(2, 3, 8, 5, 6, dtype=torch.float64)
    out = block(x)
    expected, _ = sparse_tt_reference(block, x)
    torch.testing.assert_close(out, expected)
    assert not (out == x[:, 0]).any()


def test_gather_path_equals_the_loops_with_its_selection_and_borders():
    """``tr = 0.5``: the block's own selection (float32 ``D``) is the reference's, the selected pixels (the
    windows of radius 2 cross the borders of a 5x6 map everywhere) equal the loops and the others are the
    input bit for bit."""
    block = block_of(tr=0.5, seed=1)
    x = torch.randn(2, 3, 8, 5, 6, dtype=torch.float64)
    expected, d = sparse_tt_reference(block, x)
    selected = block.select(block.queries(x[:, 0]))
    assert selected.shape == (2, 15)
    assert torch.equal(selected.sort(1).values, d.flatten(1).topk(15, 1).indices.sort(1).values)
    out = block(x)
    torch.testing.assert_close(out, expected)
    mask = torch.zeros(2, 30, dtype=torch.bool).scatter(1, selected, True).view(2, 1, 5, 6).expand_as(out)
    assert torch.equal(out[~mask], x[:, 0][~mask]) and not (out[mask] == x[:, 0][mask]).any()


def test_unselected_pixels_are_bit_identical_in_float32():
    block = block_of(tr=0.25, dtype=torch.float32)
    x = torch.randn(2, 3, 8, 6, 7)
    selected = torch.tensor([[0, 6, 20, 41], [3, 17, 35, 40]])
    out = block(x, selected)
    mask = torch.zeros(2, 42, dtype=torch.bool).scatter(1, selected, True).view(2, 1, 6, 7).expand_as(out)
    assert torch.equal(out[~mask], x[:, 0][~mask]) and not (out[mask] == x[:, 0][mask]).any()
    expected, _ = sparse_tt_reference(block, x, mask[:, 0])
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_tr_zero_returns_the_input():
    torch.manual_seed(0)
    module = SparseTemporalTransformer(16, (1, 2), tr=0.0, heads=2)
    feats = torch.randn(2, 3, 16, 8, 10)
    assert torch.equal(module(feats), feats[:, 0])
    block = block_of(tr=0.0, dtype=torch.float32)
    x = torch.randn(1, 3, 8, 4, 5)
    assert torch.equal(block(x), x[:, 0])


def test_offsets_give_windows_of_their_values():
    """Offsets [2, 4]: the windows have radii l = 1 + d = 3 and 5 (positions 1 and 2 would give 2 and 3). A
    change in frame 1 at Chebyshev distance 3 from a pixel reaches it, at 4 it does not; frame 2: 5 and 6."""
    module = SparseTemporalTransformer(8, (2, 4), r=1, tr=1.0, heads=2, stride=4)
    assert module.block.radii == (1, 3, 5) == key_radii((0, 2, 4))
    assert module.block.num_keys == 9 + 49 + 121
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 13, 13, dtype=torch.float64)
    block = module.block.double()
    base = block(x)
    for frame, near, far in ((1, 3, 4), (2, 5, 6)):
        for dist, reached in ((near, True), (far, False)):
            changed = x.clone()
            changed[0, frame, :, 0, dist] = torch.randn(8, dtype=torch.float64)
            moved = (block(changed) - base)[0, :, 0, 0].abs().max() > 0
            assert moved == reached, (frame, dist)


def test_module_resizes_to_stride_8_and_adds_the_change():
    torch.manual_seed(0)
    module = SparseTemporalTransformer(16, (1, 2), r=1, tr=1.0, heads=2).double()
    feats = torch.randn(1, 3, 16, 8, 10, dtype=torch.float64)
    small = torch.nn.functional.interpolate(feats[0], (4, 5), mode="bilinear")
    change = module.block(small[None]) - small[:1]
    expected = feats[:, 0] + torch.nn.functional.interpolate(change, (8, 10), mode="bilinear")
    torch.testing.assert_close(module(feats), expected)
    assert module.out_channels == 16


def test_bad_inputs_name_the_argument():
    for args, match in (
        (dict(tr=1.5), r"tr must be a fraction in \[0, 1\], got 1.5"),
        (dict(tr=-0.1), r"tr must be a fraction"),
        (dict(r=0), r"r must be an int >= 1, got 0"),
        (dict(s=6, e=5), r"s must be at most e, got s=6, e=5"),
        (dict(eps=-1), r"eps must be an int >= 0, got -1"),
        (dict(heads=3), r"channels 16 must be divisible by heads 3"),
        (dict(stride=6), r"stride must be a multiple of 4"),
    ):
        with pytest.raises(ValueError, match=match):
            SparseTemporalTransformer(16, (1, 2), **{"heads": 2, **args})
    module = SparseTemporalTransformer(16, (1, 2), heads=2)
    with pytest.raises(ValueError, match=r"at least 2x2 at stride 8: the stride-4 features 3x10 give 1x5"):
        module(torch.randn(1, 3, 16, 3, 10))
    with pytest.raises(ValueError, match=r"feats must be \(B, 3, 16, h, w\)"):
        module(torch.randn(1, 2, 16, 8, 8))


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("tr=1.5", r"model.sparse_tt.tr must be a fraction in \[0, 1\], got 1.5"),
        ("tr=-0.5", r"model.sparse_tt.tr must be a fraction in \[0, 1\], got -0.5"),
        ("r=0", r"model.sparse_tt.r must be at least 1, got 0"),
        ("s=6", r"model.sparse_tt.s must be at most model.sparse_tt.e, got s=6, e=5"),
        ("eps=-1", r"model.sparse_tt.eps must be at least 0, got -1"),
        ("heads=0", r"model.sparse_tt.heads must be at least 1, got 0"),
        ("stride=6", r"model.sparse_tt.stride must be a positive multiple of 4, got 6"),
        ("eps=0.5", r"model.sparse_tt.eps"),
    ],
)
def test_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.short_term=sparse_tt", f"model.sparse_tt.{override}"])


@pytest.mark.parametrize("name", ["vspw_r101", "cityscapes_r101"])
def test_configs_build_the_slides_setting(name):
    """Each config builds the module at ResNet-101 size (meta device) with 527 keys per query and says it has
    no published number."""
    path = ROOT / "configs" / "sparse_tt" / f"{name}.yaml"
    assert "no published number on this host" in path.read_text().splitlines()[0]
    cfg = load_config(path)
    assert list(cfg.data.offsets) == [1, 2, 3, 4, 5, 6] and cfg.model.backbone == "resnet101"
    with torch.device("meta"):
        model = build_model(cfg, 19, pretrained=False)
    module = model.short_term_module
    assert model.short_term == "sparse_tt" and isinstance(module, SparseTemporalTransformer)
    assert module.offsets == (1, 2, 3, 4, 5, 6) and module.block.num_keys == 527
    assert (module.block.r, module.block.tr, module.block.heads, module.stride) == (5, 0.5, 8, 8)
    assert module.out_channels == 4 * 256  # the fused stride-4 feature at the default fpn_dim
    assert model.parameter_breakdown()["short-term module (sparse_tt)"] > 0

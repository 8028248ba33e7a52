"""Spatial-Temporal OCR and OCRNet's ObjectAttention: region representations against a float64 reference,
frame-order and repetition invariance, the first-clip memory, the aux loss and bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from ssltm.model.ocr import ObjectAttention
from ssltm.model.st_ocr import SpatialTemporalOCR

B, C, K, D, KEY, H, W = 2, 16, 5, 8, 4, 9, 11


@pytest.fixture(autouse=True)
def _reference_pooling(monkeypatch):
    # soft_region_pool's kernels have their own tests; the module's tests run its eager reference (fast on CPU)
    monkeypatch.setenv("SSLTM_BACKEND", "reference")


def make(memory="none", seed=0):
    torch.manual_seed(seed)
    return SpatialTemporalOCR(C, K, channels=D, key_channels=KEY, memory=memory).eval()


def feats_of(t, seed=1):
    return torch.randn(B, t, C, H, W, generator=torch.Generator().manual_seed(seed))


def attended_regions(module, run):
    """The ``(B, K, D)`` region representations ``module``'s ObjectAttention receives while ``run()`` runs."""
    seen = []
    handle = module.attention.register_forward_hook(lambda m, args, out: seen.append(args[1].detach()))
    try:
        out = run()
    finally:
        handle.remove()
    return out, seen[0]


def pooled_reference(aux_logits, pixels):
    """float64 ``R_f`` ``(..., K, D)``: per class, the softmax-over-positions-weighted sum of the pixels."""
    weights = torch.softmax(aux_logits.double().flatten(-2), dim=-1)
    return torch.einsum("...kn,...cn->...kc", weights, pixels.double().flatten(-2))


def test_region_representations_are_the_clip_mean_of_a_float64_reference(monkeypatch):
    monkeypatch.delenv("SSLTM_BACKEND")  # the op as dispatched by default
    module = make()
    feats = feats_of(3)
    with torch.no_grad():
        aux_logits, pixels, regions = module.regions(feats)
        _, attended = attended_regions(module, lambda: module(feats))
    assert aux_logits.shape == (B, 3, K, H, W) and pixels.shape == (B, 3, D, H, W) and regions.shape == (B, 3, K, D)
    reference = pooled_reference(aux_logits, pixels)
    torch.testing.assert_close(regions.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attended.double(), reference.mean(dim=1), rtol=1e-5, atol=1e-5)


def test_output_is_invariant_to_the_order_of_the_adjacent_frames():
    module = make()
    feats = feats_of(4)
    with torch.no_grad():
        out = module(feats)
        permuted = module(feats[:, [0, 3, 1, 2]])
        other_query = module(feats[:, [1, 0, 2, 3]])
    assert out.shape == (B, D, H, W)
    torch.testing.assert_close(permuted, out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other_query, out, atol=1e-3)


def test_identical_frames_give_the_one_frame_output():
    module = make()
    frame = feats_of(1)
    with torch.no_grad():
        one = module(frame)
        three = module(frame.expand(B, 3, C, H, W))
        with_another = module(torch.cat([frame, feats_of(1, seed=2)], dim=1))
    torch.testing.assert_close(three, one, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_another, one, atol=1e-3)


def videos():
    return [[feats_of(3, seed=10 * v + c) for c in range(3)] for v in range(2)]


def test_first_clip_memory():
    plain, memory = make(), make("first_clip")
    clips = videos()
    with torch.no_grad():
        state, shared = {}, []
        for video in clips:  # one state, cleared between the videos (the predictor's reset)
            state.clear()
            shared.append([memory(clip, state=state) for clip in video])
        fresh = [[memory(clip, state=s) for clip in video] for video in clips for s in [{}]]
        without = [[plain(clip) for clip in video] for video in clips]
        stateless = memory(clips[0][1])
        first_regions = plain.regions(clips[0][0])[2]
        state = {"st_ocr_first_clip_regions": first_regions}
        later, attended = attended_regions(memory, lambda: memory(clips[0][2], state=state))
    for video in range(2):
        for clip in range(3):
            assert torch.equal(shared[video][clip], fresh[video][clip])
        assert torch.equal(fresh[video][0], without[video][0])  # the first query is unchanged by the memory
        for clip in (1, 2):
            assert not torch.allclose(fresh[video][clip], without[video][clip], atol=1e-4)
    assert torch.equal(stateless, without[0][1])  # no state: no memory
    current = plain.regions(clips[0][2])[2]
    torch.testing.assert_close(attended, torch.cat([first_regions, current], dim=1).mean(dim=1))
    torch.testing.assert_close(later, fresh[0][2])


def test_memory_is_ignored_in_training():
    plain, memory = make(), make("first_clip")
    plain.train()
    memory.train()
    clip, state = feats_of(3), {}
    torch.manual_seed(5)
    out = memory(clip, state=state)
    torch.manual_seed(5)
    assert torch.equal(out, plain(clip)) and state == {}


def test_aux_loss_is_the_weighted_cross_entropy_of_the_query_scores():
    module = make().train()
    with pytest.raises(RuntimeError, match="training forward"):
        module.losses(torch.zeros(B, 36, 44, dtype=torch.long))
    feats = feats_of(3)
    seen = []
    handle = module.aux_head.register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    module(feats)
    handle.remove()
    query_scores = seen[0].unflatten(0, (B, 3))[:, 0]
    labels = torch.randint(0, K, (B, 36, 44), generator=torch.Generator().manual_seed(3))
    labels[:, :5] = 255
    upsampled = F.interpolate(query_scores, size=(36, 44), mode="bilinear", align_corners=False)
    expected = 0.4 * F.cross_entropy(upsampled, labels, ignore_index=255)
    losses = module.losses(labels)
    assert tuple(losses) == module.loss_terms == ("st_ocr_aux",)
    torch.testing.assert_close(losses["st_ocr_aux"], expected)
    losses["st_ocr_aux"].backward()
    assert module.aux_head[0][0].weight.grad.abs().sum() > 0


def test_object_attention_is_a_softmax_over_regions():
    torch.manual_seed(0)
    block = ObjectAttention(D, KEY).double().eval()
    pixels = torch.randn(B, D, H, W, dtype=torch.float64)
    regions = torch.randn(B, K, D, dtype=torch.float64)
    out = block(pixels, regions)
    proxy = regions.transpose(1, 2).unsqueeze(-1)
    q = block.f_pixel(pixels).flatten(2)  # (B, KEY, h*w)
    k = block.f_object(proxy).flatten(2)  # (B, KEY, K)
    v = block.f_down(proxy).flatten(2)
    attention = torch.softmax(torch.einsum("bcn,bck->bnk", q, k) / KEY**0.5, dim=-1)
    expected = block.f_up(torch.einsum("bnk,bck->bcn", attention, v).unflatten(2, (H, W)))
    assert out.shape == (B, D, H, W)
    torch.testing.assert_close(out, expected)
    assert len(block.f_pixel) == len(block.f_object) == 2
    for layer in (*block.f_pixel, *block.f_object, block.f_down, block.f_up):
        assert [type(m) for m in layer] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU]
    with pytest.raises(ValueError, match="regions must be \\(B, K, C\\)"):
        block(pixels, regions.transpose(1, 2))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="memory must be one of none, first_clip, got 'fifo'"):
        SpatialTemporalOCR(C, K, memory="fifo")
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        SpatialTemporalOCR(C, 0)
    with pytest.raises(ValueError, match="feats must be \\(B, T, 16, h, w\\)"):
        make()(feats_of(2)[:, :, :8])

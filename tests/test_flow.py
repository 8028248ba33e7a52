"""ssltm.flow: warping, flow resizing and the model-side flow providers (DIS, RAFT, zero), with their errors."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate
from torchvision.models.optical_flow import raft_small

from ssltm.build import build_dataset, build_flow_provider
from ssltm.config import ConfigError, load_config
from ssltm.data import IMAGENET_MEAN, IMAGENET_STD, SyntheticVideos
from ssltm.flow import (
    FLOW_PROVIDERS,
    RaftFlowProvider,
    make_flow_provider,
    resize_flow,
    warp,
)

# x then y: the tensor that turns a flow into the flow of the horizontally mirrored frames (x negated)
NEGATE_X = torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1)


def shifted(x, dx, dy):
    """``x`` with its content moved by ``(dx, dy)`` px: ``out[..., y + dy, x + dx] = x[..., y, x]``, 0 elsewhere."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def constant_flow(n, h, w, dx, dy):
    return torch.tensor([float(dx), float(dy)]).view(1, 2, 1, 1).expand(n, 2, h, w).contiguous()


def inside(h, w, dx, dy):
    """The pixels ``p`` whose source ``p + (dx, dy)`` lies inside an ``h x w`` frame."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (xs + dx >= 0) & (xs + dx < w) & (ys + dy >= 0) & (ys + dy < h)


def recovers(x, moved, flow, dx, dy):
    """Whether ``warp(moved, flow)`` equals ``x`` wherever ``p + (dx, dy)`` is inside the frame (up to the float32
    rounding of the sampling grid)."""
    mask = inside(*x.shape[-2:], dx, dy)
    return torch.allclose(warp(moved, flow)[..., mask], x[..., mask], atol=1e-5, rtol=0)


# --- warp and resize_flow -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(13, 17), (32, 40)])
@pytest.mark.parametrize(("dx", "dy"), [(3, -2), (-5, 1), (0, 0)])
def test_warp_with_a_constant_flow_recovers_a_shifted_map(size, dx, dy):
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    moved = shifted(x, dx, dy)  # the content at p in x is at p + (dx, dy) in moved: flow x -> moved = (dx, dy)
    assert recovers(x, moved, constant_flow(2, *size, dx, dy), dx, dy)


def test_warp_fails_on_a_wrong_sign_swapped_axes_or_align_corners(monkeypatch):
    h, w, dx, dy = 32, 40, 3, -2
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    moved, flow = shifted(x, dx, dy), constant_flow(1, h, w, dx, dy)
    assert recovers(x, moved, flow, dx, dy)
    assert not recovers(x, moved, -flow, dx, dy)  # wrong sign
    assert not recovers(x, moved, flow.flip(1), dx, dy)  # y then x
    grid_sample = F.grid_sample
    monkeypatch.setattr(F, "grid_sample", lambda *a, **k: grid_sample(*a, **{**k, "align_corners": False}))
    assert not recovers(x, moved, flow, dx, dy)  # the grid normalised for align_corners=True, read without it


@pytest.mark.parametrize("stride", [4, 8])
def test_resize_flow_to_a_stride_recovers_the_shifted_feature_map(stride):
    h, w, kx, ky = 32, 40, 2, -1  # a shift of (kx, ky) feature pixels is (kx, ky) * stride image pixels
    flow = constant_flow(2, h, w, kx * stride, ky * stride)
    feats = torch.rand(2, 5, h // stride, w // stride, generator=torch.Generator().manual_seed(stride))
    moved = shifted(feats, kx, ky)
    small = resize_flow(flow, (h // stride, w // stride))
    assert small.shape == (2, 2, h // stride, w // stride) and small.dtype == torch.float32
    assert torch.equal(small, constant_flow(2, h // stride, w // stride, kx, ky))
    assert recovers(feats, moved, small, kx, ky)
    unscaled = F.interpolate(flow, size=(h // stride, w // stride), mode="bilinear", align_corners=False)
    assert not recovers(feats, moved, unscaled, kx, ky)  # the flow not divided by the stride


def test_resize_flow_scales_each_component_by_its_own_axis():
    flow = constant_flow(1, 32, 40, 4.0, 6.0)
    out = resize_flow(flow, (8, 20))  # y: 8 / 32, x: 20 / 40
    assert torch.equal(out, constant_flow(1, 8, 20, 2.0, 1.5))
    # f_x = x resized to twice the width: bilinear with align_corners=False (x / 2 - 0.25), doubled
    ramp = torch.zeros(1, 2, 4, 8)
    ramp[:, 0] = torch.arange(8.0)
    torch.testing.assert_close(resize_flow(ramp, (4, 16))[0, 0, 0], torch.arange(16.0).clamp(0.5, 14.5) - 0.5)


def test_warp_border_padding_dtype_and_gradients():
    x = torch.rand(1, 2, 5, 6, generator=torch.Generator().manual_seed(2))
    # every source point right of the frame reads the last column (NetWarp's nearest-outlier rule)
    far = warp(x, constant_flow(1, 5, 6, 100, 0))
    assert torch.equal(far, x[..., -1:].expand_as(x))
    low = warp(x.bfloat16(), constant_flow(1, 5, 6, 1, 0))
    assert low.dtype == torch.bfloat16
    x.requires_grad_(True)
    flow = constant_flow(1, 5, 6, 0.5, 0.25).requires_grad_(True)
    warp(x, flow).square().sum().backward()
    assert x.grad.abs().sum() > 0 and flow.grad.abs().sum() > 0


# --- providers ------------------------------------------------------------------------------------------------


def normalise(rgb):
    """``[0, 1]`` RGB ``(N, 3, H, W)`` as the model's input."""
    return (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def synthetic_frames():
    """Two consecutive-but-one frames of a synthetic video, normalised ``(1, 3, 64, 80)`` each."""
    frames = SyntheticVideos(num_videos=1, num_frames=4, size=(64, 80), offsets=(2,))[0]["frames"]
    return frames[:1], frames[1:]


def interior(flow, margin=10):
    return flow[..., margin:-margin, margin:-margin]


@pytest.mark.parametrize(("dx", "dy"), [(3, -2), (-4, 1)])
def test_dis_provider_recovers_an_integer_shift(synthetic_frames, dx, dy):
    src = synthetic_frames[0].expand(2, -1, -1, -1)
    dst = torch.stack([torch.roll(src[0], (dy, dx), (-2, -1)), src[0]])  # pair 1: no motion
    flow = make_flow_provider("dis")(src, dst)
    assert flow.shape == (2, 2, 64, 80) and flow.dtype == torch.float32 and flow.device == src.device
    error = interior(flow - torch.tensor([[dx, dy], [0, 0]]).float().view(2, 2, 1, 1)).norm(dim=1)
    assert error[0].median() < 0.25 and error[1].median() < 0.25


def test_dis_provider_flip_mirrors_the_flow_and_negates_x(synthetic_frames):
    # A zoom by 6% about an off-centre point: f(p) = 0.06 (p - c), varying over the frame, so that a flow
    # not mirrored, or mirrored without negating x, is far (> 1 px) from the right answer.
    src = synthetic_frames[0]
    h, w = src.shape[-2:]
    scale, cx, cy = 1.06, 0.3 * (w - 1), 0.6 * (h - 1)
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    dst = warp(src, torch.stack([cx + (xs - cx) / scale - xs, cy + (ys - cy) / scale - ys])[None])
    provider = make_flow_provider("dis")
    flow = provider(src, dst)
    flipped = provider(src.flip(-1), dst.flip(-1))

    def median_gap(a, b):
        return interior(a - b).abs().flatten(2).median(dim=2).values[0]

    # DIS is not exactly flip-equivariant (its patch grid starts at the top-left corner of either image):
    # per component the median gap must stay under 0.25 px, the accuracy the integer-shift test demands.
    assert (median_gap(flipped, flow.flip(-1) * NEGATE_X) < 0.25).all()
    assert median_gap(flipped, flow.flip(-1))[0] > 1  # x not negated
    assert median_gap(flipped, flow * NEGATE_X)[0] > 1  # not mirrored


def test_loader_flow_is_the_provider_flow_of_the_augmented_frames():
    overrides = ["data.synthetic.size=[48,64]", "data.crop_size=[40,56]", "data.offsets=[1,3]", "train.seed=5"]
    dataset, indices = build_dataset(load_config(None, [*overrides, "data.flow_in_loader=true"]), "train", train=True)
    samples = [dataset[i] for i in indices[:2]]
    for sample in samples:
        frames = sample["frames"]  # the augmented frames: random scale, crop and flip
        expected = make_flow_provider("dis")(frames[:1].expand(2, -1, -1, -1), frames[1:])
        assert sample["flow"].shape == (2, 2, 40, 56) and sample["flow"].dtype == torch.float32
        assert torch.equal(sample["flow"], expected)
    assert default_collate(samples)["flow"].shape == (2, 2, 2, 40, 56)
    plain, _ = build_dataset(load_config(None, overrides), "train", train=True)
    assert "flow" not in plain[0] and torch.equal(plain[0]["frames"], samples[0]["frames"])


def test_zero_provider_shape_dtype_and_device():
    provider = make_flow_provider("zero")
    src = torch.empty(3, 3, 7, 9, dtype=torch.bfloat16, device="meta")  # the flow follows src's device
    out = provider(src, src)
    assert out.shape == (3, 2, 7, 9) and out.dtype == torch.float32 and out.device == src.device
    assert torch.equal(provider(torch.rand(1, 3, 4, 5), torch.rand(1, 3, 4, 5)), torch.zeros(1, 2, 4, 5))
    assert make_flow_provider("dis")(torch.zeros(0, 3, 4, 5), torch.zeros(0, 3, 4, 5)).shape == (0, 2, 4, 5)


class FakeRaft(nn.Module):
    """A stand-in for RAFT with one parameter: records its inputs, returns each padded pixel's (x, y) times
    ``scale``."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, image1, image2, num_flow_updates=12):
        self.inputs = (image1, image2, num_flow_updates)
        n, _, h, w = image1.shape
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        return [torch.stack([xs, ys]).float().expand(n, 2, h, w) * self.scale]


def test_raft_provider_scales_pads_crops_and_stays_out_of_the_model():
    fake = FakeRaft()
    provider = make_flow_provider("raft", fake, iters=3)
    assert isinstance(provider, RaftFlowProvider) and not fake.training and not fake.scale.requires_grad
    model = nn.Conv2d(3, 4, 1)
    model.flow = provider  # a plain attribute: not a submodule, parameter or buffer
    assert list(model.state_dict()) == ["weight", "bias"] and len(list(model.parameters())) == 2
    rgb = torch.rand(2, 3, 130, 141, generator=torch.Generator().manual_seed(3))
    src = normalise(rgb).requires_grad_(True)
    out = provider(src, normalise(rgb.flip(0)))
    assert out.shape == (2, 2, 130, 141) and out.dtype == torch.float32 and not out.requires_grad
    image1, image2, updates = fake.inputs
    assert updates == 3 and image1.shape == image2.shape == (2, 3, 136, 144)  # padded to /8: 3 + 3 rows, 1 + 2 cols
    torch.testing.assert_close(image1[:, :, 3:133, 1:142], rgb * 2 - 1, atol=1e-5, rtol=0)  # [-1, 1]
    torch.testing.assert_close(image2[:, :, 3:133, 1:142], rgb.flip(0) * 2 - 1, atol=1e-5, rtol=0)
    ys, xs = torch.meshgrid(torch.arange(130.0), torch.arange(141.0), indexing="ij")
    assert torch.equal(out, torch.stack([xs + 1, ys + 3]).expand(2, 2, 130, 141))  # cropped back
    assert make_flow_provider("raft", fake).iters == 20


def test_make_flow_provider_and_raft_file_errors(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"flow provider must be one of {FLOW_PROVIDERS}, got 'farneback'")):
        make_flow_provider("farneback")
    with pytest.raises(ValueError, match="flow provider 'raft' needs weights"):
        make_flow_provider("raft")
    missing = tmp_path / "raft.pth"
    with pytest.raises(FileNotFoundError, match=f"RAFT weights not found: no file at {re.escape(str(missing))}"):
        make_flow_provider("raft", missing)
    small = tmp_path / "raft_small.pth"
    torch.save(raft_small(weights=None, progress=False).state_dict(), small)
    with pytest.raises(ValueError, match=f"{re.escape(str(small))} are not a state dict of torchvision's raft_large"):
        make_flow_provider("raft", small)
    with pytest.raises(ValueError, match="iters must be a positive int, got 0"):
        make_flow_provider("raft", FakeRaft(), iters=0)
    # the config layer names the key
    cfg = load_config(None, ["model.flow=raft", f"model.flow_weights={small}"])
    with pytest.raises(ConfigError, match=f"model.flow_weights = {re.escape(str(small))}: RAFT weights"):
        build_flow_provider(cfg)
    assert build_flow_provider(cfg, needs_flow=False) is None
    assert build_flow_provider(load_config(None, ["model.flow=zero"])).name == "zero"


def test_flow_config_errors(tmp_path):
    assert load_config(None).model.flow == "dis" and load_config(None).model.flow_iters == 20
    with pytest.raises(ConfigError, match=re.escape(f"model.flow must be one of {FLOW_PROVIDERS}, got 'farneback'")):
        load_config(None, ["model.flow=farneback"])
    with pytest.raises(ConfigError, match="model.flow 'raft' needs model.flow_weights: .* got null"):
        load_config(None, ["model.flow=raft"])
    missing = tmp_path / "raft.pth"
    with pytest.raises(ConfigError, match=f"model.flow_weights: .* got no file at {re.escape(str(missing))}"):
        load_config(None, ["model.flow=raft", f"model.flow_weights={missing}"])
    with pytest.raises(ConfigError, match="model.flow_iters must be at least 1, got 0"):
        load_config(None, ["model.flow_iters=0"])


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flow",
    [
        torch.zeros(2, 2, 8, 10),  # wrong width
        torch.zeros(2, 3, 8, 9),  # three components
        torch.zeros(1, 2, 8, 9),  # wrong batch
        torch.zeros(2, 8, 9, 2),  # channels last
        torch.zeros(2, 2, 8, 9, dtype=torch.int64),  # not floating point
        torch.zeros(2, 2, 8, 9, device="meta"),  # another device
        [[0.0]],
    ],
)
def test_warp_rejects_a_bad_flow(flow):
    expected = re.escape("flow must be a floating-point (N, 2, h, w) = (2, 2, 8, 9) tensor on cpu, got ")
    with pytest.raises(ValueError, match=expected):
        warp(torch.zeros(2, 4, 8, 9), flow)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"x must be a floating-point \(N, C, h, w\) tensor, got shape \(4, 8, 9\)"):
        warp(torch.zeros(4, 8, 9), torch.zeros(1, 2, 8, 9))
    with pytest.raises(ValueError, match=r"flow must be a floating-point \(N, 2, H, W\) tensor, got shape \(1, 3, 4"):
        resize_flow(torch.zeros(1, 3, 4, 4), (2, 2))
    with pytest.raises(ValueError, match=r"size must be \(h, w\), two positive ints, got \(2, 0\)"):
        resize_flow(torch.zeros(1, 2, 4, 4), (2, 0))
    provider = make_flow_provider("zero")
    with pytest.raises(ValueError, match=r"dst must be a float \(N, 3, H, W\) tensor of normalised frames"):
        provider(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="src and dst must have the same shape and device"):
        provider(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))

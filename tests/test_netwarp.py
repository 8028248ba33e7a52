"""NetWarp: the per-channel combination, the flow transformation at initialisation, exact warping of a
shifted pair, gradients, odd sizes and bad inputs."""

import pytest
import torch

from ssltm.flow import resize_flow
from ssltm.model.netwarp import NetWarp

C = 16


def clip(h=36, w=44, seed=0, stride=4):
    """Features ``(2, 2, C, ceil(h/stride), ceil(w/stride))``, frames ``(2, 2, 3, h, w)`` and a flow of a few
    pixels ``(2, 1, 2, h, w)``."""
    g = torch.Generator().manual_seed(seed)
    fh, fw = -(-h // stride), -(-w // stride)
    feats = torch.randn(2, 2, C, fh, fw, generator=g)
    images = torch.randn(2, 2, 3, h, w, generator=g)
    flow = 6 * torch.rand(2, 1, 2, h, w, generator=g) - 3
    return feats, images, flow


def test_w0_one_w1_zero_is_the_query_feature_bit_for_bit():
    torch.manual_seed(0)
    module = NetWarp(C)
    feats, images, flow = clip()
    with torch.no_grad():
        module.w0.fill_(1.0)
        module.w1.zero_()
    out = module(feats, images, flow)
    assert torch.equal(out, feats[:, 0])
    with torch.no_grad():
        module.w1.fill_(0.5)
    assert not torch.allclose(module(feats, images, flow), feats[:, 0], atol=1e-3)


def test_flow_transform_starts_near_zero():
    # The 1x1 conv that makes Λ(F) from [FlowCNN(F, I_q, I_w), F] starts at N(0, 0.001) weights and a zero
    # bias, so |Λ(F)| ≈ 0.001 * |its four inputs|: for flows of a few feature pixels it is below a hundredth of
    # a feature pixel (the adjacent feature starts practically unwarped), though F itself is not small.
    torch.manual_seed(0)
    module = NetWarp(C)
    feats, images, flow = clip()
    f = resize_flow(flow[:, 0], feats.shape[-2:])
    assert f.abs().max() > 0.5
    with torch.no_grad():
        transformed = module.transformed_flow(images, flow, tuple(feats.shape[-2:]))
    assert transformed.shape == f.shape
    assert 0 < transformed.abs().max() < 1e-2
    assert torch.equal(module.w0, torch.full((1, C, 1, 1), 0.5)) and torch.equal(module.w1, module.w0)
    assert torch.equal(module.flow_transform.bias, torch.zeros(2))
    assert module.flow_transform.weight.std() < 0.003


@pytest.mark.parametrize("dx, dy", [(2, -1), (-1, 3)])
def test_without_flowcnn_a_shifted_pair_warps_onto_the_query(dx, dy):
    stride = 4
    module = NetWarp(C, stride=stride, flowcnn=False)
    assert {name for name, _ in module.named_parameters()} == {"w0", "w1"}
    query = torch.randn(2, C, 9, 11)
    adjacent = torch.roll(query, shifts=(dy, dx), dims=(-2, -1))  # the content at p is at p + (dx, dy)
    images = torch.randn(2, 2, 3, 9 * stride, 11 * stride)
    flow = torch.tensor([dx * stride, dy * stride], dtype=torch.float32).view(1, 1, 2, 1, 1).expand(2, 1, 2, 36, 44)
    out = module(torch.stack([query, adjacent], dim=1), images, flow.contiguous())
    rows = slice(max(0, -dy), 9 - max(0, dy))  # where p + (dx, dy) is inside the map
    cols = slice(max(0, -dx), 11 - max(0, dx))
    torch.testing.assert_close(out[..., rows, cols], query[..., rows, cols], rtol=0, atol=1e-5)
    assert not torch.allclose(out, query, atol=1e-3)  # outside, the border is repeated


def test_gradients_reach_flowcnn_weights_and_both_frames_but_not_the_flow():
    torch.manual_seed(0)
    module = NetWarp(C)
    feats, images, flow = clip(h=37, w=45)  # odd sizes: features ceil(37/4) x ceil(45/4) = 10 x 12
    assert feats.shape[-2:] == (10, 12)
    feats.requires_grad_(True)
    flow.requires_grad_(True)
    out = module(feats, images, flow)
    assert out.shape == (2, C, 10, 12)
    (out * torch.randn_like(out)).sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert feats.grad[:, 0].abs().sum() > 0 and feats.grad[:, 1].abs().sum() > 0
    assert flow.grad is None


def test_bad_inputs_name_the_argument():
    module = NetWarp(C)
    feats, images, flow = clip()
    with pytest.raises(ValueError, match="flow must be float32 \\(2, 1, 2, 36, 44\\)"):
        module(feats, images, flow[..., 1:])
    with pytest.raises(ValueError, match="flow must be float32"):
        module(feats, images, flow.double())
    with pytest.raises(ValueError, match="flow must be"):
        module(feats, images, None)
    with pytest.raises(ValueError, match="images must be"):
        module(feats, None, flow)
    with pytest.raises(ValueError, match="images .* max-pooled by the stride 4"):
        module(feats[..., :8, :], images, flow)
    with pytest.raises(ValueError, match="feats must be \\(B, 2, 16, h, w\\)"):
        module(feats[:, :1], images, flow)
    with pytest.raises(ValueError, match="stride must be a positive int"):
        NetWarp(C, stride=0)

"""Team 27's AttentionWeightNet: structure, their released checkpoint on their own candidates, generalisation."""
import torch

from srmodels.checkpoint import load_into, load_state_dict
from srmodels.fusion import AttentionWeightNet, ImageWeightNet, fuse

from .conftest import load_pt, reference_path


def test_structure_matches_team27():
    net = AttentionWeightNet(num_candidates=3)
    assert sum(p.numel() for p in net.parameters()) == 28_387
    assert list(net.state_dict()) == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
        "attention.0.weight", "attention.0.bias", "attention.2.weight", "attention.2.bias"]


def test_released_checkpoint_reproduces_fixture():
    sd = load_state_dict(reference_path("weights", "team27_fusionNet.pth"))
    net = AttentionWeightNet(3).eval()
    load_into(net, sd)
    cand = load_pt(reference_path("fixtures", "fusion_seed", "inputs.pt"))["candidates"]
    expected = load_pt(reference_path("fixtures", "fusion_seed", "outputs.pt"))
    with torch.no_grad():
        w = net(cand)
        fused = fuse(cand, w)
    assert torch.allclose(w, expected["weights"], atol=1e-5, rtol=0)
    assert torch.allclose(fused, expected["fused"], atol=1e-5, rtol=0)


def test_n_candidates_and_softmax():
    for n in (2, 4):
        net = AttentionWeightNet(num_candidates=n)
        x = torch.rand(2, 3 * n, 12, 10)
        w = net(x)
        assert w.shape == (2, n, 12, 10)
        assert torch.allclose(w.sum(1), torch.ones(2, 12, 10), atol=1e-6)
        assert fuse(x, w).shape == (2, 3, 12, 10)


def test_fuse_is_weighted_sum_and_checks_channels():
    a, b = torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4)
    w = torch.stack([torch.full((4, 4), 0.25), torch.full((4, 4), 0.75)]).unsqueeze(0)
    assert torch.allclose(fuse(torch.cat([a, b], 1), w), 0.25 * a + 0.75 * b)
    try:
        fuse(torch.rand(1, 9, 4, 4), w)
    except ValueError as err:
        assert "9" in str(err)
    else:
        raise AssertionError("mismatched candidate channels accepted")


def test_image_weight_net_one_weight_per_image():
    net = ImageWeightNet(num_candidates=2)
    w = net(torch.rand(3, 3, 16, 20))
    assert w.shape == (3, 2, 1, 1)
    assert torch.allclose(w.sum(1), torch.ones(3, 1, 1))
    cand = torch.rand(3, 6, 64, 80)
    assert fuse(cand, w).shape == (3, 3, 64, 80)

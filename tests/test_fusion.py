"""Team 27's AttentionWeightNet: structure, their released checkpoint on their own members, generalisation;
training the fusion nets (``srmodels.training.fusion``) on tiny synthetic caches."""
from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from srmodels.models.checkpoint import checkpoint_meta, load_into, load_state_dict, read_checkpoint, unwrap_state_dict
from srmodels.data.datasets import FusionCrops, fusion_images, load_fusion_image
from srmodels.models.fusion import AttentionWeightNet, ImageWeightNet, fuse, start_at_anchor, start_at_member
from srmodels.training.fusion import fusion_job, train_fusion
from srmodels.data.images import write_image
from srmodels.training.loop import TrainConfig

from .helpers import SCALE, downscale, load_pt, reference_path, smooth_image

# One intra-op thread: these tensors are tiny, so more threads only add synchronisation.
FUSION_CONFIG = TrainConfig(epochs=2, batch=8, lr=1e-3, crop_border=4, seed=0, threads=1)


def test_structure_matches_team27():
    net = AttentionWeightNet(num_members=3)
    assert sum(p.numel() for p in net.parameters()) == 28_387
    assert list(net.state_dict()) == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
        "attention.0.weight", "attention.0.bias", "attention.2.weight", "attention.2.bias"]


def test_released_checkpoint_reproduces_fixture():
    sd = load_state_dict(reference_path("weights", "team27_fusionNet.pth"))
    net = AttentionWeightNet(3).eval()
    load_into(net, sd)
    cand = load_pt(reference_path("fixtures", "fusion_seed", "inputs.pt"))["candidates"]  # the fixture's key
    expected = load_pt(reference_path("fixtures", "fusion_seed", "outputs.pt"))
    with torch.no_grad():
        w = net(cand)
        fused = fuse(cand, w)
    assert torch.allclose(w, expected["weights"], atol=1e-5, rtol=0)
    assert torch.allclose(fused, expected["fused"], atol=1e-5, rtol=0)


def test_n_members_and_softmax():
    for n in (2, 4):
        net = AttentionWeightNet(num_members=n)
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
        raise AssertionError("mismatched member channels accepted")


def test_image_weight_net_one_weight_per_image():
    net = ImageWeightNet(num_members=2)
    w = net(torch.rand(3, 3, 16, 20))
    assert w.shape == (3, 2, 1, 1)
    assert torch.allclose(w.sum(1), torch.ones(3, 1, 1))
    cand = torch.rand(3, 6, 64, 80)
    assert fuse(cand, w).shape == (3, 3, 64, 80)


# ---------------------------------------------------------------------------------------- training the net

def make_fusion_split(root: Path, split: str, stems: list[str], seed: int) -> None:
    """HR/LR plus two members' caches: 'a' is right on the left half, 'b' on the right; the wrong one is brighter."""
    rng = np.random.default_rng(seed)
    for stem in stems:
        hr = smooth_image(rng, 64, 64, lo=25, hi=130)
        write_image(root / split / "hr" / f"{stem}.png", hr)
        write_image(root / split / "lr" / f"{stem}.png", downscale(hr))
        exact = hr.transpose(2, 0, 1).astype(np.float32) / 255.0
        wrong = exact + 0.35
        half = exact.shape[2] // 2
        a = np.concatenate([exact[..., :half], wrong[..., half:]], axis=2)
        b = np.concatenate([wrong[..., :half], exact[..., half:]], axis=2)
        for member, cand in (("a", a), ("b", b)):
            (root / "cache" / member / split).mkdir(parents=True, exist_ok=True)
            np.save(root / "cache" / member / split / f"{stem}.npy", cand.astype(np.float16))


@pytest.fixture(scope="module")
def fusion_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fusion")
    make_fusion_split(root, "fusion_train", [f"f{i}" for i in range(6)], seed=10)
    make_fusion_split(root, "val", ["v0", "v1"], seed=11)
    return root


def fusion_sets(root: Path, lr_patch: int = 8) -> tuple[FusionCrops, list]:
    members = ("a", "b")
    train = FusionCrops([root / "cache" / m / "fusion_train" for m in members], root / "fusion_train" / "hr",
                        root / "fusion_train" / "lr", lr_patch=lr_patch, scale=SCALE, crops_per_image=8, seed=0)
    val = fusion_images([root / "cache" / m / "val" for m in members], root / "val" / "hr", root / "val" / "lr",
                        SCALE)
    return train, val


def test_fusion_learns_to_pick_the_right_member(fusion_data, tmp_path):
    train, val = fusion_sets(fusion_data)
    torch.manual_seed(0)
    net = AttentionWeightNet(num_members=2)
    metrics = train_fusion(net, train, val, replace(FUSION_CONFIG, epochs=4, lr=3e-3), tmp_path, kind="pixel",
                           l1_weight=0.8, mse_weight=0.2, provenance={"test": True})
    best_member = max(metrics["member_val_psnr"].values())
    assert metrics["best_val_psnr"] > best_member + 10, metrics
    assert metrics["gain_over_best_member"] == metrics["best_val_psnr"] - best_member
    assert metrics["timing"]["samples_per_second"] > 0 and metrics["timing"]["hr_megapixels_per_second"] > 0
    assert not any("second" in k for k in metrics)
    # The best checkpoint describes itself and, reloaded, weights 'a' on the left and 'b' on the right.
    raw = read_checkpoint(tmp_path / "best.pth")
    meta = checkpoint_meta(raw)
    assert meta["arch"] == "fusion_pixel" and meta["kwargs"] == {"num_members": 2, "head": "softmax", "anchor": 0}
    assert meta["members"] == ["a", "b"] and meta["kind"] == "pixel" and meta["scale"] == SCALE
    assert meta["val_psnr"] == metrics["best_val_psnr"]
    reloaded = AttentionWeightNet(2)
    load_into(reloaded, unwrap_state_dict(raw))
    cands, _, _ = load_fusion_image(val[0], SCALE)
    with torch.no_grad():
        w = reloaded.eval()(cands)[0]
    assert w[0, :, 4:28].mean() > 0.9 and w[1, :, 36:60].mean() > 0.9
    assert len(list(csv.DictReader((tmp_path / "curve.csv").open()))) == 5


@pytest.mark.parametrize("net", [AttentionWeightNet(3), ImageWeightNet(3)], ids=["pixel", "image"])
def test_start_at_member_is_that_member_to_8_bit(net):
    torch.manual_seed(0)
    start_at_member(net, 1)
    cands, lr = torch.rand(2, 9, 24, 20), torch.rand(2, 3, 6, 5)
    with torch.no_grad():
        w = net(cands if isinstance(net, AttentionWeightNet) else lr)
        out = fuse(cands, w)
    assert torch.allclose(w[:, 1], torch.full_like(w[:, 1], 511 / 512), atol=1e-6)
    assert (out - cands[:, 3:6]).abs().max() < 1 / 510  # so the 8-bit images differ by at most one level
    # Still trainable: the softmax is not saturated, and the first step gives the output layer weights.
    net.zero_grad()
    fuse(cands, net(cands if isinstance(net, AttentionWeightNet) else lr)).sub(cands[:, :3]).abs().mean().backward()
    assert net.output_layer().weight.grad.abs().max() > 0 and net.output_layer().bias.grad.abs().max() > 1e-4


def test_best_member_init_starts_at_the_best_member_and_still_learns(fusion_data, tmp_path):
    train, val = fusion_sets(fusion_data)
    torch.manual_seed(0)
    metrics = train_fusion(AttentionWeightNet(num_members=2), train, val, replace(FUSION_CONFIG, epochs=4, lr=3e-3),
                           tmp_path, kind="pixel", init="best_member", provenance={"test": True})
    best_member = max(metrics["member_val_psnr"].values())
    assert metrics["init"] == "best_member"
    assert abs(metrics["initial_val_psnr"] - best_member) < 0.05, metrics  # epoch 0 is the member (8-bit)
    assert metrics["best_val_psnr"] > best_member + 10  # and it learned to take each half from the right member
    assert checkpoint_meta(read_checkpoint(tmp_path / "best.pth"))["init"] == "best_member"
    with pytest.raises(ValueError, match="unknown fusion init"):
        train_fusion(AttentionWeightNet(2), train, val, FUSION_CONFIG, tmp_path, kind="pixel", init="zeros")


def test_image_fusion_checkpoint(fusion_data, tmp_path):
    train, val = fusion_sets(fusion_data)
    torch.manual_seed(0)
    metrics = train_fusion(ImageWeightNet(num_members=2), train, val, replace(FUSION_CONFIG, epochs=1), tmp_path,
                           kind="image")
    meta = checkpoint_meta(read_checkpoint(tmp_path / "best.pth"))
    assert meta["arch"] == "fusion_image" and meta["members"] == ["a", "b"] and meta["kind"] == "image"
    reloaded = ImageWeightNet(**meta["kwargs"])
    load_into(reloaded, unwrap_state_dict(read_checkpoint(tmp_path / "best.pth")))
    assert metrics["epochs"] == 1 and metrics["best_epoch"] in (0, 1)


def test_fusion_resumes_exactly(fusion_data, tmp_path):
    train, val = fusion_sets(fusion_data)

    def run(out: Path, stop: int | None = None) -> tuple[dict, torch.nn.Module]:
        def interrupt(metrics: dict, epoch: int) -> None:
            if epoch == stop:
                raise KeyboardInterrupt

        torch.manual_seed(0)
        net = AttentionWeightNet(num_members=2)
        metrics = train_fusion(net, train, val, FUSION_CONFIG, out, kind="pixel", resume_path=out / "resume.pth",
                               log_metrics=interrupt)
        return metrics, net

    straight, straight_net = run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", stop=1)
    resumed, net = run(tmp_path / "run")
    assert resumed.pop("timing")["resumed_from_epoch"] == 1 and straight.pop("timing")["resumed_from_epoch"] == 0
    assert resumed == straight
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), straight_net.state_dict().values()))
    assert (tmp_path / "run" / "curve.csv").read_bytes() == (tmp_path / "straight" / "curve.csv").read_bytes()


def test_fusion_members_must_match_the_nets_inputs(fusion_data):
    train, val = fusion_sets(fusion_data)
    with pytest.raises(ValueError, match="3 member names for 2 members"):
        fusion_job(AttentionWeightNet(2), "pixel", train, val, members=["a", "b", "c"])


# ---------------------------------------------------------------------------------------- the residual head

def make_anchor_split(root: Path, split: str, stems: list[str], seed: int) -> None:
    """Three members' caches where the best member is wrong in a known region: 'good' is HR with little noise but
    0.1 too bright on the left quarter, 'fix' is HR with more noise everywhere (right on the left quarter),
    'bad' is 0.3 too bright everywhere."""
    rng = np.random.default_rng(seed)
    for stem in stems:
        hr = smooth_image(rng, 64, 64, lo=40, hi=150)
        write_image(root / split / "hr" / f"{stem}.png", hr)
        write_image(root / split / "lr" / f"{stem}.png", downscale(hr))
        exact = hr.transpose(2, 0, 1).astype(np.float32) / 255.0
        good = exact + rng.normal(0, 0.02, exact.shape).astype(np.float32)
        good[..., :16] += 0.1
        fix = exact + rng.normal(0, 0.1, exact.shape).astype(np.float32)
        for member, cand in (("good", good), ("fix", fix), ("bad", exact + 0.3)):
            (root / "cache" / member / split).mkdir(parents=True, exist_ok=True)
            np.save(root / "cache" / member / split / f"{stem}.npy", cand.astype(np.float16))


@pytest.fixture(scope="module")
def anchor_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("anchor")
    make_anchor_split(root, "fusion_train", [f"f{i}" for i in range(6)], seed=20)
    make_anchor_split(root, "val", ["v0", "v1"], seed=21)
    return root


def test_residual_head_is_the_anchor_exactly_and_every_member_has_a_gradient():
    torch.manual_seed(0)
    for net, inputs in ((AttentionWeightNet(3, head="residual"), "cands"), (ImageWeightNet(3, head="residual"), "lr")):
        start_at_anchor(net, 1)
        cands, lr = torch.rand(2, 9, 16, 12), torch.rand(2, 3, 4, 3)
        w = net(cands if inputs == "cands" else lr)
        assert torch.equal(fuse(cands, w), cands[:, 3:6])  # the anchor, bit for bit
        fuse(cands, w).sub(torch.rand(2, 3, 16, 12)).abs().mean().backward()
        grad = net.output_layer().weight.grad.flatten(1).abs().sum(1)
        assert grad[0] > 0 and grad[2] > 0 and grad[1] == 0  # the anchor's own logit is unused
    assert AttentionWeightNet(3, head="residual", anchor=2).config() == {"num_members": 3, "head": "residual",
                                                                         "anchor": 2}
    with pytest.raises(ValueError, match="unknown fusion head"):
        AttentionWeightNet(3, head="linear")


def test_residual_head_learns_where_the_best_member_is_wrong(anchor_data, tmp_path):
    members = ("good", "fix", "bad")
    train = FusionCrops([anchor_data / "cache" / m / "fusion_train" for m in members],
                        anchor_data / "fusion_train" / "hr", anchor_data / "fusion_train" / "lr", lr_patch=8,
                        scale=SCALE, crops_per_image=8, seed=0)
    val = fusion_images([anchor_data / "cache" / m / "val" for m in members], anchor_data / "val" / "hr",
                        anchor_data / "val" / "lr", SCALE)
    torch.manual_seed(0)
    net = AttentionWeightNet(3, head="residual")
    metrics = train_fusion(net, train, val, replace(FUSION_CONFIG, epochs=25, lr=5e-3), tmp_path, kind="pixel",
                           init="best_member", members=list(members), provenance={"test": True})
    best_member = max(metrics["member_val_psnr"].values())
    assert metrics["member_val_psnr"]["good"] == best_member and metrics["head"] == "residual"
    assert metrics["initial_val_psnr"] == best_member  # epoch 0 is the anchor, to the bit
    assert metrics["best_val_psnr"] > best_member + 1.5, metrics  # the ideal is about +2.8 dB
    meta = checkpoint_meta(read_checkpoint(tmp_path / "best.pth"))
    assert meta["kwargs"] == {"num_members": 3, "head": "residual", "anchor": 0}
    # It corrected the anchor where the anchor is wrong (the left quarter) and stayed near it elsewhere.
    reloaded = AttentionWeightNet(**meta["kwargs"])
    load_into(reloaded, unwrap_state_dict(read_checkpoint(tmp_path / "best.pth")))
    for item in val:
        cands, _, hr = load_fusion_image(item, SCALE)
        hr = torch.from_numpy(hr).permute(2, 0, 1).float() / 255.0
        with torch.no_grad():
            w = reloaded.eval()(cands)[0]
            out = fuse(cands, w[None])[0]
        error = (out - hr).square().mean(0)
        anchor_error = (cands[0, :3] - hr).square().mean(0)
        assert error[:, 2:14].mean() < anchor_error[:, 2:14].mean() * 2 / 3  # wrong region: corrected
        assert error[:, 24:].mean() < anchor_error[:, 24:].mean() * 1.2  # elsewhere: about the anchor
        assert w[0, :, 24:].mean() > 0.7
    with pytest.raises(ValueError, match="residual head starts at its anchor"):
        train_fusion(AttentionWeightNet(3, head="residual"), train, val, FUSION_CONFIG, tmp_path, kind="pixel",
                     init="random", members=list(members))


def test_residual_head_under_bf16_autocast_and_a_batch_of_72():
    """The NTIRE profile's path (bf16 autocast, batch 72) on CPU: the anchor still comes out exactly at the start,
    and a training step moves the head."""
    torch.manual_seed(0)
    net = AttentionWeightNet(3, head="residual")
    start_at_anchor(net, 2)
    cands, hr = torch.rand(72, 9, 16, 16), torch.rand(72, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights = net(cands).float()
    assert torch.equal(fuse(cands, weights), cands[:, 6:9])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights = net(cands).float()
    (fuse(cands, weights) - hr).abs().mean().backward()
    opt.step()
    assert net.output_layer().weight.abs().max() > 0

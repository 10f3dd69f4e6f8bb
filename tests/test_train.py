"""Datasets and training loops on tiny synthetic data (CPU, seconds)."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from srmodels.checkpoint import checkpoint_meta, load_into, read_checkpoint, unwrap_state_dict
from srmodels.datasets import FusionCrops, PairedPatches, dihedral, fusion_images, list_pairs, load_fusion_image
from srmodels.fusion import AttentionWeightNet, ImageWeightNet
from srmodels.images import write_image
from srmodels.model import build_model, load_model
from srmodels.train import evaluate, finetune, train_fusion

SCALE = 4
# One intra-op thread: these tensors are tiny, so more threads only add synchronisation (badly so on a busy CPU).
THREADS = 1


def smooth_image(rng: np.random.Generator, h: int, w: int, lo: int = 0, hi: int = 255) -> np.ndarray:
    """A learnable texture: random coarse grid, bicubically enlarged (uint8 HxWx3 in [lo, hi])."""
    coarse = rng.uniform(lo, hi, size=(max(h // 8, 2), max(w // 8, 2), 3)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC), lo, hi).round().astype(np.uint8)


def downscale(hr: np.ndarray) -> np.ndarray:
    return cv2.resize(hr, (hr.shape[1] // SCALE, hr.shape[0] // SCALE), interpolation=cv2.INTER_AREA)


def write_split(root: Path, images: dict[str, np.ndarray]) -> tuple[Path, Path]:
    for stem, hr in images.items():
        write_image(root / "hr" / f"{stem}.png", hr)
        write_image(root / "lr" / f"{stem}.png", downscale(hr))
    return root / "lr", root / "hr"


def find_window(big: np.ndarray, crop: np.ndarray) -> list[tuple[int, int, int]]:
    """(code, top, left) of every transform + position whose window of ``big`` (HxWxC) gives ``crop``."""
    hits = []
    for code in range(8):
        for top in range(big.shape[0] - crop.shape[0] + 1):
            for left in range(big.shape[1] - crop.shape[1] + 1):
                window = big[top:top + crop.shape[0], left:left + crop.shape[1]]
                if np.array_equal(dihedral(window, code, (0, 1)), crop):
                    hits.append((code, top, left))
    return hits


# ------------------------------------------------------------------------------------------------ datasets

def test_paired_patches_crops_are_aligned(tmp_path):
    rng = np.random.default_rng(1)
    lr = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    hr = np.repeat(np.repeat(lr, SCALE, 0), SCALE, 1)  # so LR is exactly the nearest downsampling of HR
    write_image(tmp_path / "hr" / "img_s001.png", hr)
    write_image(tmp_path / "lr" / "img_s001.png", lr)
    for augment in (False, True):
        ds = PairedPatches(tmp_path / "lr", tmp_path / "hr", lr_patch=6, scale=SCALE, seed=3, augment=augment)
        codes = set()
        for epoch in range(6):
            ds.set_epoch(epoch)
            x, y = ds[0]
            assert x.shape == (3, 6, 6) and y.shape == (3, 24, 24) and x.dtype == torch.float32
            lr_crop = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            hr_crop = (y.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            # The HR crop is the LR crop's own region, transformed the same way (random LR: any offset breaks it).
            assert np.array_equal(hr_crop, np.repeat(np.repeat(lr_crop, SCALE, 0), SCALE, 1))
            hits = find_window(lr, lr_crop)
            assert len(hits) == 1
            code, top, left = hits[0]
            codes.add(code)
            assert np.array_equal(dihedral(hr[top * SCALE:(top + 6) * SCALE, left * SCALE:(left + 6) * SCALE],
                                           code, (0, 1)), hr_crop)
        assert codes == {0} if not augment else len(codes) > 1


def test_items_depend_only_on_seed_epoch_index(tmp_path):
    rng = np.random.default_rng(2)
    lr_dir, hr_dir = write_split(tmp_path, {f"p_s{i:03d}": smooth_image(rng, 48, 48) for i in range(6)})
    a = PairedPatches(lr_dir, hr_dir, lr_patch=5, scale=SCALE, seed=7)
    b = PairedPatches(lr_dir, hr_dir, lr_patch=5, scale=SCALE, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    for i in range(len(a)):
        assert all(torch.equal(u, v) for u, v in zip(a[i], b[i]))
    b.set_epoch(3)
    assert not all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    # Independent of the worker processes that build the items.
    batches = [[t.clone() for t in next(iter(DataLoader(a, batch_size=6, num_workers=w)))] for w in (0, 2)]
    assert all(torch.equal(u, v) for u, v in zip(*batches))


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


def test_fusion_crops_align_candidates_lr_hr(tmp_path):
    rng = np.random.default_rng(3)
    lr = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    hr = np.repeat(np.repeat(lr, SCALE, 0), SCALE, 1)
    write_image(tmp_path / "hr" / "x.png", hr)
    write_image(tmp_path / "lr" / "x.png", lr)
    chw = hr.transpose(2, 0, 1).astype(np.float32) / 255.0
    for member, cand in (("m1", chw), ("m2", 1.0 - chw)):
        (tmp_path / member / "fusion_train").mkdir(parents=True)
        np.save(tmp_path / member / "fusion_train" / "x.npy", cand.astype(np.float16))
    dirs = [tmp_path / "m1" / "fusion_train", tmp_path / "m2" / "fusion_train"]
    in_memory = FusionCrops(dirs, tmp_path / "hr", tmp_path / "lr", lr_patch=4, scale=SCALE, crops_per_image=5,
                            seed=0)
    on_disk = FusionCrops(dirs, tmp_path / "hr", tmp_path / "lr", lr_patch=4, scale=SCALE, crops_per_image=5,
                          seed=0, npy_cache_dir=tmp_path / "decoded")
    assert in_memory.members == ["m1", "m2"] and len(in_memory) == 5
    assert (tmp_path / "decoded" / "hr" / "x.npy").is_file()
    for ds in (in_memory, on_disk):
        ds.set_epoch(1)
    for i in range(len(in_memory)):
        cands, x, y = in_memory[i]
        assert cands.shape == (6, 16, 16) and x.shape == (3, 4, 4) and y.shape == (3, 16, 16)
        assert torch.allclose(cands[:3], y, atol=1e-3) and torch.allclose(cands[3:], 1 - y, atol=1e-3)
        assert torch.equal(y, x.repeat_interleave(SCALE, 1).repeat_interleave(SCALE, 2))
        assert all(torch.equal(u, v) for u, v in zip(in_memory[i], on_disk[i]))
        hits = find_window(lr, (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        assert len(hits) == 1


# ------------------------------------------------------------------------------------------------ finetune

@pytest.fixture(scope="module")
def sr_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sr")
    rng = np.random.default_rng(0)
    lr_dir, hr_dir = write_split(root / "train", {f"t{i}_s001": smooth_image(rng, 80, 80) for i in range(8)})
    val_lr, val_hr = write_split(root / "val", {f"v{i}": smooth_image(rng, 64, 64) for i in range(2)})
    return {"train": (lr_dir, hr_dir), "val": list_pairs(val_hr, val_lr, SCALE)}


def run_finetune(sr_data: dict, out_dir: Path, epochs: int, schedule: str = "constant", lr: float = 1e-3,
                 log_metrics=None, resume: bool = True) -> tuple[dict, torch.nn.Module]:
    """A tiny fine-tune; its resume state lives beside ``out_dir`` (in ``<out_dir>.resume.pth``), as the stage
    keeps it outside its outputs."""
    torch.manual_seed(0)
    model = build_model("rfdn_tiny")
    train = PairedPatches(*sr_data["train"], lr_patch=16, scale=SCALE, seed=0)
    metrics = finetune(model, train, sr_data["val"], epochs=epochs, batch=4, lr=lr, schedule=schedule,
                       milestones=[], gamma=0.5, device="cpu", seed=0, out_dir=out_dir, crop_border=4,
                       provenance={"test": True}, resume_path=resume_file(out_dir) if resume else None,
                       log_metrics=log_metrics, threads=THREADS)
    return metrics, model


def resume_file(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".resume.pth")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def straight(sr_data, tmp_path_factory) -> tuple[dict, torch.nn.Module, Path]:
    out = tmp_path_factory.mktemp("straight")
    metrics, model = run_finetune(sr_data, out, epochs=2)
    return metrics, model, out


def test_finetune_learns_and_writes_outputs(sr_data, straight):
    metrics, _, out = straight
    # The outputs are results only: the resume state lives elsewhere, wall-clock figures in ``timing``.
    assert {p.name for p in out.iterdir()} == {"best.pth", "curve.csv"} and resume_file(out).is_file()
    rows = list(csv.DictReader((out / "curve.csv").open()))
    assert list(rows[0]) == ["epoch", "train_loss", "val_psnr", "lr"]
    assert [r["epoch"] for r in rows] == ["0", "1", "2"] and rows[0]["train_loss"] == ""
    assert float(rows[2]["train_loss"]) < float(rows[1]["train_loss"])
    assert metrics["epochs"] == 2 and metrics["steps"] == 4 and metrics["timing"]["resumed_from_epoch"] == 0
    assert not any("second" in k for k in metrics)
    assert metrics["best_val_psnr"] == max(float(r["val_psnr"]) for r in rows)
    # best.pth rebuilds itself and scores what was reported.
    best = load_model(out / "best.pth")
    assert checkpoint_meta(read_checkpoint(out / "best.pth"))["epoch"] == metrics["best_epoch"]
    psnr, _ = evaluate(lambda x: best(x), sr_data["val"], SCALE, 4)
    assert psnr == pytest.approx(metrics["best_val_psnr"], abs=1e-9)


def test_initial_model_can_be_best(sr_data, straight, tmp_path):
    """A pretrained start that training only spoils: epoch 0 stays best and best.pth keeps its weights."""
    _, _, straight_out = straight
    model = load_model(straight_out / "best.pth")
    train = PairedPatches(*sr_data["train"], lr_patch=16, scale=SCALE, seed=0)
    metrics = finetune(model, train, sr_data["val"], epochs=1, batch=4, lr=0.5, schedule="constant",
                       device="cpu", seed=0, out_dir=tmp_path, crop_border=4, threads=THREADS)
    assert metrics["best_epoch"] == 0 and not metrics["improved"]
    assert metrics["final_val_psnr"] < metrics["initial_val_psnr"] == metrics["best_val_psnr"]
    assert same_weights(load_model(tmp_path / "best.pth"), load_model(straight_out / "best.pth"))


def test_same_seed_same_weights(sr_data, straight, tmp_path):
    _, model, _ = straight
    _, again = run_finetune(sr_data, tmp_path, epochs=2)
    assert same_weights(model, again)


def test_resume_extends_a_finished_run(sr_data, straight, tmp_path):
    run_finetune(sr_data, tmp_path, epochs=1)
    metrics, model = run_finetune(sr_data, tmp_path, epochs=2)
    assert metrics["timing"]["resumed_from_epoch"] == 1
    assert same_weights(model, straight[1])
    assert len(list(csv.DictReader((tmp_path / "curve.csv").open()))) == 3


def test_resume_into_a_fresh_folder_restores_the_outputs(sr_data, tmp_path):
    # What the stage does after an interruption: its outputs go to a new staging folder, the resume state stays.
    first, _ = run_finetune(sr_data, tmp_path / "a", epochs=2)
    best_before = torch.load(tmp_path / "a" / "best.pth", weights_only=True)["state_dict"]
    resume_file(tmp_path / "a").rename(resume_file(tmp_path / "b"))
    again, _ = run_finetune(sr_data, tmp_path / "b", epochs=2)
    assert again["timing"]["resumed_from_epoch"] == 2 and again["best_val_psnr"] == first["best_val_psnr"]
    best_after = torch.load(tmp_path / "b" / "best.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(best_before[k], best_after[k]) for k in best_before)
    assert (tmp_path / "a" / "curve.csv").read_bytes() == (tmp_path / "b" / "curve.csv").read_bytes()


def test_resume_after_interruption_matches_straight_run(sr_data, tmp_path):
    straight_metrics, straight_model = run_finetune(sr_data, tmp_path / "straight", epochs=2, schedule="cosine")

    def interrupt(metrics: dict, step: int) -> None:
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune(sr_data, tmp_path / "run", epochs=2, schedule="cosine", log_metrics=interrupt)
    metrics, model = run_finetune(sr_data, tmp_path / "run", epochs=2, schedule="cosine")
    assert metrics["timing"]["resumed_from_epoch"] == 1
    assert same_weights(model, straight_model)
    assert metrics["best_val_psnr"] == straight_metrics["best_val_psnr"]


def test_resume_with_other_config_starts_fresh(sr_data, tmp_path, caplog):
    run_finetune(sr_data, tmp_path, epochs=1)
    with caplog.at_level(logging.WARNING, logger="srmodels.train"):
        metrics, _ = run_finetune(sr_data, tmp_path, epochs=1, lr=5e-4)
    assert metrics["timing"]["resumed_from_epoch"] == 0
    assert "another configuration (lr differ)" in caplog.text


# -------------------------------------------------------------------------------------------------- fusion

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


def test_fusion_learns_to_pick_the_right_candidate(fusion_data, tmp_path):
    train, val = fusion_sets(fusion_data)
    torch.manual_seed(0)
    net = AttentionWeightNet(num_candidates=2)
    metrics = train_fusion(net, train, val, kind="pixel", epochs=4, batch=8, lr=3e-3, l1_weight=0.8,
                           mse_weight=0.2, device="cpu", seed=0, out_dir=tmp_path, crop_border=4,
                           provenance={"test": True}, threads=THREADS)
    best_member = max(metrics["member_val_psnr"].values())
    assert metrics["best_val_psnr"] > best_member + 10, metrics
    assert metrics["timing"]["samples_per_second"] > 0 and metrics["timing"]["hr_megapixels_per_second"] > 0
    assert not any("second" in k for k in metrics)
    # The best checkpoint describes itself and, reloaded, weights 'a' on the left and 'b' on the right.
    raw = read_checkpoint(tmp_path / "best.pth")
    meta = checkpoint_meta(raw)
    assert meta["arch"] == "fusion_pixel" and meta["kwargs"] == {"num_candidates": 2}
    assert meta["members"] == ["a", "b"] and meta["kind"] == "pixel" and meta["scale"] == SCALE
    reloaded = AttentionWeightNet(2)
    load_into(reloaded, unwrap_state_dict(raw))
    cands, _, _ = load_fusion_image(val[0], SCALE)
    with torch.no_grad():
        w = reloaded.eval()(cands)[0]
    assert w[0, :, 4:28].mean() > 0.9 and w[1, :, 36:60].mean() > 0.9
    assert len(list(csv.DictReader((tmp_path / "curve.csv").open()))) == 5


def test_image_fusion_checkpoint(fusion_data, tmp_path):
    train, val = fusion_sets(fusion_data)
    torch.manual_seed(0)
    metrics = train_fusion(ImageWeightNet(num_candidates=2), train, val, kind="image", epochs=1, batch=8, lr=1e-3,
                           device="cpu", seed=0, out_dir=tmp_path, crop_border=4, threads=THREADS)
    meta = checkpoint_meta(read_checkpoint(tmp_path / "best.pth"))
    assert meta["arch"] == "fusion_image" and meta["members"] == ["a", "b"] and meta["kind"] == "image"
    reloaded = ImageWeightNet(**meta["kwargs"])
    load_into(reloaded, unwrap_state_dict(read_checkpoint(tmp_path / "best.pth")))
    assert metrics["epochs"] == 1 and metrics["best_epoch"] in (0, 1)


def test_evaluate_scores_backbone_pairs(sr_data):
    psnr, per_image = evaluate(lambda x: torch.nn.functional.interpolate(x, scale_factor=SCALE, mode="nearest"),
                               sr_data["val"], SCALE, crop_border=4)
    assert set(per_image) == {"v0", "v1"} and 15 < psnr < 60
    assert psnr == pytest.approx(np.mean(list(per_image.values())))


def test_compile_wraps_the_training_forward_only(sr_data, tmp_path, monkeypatch):
    # Real compilation takes minutes on 2 cores; what matters here is where the compiled callable is used.
    compiled = []

    def fake_compile(module):
        def forward(*args):
            compiled.append(args[0].shape)
            return module(*args)
        return forward

    monkeypatch.setattr(torch, "compile", fake_compile)
    torch.manual_seed(0)
    model = build_model("rfdn_tiny")
    train = PairedPatches(*sr_data["train"], lr_patch=16, scale=SCALE, seed=0)
    metrics = finetune(model, train, sr_data["val"], epochs=1, batch=4, lr=1e-3, schedule="constant", device="cpu",
                       seed=0, out_dir=tmp_path, crop_border=4, threads=THREADS, compile=True)
    assert len(compiled) == metrics["steps"] == 2 and all(s[-1] == 16 for s in compiled)  # patches, not val
    assert load_model(tmp_path / "best.pth").net.state_dict().keys() == model.net.state_dict().keys()


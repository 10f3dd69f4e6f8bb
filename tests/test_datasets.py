"""Training datasets on tiny synthetic data: aligned crops, items that depend only on (seed, epoch, index)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from srmodels.data.datasets import FusionCrops, PairedPatches, dihedral
from srmodels.data.images import write_image

from .helpers import SCALE, smooth_image, write_split


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


def test_paired_patches_crops_are_aligned(tmp_path):
    rng = np.random.default_rng(1)
    lr = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    hr = np.repeat(np.repeat(lr, SCALE, 0), SCALE, 1)  # so LR is exactly the nearest downsampling of HR
    write_image(tmp_path / "hr" / "img_s001.png", hr)
    write_image(tmp_path / "lr" / "img_s001.png", lr)
    for augment in (False, True):
        ds = PairedPatches(tmp_path / "hr", tmp_path / "lr", lr_patch=6, scale=SCALE, seed=3, augment=augment)
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
    hr_dir, lr_dir = write_split(tmp_path, {f"p_s{i:03d}": smooth_image(rng, 48, 48) for i in range(6)})
    a = PairedPatches(hr_dir, lr_dir, lr_patch=5, scale=SCALE, seed=7)
    b = PairedPatches(hr_dir, lr_dir, lr_patch=5, scale=SCALE, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    for i in range(len(a)):
        assert all(torch.equal(u, v) for u, v in zip(a[i], b[i]))
    b.set_epoch(3)
    assert not all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    # Independent of the worker processes that build the items.
    batches = [[t.clone() for t in next(iter(DataLoader(a, batch_size=6, num_workers=w)))] for w in (0, 2)]
    assert all(torch.equal(u, v) for u, v in zip(*batches))


def test_fusion_crops_align_member_outputs_lr_hr(tmp_path):
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

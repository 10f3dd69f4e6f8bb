"""Training data: paired LR/HR patches for the backbones, cached-member crops for the fusion net.

Arguments name HR before LR everywhere (folders, files). Items put the model's inputs first and the HR target
last: ``(lr, hr)`` and ``(member outputs, lr, hr)``, which the training loop relies on.

Randomness: every random choice of item ``index`` in epoch ``epoch`` comes from
``np.random.default_rng((seed, epoch, index))``. An item is therefore a pure function of (seed, epoch, index):
the same whichever DataLoader worker builds it, however many workers there are, and whether the run was
resumed or not. Call ``set_epoch`` before each epoch's DataLoader iterator is created (workers receive a copy
of the dataset when the iterator starts, so a later ``set_epoch`` does not reach them).

Augmentation is one of the 8 flips/rotations (the dihedral group), applied identically to every array of an
item: code ``t`` in 0..7 means "flip the width axis if ``t & 1``, then rotate by ``t >> 1`` quarter turns",
the same order as ``srmodels.models.inference.apply_transform``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from srmodels.data.member_outputs import load_output
from srmodels.core.errors import DataError
from srmodels.core.files import atomic
from srmodels.data.images import ImageError, check_pair, image_size, list_images, pair_by_stem, read_image

log = logging.getLogger(__name__)

NUM_TRANSFORMS = 8


def dihedral(arr: np.ndarray, code: int, axes: tuple[int, int]) -> np.ndarray:
    """Flip (if ``code & 1``) the second of ``axes``, then rotate ``code >> 1`` quarter turns in ``axes``."""
    if code & 1:
        arr = np.flip(arr, axis=axes[1])
    return np.rot90(arr, code >> 1, axes=axes)


def _chw_tensor(arr: np.ndarray) -> torch.Tensor:
    """CHW array (any dtype; uint8 is scaled by 1/255) -> contiguous float32 tensor."""
    # Always a fresh, writable copy: the source may be a read-only memmap or an array shared between items.
    out = np.array(arr, dtype=np.float32, order="C", copy=True)
    if arr.dtype == np.uint8:
        out *= 1.0 / 255.0
    return torch.from_numpy(out)


def list_pairs(hr_dir: str | Path, lr_dir: str | Path, scale: int) -> list[tuple[Path, Path]]:
    """Full-image (hr_path, lr_path) pairs of a split folder, sorted by HR name and matched by stem."""
    hr_files = list_images(hr_dir)
    if not hr_files:
        raise ImageError(f"{hr_dir}: no images")
    return pair_by_stem(hr_files, list_images(lr_dir), scale)


def read_pair(hr_path: Path, lr_path: Path, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(hr, lr) uint8 HxWx3 arrays, HR cropped to exactly ``scale`` x the LR size."""
    hr, lr = read_image(hr_path), read_image(lr_path)
    return check_pair(hr, lr, scale, hr_path, lr_path), lr


class PairedPatches(Dataset):
    """Random paired crops of the backbones' training sub-images, returned as float32 CHW in [0, 1].

    Each item is one sub-image pair (``<stem>_s###.png`` in ``hr_dir`` and ``lr_dir``): a random LR crop of
    ``lr_patch`` pixels, the HR crop of ``lr_patch * scale`` at the matching position, and (``augment``) one of
    the 8 flips/rotations applied to both. Sub-images are small (192 px HR by default), so decoding the PNGs
    per item costs less than the forward pass and keeps worker memory flat.
    """

    def __init__(self, hr_dir: str | Path, lr_dir: str | Path, lr_patch: int, scale: int, seed: int,
                 augment: bool = True) -> None:
        if lr_patch < 1 or scale < 1:
            raise ValueError(f"lr_patch and scale must be >= 1, got {lr_patch}, {scale}")
        self.pairs = list_pairs(hr_dir, lr_dir, scale)
        self.lr_patch = int(lr_patch)
        self.scale = int(scale)
        self.seed = int(seed)
        self.augment = bool(augment)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops/transforms the items use."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        hr_path, lr_path = self.pairs[index]
        hr, lr = read_pair(hr_path, lr_path, self.scale)
        p, s = self.lr_patch, self.scale
        h, w = lr.shape[:2]
        if h < p or w < p:
            raise ImageError(f"{lr_path}: LR sub-image {w}x{h} is smaller than the {p}x{p} training crop")
        rng = np.random.default_rng((self.seed, self.epoch, index))
        top, left = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
        code = int(rng.integers(0, NUM_TRANSFORMS)) if self.augment else 0
        lr_crop = dihedral(lr[top:top + p, left:left + p], code, (0, 1))
        hr_crop = dihedral(hr[top * s:(top + p) * s, left * s:(left + p) * s], code, (0, 1))
        return _chw_tensor(lr_crop.transpose(2, 0, 1)), _chw_tensor(hr_crop.transpose(2, 0, 1))


@dataclass(frozen=True)
class FusionImage:
    """One full image of a fusion split: its members' cached SR outputs plus the HR and LR files."""

    stem: str
    outputs: tuple[Path, ...]  # one (3, H, W) float16 .npy per member, in member order
    hr: Path
    lr: Path


def fusion_images(cache_dirs: Sequence[str | Path], hr_dir: str | Path, lr_dir: str | Path,
                  scale: int) -> list[FusionImage]:
    """The images of a split with every member's cached output; a missing or misshaped cache is an error.

    Only the .npy headers are read (memory-mapped, nothing loaded), so this is cheap even for 800 2K images.
    """
    if len(cache_dirs) < 2:
        raise ValueError(f"fusion needs at least two members' caches, got {len(cache_dirs)}")
    items = []
    for hr_path, lr_path in list_pairs(hr_dir, lr_dir, scale):
        lr_h, lr_w = image_size(lr_path)
        expected = (3, lr_h * scale, lr_w * scale)
        paths = []
        for d in map(Path, cache_dirs):
            path = d / f"{hr_path.stem}.npy"
            if not path.is_file():
                raise ImageError(f"{path}: no cached SR output for {hr_path.name} (run the cache stage)")
            arr = load_output(path, mmap=True)  # a truncated or corrupt file is a DataError naming it
            if tuple(arr.shape) != expected:
                raise ImageError(f"{path}: cached output has shape {tuple(arr.shape)}, expected {expected} "
                                 f"(3 x {scale} x the LR size of {lr_path.name})")
            paths.append(path)
        items.append(FusionImage(hr_path.stem, tuple(paths), hr_path, lr_path))
    return items


def load_fusion_image(item: FusionImage, scale: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Whole-image inputs for validation: member outputs (1, 3N, H, W) float32, LR (1, 3, h, w), HR uint8 HxWx3."""
    hr, lr = read_pair(item.hr, item.lr, scale)
    cands = np.concatenate([load_output(p).astype(np.float32) for p in item.outputs], axis=0)
    return torch.from_numpy(cands).unsqueeze(0), _chw_tensor(lr.transpose(2, 0, 1)).unsqueeze(0), hr


class FusionCrops(Dataset):
    """Random crops of the members' cached SR outputs with the matching LR and HR crops.

    An epoch is ``crops_per_image`` crops of each training image (item ``index`` belongs to image
    ``index // crops_per_image``). Items are ``(member outputs (3N, P, P), lr (3, p, p), hr (3, P, P))`` float32
    with ``p = lr_patch`` and ``P = p * scale``, one random flip/rotation applied to all three.

    The member outputs are memory-mapped per item (``np.load(mmap_mode='r')``), so only the crop is read: the NTIRE
    profile caches up to 800 images x 3 members x ~17 MB. The HR and LR images are decoded once here instead of
    once per crop (a 2K PNG takes tens of milliseconds to decode, several times a small net's step):

    * ``npy_cache_dir=None``: kept in memory as uint8, ~6.5 MB per 2K image (0.5 GB for the 80 disjoint
      DIV2K fusion images). DataLoader workers share them copy-on-write when forked.
    * ``npy_cache_dir``: written there once as uint8 .npy (reused while newer than the PNG) and memory-mapped
      like the members; for the 800-image "shared" split, where holding them in RAM would cost ~5 GB per
      process.
    """

    def __init__(self, cache_dirs: Sequence[str | Path], hr_dir: str | Path, lr_dir: str | Path, lr_patch: int,
                 scale: int, crops_per_image: int, seed: int, augment: bool = True,
                 npy_cache_dir: str | Path | None = None) -> None:
        if lr_patch < 1 or crops_per_image < 1:
            raise ValueError(f"lr_patch and crops_per_image must be >= 1, got {lr_patch}, {crops_per_image}")
        self.cache_dirs = [Path(d) for d in cache_dirs]
        self.images = fusion_images(self.cache_dirs, hr_dir, lr_dir, scale)
        # data/cache/<backbone>/<split>: the member is the folder above the split's.
        self.members = [d.parent.name for d in self.cache_dirs]
        self.lr_patch = int(lr_patch)
        self.scale = int(scale)
        self.crops_per_image = int(crops_per_image)
        self.seed = int(seed)
        self.augment = bool(augment)
        self.epoch = 0
        self.npy_cache_dir = Path(npy_cache_dir) if npy_cache_dir is not None else None
        self._hr: list[np.ndarray | Path] = []
        self._lr: list[np.ndarray | Path] = []
        for item in self.images:
            hr, lr = read_pair(item.hr, item.lr, self.scale)
            if lr.shape[0] < self.lr_patch or lr.shape[1] < self.lr_patch:
                raise DataError(f"{item.lr}: LR image {lr.shape[1]}x{lr.shape[0]} is smaller than the "
                                f"{self.lr_patch}x{self.lr_patch} training crop (lr_patch)")
            if self.npy_cache_dir is None:
                self._hr.append(hr)
                self._lr.append(lr)
            else:
                self._hr.append(self._decoded_npy(item.hr, "hr", hr))
                self._lr.append(self._decoded_npy(item.lr, "lr", lr))

    @property
    def num_members(self) -> int:
        return len(self.cache_dirs)

    def _decoded_npy(self, source: Path, kind: str, arr: np.ndarray) -> Path:
        """Write ``arr`` as ``<npy_cache_dir>/<kind>/<stem>.npy`` unless an up-to-date copy exists."""
        assert self.npy_cache_dir is not None
        path = self.npy_cache_dir / kind / f"{source.stem}.npy"
        if path.is_file() and path.stat().st_mtime >= source.stat().st_mtime:
            return path
        with atomic(path) as tmp:  # concurrent or interrupted runs never see half a file
            np.save(tmp, arr)
        return path

    @staticmethod
    def _view(arr: np.ndarray | Path) -> np.ndarray:
        return np.load(arr, mmap_mode="r") if isinstance(arr, Path) else arr

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops/transforms the items use."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images) * self.crops_per_image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = index // self.crops_per_image
        lr_img, hr_img = self._view(self._lr[i]), self._view(self._hr[i])
        p, s = self.lr_patch, self.scale
        h, w = lr_img.shape[:2]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        top, left = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
        code = int(rng.integers(0, NUM_TRANSFORMS)) if self.augment else 0
        hs = (slice(top * s, (top + p) * s), slice(left * s, (left + p) * s))
        # Slicing a memmap reads only the crop's rows; concatenate copies them out of the file.
        cands = np.concatenate([np.load(path, mmap_mode="r")[(slice(None), *hs)]
                                for path in self.images[i].outputs], axis=0)
        lr = np.asarray(lr_img[top:top + p, left:left + p]).transpose(2, 0, 1)
        hr = np.asarray(hr_img[hs]).transpose(2, 0, 1)
        return (_chw_tensor(dihedral(cands, code, (1, 2))), _chw_tensor(dihedral(lr, code, (1, 2))),
                _chw_tensor(dihedral(hr, code, (1, 2))))

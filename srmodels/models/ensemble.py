"""The trained ensemble as one file: the members' weights, the fusion net's and how they run, in safetensors.

The pipeline's result is spread over ``data/``: a fine-tuned checkpoint per member, the fusion net, the x8 and
tiling settings. The ensemble stage writes them as one file, ``<paths.ensemble>/ensemble.safetensors``, to hand
on, serve (the MLflow model of ``srmodels.tracking.ensemble_model``), run (``srmodels upscale --weights``) or
export (``srmodels export --to ntire``). ``Ensemble.upscale_image`` gives the PNGs the test stage writes, bit for
bit on the same CPU kernels: the members run as the cache stage runs them (the CPU kernels of
``srmodels.models.accelerate``, x8, tiles), their outputs are rounded to float16 as the cache stores them, then
fused, clamped and rounded to 8 bits.

Layout: tensors ``members.<name>.<key>`` and ``fusion.<key>``, and a single metadata entry
``srmodels_ensemble`` holding this JSON object (one entry, because safetensors writes several in any order and
the file's bytes must not vary)::

    {"format": "srmodels-ensemble-v1", "scale": 4,
     "members": [{"name": "dat", "model": {"arch": ..., "variant": ..., "kwargs": ..., "input_range": ...}}, ...],
     "fusion": {"arch": "fusion_pixel", "kwargs": {...}, "members": [...]},
     "inference": {"self_ensemble": true, "tile": null, "tile_overlap": 16},
     "member_dtype": "float16",
     "kernels": {"cpu_isa": "avx2", "threads": 2}}

``kernels`` is how the pipeline ran (docs/reproducibility.md): the same bits need the same pin and threads.
Reading it unpickles nothing; a damaged file, or one that is not an ensemble, is a one-line ``CheckpointError``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from srmodels.core.files import atomic
from srmodels.core.layout import ENSEMBLE, SCALE
from srmodels.data.images import to_tensor, to_uint8
from srmodels.models.accelerate import accelerate
from srmodels.models.checkpoint import (CheckpointError, checkpoint_meta, load_into, read_checkpoint,
                                        read_safetensors_file, unwrap_state_dict)
from srmodels.models.fusion import FUSION_KINDS, fuse, fusion_inputs, fusion_kind, load_fusion
from srmodels.models.inference import upscale
from srmodels.models.model import SRModel, check_input_size, min_input_size, model_from_description

FORMAT = "srmodels-ensemble-v1"
METADATA_KEY = "srmodels_ensemble"
MEMBER_DTYPE = "float16"  # the cache stage's storage type, which the fusion net was trained and tested on


class Ensemble(nn.Module):
    """The members, the fusion net and their settings; ``forward`` maps an LR batch in [0, 1] to the fused SR
    image, clamped to [0, 1]."""

    def __init__(self, members: Mapping[str, SRModel], fusion: nn.Module, kind: str, *, self_ensemble: bool,
                 tile: int | None, tile_overlap: int, kernels: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.names = list(members)
        self.members = nn.ModuleList(members.values())
        self.fusion, self.kind = fusion, kind
        self.self_ensemble, self.tile, self.tile_overlap = self_ensemble, tile, tile_overlap
        self.kernels = dict(kernels or {})
        self.scale = SCALE

    def member_outputs(self, lr: torch.Tensor) -> torch.Tensor:
        """(1, 3N, H, W) float32: each member's output, rounded through float16 as the cache stores it."""
        outs = []
        for member in self.members:
            sr = upscale(member, lr, self.scale, self_ensemble=self.self_ensemble, tile=self.tile,
                         tile_overlap=self.tile_overlap)
            # numpy's conversion, as the cache's .npy files were written
            outs.append(sr[0].float().cpu().numpy().astype(np.float16).astype(np.float32))
        return torch.from_numpy(np.concatenate(outs))[None].to(lr.device)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        if lr.shape[0] != 1:
            return torch.cat([self(x[None]) for x in lr])
        outputs = self.member_outputs(lr)
        return fuse(outputs, self.fusion(fusion_inputs(self.kind, outputs, lr))).clamp_(0, 1)

    def min_input_size(self) -> int:
        """The smallest LR side every member processes."""
        return max(min_input_size(m) for m in self.members)

    def check_input(self, height: int, width: int, name: str | Path) -> None:
        """An ``ImageError`` naming ``name`` when a member cannot process an LR input of this size."""
        for member in self.members:
            check_input_size(member, height, width, name)

    def upscale_image(self, img: np.ndarray) -> np.ndarray:
        """An HxWx3 uint8 RGB image -> its 4x fused SR image, HxWx3 uint8 (the test stage's PNG pixels)."""
        device = next(self.fusion.parameters()).device
        with torch.inference_mode():
            return to_uint8(self(to_tensor(img).to(device)))

    def describe(self) -> dict[str, Any]:
        return {"members": self.names, "fusion": self.kind, "self_ensemble": self.self_ensemble,
                "tile": self.tile, "tile_overlap": self.tile_overlap, **self.kernels}


def _own_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    raw = read_checkpoint(path)
    meta = checkpoint_meta(raw)
    if meta is None:
        raise CheckpointError(f"{path}: not a checkpoint of this pipeline (it does not describe itself)")
    return meta, unwrap_state_dict(raw, source=str(path))


def write_ensemble(path: str | Path, members: Mapping[str, str | Path], fusion: str | Path, *, self_ensemble: bool,
                   tile: int | None, tile_overlap: int, cpu_isa: str, threads: int) -> dict[str, Any]:
    """Write the ensemble of ``members`` (name -> fine-tuned checkpoint, in the fusion's order) and the fusion
    checkpoint ``fusion`` to ``path``, atomically; returns the description written."""
    from safetensors.torch import save_file

    net, fusion_meta = load_fusion(fusion)
    if list(fusion_meta.get("members", members)) != list(members):
        raise CheckpointError(f"{fusion}: fuses {fusion_meta.get('members')}, not {list(members)}")
    tensors = {f"fusion.{k}": v for k, v in net.state_dict().items()}
    described = []
    for name, ckpt in members.items():
        meta, state = _own_checkpoint(Path(ckpt))
        model = model_from_description(meta, state, str(ckpt))  # refuses what would not load back
        described.append({"name": name, "model": model.describe()})
        tensors.update({f"members.{name}.{k}": v for k, v in model.net.state_dict().items()})
    spec = {"format": FORMAT, "scale": SCALE, "members": described,
            "fusion": {"arch": fusion_meta["arch"], "kwargs": dict(net.config()), "members": list(members)},
            "inference": {"self_ensemble": bool(self_ensemble), "tile": tile, "tile_overlap": int(tile_overlap)},
            "member_dtype": MEMBER_DTYPE, "kernels": {"cpu_isa": cpu_isa, "threads": int(threads)}}
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    with atomic(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(spec, sort_keys=True)})
    return spec


def find_ensemble(path: str | Path) -> Path | None:
    """The ensemble file ``path`` names: the file itself, or in a folder its ``ensemble.safetensors`` (the
    ensemble stage's folder) or ``artifacts/ensemble.safetensors`` (an MLflow model's folder); None when
    ``path`` holds no ensemble (a single model's checkpoint, say)."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in (path / ENSEMBLE, path / "artifacts" / ENSEMBLE) if p.is_file()]
        if not found:
            raise CheckpointError(f"{path}: a folder without {ENSEMBLE} (or artifacts/{ENSEMBLE}); name an ensemble "
                                  "file, an MLflow model's folder or a checkpoint")
        return found[0]
    if path.is_file() and _metadata(path) is not None:
        return path
    return None


def _metadata(path: Path) -> str | None:
    """The ensemble's JSON text from a safetensors header, or None for any other file (reads the header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


def read_ensemble(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An ensemble file's description and tensors (see the module docstring); a ``CheckpointError`` otherwise."""
    path = Path(path)
    metadata, tensors = read_safetensors_file(path)
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{path}: not an ensemble file (no {METADATA_KEY} metadata)")
    try:
        spec = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: its {METADATA_KEY} metadata is not JSON ({err.msg})") from None
    found = spec.get("format") if isinstance(spec, dict) else None
    if found != FORMAT:
        raise CheckpointError(f"{path}: an ensemble of format {found!r}; this srmodels reads {FORMAT}")
    missing = [k for k in ("members", "fusion", "inference") if k not in spec]
    if missing:
        raise CheckpointError(f"{path}: its description lacks {', '.join(missing)}")
    return spec, tensors


def _part(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_ensemble(path: str | Path, *, accelerated: bool = True) -> Ensemble:
    """The ensemble in ``path`` (a file, or a folder :func:`find_ensemble` reads), in eval mode on the CPU.

    ``accelerated``: the members on the CPU kernels the cache stage used (False: the plain ports, whose results
    differ from the test stage's in the last bits)."""
    file = find_ensemble(path) or Path(path)
    spec, tensors = read_ensemble(file)
    members = {}
    for entry in spec["members"]:
        name = entry["name"]
        model = model_from_description(entry["model"], _part(tensors, f"members.{name}."), f"{file} [{name}]")
        members[name] = accelerate(model, enabled=accelerated)
    kind = fusion_kind(spec["fusion"])
    if kind not in FUSION_KINDS:
        raise CheckpointError(f"{file}: unknown fusion {spec['fusion'].get('arch')!r}")
    net = FUSION_KINDS[kind](**spec["fusion"]["kwargs"])
    load_into(net, _part(tensors, "fusion."), source=f"{file} [fusion]")
    inf = spec["inference"]
    return Ensemble(members, net.eval(), kind, self_ensemble=inf["self_ensemble"], tile=inf["tile"],
                    tile_overlap=inf["tile_overlap"], kernels=spec.get("kernels")).eval()

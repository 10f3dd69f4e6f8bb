"""Checkpoint loading (every wrapping the released SR weights use) and our self-describing checkpoints.

Everything is read with ``torch.load(weights_only=True)``: a file that needs arbitrary unpickling is refused,
never executed. Loading into a model is strict by default and a mismatch is reported key by key.
"""
from __future__ import annotations

import hashlib
import logging
import pickle
import re
import subprocess
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import UserError

log = logging.getLogger(__name__)

FORMAT = "srmodels-checkpoint-v1"
# Wrapper keys in the order they are preferred: EMA weights beat raw ones (Real-ESRGAN, SwinIR real-world).
WRAPPER_KEYS = ("params_ema", "params", "weight_net_state_dict", "state_dict", "model")
STRIP_PREFIXES = ("module.", "_orig_mod.")
# Original ESRGAN (xinntao/ESRGAN) names -> BasicSR RRDBNet names.
_ESRGAN_RENAMES = (
    (re.compile(r"^RRDB_trunk\.(\d+)\.RDB(\d)\."), r"body.\1.rdb\2."),
    (re.compile(r"^trunk_conv\."), "conv_body."),
    (re.compile(r"^upconv1\."), "conv_up1."),
    (re.compile(r"^upconv2\."), "conv_up2."),
    (re.compile(r"^HRconv\."), "conv_hr."),
)


class CheckpointError(UserError):
    """A checkpoint that cannot be read safely or does not fit the model."""


def _first_line(text: str, limit: int = 160) -> str:
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _describe(err: BaseException) -> str:
    """'RuntimeError: unexpected EOF ...', 'struct.error: ...': the type always, the first line when there is one."""
    kind = type(err).__name__ if type(err).__module__ == "builtins" else f"{type(err).__module__}.{type(err).__name__}"
    detail = _first_line(str(err))
    return f"{kind}: {detail}" if detail else kind


def _damage(path: Path) -> str | None:
    """What is wrong with the file itself (empty, cut, failing a CRC, not a torch file), or None if it looks whole."""
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":  # torch.save's zip format (the default since torch 1.6)
        if not zipfile.is_zipfile(path):
            # The central directory sits at the end of a zip: a cut file loses it first.
            return f"truncated or corrupt zip archive: no end-of-archive record in its {size:,} bytes"
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()  # reads every member; only reached when loading already failed
        except Exception as err:  # noqa: BLE001 - any failure here means a damaged archive
            return f"corrupt zip archive ({_describe(err)})"
        return f"corrupt zip archive: {bad} fails its CRC check" if bad is not None else None
    if head[:1] != b"\x80":  # the legacy format is a pickle (protocol 2+), which starts with 0x80
        return f"neither a zip archive nor a pickle, {size:,} bytes starting {head!r}"
    return None


def read_checkpoint(path: str | Path) -> dict[str, Any] | Mapping[str, torch.Tensor]:
    """The raw object stored in ``path``, loaded without arbitrary unpickling."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load on a bad file raises many types (KeyError, struct.error...)
        damage = _damage(path)
        if damage is not None:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({damage})") from err
        if isinstance(err, pickle.UnpicklingError):
            # torch's message is a paragraph; the text after 'WeightsUnpickler error:' names what was refused.
            m = re.search(r"WeightsUnpickler error:\s*(.*?)(?: was not an allowed global|\n\n|$)", str(err), re.DOTALL)
            what = " ".join(m.group(1).split()) if m and m.group(1).strip() else _describe(err)
            raise CheckpointError(
                f"{path}: refused, the file needs arbitrary unpickling (not a plain tensor checkpoint); "
                f"loading it could execute code ({what})") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_describe(err)})") from err


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Plain ``{key: tensor}`` from any known wrapping, prefixes stripped and ESRGAN names mapped."""
    if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        for key in WRAPPER_KEYS:
            if key in obj and _is_tensor_dict(obj[key]):
                obj = obj[key]
                break
        else:
            raise CheckpointError(
                f"{source}: no state dict found; top-level keys {sorted(map(str, obj))[:10]}, "
                f"expected a tensor dict or one of {', '.join(WRAPPER_KEYS)}")
    if not _is_tensor_dict(obj):
        raise CheckpointError(f"{source}: does not hold a state dict of tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        stripped = True
        while stripped:  # wrappers nest in any order: torch.compile over DDP, DDP over compile
            stripped = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        for pattern, repl in _ESRGAN_RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The unwrapped tensors of any checkpoint the project knows (see the module docstring)."""
    return unwrap_state_dict(read_checkpoint(path), source=str(path))


def checkpoint_meta(obj: Any) -> dict[str, Any] | None:
    """Our own checkpoints describe themselves; released ones return None."""
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return dict(obj["meta"])
    return None


def mismatch_report(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Lines naming missing, unexpected and wrongly shaped keys (empty when the dict fits exactly)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shaped = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]

    def block(title: str, keys: list[str]) -> list[str]:
        if not keys:
            return []
        shown = keys[:8] + ([f"... and {len(keys) - 8} more"] if len(keys) > 8 else [])
        return [f"{title} ({len(keys)}): " + ", ".join(shown)]

    return block("missing", missing) + block("unexpected", unexpected) + block("wrong shape", shaped)


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
              source: str = "checkpoint") -> list[str]:
    """Load strictly (default) with a readable report; non-strict loads what fits and returns the report."""
    report = mismatch_report(model, state_dict)
    if report and strict:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(report))
    if report:
        log.warning("%s: partial load into %s: %s", source, type(model).__name__, "; ".join(report))
        expected = model.state_dict()
        state_dict = {k: v for k, v in state_dict.items() if k in expected and v.shape == expected[k].shape}
    model.load_state_dict(state_dict, strict=strict)
    return report


# DVC rewrites these tracked files between the stages of one run; they must not make the tree look "dirty".
_BOOKKEEPING_PATHSPEC = (":(exclude,glob)**/dvc.lock", ":(exclude,glob)**/.gitignore")


def git_commit(cwd: str | Path | None = None) -> str:
    """HEAD's commit, '+dirty' for uncommitted tracked changes other than DVC's bookkeeping; 'unknown' outside git."""
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if not sha:
        return "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", *_BOOKKEEPING_PATHSPEC)
    return sha + ("+dirty" if dirty else "")


def params_hash(params: Mapping[str, Any]) -> str:
    """Short stable hash of a params mapping (key order independent)."""
    import json

    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_checkpoint(path: str | Path, state_dict: Mapping[str, torch.Tensor], *, arch: str, kwargs: dict[str, Any],
                    scale: int, input_range: float, variant: str | None = None, step: int = 0, epoch: int = 0,
                    provenance: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> None:
    """Write a checkpoint that can rebuild its model alone (``weights_only``-loadable: tensors and plain types)."""
    meta = {"arch": arch, "variant": variant, "kwargs": kwargs, "scale": int(scale), "input_range": float(input_range),
            "step": int(step), "epoch": int(epoch), "provenance": provenance or {}}
    if extra:
        meta.update(extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": FORMAT, "meta": meta, "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}},
               tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a truncated checkpoint behind

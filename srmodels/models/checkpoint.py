"""Checkpoint loading (every wrapping the released SR weights use) and our self-describing checkpoints.

Two file formats are read, chosen by the file's first bytes (not its name):

* torch files (``.pth``, ``.pt``, ``.ckpt``), read with ``torch.load(weights_only=True)``: a file that needs
  arbitrary unpickling is refused, never executed;
* safetensors (``.safetensors``), read with ``safetensors.torch``: a JSON header and raw tensor bytes, nothing
  to execute. Our own description travels in its string metadata (see :func:`save_checkpoint`); files written
  by other toolkits (traiNNer-redux, chaiNNer, spandrel users) are bare tensor dicts.

The tensors may be wrapped as the toolkits write them: ``params_ema`` / ``params-ema`` / ``params`` (BasicSR,
traiNNer-redux), ``model_state_dict``, ``state_dict``, ``model``, ``net``, ``net_g`` / ``netG`` (trainer
states), team 27's ``weight_net_state_dict``, nested ones too; keys may carry ``module.`` / ``_orig_mod.``
(DDP, torch.compile) or, on every key, ``netG.`` / ``net_g.`` prefixes; original ESRGAN names are mapped to
RRDBNet's. Loading into a model is strict by default and a mismatch is reported key by key.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from srmodels.core.errors import UserError
from srmodels.core.files import atomic

log = logging.getLogger(__name__)

FORMAT = "srmodels-checkpoint-v1"
# Wrapper keys in the order they are preferred: EMA weights beat raw ones (Real-ESRGAN, SwinIR real-world;
# traiNNer-redux writes 'params-ema' in older releases). The rest are what trainers put around a state dict.
WRAPPER_KEYS = ("params_ema", "params-ema", "params", "weight_net_state_dict", "model_state_dict", "state_dict",
                "model", "net", "net_g", "netG")
# Wrappers seen nested (a trainer state around a BasicSR dict); deeper nesting is not a checkpoint we know.
_MAX_WRAPPING_DEPTH = 3
# Stripped from any key wherever they occur at its start: DDP and torch.compile wrap the module itself.
STRIP_PREFIXES = ("module.", "_orig_mod.")
# Stripped only when every key starts with it: a generator saved from its GAN wrapper (ESRGAN-era trainers,
# BasicSR's net_g); on some keys only it could be a real submodule name.
COMMON_PREFIXES = ("netG.", "net_g.")
# safetensors metadata: the key whose value marks our description (its other keys are JSON-encoded fields).
# 'format': 'pt' is what safetensors.torch and Hugging Face tools write and check; we keep it as they expect.
SAFETENSORS_FORMAT_KEY = "srmodels_format"
SAFETENSORS_SUFFIX = ".safetensors"
# A safetensors header is JSON, preceded by its length; larger than this it is not a checkpoint we can read
# (the format itself caps it at 100 MB).
_SAFETENSORS_MAX_HEADER = 100_000_000
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


def _looks_like_safetensors(path: Path) -> bool:
    """An 8-byte little-endian header length that fits the file, then the header's opening brace."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < size <= min(_SAFETENSORS_MAX_HEADER, path.stat().st_size - 8)


def _safetensors_damage(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing (cut header, cut tensor data), or None if it looks whole."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, not even the 8-byte header length"
        n = int.from_bytes(head, "little")
        if n > _SAFETENSORS_MAX_HEADER:
            return f"not safetensors: its first 8 bytes give a header of {n:,} bytes, starting {head!r}"
        if 8 + n > size:
            return f"truncated: the header alone needs {8 + n:,} bytes, the file has {size:,}"
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return f"corrupt header ({_describe(err)})"
    if not isinstance(header, dict):
        return "corrupt header (not a JSON object)"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
            and len(v["data_offsets"]) == 2]
    need = 8 + n + max(ends, default=0)
    if need > size:
        return f"truncated: its tensors need {need:,} bytes, the file has {size:,}"
    return None


def _decode_metadata(path: Path, metadata: Mapping[str, str] | None) -> dict[str, Any] | None:
    """Our description from a safetensors header's metadata, or None for a file written elsewhere."""
    if not metadata or metadata.get(SAFETENSORS_FORMAT_KEY) != FORMAT:
        return None
    meta: dict[str, Any] = {}
    for key, text in metadata.items():
        if key in (SAFETENSORS_FORMAT_KEY, "format"):
            continue
        try:
            meta[key] = json.loads(text)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: metadata {key!r} is not JSON ({err.msg}); the file says it is an "
                                  f"{FORMAT} description") from None
    missing = [k for k in ("arch", "kwargs", "scale", "input_range") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: its {FORMAT} metadata lacks {', '.join(missing)}")
    return meta


def read_safetensors(path: str | Path) -> dict[str, Any] | dict[str, torch.Tensor]:
    """A safetensors file as :func:`read_checkpoint` returns it: our wrapping when its metadata describes it,
    the bare tensor dict otherwise. Reads only JSON and raw tensor bytes (nothing executes)."""
    metadata, tensors = read_safetensors_file(path)
    meta = _decode_metadata(Path(path), metadata)
    if meta is None:
        return tensors
    return {"format": FORMAT, "meta": meta, "state_dict": tensors}


def read_safetensors_file(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's metadata (string -> string) and tensors; a damaged or foreign file is a
    ``CheckpointError`` saying what is wrong with it."""
    # Imported here, as in save_safetensors: reading or writing a .pth never needs safetensors installed.
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load as load_bytes

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: not a readable safetensors file (empty file (0 bytes))")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
        tensors = load_bytes(path.read_bytes())  # a copy in memory: no memory map left open on the file
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = _safetensors_damage(path) or _describe(err)
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason})") from None
    return dict(metadata or {}), tensors


def read_checkpoint(path: str | Path) -> dict[str, Any] | Mapping[str, torch.Tensor]:
    """The raw object stored in ``path``, loaded without arbitrary unpickling: a torch file or safetensors, told
    apart by their first bytes (a renamed file still loads), the name deciding only for a file that is neither."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    with open(path, "rb") as f:
        head = f.read(4)
    torch_file = head == b"PK\x03\x04" or head[:1] == b"\x80"  # zip (torch.save) or legacy pickle
    if _looks_like_safetensors(path) or (path.suffix.lower() == SAFETENSORS_SUFFIX and not torch_file):
        return read_safetensors(path)
    try:
        # Through a file object: torch.load given a '.safetensors' path reads it as safetensors itself.
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
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


def _find_state_dict(obj: Mapping[str, Any], depth: int = 0) -> Mapping[str, torch.Tensor] | None:
    """The preferred wrapped tensor dict: a wrapper key at this level beats a deeper one, EMA beats raw."""
    for key in WRAPPER_KEYS:
        if key in obj and _is_tensor_dict(obj[key]):
            return obj[key]
    if depth + 1 < _MAX_WRAPPING_DEPTH:
        for key in WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                found = _find_state_dict(obj[key], depth + 1)
                if found is not None:
                    return found
    return None


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Plain ``{key: tensor}`` from any known wrapping, prefixes stripped and ESRGAN names mapped."""
    if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        found = _find_state_dict(obj)
        if found is None:
            raise CheckpointError(
                f"{source}: no state dict found; top-level keys {sorted(map(str, obj))[:10]}, "
                f"expected a tensor dict or one of {', '.join(WRAPPER_KEYS)}")
        obj = found
    if not _is_tensor_dict(obj):
        raise CheckpointError(f"{source}: does not hold a state dict of tensors")
    for prefix in COMMON_PREFIXES:
        if all(str(key).startswith(prefix) for key in obj):
            obj = {key[len(prefix):]: value for key, value in obj.items()}
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


def save_checkpoint(path: str | Path, state_dict: Mapping[str, torch.Tensor], *, arch: str, kwargs: dict[str, Any],
                    scale: int, input_range: float, variant: str | None = None, step: int = 0, epoch: int = 0,
                    provenance: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                    raw_weights: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write a checkpoint that can rebuild its model alone.

    A ``.safetensors`` path gets a safetensors file with the description in its metadata (one JSON-encoded
    string per field, see :func:`save_safetensors`); any other path a torch file loadable with
    ``weights_only`` (tensors and plain types), the pipeline's format. ``raw_weights``, for an EMA run whose
    ``state_dict`` is the average: the torch file also holds the average as ``params_ema`` (stored once) and
    these as ``params``, BasicSR's keys (a safetensors file holds one set, the average).
    """
    meta = {"arch": arch, "variant": variant, "kwargs": kwargs, "scale": int(scale), "input_range": float(input_range),
            "step": int(step), "epoch": int(epoch), "provenance": provenance or {}}
    if extra:
        meta.update(extra)
    path = Path(path)
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        save_safetensors(path, state_dict, meta=meta)
        return
    weights = {k: v.detach().cpu() for k, v in state_dict.items()}
    checkpoint: dict[str, Any] = {"format": FORMAT, "meta": meta, "state_dict": weights}
    if raw_weights is not None:
        checkpoint["params_ema"] = weights  # the same dict: pickled once
        checkpoint["params"] = {k: v.detach().cpu() for k, v in raw_weights.items()}
    save_torch(path, checkpoint)


def save_torch(path: str | Path, obj: Any) -> None:
    """``torch.save(obj)`` as ``path``, atomically: an interrupted save never leaves a truncated file behind.

    Written through the fixed name ``<name>.tmp``: torch names the root folder of its zip archive after the file
    it writes, so a temporary name that varied (a process id) would vary the bytes; ``best.pth`` holds
    ``best.pth/data.pkl`` on every run.
    """
    path = Path(path)
    with atomic(path, tmp_name=f"{path.name}.tmp") as tmp:
        torch.save(obj, tmp)


def safetensors_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """Our description as safetensors metadata (string -> string): every field JSON-encoded, so numbers, lists
    and nested dicts come back as they went in; a field JSON cannot hold is refused (ValueError)."""
    out = {"format": "pt", SAFETENSORS_FORMAT_KEY: FORMAT}
    for key, value in meta.items():
        if key in out:
            raise ValueError(f"metadata field {key!r} is reserved")
        try:
            out[str(key)] = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"metadata field {key!r} cannot be written as JSON ({err})") from None
    return out


def save_safetensors(path: str | Path, state_dict: Mapping[str, torch.Tensor], *,
                     meta: Mapping[str, Any] | None = None) -> None:
    """Write ``state_dict`` as safetensors, atomically; ``meta`` (our description) goes into its metadata.

    Without ``meta`` the file is a bare tensor dict with ``{'format': 'pt'}``, the layout other toolkits write.
    """
    from safetensors.torch import save_file

    metadata = safetensors_metadata(meta) if meta is not None else {"format": "pt"}
    # safetensors refuses tensors that share storage or are not contiguous: each one gets its own copy.
    tensors = {str(k): v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    with atomic(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)

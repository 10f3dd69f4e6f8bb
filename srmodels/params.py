"""The one place that loads and validates ``params.yaml``.

The schema below is the list of every knob. An unknown key, a missing key or a wrong type raises
``ParamsError`` naming the dotted key, so a stage stops before doing any work.
"""
from __future__ import annotations

import copy
from pathlib import Path, PurePosixPath
from typing import Any


from .errors import UserError


class ParamsError(UserError):
    """params.yaml does not fit the schema; the message names the key."""


class Optional_:
    def __init__(self, spec: Any) -> None:
        self.spec = spec


class OneOf:
    def __init__(self, *choices: Any) -> None:
        self.choices = choices


class ListOf:
    def __init__(self, spec: Any) -> None:
        self.spec = spec


class DictOf:
    """A mapping with free keys (names chosen by the user) and values of one spec."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec


BACKBONE = {
    "variant": str,
    "pretrained": Optional_(str),
    "epochs": int,
    "batch": int,
    "lr": float,
    "lr_patch": int,
    "schedule": OneOf("cosine", "multistep", "constant"),
    "milestones": ListOf(int),
    "gamma": float,
    "nprocs": int,
    "compile": bool,
}

SCHEMA: dict[str, Any] = {
    "seed": int,
    # Upper bound on the CPU kernels' instruction set (srmodels.isa): the same bits on every x86-64 CPU.
    "cpu_isa": OneOf("avx2", "avx512", "sse41", "native"),
    "scale": int,
    "device": OneOf("auto", "cpu", "cuda"),
    "threads": int,
    "paths": {"prepared": str, "finetune": str, "cache": str, "fusion": str, "test": str, "score": str,
              "pretrained": str, "runs": str, "work": str},
    "data": {
        "source": OneOf("samples", "div2k"),
        "fusion_split": OneOf("disjoint", "shared"),
        "samples": {"backbone_train": ListOf(str), "fusion_train": ListOf(str), "val": ListOf(str),
                    "test": ListOf(str)},
        "div2k": {"root": str, "backbone_train": ListOf(int), "fusion_train": ListOf(int), "val": ListOf(int),
                  "test": OneOf("valid", "test")},
        "benchmarks": DictOf(str),
        "patches": {"hr_size": int, "step": int},
    },
    "backbones": DictOf(BACKBONE),
    "fusion": {
        "members": ListOf(str),
        "kind": OneOf("pixel", "image"),
        "epochs": int,
        "batch": int,
        "lr": float,
        "lr_patch": int,
        "l1_weight": float,
        "mse_weight": float,
        "crops_per_image": int,
        "compile": bool,
    },
    "inference": {"self_ensemble": bool, "tile": Optional_(int), "tile_overlap": int, "compile": bool},
    "metrics": {"crop_border": int, "y_channel": bool},
    "mlflow": {"tracking_uri": str, "experiment": str},
}


def _type_name(spec: Any) -> str:
    if isinstance(spec, type):
        return spec.__name__
    if isinstance(spec, Optional_):
        return f"{_type_name(spec.spec)} or null"
    if isinstance(spec, OneOf):
        return " | ".join(map(str, spec.choices))
    if isinstance(spec, ListOf):
        return f"list of {_type_name(spec.spec)}"
    return "mapping"


def _check(value: Any, spec: Any, key: str) -> Any:
    if isinstance(spec, Optional_):
        return None if value is None else _check(value, spec.spec, key)
    if isinstance(spec, OneOf):
        if value not in spec.choices:
            raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(str, spec.choices))}")
        return value
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected {_type_name(spec)}, got {type(value).__name__} {value!r}")
        return [_check(v, spec.spec, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(spec, DictOf):
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {k: _check(v, spec.spec, f"{key}.{k}") for k, v in value.items()}
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise ParamsError(f"{key or 'params'}: expected a mapping, got {type(value).__name__}")
        prefix = f"{key}." if key else ""
        unknown = sorted(set(value) - set(spec))
        if unknown:
            raise ParamsError(f"{prefix}{unknown[0]}: unknown key (known here: {', '.join(spec)})")
        missing = [k for k in spec if k not in value]
        if missing:
            raise ParamsError(f"{prefix}{missing[0]}: missing")
        return {k: _check(value[k], s, f"{prefix}{k}") for k, s in spec.items()}
    if spec is float:
        # Ints are fine where floats are expected.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if spec is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ParamsError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if not isinstance(value, spec):
        raise ParamsError(f"{key}: expected {_type_name(spec)}, got {type(value).__name__} {value!r}")
    return value


def _semantic_checks(p: dict[str, Any]) -> None:
    from .archs import VARIANTS  # local: keeps `srmodels.params` importable without building models

    for name, bb in p["backbones"].items():
        if bb["variant"] not in VARIANTS:
            raise ParamsError(f"backbones.{name}.variant: unknown variant {bb['variant']!r}; "
                              f"valid: {', '.join(sorted(VARIANTS))}")
        for field in ("epochs", "batch", "lr_patch", "nprocs"):
            if bb[field] < 1:
                raise ParamsError(f"backbones.{name}.{field}: must be >= 1, got {bb[field]}")
        folder = PurePosixPath(p["paths"]["pretrained"]) / name
        if bb["pretrained"] is not None and PurePosixPath(bb["pretrained"]).parent != folder:
            # finetune@<b> depends on that folder (dvc.yaml cannot name a per-backbone file), so the checkpoint
            # must be in it for DVC to see it change.
            raise ParamsError(f"backbones.{name}.pretrained: {bb['pretrained']!r} must be a file in {folder}/ "
                              "(the folder finetune@" + name + " depends on; copy or symlink it there)")
        if bb["lr_patch"] * p["scale"] > p["data"]["patches"]["hr_size"]:  # the crops come from these sub-images
            raise ParamsError(f"backbones.{name}.lr_patch: {bb['lr_patch']} needs HR crops of "
                              f"{bb['lr_patch'] * p['scale']} px, larger than the {p['data']['patches']['hr_size']}"
                              f"-px training sub-images (data.patches.hr_size)")
        if bb["batch"] % bb["nprocs"]:  # batch is the global batch, split evenly over the DDP processes
            raise ParamsError(f"backbones.{name}.batch: {bb['batch']} does not divide by nprocs={bb['nprocs']}")
    members = p["fusion"]["members"]
    for i, m in enumerate(members):
        if m not in p["backbones"]:
            raise ParamsError(f"fusion.members[{i}]: {m!r} is not a key of backbones ({', '.join(p['backbones'])})")
    if len(set(members)) != len(members) or len(members) < 2:
        raise ParamsError(f"fusion.members: need at least two distinct backbones, got {members}")
    for field in ("epochs", "batch", "lr_patch", "crops_per_image"):
        if p["fusion"][field] < 1:
            raise ParamsError(f"fusion.{field}: must be >= 1, got {p['fusion'][field]}")
    for split in ("backbone_train", "fusion_train", "val"):
        r = p["data"]["div2k"][split]
        if len(r) != 2 or r[0] > r[1]:
            raise ParamsError(f"data.div2k.{split}: expected [first, last] image numbers, got {r}")
    if p["data"]["patches"]["hr_size"] % p["scale"]:
        raise ParamsError(f"data.patches.hr_size: {p['data']['patches']['hr_size']} is not a multiple of scale")
    if p["scale"] != 4:
        raise ParamsError(f"scale: only x4 is supported (the backbones' variants are x4), got {p['scale']}")


def validate(raw: Any) -> dict[str, Any]:
    """Checked, normalised copy of a params mapping."""
    params = _check(copy.deepcopy(raw), SCHEMA, "")
    _semantic_checks(params)
    return params


def read_yaml(path: str | Path) -> Any:
    """A params file read exactly as DVC reads it: YAML 1.2 (ruamel.yaml's safe loader, DVC's own parser).

    PyYAML speaks YAML 1.1, where ``1e-3`` is a string and ``yes`` a boolean; DVC, which decides what a changed
    param re-runs, reads the number 0.001 and the string 'yes'. Reading with DVC's rules means the value a
    stage runs with is the value DVC hashed, so no param is accepted by one and refused later by the other.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    path = Path(path)
    try:
        return YAML(typ="safe").load(path.read_text())
    except OSError as err:
        raise ParamsError(f"{path}: cannot read ({err.strerror})") from None
    except YAMLError as err:
        raise ParamsError(f"{path}: invalid YAML ({' '.join(str(err).split())})") from None


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read and validate params.yaml (a missing file or invalid YAML also raises ParamsError)."""
    return validate(read_yaml(path))


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'fusion.epochs': 40, ...}: the form MLflow and comparisons use."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out

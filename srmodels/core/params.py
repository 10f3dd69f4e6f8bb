"""The one place that loads and validates ``params.yaml``.

The schema below is the list of every knob. An unknown key, a missing key or a wrong type raises
``ParamsError`` naming the dotted key, so a stage stops before doing any work.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence


from srmodels.core.errors import UserError
from srmodels.core.files import atomic
from srmodels.core.layout import SCALE


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


class PartialOf:
    """A mapping whose keys are a subset of ``spec`` (the rest comes from defaults), with ``required`` present."""

    def __init__(self, spec: dict[str, Any], required: tuple[str, ...] = ()) -> None:
        self.spec, self.required = spec, required


class DictOf:
    """A mapping with free keys (names chosen by the user) and values of one spec."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec


# What a backbone trains with: `backbone_defaults` holds every key but the variant, and each `backbones.<b>`
# entry states its variant and only what differs from the defaults.
BACKBONE_DEFAULTS = {
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
    "ema_decay": float,
}
BACKBONE = {"variant": str, **BACKBONE_DEFAULTS}

SCHEMA: dict[str, Any] = {
    "seed": int,
    # Upper bound on the CPU kernels' instruction set (srmodels.core.isa): the same bits on every x86-64 CPU.
    "cpu_isa": OneOf("avx2", "avx512", "sse41", "native"),
    "device": OneOf("auto", "cpu", "cuda"),
    "threads": int,
    "paths": {"prepared": str, "finetune": str, "cache": str, "baselines": str, "fusion": str, "test": str,
              "score": str, "ensemble": str, "pretrained": str, "runs": str, "work": str},
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
    "backbone_defaults": BACKBONE_DEFAULTS,
    "backbones": DictOf(PartialOf(BACKBONE, required=("variant",))),
    # The backbones the pipeline fine-tunes and caches (dvc.yaml makes finetune@<b> and cache@<b> for each).
    "trained": ListOf(str),
    "fusion": {
        "members": ListOf(str),
        "kind": OneOf("pixel", "image"),
        "init": OneOf("best_member", "random"),
        "head": OneOf("softmax", "residual"),
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
    "metrics": {"crop_border": int, "bootstrap": {"resamples": int, "seed": int}},
    "mlflow": {"tracking_uri": str, "experiment": str, "registered_model": Optional_(str)},
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
    if isinstance(spec, PartialOf):
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {type(value).__name__}")
        unknown = sorted(set(value) - set(spec.spec))
        if unknown:
            raise ParamsError(f"{key}.{unknown[0]}: unknown key (known here: {', '.join(spec.spec)})")
        return _check(value, {k: s for k, s in spec.spec.items() if k in value or k in spec.required}, key)
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


def _positive(key: str, value: float, hint: str = "") -> None:
    if not value > 0:  # also refuses NaN
        raise ParamsError(f"{key}: must be > 0 (got {value:g}){hint}")


def _at_least(key: str, value: int, low: int, hint: str = "") -> None:
    if value < low:
        raise ParamsError(f"{key}: must be >= {low} (got {value}){hint}")


def _backbone_entry_checks(key: str, entry: dict[str, Any], epochs_key: str) -> None:
    """Checks of one complete backbone entry (or ``backbone_defaults``) that need nothing else."""
    if not 0.0 <= entry["ema_decay"] < 1.0:  # 1 would never leave the initial weights
        raise ParamsError(f"{key}.ema_decay: must be in [0, 1) (0 = off; KAIR's SwinIR recipe uses 0.999), "
                          f"got {entry['ema_decay']}")
    # lr 0 would "train" without moving: the way to keep released weights is epochs 0, which is said here.
    _positive(f"{key}.lr", entry["lr"], f"; to use the pretrained weights unchanged set {epochs_key}: 0")
    _positive(f"{key}.gamma", entry["gamma"])
    for i, m in enumerate(entry["milestones"]):
        _at_least(f"{key}.milestones[{i}]", m, 1, " (milestones are epochs)")


def _min_input_size(variant: str) -> int:
    # Local: only these checks need the architectures, and none of them changes a stage's result.
    from srmodels import archs

    arch, kwargs, _ = archs.variant_spec(variant)
    return archs.min_input_size(arch, kwargs)


def _semantic_checks(p: dict[str, Any]) -> None:
    """What the schema cannot say, section by section; the first problem raises ``ParamsError``."""
    # The defaults first, so that a bad default is named where it is written.
    _backbone_entry_checks("backbone_defaults", p["backbone_defaults"], "backbones.<b>.epochs")
    for name, bb in p["backbones"].items():
        _backbone_entry_checks(f"backbones.{name}", bb, f"backbones.{name}.epochs")
    _at_least("seed", p["seed"], 0)
    _at_least("threads", p["threads"], 1)
    inference = p["inference"]
    if inference["tile"] is not None:
        _at_least("inference.tile", inference["tile"], 1, " (LR pixels; null = whole images)")
    _at_least("inference.tile_overlap", inference["tile_overlap"], 0)
    for name, bb in p["backbones"].items():
        _backbone_checks(p, name, bb)
    check_members(p)
    _tile_checks(p)
    _fusion_checks(p["fusion"])
    _metrics_checks(p["metrics"])
    _data_checks(p["data"])


def _backbone_checks(p: dict[str, Any], name: str, bb: dict[str, Any]) -> None:
    """One ``backbones`` entry against the architectures, its pretrained folder and the training sub-images."""
    from srmodels import archs

    key = f"backbones.{name}"
    try:
        arch = archs.variant_spec(bb["variant"])[0]  # imports that architecture only
    except KeyError:
        raise ParamsError(f"{key}.variant: unknown variant {bb['variant']!r}; "
                          f"valid: {', '.join(sorted(archs.variants()))}") from None
    if arch != name:
        # A backbone's stages depend on srmodels/archs/<b>.py (dvc.yaml), the file of its architecture.
        raise ParamsError(f"{key}.variant: {bb['variant']!r} is a {arch} variant; a backbone is named after "
                          f"its architecture (one of {', '.join(archs.ARCHS)})")
    # epochs 0: the pretrained weights as they are (validated, saved as best.pth and cached).
    _at_least(f"{key}.epochs", bb["epochs"], 0, "; 0 uses the pretrained weights unchanged")
    for field in ("batch", "lr_patch", "nprocs"):
        _at_least(f"{key}.{field}", bb[field], 1)
    if bb["epochs"] == 0 and bb["pretrained"] is None:
        raise ParamsError(f"{key}.epochs: 0 uses the pretrained weights unchanged, but {key}.pretrained is "
                          "null (random weights); name a checkpoint or train for epochs >= 1")
    folder = PurePosixPath(p["paths"]["pretrained"]) / name
    if bb["pretrained"] is not None and PurePosixPath(bb["pretrained"]).parent != folder:
        # finetune@<b> depends on that folder (dvc.yaml cannot name a per-backbone file), so the checkpoint
        # must be in it for DVC to see it change.
        raise ParamsError(f"{key}.pretrained: {bb['pretrained']!r} must be a file in {folder}/ "
                          "(the folder finetune@" + name + " depends on; copy or symlink it there)")
    if bb["lr_patch"] * SCALE > p["data"]["patches"]["hr_size"]:  # the crops come from these sub-images
        raise ParamsError(f"{key}.lr_patch: {bb['lr_patch']} needs HR crops of "
                          f"{bb['lr_patch'] * SCALE} px, larger than the {p['data']['patches']['hr_size']}"
                          f"-px training sub-images (data.patches.hr_size)")
    smallest = _min_input_size(bb["variant"])
    if bb["lr_patch"] < smallest:  # training feeds the crops to the network whole
        raise ParamsError(f"{key}.lr_patch: {bb['lr_patch']} px crops are smaller than {bb['variant']} "
                          f"accepts (at least {smallest} px on each side)")
    if bb["batch"] % bb["nprocs"]:  # batch is the global batch, split evenly over the DDP processes
        raise ParamsError(f"{key}.batch: {bb['batch']} does not divide by nprocs={bb['nprocs']}")


def _tile_checks(p: dict[str, Any]) -> None:
    """The inference tiles against every trained backbone (what the cache stages run with them)."""
    inference = p["inference"]
    window = None if inference["tile"] is None else inference["tile"] + 2 * inference["tile_overlap"]
    for name in p["trained"] if window is not None else ():
        variant = p["backbones"][name]["variant"]
        if window < _min_input_size(variant):  # each forward sees a tile + 2 * overlap window (or the image)
            raise ParamsError(f"inference.tile: {inference['tile']} with tile_overlap {inference['tile_overlap']} "
                              f"gives {window}-px windows, smaller than backbones.{name} ({variant}) accepts "
                              f"(at least {_min_input_size(variant)} px on each side)")


def _fusion_checks(fusion: dict[str, Any]) -> None:
    for field in ("epochs", "batch", "lr_patch", "crops_per_image"):
        _at_least(f"fusion.{field}", fusion[field], 1)
    _positive("fusion.lr", fusion["lr"])
    for field in ("l1_weight", "mse_weight"):
        if not fusion[field] >= 0:
            raise ParamsError(f"fusion.{field}: must be >= 0 (got {fusion[field]:g})")
    if not fusion["l1_weight"] + fusion["mse_weight"] > 0:
        raise ParamsError("fusion.l1_weight: the loss is 0 (l1_weight and mse_weight are both 0); "
                          "give one of them a positive weight")


def _metrics_checks(metrics: dict[str, Any]) -> None:
    _at_least("metrics.crop_border", metrics["crop_border"], 0)
    if metrics["bootstrap"]["resamples"] < 100:
        raise ParamsError(f"metrics.bootstrap.resamples: {metrics['bootstrap']['resamples']} is too few "
                          "for a 95% interval (use 1000 or more)")
    _at_least("metrics.bootstrap.seed", metrics["bootstrap"]["seed"], 0)


def _data_checks(data: dict[str, Any]) -> None:
    for split in ("backbone_train", "fusion_train", "val"):
        r = data["div2k"][split]
        if len(r) != 2 or r[0] > r[1]:
            raise ParamsError(f"data.div2k.{split}: expected [first, last] image numbers, got {r}")
    for field in ("hr_size", "step"):
        _at_least(f"data.patches.{field}", data["patches"][field], 1)
    if data["patches"]["hr_size"] % SCALE:
        raise ParamsError(f"data.patches.hr_size: {data['patches']['hr_size']} is not a multiple of {SCALE}")


def check_members(p: dict[str, Any]) -> None:
    """``trained`` names ``backbones`` entries, and ``fusion.members`` at least two distinct trained ones
    (``validate`` runs it, so every stage refuses an unknown member in the same line)."""
    backbones = ", ".join(p["backbones"]) or "none"
    trained = p["trained"]
    for i, b in enumerate(trained):
        if b not in p["backbones"]:
            raise ParamsError(f"trained[{i}]: {b!r} is not a backbone; trained names entries of backbones: "
                              f"{backbones}")
    if len(set(trained)) != len(trained):
        raise ParamsError(f"trained: {trained} names a backbone twice")
    members = p["fusion"]["members"]
    for i, m in enumerate(members):
        if m not in p["backbones"]:
            raise ParamsError(f"fusion.members[{i}]: {m!r} is not a backbone; fusion.members names trained "
                              f"entries of backbones: {backbones} (trained: {', '.join(trained) or 'none'})")
        if m not in trained:
            raise ParamsError(f"fusion.members[{i}]: {m!r} is not trained (trained: {', '.join(trained) or 'none'}); "
                              f"add it to trained, which makes finetune@{m} and cache@{m}")
    if len(set(members)) != len(members) or len(members) < 2:
        raise ParamsError(f"fusion.members: need at least two distinct backbones, got {members} "
                          f"(trained: {', '.join(trained) or 'none'})")
    if p["fusion"]["head"] == "residual" and p["fusion"]["init"] != "best_member":
        raise ParamsError(f"fusion.init: {p['fusion']['init']!r} applies to the softmax head; the residual head "
                          "always starts at its anchor, the best validation member (set fusion.init: best_member)")


def check_files(p: dict[str, Any], backbones: Sequence[str] | None = None, root: str | Path = ".") -> None:
    """The files validated params name exist: each ``backbones.<b>.pretrained`` that is set (of ``backbones``;
    None: every entry), relative to ``root`` (the stages' working directory, the repository root)."""
    for name in p["backbones"] if backbones is None else backbones:
        pretrained = p["backbones"][name]["pretrained"]
        if pretrained is None:
            continue
        path = Path(root) / pretrained
        if not path.is_file():
            folder = path.parent
            there = sorted(f.name for f in folder.iterdir() if not f.name.startswith(".")) if folder.is_dir() else []
            found = (f"files there: {', '.join(there[:10])}{', ...' if len(there) > 10 else ''}" if there
                     else "the folder is empty" if folder.is_dir() else "the folder does not exist")
            raise ParamsError(f"backbones.{name}.pretrained: {pretrained} "
                              f"{'is not a file' if path.exists() else 'does not exist'} ({found})")


def check_params(path: str | Path = "params.yaml", root: str | Path = ".") -> dict[str, Any]:
    """Everything about a params file that can be known without running a stage: the schema (unknown keys at
    any depth, types, values), ``trained`` and ``fusion.members`` against ``backbones``, and the pretrained
    files (relative to ``root``, where the stages run). Returns the validated params; the first problem is a
    ``ParamsError`` naming the file and the key (``srmodels check``)."""
    raw = read_yaml(path)  # its errors name the file already
    try:
        params = validate(raw)
        check_files(params, root=root)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
    return params


def validate(raw: Any) -> dict[str, Any]:
    """Checked, normalised copy of a params mapping; each ``backbones.<b>`` comes out complete (defaults filled)."""
    params = _check(copy.deepcopy(raw), SCHEMA, "")
    params["backbones"] = {name: {"variant": entry["variant"],
                                  **{k: entry.get(k, v) for k, v in params["backbone_defaults"].items()}}
                           for name, entry in params["backbones"].items()}
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


def flatten(tree: Any, prefix: str = "", *, lists: bool = False) -> dict[str, Any]:
    """Nested mappings as one level of dotted keys, ``{'fusion': {'epochs': 40}}`` -> ``{'fusion.epochs': 40}``:
    the form of MLflow's params and metrics, profile overrides and configuration comparisons.

    ``lists``: lists too, item by index (``images.0.psnr``), as compare-metrics reads a metrics document. An
    empty mapping (or list) is a leaf, kept as it is; ``prefix`` goes before every key.
    """
    def container(value: Any) -> bool:
        return isinstance(value, Mapping) or lists and isinstance(value, list)

    if not container(tree):
        return {prefix.removesuffix("."): tree}
    out: dict[str, Any] = {}
    for k, v in tree.items() if isinstance(tree, Mapping) else enumerate(tree):
        key = f"{prefix}{k}"
        if container(v) and v:
            out.update(flatten(v, key + ".", lists=lists))
        else:
            out[key] = v
    return out


def flatten_text(tree: Mapping[str, Any]) -> dict[str, str]:
    """:func:`flatten` with each leaf as text: strings as they are, anything else as JSON (``true``,
    ``["dat", "rfdn"]``), so that lists and booleans compare as values (a seed sweep's grouping)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in flatten(tree).items()}


# ------------------------------------------------------------------------------------------------- profiles
# A profile (profiles/<name>.yaml) holds only what differs from params.yaml: mappings merge key by key, any
# other value (lists included) replaces. It reaches a run either as `dvc exp run` overrides (params.yaml stays
# as it is; the experiment records the values) or written into params.yaml.

PROFILES = Path("profiles")


def profile_path(name: str) -> Path:
    """``profiles/<name>.yaml`` for a bare name, else the path given."""
    return PROFILES / f"{name}.yaml" if "/" not in name and not name.endswith((".yaml", ".yml")) else Path(name)


def read_profile(name: str) -> dict[str, Any]:
    path = profile_path(name)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml"))) or "none"
        raise ParamsError(f"{path}: no such profile (profiles here: {known})")
    profile = read_yaml(path)
    if not isinstance(profile, dict):
        raise ParamsError(f"{path}: expected a mapping of params to change")
    return profile


def merged(base: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``profile`` applied (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in profile.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _override_value(key: str, value: Any) -> str:
    """``value`` in the override grammar of ``dvc exp run -S`` (Hydra's), as one shell word."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_override_value(key, v) for v in value) + "]"
    text = str(value)
    if not text or any(c.isspace() or c in "'\"\\,[]{}()=:#~" for c in text):
        raise ParamsError(f"{key}: {text!r} cannot be passed as a `dvc exp run -S` override; "
                          "write the profile into params.yaml with --apply instead")
    return text


def profile_overrides(profile: dict[str, Any]) -> list[str]:
    """``-S ++key=value`` arguments for ``dvc exp run`` that apply ``profile`` (``++``: set, adding the key if
    params.yaml lacks it, as for a backbone entry that states only what differs from backbone_defaults)."""
    args: list[str] = []
    for key, value in flatten(profile).items():
        args += ["-S", f"++{key}={_override_value(key, value)}"]
    return args


def apply_profile(params_path: str | Path, profile: dict[str, Any]) -> None:
    """Write ``profile`` into the params file in place, keeping its comments and order (validated first)."""
    from ruamel.yaml import YAML

    params_path = Path(params_path)
    validate(merged(read_yaml(params_path), profile))  # refuse before touching the file
    yaml = YAML()  # round-trip: comments and layout survive
    yaml.width = 120
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = yaml.load(params_path.read_text())

    def put(node: Any, changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                put(node[key], value)
            else:
                node[key] = value

    put(doc, profile)
    with atomic(params_path) as tmp, open(tmp, "w") as f:
        yaml.dump(doc, f)

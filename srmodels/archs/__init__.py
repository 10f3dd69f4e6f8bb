"""The backbone architectures: plain ports that keep the official constructor keywords and ``state_dict`` keys,
so released checkpoints load strictly without remapping.

Each architecture is one module, ``srmodels/archs/<arch>.py``, that never imports another architecture (shared
building blocks live in ``_layers``). It ends with ``VARIANTS``, its named sizes; a variant's name starts with its
architecture's name (``dat_small`` is a ``dat``). An optional ``min_input_size(**kwargs)`` gives the smallest LR
side the architecture processes.

``ARCHS`` is the literal table of architectures. It is plain data, and a module is imported only when a variant
of it is built, so that a backbone's pipeline stages depend on their own entry and file and nothing else: adding
an architecture re-runs none of the others (dvc.yaml: ``srmodels/archs/__init__.py: ARCHS.<arch>``).

May import: nothing else in srmodels (torch only).
"""
from __future__ import annotations

import importlib
from typing import Any

# Architecture name (its module in srmodels/archs/) -> the class in that module. Checkpoints record the name.
ARCHS = {
    "dat": "DAT",
    "swinir": "SwinIR",
    "rfdn": "RFDN",
    "rrdbnet": "RRDBNet",
}


def _module(arch: str) -> Any:
    if arch not in ARCHS:
        raise KeyError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHS)}")
    return importlib.import_module(f"{__name__}.{arch}")


def arch_class(arch: str) -> type:
    """The ``nn.Module`` class of an architecture."""
    return getattr(_module(arch), ARCHS[arch])


def arch_of(variant: str) -> str | None:
    """The architecture a variant name belongs to (the longest name in ``ARCHS`` it starts with), or None."""
    found = [a for a in ARCHS if variant == a or variant.startswith(a + "_")]
    return max(found, key=len) if found else None


def variants() -> dict[str, tuple[str, dict[str, Any], float]]:
    """Every named variant: name -> (arch, constructor kwargs, input range). Imports every architecture."""
    return {name: (arch, kwargs, input_range) for arch in ARCHS
            for name, (kwargs, input_range) in _module(arch).VARIANTS.items()}


def variant_spec(name: str) -> tuple[str, dict[str, Any], float]:
    """(arch, kwargs copy, input_range) of a named variant; a KeyError lists the valid names."""
    arch = arch_of(name)
    table = _module(arch).VARIANTS if arch else {}
    if name not in table:
        raise KeyError(f"unknown variant {name!r}; valid: {', '.join(sorted(variants()))}")
    kwargs, input_range = table[name]
    return arch, {k: (list(v) if isinstance(v, list) else v) for k, v in kwargs.items()}, input_range


def create(name: str, **overrides: Any) -> Any:
    """Build the raw network of a named variant (official forward semantics), kwargs overridable."""
    arch, kwargs, _ = variant_spec(name)
    kwargs.update(overrides)
    return arch_class(arch)(**kwargs)


def min_input_size(arch: str, kwargs: dict[str, Any]) -> int:
    """The smallest LR height and width an architecture built with ``kwargs`` processes (1: any size)."""
    smallest = getattr(_module(arch), "min_input_size", None)
    return 1 if smallest is None else int(smallest(**kwargs))

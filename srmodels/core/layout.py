"""Where the pipeline's files live: every folder and file name inside the ``paths.*`` roots, defined once.

``params.yaml`` names the roots (``paths.prepared``, ``paths.cache``, ...); this module names what is inside
them, so stages, library functions and tests agree without spelling ``"val_se"`` or ``"train_patches"`` twice.
The MLflow store is located here too (:func:`tracking_uri`). The upscaling factor is fixed here as well: the
data, the checkpoints and the official fixtures are all x4, and a knob that validation refuses to change would
only mislead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

SCALE = 4

# Inside paths.prepared (the prepare and benchmark@<set> stages write these).
TRAIN_PATCHES = "train_patches"   # lossless sub-images the backbones fine-tune on
FUSION_TRAIN = "fusion_train"     # whole images the fusion net learns from
VAL = "val"                       # whole images every model selects its best epoch on
EVAL = "eval"                     # eval/<set>/: the scored sets (test, plus data.benchmarks)
SPLITS = "splits.json"            # which source image went where
HR, LR = "hr", "lr"               # each of the folders above holds hr/ and lr/ with the same stems

# Inside paths.cache/<member>: the same folders of SR outputs (.npy); *_se with x8 self-ensemble.
VAL_SE = "val_se"
EVAL_SE = "eval_se"

# Inside paths.finetune/<member>, paths.fusion, paths.test, paths.score.
BEST = "best.pth"
CURVE = "curve.csv"
METRICS = "metrics.json"
COUNTS = "counts.json"
SR = "sr"                         # paths.test/sr/<set>/: fused 8-bit outputs
WEIGHTS = "weights"               # paths.test/weights/<set>/: who wins where
PER_IMAGE = "per_image.csv"        # paths.score: every scored image's PSNR/SSIM per model (srmodels summarize reads it)
SCORE_TABLE = "table.md"          # paths.score: the model table and the paired comparisons
BASELINES = "baselines.json"      # paths.baselines: best validation member, least-squares weights, costs
ENSEMBLE = "ensemble.safetensors"  # paths.ensemble: members, fusion net and settings in one file


@dataclass(frozen=True)
class Pairs:
    """A folder holding ``hr/`` and ``lr/`` images with the same stems (HR first, everywhere)."""

    root: Path

    @property
    def hr(self) -> Path:
        return self.root / HR

    @property
    def lr(self) -> Path:
        return self.root / LR


def train_patches(prepared: Path) -> Pairs:
    return Pairs(Path(prepared) / TRAIN_PATCHES)


def fusion_train(prepared: Path) -> Pairs:
    return Pairs(Path(prepared) / FUSION_TRAIN)


def val(prepared: Path) -> Pairs:
    return Pairs(Path(prepared) / VAL)


def eval_set(prepared: Path, name: str) -> Pairs:
    return Pairs(Path(prepared) / EVAL / name)


def eval_sets(prepared: Path) -> list[str]:
    """Names of the prepared scored sets, sorted."""
    return sorted(p.name for p in (Path(prepared) / EVAL).iterdir() if p.is_dir())


def cached_val(cache: Path, member: str, self_ensemble: bool) -> Path:
    """A member's cached SR outputs of the validation images."""
    return Path(cache) / member / (VAL_SE if self_ensemble else VAL)


def cached_eval(cache: Path, member: str, set_name: str, self_ensemble: bool) -> Path:
    """A member's cached SR outputs of one scored set."""
    return Path(cache) / member / (EVAL_SE if self_ensemble else EVAL) / set_name


def cached_fusion_train(cache: Path, member: str) -> Path:
    return Path(cache) / member / FUSION_TRAIN


# ------------------------------------------------------------------------------------------------- the MLflow store
# params mlflow.tracking_uri (or $MLFLOW_TRACKING_URI), local paths relative to the repository root.


def repo_root() -> Path:
    """The repository the pipeline runs in: ``$DVC_ROOT`` (the main one even under ``dvc exp run --temp``)."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(params: Mapping[str, Any], root: Path | None = None) -> str | None:
    """The MLflow store, None when tracking is off; local paths made absolute against :func:`repo_root`."""
    uri = (os.environ.get("MLFLOW_TRACKING_URI")
           or params.get("mlflow", {}).get("tracking_uri", "sqlite:///mlflow.db")).strip()
    if uri.lower() in ("", "none", "off"):
        return None
    root = root or repo_root()
    if uri.startswith("sqlite:///"):
        path, sep, query = uri[len("sqlite:///"):].partition("?")
        if path and path != ":memory:" and not path.startswith("/"):
            return f"sqlite:///{(root / path).resolve()}{sep}{query}"
    elif ":" not in uri and uri != "databricks":
        return (root / uri).resolve().as_uri()  # a bare folder: MLflow's file store
    return uri


def artifact_location(uri: str, root: Path | None = None) -> str | None:
    """Where a new experiment keeps artifacts; None where the store decides (servers, file stores)."""
    if uri.split(":", 1)[0].lower() in ("http", "https", "databricks", "file"):
        return None
    db = uri[len("sqlite:///"):].partition("?")[0] if uri.startswith("sqlite:///") else ""
    return (Path(db).parent if db.startswith("/") else root or repo_root()).joinpath("mlartifacts").as_uri()

"""params.yaml validation: both profiles load; unknown keys, wrong types and bad values name the key."""
import copy
from pathlib import Path

import pytest
import yaml

from srmodels.params import ParamsError, flatten, load_params, validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_both_profiles_validate():
    default = load_params(ROOT / "params.yaml")
    ntire = load_params(ROOT / "params_ntire.yaml")
    assert default["data"]["source"] == "samples" and ntire["data"]["source"] == "div2k"
    assert ntire["fusion"]["epochs"] == 150 and ntire["fusion"]["batch"] == 72
    assert ntire["fusion"]["l1_weight"] == 0.8 and ntire["fusion"]["mse_weight"] == 0.2
    assert ntire["fusion"]["lr"] == 1.0e-4 and ntire["fusion"]["lr_patch"] == 128
    assert [ntire["backbones"][m]["variant"] for m in ntire["fusion"]["members"]] == ["dat_s", "swinir_m_s48", "rfdn"]
    assert all(ntire["backbones"][m]["epochs"] == 100 for m in ntire["fusion"]["members"])


@pytest.mark.parametrize("path, value, message", [
    (("fusion", "epoch"), 3, "fusion.epoch: unknown key"),
    (("fusion", "lr"), "1e-3", "fusion.lr: expected a number"),
    (("fusion", "epochs"), 2.5, "fusion.epochs: expected an integer"),
    (("fusion", "epochs"), True, "fusion.epochs: expected an integer"),
    (("device",), "tpu", "device: 'tpu' is not one of"),
    (("backbones", "dat", "variant"), "dat_xl", "backbones.dat.variant: unknown variant"),
    (("backbones", "dat", "schedule"), "linear", "backbones.dat.schedule"),
    (("fusion", "members"), ["dat", "nope"], "fusion.members[1]"),
    (("fusion", "members"), ["dat"], "fusion.members: need at least two"),
    (("data", "samples", "val"), "coins", "data.samples.val: expected list"),
    (("inference", "tile"), "big", "inference.tile: expected an integer"),
    (("mlflow",), None, "mlflow: expected a mapping"),
    (("backbones", "dat", "nprocs"), 3, "backbones.dat.batch: 8 does not divide by nprocs=3"),
    (("backbones", "dat", "nprocs"), 0, "backbones.dat.nprocs: must be >= 1"),
])
def test_errors_name_the_key(raw, path, value, message):
    with pytest.raises(ParamsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(_with(raw, path, value))


def _with(raw: dict, path: tuple, value) -> dict:
    """A copy of ``raw`` with the key at ``path`` set to ``value``."""
    changed = copy.deepcopy(raw)
    node = changed
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return changed


def test_missing_key_named(raw):
    bad = copy.deepcopy(raw)
    del bad["fusion"]["kind"]
    with pytest.raises(ParamsError, match="fusion.kind: missing"):
        validate(bad)


def test_ints_accepted_as_floats_and_flatten(raw):
    p = copy.deepcopy(raw)
    p["fusion"]["lr"] = 1
    out = validate(p)
    assert isinstance(out["fusion"]["lr"], float)
    flat = flatten(out)
    assert flat["fusion.epochs"] == out["fusion"]["epochs"] and "backbones.dat.variant" in flat


def test_bad_file(tmp_path):
    (tmp_path / "p.yaml").write_text("seed: [unclosed\n")
    with pytest.raises(ParamsError, match="invalid YAML"):
        load_params(tmp_path / "p.yaml")
    with pytest.raises(ParamsError, match="cannot read"):
        load_params(tmp_path / "missing.yaml")


def test_params_are_read_as_dvc_reads_them(tmp_path):
    # YAML 1.2, DVC's reading: 1e-3 is the number DVC hashed (no latent "string" error when the stage runs),
    # and 'yes' is the string DVC sees, refused by the schema at once instead of silently read as True.
    text = (ROOT / "params.yaml").read_text()
    (tmp_path / "p.yaml").write_text(text.replace("  lr: 1.0e-3\n  lr_patch: 32        # LR crop",
                                                  "  lr: 1e-3\n  lr_patch: 32        # LR crop"))
    assert "lr: 1e-3" in (tmp_path / "p.yaml").read_text()
    assert load_params(tmp_path / "p.yaml")["fusion"]["lr"] == 0.001
    (tmp_path / "q.yaml").write_text(text.replace("self_ensemble: true", "self_ensemble: yes"))
    with pytest.raises(ParamsError, match="inference.self_ensemble: expected bool, got str 'yes'"):
        load_params(tmp_path / "q.yaml")


@pytest.mark.parametrize("path, value, message", [
    (("cpu_isa",), "avx3", "cpu_isa: 'avx3' is not one of"),
    (("backbones", "rfdn", "lr_patch"), 100, "backbones.rfdn.lr_patch: 100 needs HR crops of 400 px"),
    (("backbones", "dat", "pretrained"), "elsewhere/DAT_S_x4.pth",
     "backbones.dat.pretrained: 'elsewhere/DAT_S_x4.pth' must be a file in inputs/pretrained/dat/"),
])
def test_checks_that_need_no_data_run_before_any_work(raw, path, value, message):
    with pytest.raises(ParamsError, match=message):
        validate(_with(raw, path, value))

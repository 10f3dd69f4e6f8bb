"""params.yaml validation: the defaults and the NTIRE profile; unknown keys, wrong types and bad values name the key."""
import copy
import re
from pathlib import Path

import pytest
from srmodels.params import (ParamsError, apply_profile, flatten, load_params, merged, profile_overrides, read_profile,
                             read_yaml, validate)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw():
    return read_yaml(ROOT / "params.yaml")


def test_both_profiles_validate(raw):
    default = load_params(ROOT / "params.yaml")
    ntire = validate(merged(raw, read_profile(str(ROOT / "profiles" / "ntire.yaml"))))
    assert default["data"]["source"] == "samples" and ntire["data"]["source"] == "div2k"
    assert ntire["fusion"]["epochs"] == 150 and ntire["fusion"]["batch"] == 72
    assert ntire["fusion"]["l1_weight"] == 0.8 and ntire["fusion"]["mse_weight"] == 0.2
    assert ntire["fusion"]["lr"] == 1.0e-4 and ntire["fusion"]["lr_patch"] == 128
    assert [ntire["backbones"][m]["variant"] for m in ntire["fusion"]["members"]] == ["dat_s", "swinir_m_s48", "rfdn"]
    assert all(ntire["backbones"][b]["epochs"] == 100 and ntire["backbones"][b]["lr"] == 1.0e-4
               for b in ntire["backbones"])
    assert ntire["backbones"]["swinir"]["lr_patch"] == 48 and ntire["backbones"]["dat"]["lr_patch"] == 64
    # EMA where the official recipe has it (KAIR's SwinIR, E_decay 0.999); off by default everywhere.
    assert {b: e["ema_decay"] for b, e in ntire["backbones"].items()} == {"dat": 0.0, "swinir": 0.999, "rfdn": 0.0,
                                                                           "rrdbnet": 0.0}
    assert all(e["ema_decay"] == 0.0 for e in default["backbones"].values())


def test_backbone_entries_state_only_what_differs(raw):
    p = load_params(ROOT / "params.yaml")
    defaults = p["backbone_defaults"]
    for name, entry in raw["backbones"].items():
        assert "variant" in entry and all(entry[k] != defaults[k] for k in entry if k != "variant"), name
        assert p["backbones"][name] == {"variant": entry["variant"], **defaults, **entry}
    assert p["backbones"]["rfdn"]["lr"] == 2.0e-3 and p["backbones"]["dat"]["lr"] == defaults["lr"]


@pytest.mark.parametrize("path, value, message", [
    (("backbones", "dat", "epoch"), 3, "backbones.dat.epoch: unknown key"),
    (("backbones", "dat", "epochs"), "many", "backbones.dat.epochs: expected an integer"),
    (("backbone_defaults", "lr"), "fast", "backbone_defaults.lr: expected a number"),
    (("backbone_defaults", "variant"), "dat_s", "backbone_defaults.variant: unknown key"),
    (("scale",), 4, "scale: unknown key"),
])
def test_defaults_errors_name_the_key(raw, path, value, message):
    with pytest.raises(ParamsError, match=message):
        validate(_with(raw, path, value))
    bad = copy.deepcopy(raw)
    del bad["backbones"]["dat"]["variant"]
    with pytest.raises(ParamsError, match="backbones.dat.variant: missing"):
        validate(bad)


def test_profile_as_dvc_overrides_equals_profile_written_in(raw, tmp_path):
    """The `-S` overrides, applied by DVC's own override code, give the params --apply writes, and both give
    the merged profile; --apply keeps params.yaml's comments."""
    from dvc.utils.hydra import apply_overrides

    profile = read_profile(str(ROOT / "profiles" / "ntire.yaml"))
    expected = validate(merged(raw, profile))
    via_dvc, written = tmp_path / "dvc.yaml", tmp_path / "written.yaml"
    for path in (via_dvc, written):
        path.write_text((ROOT / "params.yaml").read_text())
    apply_overrides(via_dvc, profile_overrides(profile)[1::2])
    apply_profile(written, profile)
    assert load_params(via_dvc) == expected == load_params(written)
    assert "# what every backbones.<b> entry trains with" in written.read_text()


def test_profile_refused_whole(raw, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    before = path.read_text()
    with pytest.raises(ParamsError, match="backbones.dat.variant: unknown variant"):
        apply_profile(path, {"fusion": {"epochs": 5}, "backbones": {"dat": {"variant": "dat_xl"}}})
    assert path.read_text() == before  # nothing written
    with pytest.raises(ParamsError, match="no such profile"):
        read_profile(str(tmp_path / "nope.yaml"))
    with pytest.raises(ParamsError, match="cannot be passed as a `dvc exp run -S` override"):
        profile_overrides({"data": {"div2k": {"root": "my data/DIV2K"}}})


@pytest.mark.parametrize("path, value, message", [
    (("fusion", "epoch"), 3, "fusion.epoch: unknown key"),
    (("fusion", "lr"), "1e-3", "fusion.lr: expected a number"),
    (("fusion", "epochs"), 2.5, "fusion.epochs: expected an integer"),
    (("fusion", "epochs"), True, "fusion.epochs: expected an integer"),
    (("device",), "tpu", "device: 'tpu' is not one of"),
    (("backbones", "dat", "variant"), "dat_xl", "backbones.dat.variant: unknown variant"),
    (("backbones", "dat", "schedule"), "linear", "backbones.dat.schedule"),
    (("backbone_defaults", "schedule"), "linear", "backbone_defaults.schedule"),
    (("fusion", "members"), ["dat", "nope"], "fusion.members[1]"),
    (("fusion", "members"), ["dat"], "fusion.members: need at least two"),
    (("data", "samples", "val"), "coins", "data.samples.val: expected list"),
    (("inference", "tile"), "big", "inference.tile: expected an integer"),
    (("mlflow",), None, "mlflow: expected a mapping"),
    (("backbone_defaults", "nprocs"), 3, "backbones.dat.batch: 8 does not divide by nprocs=3"),
    (("backbones", "dat", "nprocs"), 0, "backbones.dat.nprocs: must be >= 1"),
    (("backbones", "swinir", "ema_decay"), 1.0, "backbones.swinir.ema_decay: must be in [0, 1) (0 = off"),
    (("backbones", "swinir", "ema_decay"), "0.999", "backbones.swinir.ema_decay: expected a number"),
    (("backbone_defaults", "ema_decay"), -0.1, "backbone_defaults.ema_decay: must be in [0, 1)"),
    (("backbone_defaults", "ema_decay"), float("nan"), "backbone_defaults.ema_decay: must be in [0, 1)"),
])
def test_errors_name_the_key(raw, path, value, message):
    with pytest.raises(ParamsError, match=re.escape(message)) as err:
        validate(_with(raw, path, value))
    assert "\n" not in str(err.value)


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

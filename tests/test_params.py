"""params.yaml validation: the defaults and the NTIRE profile; unknown keys, wrong types and bad values name the key."""
import copy
import re
from pathlib import Path

import pytest
from srmodels.core.params import (ParamsError, apply_profile, flatten, load_params, merged, profile_overrides, read_profile,
                             read_yaml, validate)

from .helpers import ROOT

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


# ------------------------------------------------------------------------- every error names its full key

@pytest.mark.parametrize("path, value, message", [
    # the fusion has no gamma: its own key, nothing else
    (("fusion", "lr"), 0, "fusion.lr: must be > 0 (got 0)"),
    (("fusion", "lr"), float("nan"), "fusion.lr: must be > 0 (got nan)"),
    (("backbones", "dat", "lr"), 0, "backbones.dat.lr: must be > 0 (got 0); to use the pretrained weights "
                                    "unchanged set backbones.dat.epochs: 0"),
    (("backbone_defaults", "lr"), -1e-3, "backbone_defaults.lr: must be > 0 (got -0.001); to use the pretrained "
                                         "weights unchanged set backbones.<b>.epochs: 0"),
    (("backbones", "rfdn", "gamma"), 0, "backbones.rfdn.gamma: must be > 0 (got 0)"),
    (("backbone_defaults", "gamma"), -0.5, "backbone_defaults.gamma: must be > 0 (got -0.5)"),
    (("backbones", "swinir", "milestones"), [2, 0], "backbones.swinir.milestones[1]: must be >= 1 (got 0)"),
    (("backbones", "dat", "epochs"), -1, "backbones.dat.epochs: must be >= 0 (got -1)"),
    (("backbones", "dat", "epochs"), 0, "backbones.dat.epochs: 0 uses the pretrained weights unchanged, but "
                                        "backbones.dat.pretrained is null"),
    (("backbone_defaults", "epochs"), 0, "backbones.dat.epochs: 0 uses the pretrained weights unchanged"),
    (("fusion", "epochs"), 0, "fusion.epochs: must be >= 1 (got 0)"),
    (("fusion", "l1_weight"), -0.8, "fusion.l1_weight: must be >= 0 (got -0.8)"),
    (("seed",), -1, "seed: must be >= 0 (got -1)"),
    (("threads",), 0, "threads: must be >= 1 (got 0)"),
    (("metrics", "crop_border"), -4, "metrics.crop_border: must be >= 0 (got -4)"),
    (("inference", "tile"), 0, "inference.tile: must be >= 1 (got 0)"),
    (("inference", "tile_overlap"), -1, "inference.tile_overlap: must be >= 0 (got -1)"),
    (("data", "patches", "step"), 0, "data.patches.step: must be >= 1 (got 0)"),
    # the architecture's smallest input (RFDN: 15 px) where a stage would feed it smaller pieces
    (("backbones", "rfdn", "lr_patch"), 12, "backbones.rfdn.lr_patch: 12 px crops are smaller than rfdn_small "
                                            "accepts (at least 15 px on each side)"),
    # typos anywhere, including sections no stage hashes (mlflow) and the top level
    (("sede",), 1, "sede: unknown key"),
    (("mlflow", "experimnt"), "x", "mlflow.experimnt: unknown key (known here: tracking_uri, experiment, registered_model)"),
    (("paths", "pretraind"), "x", "paths.pretraind: unknown key"),
    (("metrics", "bootstrap", "resample"), 10, "metrics.bootstrap.resample: unknown key"),
    # members and trained against backbones: the key, the name and the names known
    (("fusion", "members"), ["dat", "nosuch"], "fusion.members[1]: 'nosuch' is not a backbone; fusion.members "
                                               "names trained entries of backbones: dat, swinir, rfdn, rrdbnet"),
    (("fusion", "members"), ["dat", "rrdbnet"], "fusion.members[1]: 'rrdbnet' is not trained (trained: dat, "
                                                "swinir, rfdn); add it to trained"),
    (("trained",), ["dat", "edsr"], "trained[1]: 'edsr' is not a backbone; trained names entries of backbones: "
                                    "dat, swinir, rfdn, rrdbnet"),
    (("trained",), ["dat", "dat"], "trained: ['dat', 'dat'] names a backbone twice"),
])
def test_every_error_names_its_full_key(raw, path, value, message):
    with pytest.raises(ParamsError, match=re.escape(message)) as err:
        validate(_with(raw, path, value))
    assert "\n" not in str(err.value) and str(err.value).startswith(message.split(":")[0] + ":")


def test_tile_windows_are_checked_against_trained_backbones_only(raw):
    # tile 6 + 2 * 4 = 14 px windows: too small for RFDN (15), fine for the others
    small = _with(_with(raw, ("inference", "tile"), 6), ("inference", "tile_overlap"), 4)
    with pytest.raises(ParamsError, match=re.escape("smaller than backbones.rfdn (rfdn_small) accepts")):
        validate(small)
    p = validate(_with(_with(small, ("trained",), ["dat", "swinir"]), ("fusion", "members"), ["dat", "swinir"]))
    assert p["inference"]["tile"] == 6


def _dict_sections(spec, prefix=""):
    """Dotted keys of every fixed-key mapping of the schema (the top level is '')."""
    from srmodels.core.params import DictOf, PartialOf

    yield prefix
    for key, sub in spec.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(sub, dict):
            yield from _dict_sections(sub, dotted)
        elif isinstance(sub, DictOf) and isinstance(sub.spec, PartialOf):
            yield f"{dotted}.<each>"


def test_unknown_keys_are_refused_in_every_section(raw):
    from srmodels.core.params import SCHEMA

    sections = list(_dict_sections(SCHEMA))
    assert {"", "paths", "mlflow", "metrics.bootstrap", "backbone_defaults", "backbones.<each>"} <= set(sections)
    for section in sections:
        for name in (["dat", "rrdbnet"] if section == "backbones.<each>" else [None]):
            where = section.replace("<each>", name) if name else section
            node = copy.deepcopy(raw)
            target = node
            for part in filter(None, where.split(".")):
                target = target[part]
            target["typo_key"] = 1
            key = f"{where}.typo_key" if where else "typo_key"
            with pytest.raises(ParamsError, match=re.escape(f"{key}: unknown key")):
                validate(node)


def test_epochs_0_keeps_released_weights(raw):
    p = validate(_with(raw, ("backbones", "dat"), {"variant": "dat_small", "epochs": 0,
                                                   "pretrained": "inputs/pretrained/dat/DAT_small.pth"}))
    assert p["backbones"]["dat"]["epochs"] == 0 and p["backbones"]["dat"]["lr"] > 0


# ------------------------------------------------------------------------------------------ srmodels check

def _params_file(tmp_path, raw, **changes) -> Path:
    """A params file in tmp_path: the repository's, with ``changes`` (dotted key -> value)."""
    from ruamel.yaml import YAML

    changed = raw
    for key, value in changes.items():
        changed = _with(changed, tuple(key.split("__")), value)
    path = tmp_path / "params.yaml"
    with open(path, "w") as f:
        YAML().dump(changed, f)
    return path


def test_check_accepts_the_committed_params(cli, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("SRMODELS_PARAMS", raising=False)
    code, out, err = cli("check")
    p = load_params(ROOT / "params.yaml")
    assert code == 0 and err == ""
    assert out == (f"params.yaml: ok ({len(p['backbones'])} backbones; trained: {', '.join(p['trained'])}; "
                   f"members: {', '.join(p['fusion']['members'])})\n")


@pytest.mark.parametrize("changes, message", [
    ({"sede": 1}, "sede: unknown key"),
    ({"mlflow__experimnt": "srmodels"}, "mlflow.experimnt: unknown key"),
    ({"fusion__lr": 0}, "fusion.lr: must be > 0 (got 0)"),
    ({"fusion__members": ["dat", "nosuch"]}, "fusion.members[1]: 'nosuch' is not a backbone"),
    ({"backbones__dat__pretrained": "inputs/pretrained/dat/DAT_S_x4.pth"},
     "backbones.dat.pretrained: inputs/pretrained/dat/DAT_S_x4.pth does not exist (the folder does not exist)"),
])
def test_check_names_the_file_and_the_key_in_one_line(cli, raw, tmp_path, monkeypatch, changes, message):
    monkeypatch.chdir(tmp_path)  # paths are relative to where the stages run
    path = _params_file(tmp_path, raw, **changes)
    code, out, err = cli("check", path)
    assert code == 2 and out == ""
    assert err.startswith(f"srmodels: error: {path}: {message}") and err.count("\n") == 1


def test_check_finds_pretrained_files_and_honours_srmodels_params(cli, raw, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _params_file(tmp_path, raw, backbones__rfdn__pretrained="inputs/pretrained/rfdn/RFDN_AIM.pth")
    monkeypatch.setenv("SRMODELS_PARAMS", str(path))
    (tmp_path / "inputs" / "pretrained" / "rfdn").mkdir(parents=True)
    (tmp_path / "inputs" / "pretrained" / "rfdn" / "other.pth").write_bytes(b"x")
    code, _, err = cli("check")  # no argument: the file the stages read
    assert code == 2 and f"{path}: backbones.rfdn.pretrained: inputs/pretrained/rfdn/RFDN_AIM.pth does not exist " \
                         "(files there: other.pth)" in err
    (tmp_path / "inputs" / "pretrained" / "rfdn" / "RFDN_AIM.pth").write_bytes(b"x")
    code, out, _ = cli("check")
    assert code == 0 and out.startswith(f"{path}: ok (4 backbones;")
    code, _, err = cli("check", tmp_path / "missing.yaml")
    assert code == 2 and "missing.yaml: cannot read" in err

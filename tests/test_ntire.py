"""`srmodels export --to ntire`: the NTIRE 2025 image SR x4 layout, a team package that runs without srmodels the
way the challenge's test.py calls it and writes the test stage's PNGs bit for bit; refusals in one line, nothing
left behind."""
from __future__ import annotations

import errno
import os
import shutil
import sys

import cv2
import numpy as np
import pytest
import torch

from srmodels.core.errors import UserError
from srmodels.core.isa import ENV_VAR
from srmodels.core.layout import ENSEMBLE, SCALE, eval_set, fusion_train, val
from srmodels.data.images import write_image
from srmodels.evaluation.evaluation import fuse_eval_sets
from srmodels.interop.export import ExportError
from srmodels.interop.ntire import _unresolved_imports, export_ntire, package_files, srmodels_imports
from srmodels.models.accelerate import accelerate
from srmodels.models.caching import cache_outputs
from srmodels.models.checkpoint import save_checkpoint
from srmodels.models.ensemble import write_ensemble
from srmodels.models.fusion import AttentionWeightNet, fusion_kind, load_fusion
from srmodels.models.model import build_model, load_model

from . import procs
from .helpers import smooth_image

TEAM, NAME = 27, "Test"
PACKAGE = f"team{TEAM:02d}_{NAME}"
# dat_tiny's 64->256 upsampler convs take the Winograd kernel; the others packed linears and direct convs.
MEMBERS = {"dat": "dat_tiny", "swinir": "swinir_small", "rfdn": "rfdn_tiny"}
# rfdn needs 15 px a side. Tiles of 16 px with 2 px of context, as the file's "inference" says: the first image
# runs whole, the second in two 16x20 windows.
LR_SIZES = {"0901x4": (16, 16), "0902x4": (16, 30)}
TILE, OVERLAP = 16, 2

# What the challenge's test.py does, in a child process with srmodels unimportable: import the team's package
# from the submission's root and call its main with the team's model_zoo folder.
HARNESS = """
import importlib.abc, os, sys

class NoSrmodels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "srmodels" or name.startswith("srmodels."):
            raise ImportError(f"{name}: the team package imports srmodels")
        return None

sys.meta_path.insert(0, NoSrmodels())
assert not any(m.split(".")[0] == "srmodels" for m in sys.modules), "srmodels loaded at start-up"
import torch
torch.set_num_threads(int(sys.argv[1]))
from models.%s import main
main(model_dir=os.path.join("model_zoo", "%s"), input_path=sys.argv[2], output_path=sys.argv[3],
     device=torch.device("cpu"))
assert not any(m.split(".")[0] == "srmodels" for m in sys.modules)
""" % (PACKAGE, PACKAGE)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Randomly initialised members and a residual-head fusion net as the pipeline saves them, and the
    prepared folder with the scored LR images ('test' set)."""
    root = tmp_path_factory.mktemp("ntire")
    torch.manual_seed(0)
    ckpts = {}
    for name, variant in MEMBERS.items():
        model = build_model(variant).eval()
        ckpts[name] = root / "finetune" / name / "best.pth"
        save_checkpoint(ckpts[name], model.net.state_dict(), **model.describe(), step=1, epoch=1)
    net = AttentionWeightNet(num_members=len(MEMBERS), head="residual", anchor=0)
    with torch.no_grad():  # default init pulls little: make the fusion decide something
        for p in net.parameters():
            p.mul_(4)
    fusion = root / "fusion" / "best.pth"
    save_checkpoint(fusion, net.state_dict(), arch="fusion_pixel", kwargs=net.config(), scale=SCALE,
                    input_range=1.0, extra={"members": list(MEMBERS), "kind": "pixel", "init": "random"})
    prepared = root / "prepared"
    fusion_train(prepared).lr.mkdir(parents=True)
    val(prepared).lr.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, (h, w) in LR_SIZES.items():
        write_image(eval_set(prepared, "test").lr / f"{stem}.png", smooth_image(rng, h, w))
    return {"root": root, "members": ckpts, "fusion": fusion, "prepared": prepared}


def _ensemble(trained):
    path = trained["root"] / "ensemble" / ENSEMBLE
    if not path.exists():
        write_ensemble(path, trained["members"], trained["fusion"], self_ensemble=True, tile=TILE,
                       tile_overlap=OVERLAP, cpu_isa=os.environ.get(ENV_VAR, "native"),
                       threads=torch.get_num_threads())
    return path


def _test_stage_pngs(trained):
    """The cache stage's member outputs and the test stage's fused PNGs, by the functions those stages run."""
    root = trained["root"] / "stages"
    for name, ckpt in trained["members"].items():
        cache_outputs(accelerate(load_model(ckpt)), trained["prepared"], root / "cache" / name, scale=SCALE,
                      self_ensemble=True, tile=TILE, tile_overlap=OVERLAP, device=torch.device("cpu"))
    net, meta = load_fusion(trained["fusion"])
    fuse_eval_sets(net, fusion_kind(meta), list(MEMBERS), root / "cache", trained["prepared"], root / "test",
                   self_ensemble=True, device=torch.device("cpu"))
    return root / "test" / "sr" / "test"


def test_the_team_main_writes_the_test_stage_pngs_bit_for_bit(trained, tmp_path):
    reference = _test_stage_pngs(trained)
    sub = tmp_path / "NTIRE2025_ImageSR_x4"  # a clone of the challenge's repository: other teams stay
    (sub / "models" / "team00_DAT").mkdir(parents=True)
    (sub / "models" / "team00_DAT" / "__init__.py").write_text("")
    (sub / "test.py").write_text("")
    (sub / "model_zoo" / PACKAGE).mkdir(parents=True)  # empty: taken
    done = export_ntire(_ensemble(trained).parent, sub, team=TEAM, name=NAME)
    assert done.code == sub / "models" / PACKAGE and done.weights == sub / "model_zoo" / PACKAGE / ENSEMBLE
    assert sorted(os.listdir(sub)) == ["model_zoo", "models", "test.py"]
    assert sorted(os.listdir(sub / "models")) == sorted([PACKAGE, "team00_DAT"])
    assert done.weights.read_bytes() == _ensemble(trained).read_bytes()

    out = tmp_path / "results" / "test"
    ran = procs.run([sys.executable, "-c", HARNESS, str(torch.get_num_threads()),
                     eval_set(trained["prepared"], "test").lr, out],
                    cwd=sub, env=dict(os.environ), timeout=300, what="the team's main")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference)) == [f"{s}.png" for s in sorted(LR_SIZES)]
    for name in sorted(os.listdir(reference)):
        got, want = cv2.imread(str(out / name)), cv2.imread(str(reference / name))
        assert got.shape == want.shape == (LR_SIZES[name[:-4]][0] * SCALE, LR_SIZES[name[:-4]][1] * SCALE, 3)
        differing = int((got != want).any(axis=2).sum())
        assert differing == 0, f"{name}: {differing} pixels differ from the test stage's"


def test_the_package_imports_no_srmodels_and_every_module_it_names(trained, tmp_path):
    done = export_ntire(_ensemble(trained), tmp_path / "sub")
    code = done.code
    assert code.name == "team27_SRModels"  # the defaults
    written = {p.relative_to(code).as_posix() for p in code.rglob("*") if p.is_file()}
    assert written == {"__init__.py", "ensemble.py", "README.md", "accelerate.py", "inference.py", "fusion.py",
                       "model.py", "images.py", "archs/__init__.py", "archs/_layers.py", "archs/dat.py",
                       "archs/swinir.py", "archs/rfdn.py", "archs/rrdbnet.py"}
    assert srmodels_imports(code) == [] and _unresolved_imports(code) == []
    assert "from models.team27_SRModels import main" in (code / "README.md").read_text()
    # a module the package lacks is named where it is imported
    (code / "archs" / "rrdbnet.py").unlink()
    assert [m.split(":")[0] for m in _unresolved_imports(code)] == ["accelerate.py"]
    # the check sees an import of srmodels wherever it is
    (code / "archs" / "rfdn.py").write_text((code / "archs" / "rfdn.py").read_text()
                                            + "\n\ndef late():\n    from srmodels import archs\n    return archs\n")
    (code / "extra.py").write_text("import os, srmodels.models.fusion\n")
    found = srmodels_imports(code)
    assert len(found) == 2 and found[0].startswith("archs/rfdn.py:") and found[1].startswith("extra.py:1:")


def test_an_extracted_module_keeps_only_what_its_names_use():
    files = package_files(["rfdn"])
    fusion = files["fusion.py"]
    assert "class AttentionWeightNet" in fusion and "def residual_weights" in fusion
    assert "load_fusion" not in fusion and "start_at_member" not in fusion and "import math" not in fusion
    model = files["model.py"]
    assert "class SRModel" in model and "def scale_of" in model
    assert "def load_model" not in model and "read_checkpoint" not in model and "import archs" not in model


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_refusals_are_one_line_and_write_nothing(trained, tmp_path, monkeypatch):
    ensemble = _ensemble(trained)
    out = tmp_path / "out"
    with pytest.raises(ExportError) as err:  # a single model's checkpoint
        export_ntire(trained["members"]["rfdn"], out)
    assert "not an ensemble file" in _one_line(err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:  # a folder without the ensemble
        export_ntire(tmp_path / "empty", out)
    assert ENSEMBLE in _one_line(err)
    for team, name in ((100, NAME), (-1, NAME), (TEAM, "my-team"), (TEAM, "")):
        with pytest.raises(ExportError) as err:
            export_ntire(ensemble, out, team=team, name=name)
        _one_line(err)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ExportError) as err:
        export_ntire(ensemble, tmp_path / "a_file" / "sub")
    assert "is a file" in _one_line(err)
    assert not out.exists()

    taken = out / "models" / PACKAGE / "team.py"
    taken.parent.mkdir(parents=True)
    taken.write_text("theirs")
    with pytest.raises(ExportError) as err:
        export_ntire(ensemble, out, team=TEAM, name=NAME)
    assert "not empty" in _one_line(err)
    assert taken.read_text() == "theirs" and sorted(os.listdir(out)) == ["models"]
    shutil.rmtree(out)

    real_copy = shutil.copyfile

    def full_disk(src, dst, *args, **kwargs):
        if str(src).endswith(ENSEMBLE):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_copy(src, dst, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(shutil, "copyfile", full_disk)
        with pytest.raises(ExportError) as err:
            export_ntire(ensemble, out / "deeper")
        assert os.strerror(errno.ENOSPC) in _one_line(err)
        assert not out.exists()  # neither the folders made for it nor the staging folder remain

    # the weights' folder cannot be renamed into place: the code's rename is undone
    real_replace = os.replace

    def refuse_weights(src, dst):
        if os.path.basename(os.path.dirname(dst)) == "model_zoo":
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(dst))
        return real_replace(src, dst)

    (out / "models").mkdir(parents=True)
    monkeypatch.setattr(os, "replace", refuse_weights)
    with pytest.raises(ExportError) as err:
        export_ntire(ensemble, out)
    assert os.strerror(errno.EXDEV) in _one_line(err)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["models"]

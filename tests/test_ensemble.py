"""The trained ensemble as one file (srmodels.models.ensemble), and as one MLflow model (srmodels.tracking).

The reference is what the pipeline's stages do: the cache stage's `cache_outputs` (accelerated members, x8,
float16 .npy files), then the test stage's `fuse_eval_sets` (fusion, clamp, 8-bit PNG). The ensemble must give
those PNGs' pixels exactly, in this process and through MLflow's registry.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from srmodels.core import layout
from srmodels.data.images import read_image, write_image
from srmodels.evaluation.evaluation import fuse_eval_sets
from srmodels.models.accelerate import accelerate
from srmodels.models.caching import cache_outputs
from srmodels.models.checkpoint import CheckpointError, save_checkpoint
from srmodels.models.ensemble import find_ensemble, load_ensemble, read_ensemble, write_ensemble
from srmodels.models.fusion import AttentionWeightNet, load_fusion
from srmodels.models.model import build_model, load_model

from .helpers import smooth_image

MEMBERS = {"swinir": "swinir_tiny", "rfdn": "rfdn_tiny"}


def _member_checkpoint(path: Path, variant: str, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_model(variant)
    with torch.no_grad():  # random init leaves RFDN's output near zero: scale it into a range that rounds
        for p in model.parameters():
            p.mul_(1.5)
    save_checkpoint(path, model.net.state_dict(), **{**model.describe(), "scale": 4})
    return path


def _fusion_checkpoint(path: Path, members: list[str]) -> Path:
    torch.manual_seed(7)
    net = AttentionWeightNet(num_members=len(members), head="residual", anchor=0)
    save_checkpoint(path, net.state_dict(), arch="fusion_pixel", kwargs=net.config(), scale=4, input_range=1.0,
                    extra={"members": members})
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Member and fusion checkpoints, a prepared folder with one scored set, and the test stage's PNGs made
    from them by the stages' own functions."""
    root = tmp_path_factory.mktemp("ensemble")
    ckpts = {name: _member_checkpoint(root / f"{name}.pth", variant, seed)
             for seed, (name, variant) in enumerate(MEMBERS.items())}
    fusion = _fusion_checkpoint(root / "fusion.pth", list(MEMBERS))
    prepared, rng = root / "prepared", np.random.default_rng(0)
    for lr_dir, sizes in ((layout.fusion_train(prepared).lr, [(20, 20)]), (layout.val(prepared).lr, [(20, 20)]),
                          (layout.eval_set(prepared, "test").lr, [(24, 20), (19, 33)])):
        for i, (h, w) in enumerate(sizes):
            write_image(lr_dir / f"img{i}.png", smooth_image(rng, h, w))
    cache = root / "cache"
    for name, ckpt in ckpts.items():
        cache_outputs(accelerate(load_model(ckpt)), prepared, cache / name, scale=4, self_ensemble=True, tile=None,
                      tile_overlap=16, device=torch.device("cpu"))
    net, meta = load_fusion(fusion)
    fuse_eval_sets(net, "pixel", list(MEMBERS), cache, prepared, root / "test", self_ensemble=True,
                   device=torch.device("cpu"))
    file = root / "out" / layout.ENSEMBLE
    write_ensemble(file, ckpts, fusion, self_ensemble=True, tile=None, tile_overlap=16, cpu_isa="native",
                   threads=torch.get_num_threads())
    return {"root": root, "ckpts": ckpts, "fusion": fusion, "prepared": prepared, "file": file,
            "lr": sorted(layout.eval_set(prepared, "test").lr.glob("*.png")), "sr": root / "test" / layout.SR / "test"}


def test_the_ensemble_gives_the_test_stage_pixels_exactly(trained):
    ensemble = load_ensemble(trained["file"])
    assert ensemble.names == list(MEMBERS) and ensemble.self_ensemble and ensemble.tile is None
    for lr in trained["lr"]:
        ours, theirs = ensemble.upscale_image(read_image(lr)), read_image(trained["sr"] / lr.name)
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), lr.name
    # The plain ports are not the kernels the cache ran: close, but the check above is not vacuous.
    plain = load_ensemble(trained["file"], accelerated=False)
    diffs = [np.abs(plain.upscale_image(read_image(lr)).astype(int) - read_image(trained["sr"] / lr.name)).max()
             for lr in trained["lr"]]
    assert max(diffs) <= 1


def test_the_file_is_the_same_bytes_every_time_and_describes_itself(trained, tmp_path):
    again = tmp_path / "again.safetensors"
    write_ensemble(again, trained["ckpts"], trained["fusion"], self_ensemble=True, tile=None, tile_overlap=16,
                   cpu_isa="native", threads=torch.get_num_threads())
    assert again.read_bytes() == trained["file"].read_bytes()
    spec, tensors = read_ensemble(again)
    assert [m["name"] for m in spec["members"]] == list(MEMBERS)
    assert spec["members"][0]["model"]["variant"] == "swinir_tiny" and spec["fusion"]["arch"] == "fusion_pixel"
    assert spec["inference"] == {"self_ensemble": True, "tile": None, "tile_overlap": 16}
    assert {k.split(".")[0] for k in tensors} == {"members", "fusion"}


def test_a_folder_names_its_ensemble(trained, tmp_path):
    assert find_ensemble(trained["file"].parent) == trained["file"]
    mlflow_folder = tmp_path / "model" / "artifacts"
    mlflow_folder.mkdir(parents=True)
    (mlflow_folder / layout.ENSEMBLE).write_bytes(trained["file"].read_bytes())
    assert find_ensemble(tmp_path / "model") == mlflow_folder / layout.ENSEMBLE
    assert find_ensemble(trained["ckpts"]["rfdn"]) is None  # one model's checkpoint: not an ensemble
    with pytest.raises(CheckpointError, match=f"{tmp_path}: a folder without {layout.ENSEMBLE}"):
        find_ensemble(tmp_path)


def test_what_is_not_a_whole_ensemble_is_refused_in_one_line(trained, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(trained["file"].read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: not a readable safetensors file \(truncated"):
        load_ensemble(cut)
    single = tmp_path / "single.safetensors"
    save_checkpoint(single, torch.load(trained["ckpts"]["rfdn"], weights_only=True)["state_dict"],
                    arch="rfdn", variant="rfdn_tiny", kwargs=build_model("rfdn_tiny").kwargs, scale=4,
                    input_range=1.0)
    with pytest.raises(CheckpointError, match="single.safetensors: not an ensemble file"):
        read_ensemble(single)
    with pytest.raises(CheckpointError, match=r"fusion.pth: fuses \['swinir', 'rfdn'\], not \['rfdn', 'swinir'\]"):
        write_ensemble(tmp_path / "x.safetensors", dict(reversed(trained["ckpts"].items())), trained["fusion"],
                       self_ensemble=True, tile=None, tile_overlap=16, cpu_isa="native", threads=1)
    assert not (tmp_path / "x.safetensors").exists()


def test_upscale_and_eval_take_the_ensemble(trained, tmp_path, cli):
    out = tmp_path / "sr"
    code, _, _ = cli("upscale", "--weights", str(trained["file"].parent), *map(str, trained["lr"]), "-o", str(out))
    assert code == 0
    for lr in trained["lr"]:
        assert np.array_equal(read_image(out / lr.name), read_image(trained["sr"] / lr.name))
    code, _, err = cli("upscale", "--weights", str(trained["file"]), "--tile", "8", str(trained["lr"][0]),
                       "-o", str(tmp_path / "no"))
    assert code == 2 and err.strip().endswith("an ensemble runs with its own settings (x8, tiles, members' "
                                              "variants); drop --tile") and not (tmp_path / "no").exists()
    hr = tmp_path / "truth"
    for lr in trained["lr"]:  # the test stage's outputs as ground truth: PSNR is infinite, the table says so
        write_image(hr / lr.name, read_image(trained["sr"] / lr.name))
    code, table, _ = cli("eval", "--weights", str(trained["file"]), "--hr", str(hr), "--lr",
                         str(trained["lr"][0].parent), "--json", str(tmp_path / "r.json"))
    assert code == 0 and "fusion(swinir+rfdn)+se" in table
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["model"]["members"] == list(MEMBERS) and result["protocol"]["self_ensemble"] is True
    assert all(r["psnr_rgb"] == float("inf") for r in result["sets"]["truth"]["images"])


def test_the_registered_model_predicts_the_same_pixels(trained, tmp_path, cli, monkeypatch):
    import mlflow

    from srmodels.tracking.registry import log_ensemble_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp).info.run_id
    before = os.environ.get("MLFLOW_TRACKING_URI")
    info = log_ensemble_model(uri, run, trained["file"], registered_name="sr-ensemble", scores={"test.psnr_y": 30.5})
    # The process's own default store is untouched (other code of the process logs elsewhere).
    assert os.environ.get("MLFLOW_TRACKING_URI") == before and mlflow.get_tracking_uri() != uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert info.registered_model_version == 1
    assert client.get_model_version("sr-ensemble", "1").tags == {"test.psnr_y": "30.5"}
    model = mlflow.pyfunc.load_model("models:/sr-ensemble/1")
    for lr in trained["lr"]:
        [out] = model.predict(read_image(lr)[None])
        assert np.array_equal(out, read_image(trained["sr"] / lr.name))
    stored = Path(mlflow.artifacts.download_artifacts("models:/sr-ensemble/1", dst_path=str(tmp_path / "dl")))
    assert not list(stored.rglob("*.pkl")) and (stored / "artifacts" / layout.ENSEMBLE).is_file()
    with pytest.raises(mlflow.exceptions.MlflowException):  # the signature refuses other pixel types
        model.predict(read_image(trained["lr"][0])[None].astype(np.float32))
    # The command line fetches it by name; a wrong name or a store that is down is one line.
    lr = trained["lr"][0]
    code, _, _ = cli("upscale", "--weights", "models:/sr-ensemble/1", str(lr), "-o", str(tmp_path / "a"))
    assert code == 0 and np.array_equal(read_image(tmp_path / "a" / lr.name), read_image(trained["sr"] / lr.name))
    code, _, err = cli("upscale", "--weights", "models:/nosuch/1", str(lr), "-o", str(tmp_path / "b"))
    assert code == 2 and err.startswith(f"srmodels: error: models:/nosuch/1: no such model in {uri}")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "b").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
    code, _, err = cli("upscale", "--weights", "models:/sr-ensemble/1", str(lr), "-o", str(tmp_path / "c"))
    assert code == 2 and err.startswith("srmodels: error: models:/sr-ensemble/1: could not fetch it from "
                                        "http://127.0.0.1:9") and not (tmp_path / "c").exists()


def test_export_takes_the_ensemble_to_ntire_only(trained, tmp_path, cli):
    code, out, _ = cli("export", "--weights", str(trained["file"]), "--to", "ntire", "-o", str(tmp_path / "sub"),
                       "--team", "5", "--team-name", "Lab")
    assert code == 0 and "from models.team05_Lab import main" in out
    assert (tmp_path / "sub/model_zoo/team05_Lab" / layout.ENSEMBLE).read_bytes() == trained["file"].read_bytes()
    code, _, err = cli("export", "--weights", str(trained["file"]), "--to", "onnx", "-o", str(tmp_path / "x.onnx"))
    assert code == 2 and "the trained ensemble exports --to ntire" in err and not (tmp_path / "x.onnx").exists()

"""`srmodels export`: self-describing safetensors, the official layouts (run the official way), ONNX checked with
onnxruntime on sizes other than the traced one; the CLI's one-line errors."""
import errno
import importlib.util
import logging
import os
import re

import pytest
import torch

from srmodels import archs
from srmodels.models.checkpoint import checkpoint_meta, load_state_dict, read_checkpoint, save_checkpoint
from srmodels.cli import main
from srmodels.interop.export import FORMATS, ExportError, export_official, export_onnx, export_safetensors, official_state
from srmodels.models.fusion import AttentionWeightNet, ImageWeightNet, fuse
from srmodels.models.model import build_model, load_model

HAS_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnx/onnxruntime/onnxscript not installed (pip install -e '.[onnx]')")

# ONNX against PyTorch, max |difference| on the [0, 1] output scale, float32: 1e-5 is 1/390 of an 8-bit level.
# The tiny models measure 1e-7..4e-7; the library's own default (for full-size models) is 1e-4.
ONNX_ATOL = 1e-5
# The official RFDN run on 0-255 pixels with the folded weights against our model, on the [0, 1] scale.
FOLD_ATOL = 1e-5


def _ours(tmp_path, variant, name="ours.pth", **overrides):
    model = build_model(variant, overrides).eval()
    path = tmp_path / name
    save_checkpoint(path, model.net.state_dict(), **model.describe(), step=5, epoch=1,
                    provenance={"git_commit": "abc"})
    return model, path


def _fusion(tmp_path, kind="pixel", n=3):
    net = (AttentionWeightNet if kind == "pixel" else ImageWeightNet)(num_members=n)
    with torch.no_grad():  # default init gives near-uniform weights; make the fusion decide something
        for p in net.parameters():
            p.mul_(4)
    path = tmp_path / f"fusion_{kind}.pth"
    save_checkpoint(path, net.state_dict(), arch=f"fusion_{kind}", kwargs={"num_members": n}, scale=4,
                    input_range=1.0, extra={"members": ["dat", "swinir", "rfdn"][:n], "kind": kind})
    return net.eval(), path


# --------------------------------------------------------------------------------------------------- safetensors


def test_safetensors_export_of_ours_keeps_the_description(tmp_path):
    model, path = _ours(tmp_path, "swinir_tiny")
    out = export_safetensors(path, tmp_path / "ours.safetensors")
    assert checkpoint_meta(read_checkpoint(out)) == checkpoint_meta(read_checkpoint(path))
    loaded = load_model(out)  # no variant
    x = torch.rand(1, 3, 16, 21)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_safetensors_export_of_released_weights_describes_them(tmp_path):
    """BasicSR-wrapped weights without a description: --arch once, never again."""
    model = build_model("dat_tiny").eval()
    torch.save({"params_ema": model.net.state_dict()}, tmp_path / "DAT_tiny.pth")
    out = export_safetensors(tmp_path / "DAT_tiny.pth", tmp_path / "dat.safetensors", variant="dat_tiny")
    meta = checkpoint_meta(read_checkpoint(out))
    assert meta["variant"] == "dat_tiny" and meta["provenance"]["source"] == "DAT_tiny.pth"
    assert len(meta["provenance"]["source_sha256"]) == 64
    loaded = load_model(out)
    x = torch.rand(1, 3, 20, 17)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_safetensors_export_of_the_fusion_net(tmp_path):
    net, path = _fusion(tmp_path)
    out = export_safetensors(path, tmp_path / "fusion.safetensors")
    raw = read_checkpoint(out)
    assert checkpoint_meta(raw)["members"] == ["dat", "swinir", "rfdn"]
    reloaded = AttentionWeightNet(3)
    reloaded.load_state_dict(load_state_dict(out))
    x = torch.rand(1, 9, 12, 12)
    with torch.no_grad():
        assert torch.equal(reloaded(x), net(x))


# ------------------------------------------------------------------------------------------------------ official


@pytest.mark.parametrize("variant", ["dat_tiny", "swinir_tiny", "rrdbnet_tiny"])
def test_official_layout_is_basicsr_params(tmp_path, variant):
    """{'params': ...} with the upstream key names: what the official test scripts and spandrel load."""
    model, path = _ours(tmp_path, variant)
    out = export_official(path, tmp_path / "official.pth")
    raw = torch.load(out, weights_only=True)
    assert list(raw) == ["params"]
    want = model.net.state_dict()
    assert list(raw["params"]) == list(want) and all(torch.equal(raw["params"][k], want[k]) for k in want)
    net = archs.create(variant)
    net.load_state_dict(raw["params"], strict=True)  # the ports keep the official names (conformance tests)
    assert checkpoint_meta(read_checkpoint(out)) is None  # no description: the official layout has none


def test_official_rfdn_folds_the_input_range(tmp_path):
    """A [0, 1]-trained RFDN exported for the official 0-255 pipeline, run the official way, is our model."""
    model, path = _ours(tmp_path, "rfdn_tiny")
    assert model.input_range == 1.0
    state = official_state(path)
    assert "params" not in state and "fea_conv.weight" in state  # RFDN's bare dict
    official = archs.arch_class("rfdn")(**model.kwargs).eval()
    official.load_state_dict(state, strict=True)
    x = torch.rand(1, 3, 19, 23)
    with torch.no_grad():
        ours = model(x)
        theirs = official(x * 255.0) / 255.0  # the official script: 0-255 in, 0-255 out
        unfolded = model.net(x * 255.0) / 255.0
    assert (theirs - ours).abs().max() <= FOLD_ATOL
    assert (unfolded - ours).abs().max() > 100 * FOLD_ATOL  # the fold is what makes them agree


def test_official_rfdn_on_its_native_range_is_unchanged(tmp_path):
    model = build_model("rfdn_tiny")
    model.input_range = 255.0  # as RFDN_AIM.pth
    save_checkpoint(tmp_path / "r.pth", model.net.state_dict(), **model.describe())
    out = export_official(tmp_path / "r.pth", tmp_path / "RFDN.pth")
    raw = torch.load(out, weights_only=True)
    want = model.net.state_dict()
    assert list(raw) == list(want) and all(torch.equal(raw[k], want[k]) for k in want)
    back = load_model(out, "rfdn_tiny", input_range=255.0)  # read back as a released RFDN is
    x = torch.rand(1, 3, 16, 18)
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))


def test_official_refuses_a_range_that_does_not_fold(tmp_path):
    model = build_model("dat_tiny")
    save_checkpoint(tmp_path / "d.pth", model.net.state_dict(), **{**model.describe(), "input_range": 255.0})
    with pytest.raises(ExportError, match="does not fold"):
        export_official(tmp_path / "d.pth", tmp_path / "o.pth")
    assert not (tmp_path / "o.pth").exists()


def test_official_fusion_is_team27_layout(tmp_path):
    net, path = _fusion(tmp_path)
    raw = torch.load(export_official(path, tmp_path / "team27.pth"), weights_only=True)
    assert list(raw) == ["weight_net_state_dict"]
    reloaded = AttentionWeightNet(3)
    reloaded.load_state_dict(raw["weight_net_state_dict"], strict=True)


# ------------------------------------------------------------------------------------------------------------ CLI


def test_cli_export_round_trip(tmp_path, capsys):
    model, path = _ours(tmp_path, "rrdbnet_tiny")
    assert main(["export", "--weights", str(path), "--to", "safetensors", "-o", str(tmp_path / "m.safetensors")]) == 0
    assert main(["export", "--weights", str(tmp_path / "m.safetensors"), "--to", "official", "-o", str(tmp_path / "o.pth")]) == 0
    assert str(tmp_path / "o.pth") in capsys.readouterr().out
    raw = torch.load(tmp_path / "o.pth", weights_only=True)
    assert all(torch.equal(raw["params"][k], v) for k, v in model.net.state_dict().items())


@pytest.mark.parametrize("case,message", [
    ("missing", "checkpoint not found"),
    ("folder", "it is a folder"),
    ("arch", "unknown variant"),
    ("garbage", "not a readable safetensors file"),
    ("under-a-file", "is a file, so"),
])
def test_cli_export_errors_are_one_line(tmp_path, capsys, case, message):
    _, path = _ours(tmp_path, "rfdn_tiny")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (tmp_path / "dir").mkdir()
    args = {"missing": ["--weights", str(tmp_path / "nope.pth"), "-o", str(tmp_path / "x.safetensors")],
            "folder": ["--weights", str(path), "-o", str(tmp_path / "dir")],
            "arch": ["--weights", str(path), "-o", str(tmp_path / "x.safetensors"), "--arch", "dat_huge"],
            "garbage": ["--weights", str(tmp_path / "bad.safetensors"), "-o", str(tmp_path / "x.safetensors")],
            "under-a-file": ["--weights", str(path), "-o", str(path / "x.safetensors")]}[case]
    assert main(["export", "--to", "safetensors", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("srmodels: error:") and message in err[0], err


def _one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("srmodels: error:"), err
    return err[0]


def _no_export_work(monkeypatch):
    """Fail the test if the export reads the checkpoint (or loads the ONNX exporter) before checking its output."""
    def refuse(*_, **__):
        raise AssertionError("export work began before the output was checked")
    monkeypatch.setattr("srmodels.interop.export._load", refuse)
    monkeypatch.setattr("srmodels.interop.export._onnx_modules", refuse)


@pytest.mark.parametrize("to", FORMATS)
@pytest.mark.parametrize("where", ["in-it", "folder-to-make"])
def test_cli_export_into_a_read_only_folder_is_one_line_before_any_work(tmp_path, capsys, monkeypatch,
                                                                        read_only_folder, to, where):
    """Was a traceback for every format (PermissionError, SafetensorError, RuntimeError), ONNX's after ~8 s."""
    _, path = _ours(tmp_path, "rfdn_tiny", nf=8)
    _no_export_work(monkeypatch)
    out = read_only_folder / (f"m.{to}" if where == "in-it" else f"sub/m.{to}")
    assert main(["export", "--weights", str(path), "--to", to, "-o", str(out)]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"srmodels: error: {read_only_folder}: cannot write") and "Permission denied" in line
    assert f"m.{to}" in line and list(read_only_folder.iterdir()) == []


@pytest.mark.parametrize("to", FORMATS)
def test_cli_export_under_a_file_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, to):
    _, path = _ours(tmp_path, "rfdn_tiny", nf=8)
    (tmp_path / "notes.txt").write_text("a file")
    _no_export_work(monkeypatch)
    assert main(["export", "--weights", str(path), "--to", to, "-o", str(tmp_path / "notes.txt" / f"m.{to}")]) == 2
    assert f"{tmp_path / 'notes.txt'}: is a file, so" in _one_line(capsys)
    assert (tmp_path / "notes.txt").read_text() == "a file"


def _writer_fails_half_way(monkeypatch, to):
    """The format's writer writes part of its file, then fails as on a full disk."""
    def partial_then_full(path):
        with open(path, "wb") as f:
            f.write(b"partial")
        if to == "safetensors":  # what safetensors' writer raises for an I/O error
            from safetensors import SafetensorError
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if to == "official":
        monkeypatch.setattr(torch, "save", lambda obj, f, *args, **kwargs: partial_then_full(f))
    elif to == "safetensors":
        monkeypatch.setattr("safetensors.torch.save_file",
                            lambda tensors, filename, **kwargs: partial_then_full(filename))
    else:
        monkeypatch.setattr(torch.onnx, "export", lambda model, args, f, **kwargs: partial_then_full(f))


@pytest.mark.parametrize("to", [t if t != "onnx" else pytest.param(t, marks=needs_ort) for t in FORMATS])
def test_cli_export_failing_half_way_leaves_nothing(tmp_path, capsys, monkeypatch, to):
    _, path = _ours(tmp_path, "rfdn_tiny", nf=8)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f"m.{to}").write_bytes(b"the user's file")
    _writer_fails_half_way(monkeypatch, to)
    assert main(["export", "--weights", str(path), "--to", to, "-o", str(tmp_path / "out" / f"m.{to}")]) == 2
    line = _one_line(capsys)
    assert f"m.{to}: cannot write the export" in line and "No space left on device" in line
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"m.{to}"]  # no temporary file left
    assert (tmp_path / "out" / f"m.{to}").read_bytes() == b"the user's file"  # and the old file kept
    assert main(["export", "--weights", str(path), "--to", to, "-o", str(tmp_path / "new" / "sub" / f"m.{to}")]) == 2
    assert not (tmp_path / "new").exists()  # the folders made for it are gone again


# ----------------------------------------------------------------------------------------------------------- ONNX

# Tiny variants, narrowed further where it keeps every code path (shifted and plain windows, padding, both DAT
# attentions): export time grows with the graph, not with the channels. SwinIR: one residual group of a plain and a
# shifted block (a second group repeats the same ops). DAT keeps two groups: the shifted spatial block is the
# first of the second group.
_ONNX_MODELS = {
    "dat_tiny": dict(embed_dim=32, num_heads=[2, 2]),  # narrower gives DAT's position-bias MLP zero width
    "swinir_tiny": dict(embed_dim=12, depths=[2], num_heads=[2]),
    "rfdn_tiny": dict(nf=8),
    "rrdbnet_tiny": dict(num_feat=8, num_block=1, num_grow_ch=4),
}


def _ort_run(path, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, session.run(None, {k: v.numpy() for k, v in feeds.items()})


def _assert_runs_at_any_size(path, model):
    """The exported graph has symbolic height and width and, run by onnxruntime, is ``model`` within ONNX_ATOL on
    sizes other than the export's own: odd on both sides, and multiples of every window (no padding at all: the
    traced graph padded), the smallest allowed among them."""
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(path)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[2].dim_param and dims[3].dim_param  # height and width symbolic, not the traced 20x28
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for h, w in ((17, 45), (24, 32), (16, 16)):
        x = torch.rand(1, 3, h, w)
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            want = model(x)
        assert got.shape == (1, 3, 4 * h, 4 * w)
        assert (torch.from_numpy(got) - want).abs().max() <= ONNX_ATOL, (h, w)


# RFDN goes through the CLI in the fast subset (test_onnx_cli_exports_rfdn_...: the whole export, onnxruntime at
# three more sizes). The other backbones' exports take 3-15 s each on 2 cores: slow. In the fast subset
# test_accelerated_layers_step_aside_under_export[...] traces each of them with symbolic sizes (torch.export, the
# ONNX exporter's first half) and checks its numbers at another size.
@needs_ort
@pytest.mark.slow
@pytest.mark.parametrize("variant", [v for v in _ONNX_MODELS if v != "rfdn_tiny"])
def test_onnx_backbone_dynamic_size(tmp_path, variant):
    model, path = _ours(tmp_path, variant, **_ONNX_MODELS[variant])
    check = export_onnx(path, tmp_path / "m.onnx")
    print(check.summary())  # the measured differences, in the test log (-s)
    assert check.opset >= 17 and len(check.sizes) == 2 and max(check.max_abs_diff) <= ONNX_ATOL
    _assert_runs_at_any_size(check.path, model)


@needs_ort
@pytest.mark.parametrize("kind", ["pixel", "image"])
def test_onnx_fusion_net(tmp_path, kind):
    net, path = _fusion(tmp_path, kind)
    check = export_onnx(path, tmp_path / "fusion.onnx")
    print(check.summary())
    assert check.inputs == (["members"] if kind == "pixel" else ["members", "lr"])
    assert check.outputs == ["fused", "weights"] and max(check.max_abs_diff) <= ONNX_ATOL
    outputs, lr = torch.rand(1, 9, 68, 100), torch.rand(1, 3, 17, 25)
    feeds = {"members": outputs} if kind == "pixel" else {"members": outputs, "lr": lr}
    _, (fused, weights) = _ort_run(check.path, feeds)
    with torch.no_grad():
        want_w = net(outputs if kind == "pixel" else lr)
        want = fuse(outputs, want_w)
    assert (torch.from_numpy(weights) - want_w).abs().max() <= ONNX_ATOL
    assert (torch.from_numpy(fused) - want).abs().max() <= ONNX_ATOL


@needs_ort
@pytest.mark.slow  # a whole backbone through the ONNX exporter and onnxruntime at four sizes
def test_onnx_cli_exports_rfdn_reports_the_difference_and_refuses_old_opsets(tmp_path, capsys):
    """`srmodels export --to onnx` of RFDN: the printed check (two sizes, each within the tolerance), opset >= 17,
    and the graph runs at any size (test_onnx_backbone_dynamic_size's checks, which are slow for the other
    backbones: this is the fast subset's whole backbone export)."""
    import onnx

    model, path = _ours(tmp_path, "rfdn_tiny", **_ONNX_MODELS["rfdn_tiny"])
    assert main(["export", "--weights", str(path), "--to", "onnx", "-o", str(tmp_path / "r.onnx")]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime vs PyTorch max |diff|" in out and (tmp_path / "r.onnx").is_file()
    diffs = re.findall(r"LR (\d+)x(\d+): ([0-9.e+-]+)", out)
    assert len(diffs) == 2 and all(float(d) <= ONNX_ATOL for _, _, d in diffs), out
    opset = max(o.version for o in onnx.load(str(tmp_path / "r.onnx")).opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 17
    _assert_runs_at_any_size(tmp_path / "r.onnx", model)
    assert main(["export", "--weights", str(path), "--to", "onnx", "--opset", "13", "-o", str(tmp_path / "old.onnx")]) == 2
    assert "opset >= 17" in capsys.readouterr().err and not (tmp_path / "old.onnx").exists()


@pytest.mark.parametrize("variant, overrides", [("swinir_tiny", _ONNX_MODELS["swinir_tiny"]), ("rrdbnet_tiny", {}),
                                                ("dat_tiny", _ONNX_MODELS["dat_tiny"])],
                         ids=["swinir", "rrdbnet", "dat"])
def test_accelerated_layers_step_aside_under_export(variant, overrides):
    """An accelerated model traces to the plain port's ops (no oneDNN kernels), with symbolic height and width, and
    gives the plain model's numbers at a size other than the traced one."""
    from torch.export import Dim

    from srmodels.models.accelerate import accelerate

    model = build_model(variant, overrides).eval()
    fast = accelerate(build_model(variant, overrides).eval())
    fast.load_state_dict(model.state_dict())
    # Dim.DYNAMIC: with named Dims torch.export refuses guards it cannot prove for every size (the padding),
    # which torch.onnx.export defers to run time
    program = torch.export.export(fast, (torch.rand(1, 3, 20, 28),),
                                  dynamic_shapes=({2: Dim.DYNAMIC, 3: Dim.DYNAMIC},))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("mkldnn" in t for t in targets), sorted(t for t in targets if "mkldnn" in t)
    x = torch.rand(1, 3, 23, 37)
    with torch.no_grad():
        got, want = program.module()(x), model(x)
    assert got.shape == want.shape == (1, 3, 92, 148)
    assert (got - want).abs().max() <= ONNX_ATOL


def test_export_names_its_weights_like_every_subcommand(tmp_path, capsys, caplog):
    """--weights, as eval and upscale take them; the positional form still works, with a deprecation warning."""
    _, path = _ours(tmp_path, "rfdn_tiny")
    assert main(["export", "--weights", str(path), "--to", "safetensors", "-o", str(tmp_path / "a.safetensors")]) == 0
    with caplog.at_level(logging.WARNING, logger="srmodels"):
        assert main(["export", str(path), "--to", "safetensors", "-o", str(tmp_path / "b.safetensors")]) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"`srmodels export WEIGHTS` is deprecated; write `--weights {path}`"]
    a, b = (read_checkpoint(tmp_path / f"{x}.safetensors") for x in "ab")  # safetensors orders metadata freely
    assert checkpoint_meta(a) == checkpoint_meta(b)
    sa, sb = (load_state_dict(tmp_path / f"{x}.safetensors") for x in "ab")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    capsys.readouterr()
    assert main(["export", "--to", "safetensors", "-o", str(tmp_path / "c.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == "srmodels: error: --weights: required (the checkpoint to use)"
    assert main(["export", str(path), "--weights", str(tmp_path / "other.pth"), "--to", "safetensors",
                 "-o", str(tmp_path / "c.safetensors")]) == 2
    assert "name the weights once" in capsys.readouterr().err
    assert not (tmp_path / "c.safetensors").exists()

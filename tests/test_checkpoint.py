"""Checkpoint loading: every wrapping, safety, strict reports, self-describing round trip."""
import json

import pytest
import torch
from torch import nn

from srmodels.core.provenance import git_commit, params_hash
from srmodels.models import checkpoint as ckpt
from srmodels.models.checkpoint import CheckpointError, load_into, load_state_dict, save_checkpoint, unwrap_state_dict

from .helpers import reference_path


def _sd():
    return {"conv.weight": torch.randn(2, 3, 3, 3), "conv.bias": torch.randn(2)}


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"params": sd},
    lambda sd: {"params_ema": sd},
    lambda sd: {"weight_net_state_dict": sd, "epoch": 3, "optimizer_state_dict": {"state": {}}},
    lambda sd: {k.replace("conv", "module.conv"): v for k, v in sd.items()},
    lambda sd: {"params": {"_orig_mod.module." + k: v for k, v in sd.items()}},
])
def test_wrappings_unwrap(tmp_path, wrap):
    sd = _sd()
    path = tmp_path / "w.pth"
    torch.save(wrap(sd), path)
    got = load_state_dict(path)
    assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_params_ema_preferred(tmp_path):
    a, b = _sd(), _sd()
    torch.save({"params": a, "params_ema": b}, tmp_path / "w.pth")
    assert torch.equal(load_state_dict(tmp_path / "w.pth")["conv.bias"], b["conv.bias"])


def test_esrgan_names_mapped():
    old = {"conv_first.weight": torch.zeros(1), "RRDB_trunk.0.RDB1.conv1.weight": torch.zeros(1),
           "RRDB_trunk.12.RDB3.conv5.bias": torch.zeros(1), "trunk_conv.weight": torch.zeros(1),
           "upconv1.weight": torch.zeros(1), "upconv2.bias": torch.zeros(1), "HRconv.weight": torch.zeros(1),
           "conv_last.bias": torch.zeros(1)}
    assert list(unwrap_state_dict(old)) == [
        "conv_first.weight", "body.0.rdb1.conv1.weight", "body.12.rdb3.conv5.bias", "conv_body.weight",
        "conv_up1.weight", "conv_up2.bias", "conv_hr.weight", "conv_last.bias"]


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/srmodels-pwned", "w"))


def test_malicious_pickle_refused_and_not_executed(tmp_path):
    import os
    marker = "/tmp/srmodels-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pth"
    torch.save({"params": _sd(), "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_state_dict(path)
    assert not os.path.exists(marker)


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_state_dict(tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "nope.pth")
    torch.save({"epoch": 3}, tmp_path / "nosd.pth")
    with pytest.raises(CheckpointError, match="no state dict"):
        load_state_dict(tmp_path / "nosd.pth")


def test_strict_report_names_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 3, 1))
    sd = model.state_dict()
    bad = dict(sd)
    bad.pop("1.bias")
    bad["0.weight"] = torch.zeros(5, 3, 3, 3)
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_into(model, bad)
    msg = str(err.value)
    assert "missing (1): 1.bias" in msg and "unexpected (1): extra.weight" in msg and "0.weight" in msg
    report = load_into(model, bad, strict=False)
    assert len(report) == 3


def test_self_describing_round_trip(tmp_path):
    from srmodels.models.model import build_model, load_model

    model = build_model("rfdn_tiny")
    path = tmp_path / "ours.pth"
    save_checkpoint(path, model.net.state_dict(), **model.describe(), step=7, epoch=2,
                    provenance={"git_commit": git_commit(), "params_hash": params_hash({"a": 1})})
    raw = torch.load(path, weights_only=True)
    meta = ckpt.checkpoint_meta(raw)
    assert meta["arch"] == "rfdn" and meta["scale"] == 4 and meta["step"] == 7 and meta["input_range"] == 1.0
    loaded = load_model(path)  # no variant needed
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_released_rfdn_recognised_and_scaled(tmp_path):
    from srmodels.models.model import load_model

    path = reference_path("weights", "RFDN_AIM.pth")
    model = load_model(path)  # recognised from its keys and shapes
    assert model.variant == "rfdn" and model.input_range == 255.0
    raw = torch.load(reference_path("fixtures", "rfdn", "released_RFDN_AIM", "inputs.pt"), weights_only=True)
    out = torch.load(reference_path("fixtures", "rfdn", "released_RFDN_AIM", "outputs.pt"), weights_only=True)
    key = sorted(raw)[0]
    with torch.no_grad():
        y = model(raw[key] / 255.0) * 255.0  # the wrapper takes [0,1]
    assert torch.allclose(y, out[key], atol=1e-2 * 2, rtol=0)


def test_wrong_architecture_names_keys(tmp_path):
    from srmodels.models.model import load_model

    path = reference_path("weights", "RFDN_AIM.pth")
    with pytest.raises(CheckpointError, match="missing .*conv_first"):
        load_model(path, "rrdbnet_tiny")


# ------------------------------------------------------------------------------------ damaged files: the reason


def _saved(tmp_path, **kwargs) -> bytes:
    torch.save({"params": {"w": torch.arange(4096, dtype=torch.float32)}}, tmp_path / "whole.pth", **kwargs)
    return (tmp_path / "whole.pth").read_bytes()


def _reason(path) -> str:
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "\n" not in msg and "()" not in msg, msg
    return msg


def test_truncated_zip_checkpoint_says_why(tmp_path):
    blob = _saved(tmp_path)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(blob[: len(blob) // 2])
    assert "truncated or corrupt zip archive" in _reason(cut)


def test_empty_and_foreign_files_say_why(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty file (0 bytes)" in _reason(tmp_path / "empty.pth")
    (tmp_path / "notes.pth").write_bytes(b"hello, not a checkpoint")
    assert "neither a zip archive nor a pickle" in _reason(tmp_path / "notes.pth")


def test_corrupt_zip_member_is_not_called_unsafe(tmp_path):
    # A flipped byte inside the pickle makes torch's weights-only unpickler complain; the CRC says why.
    blob = bytearray(_saved(tmp_path))
    start = blob.index(b"data.pkl") + 200
    blob[start] ^= 0xFF
    (tmp_path / "flipped.pth").write_bytes(bytes(blob))
    msg = _reason(tmp_path / "flipped.pth")
    assert "CRC" in msg and "arbitrary unpickling" not in msg


def test_truncated_legacy_checkpoint_says_why(tmp_path):
    blob = _saved(tmp_path, _use_new_zipfile_serialization=False)
    (tmp_path / "cut.pth").write_bytes(blob[: len(blob) - 100])
    assert "not a readable torch checkpoint (RuntimeError: unexpected EOF" in _reason(tmp_path / "cut.pth")


def test_refusal_names_what_was_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"params": Payload()}, tmp_path / "evil.pth")
    assert "Unsupported global: GLOBAL print" in _reason(tmp_path / "evil.pth")


# ------------------------------------------------------------------- other toolkits' wrappings and safetensors


@pytest.mark.parametrize("wrap", [
    lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {"state": {}}, "epoch": 9},
    lambda sd: {"params-ema": sd},
    lambda sd: {"net": sd},
    lambda sd: {"net_g": sd},
    lambda sd: {"netG": sd},
    lambda sd: {"netG." + k: v for k, v in sd.items()},
    lambda sd: {"params": {"net_g." + k: v for k, v in sd.items()}},
    lambda sd: {"state_dict": {"params_ema": sd}, "step": 3},  # a trainer state around a BasicSR dict
], ids=["model_state_dict", "params-ema", "net", "net_g", "netG", "netG-prefix", "net_g-prefix", "nested"])
def test_other_toolkits_wrappings_unwrap(tmp_path, wrap):
    sd = _sd()
    torch.save(wrap(sd), tmp_path / "w.pth")
    got = load_state_dict(tmp_path / "w.pth")
    assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_common_prefix_stripped_only_when_every_key_has_it():
    sd = {"netG.conv.weight": torch.zeros(1), "conv_last.weight": torch.zeros(1)}
    assert list(unwrap_state_dict(sd)) == ["netG.conv.weight", "conv_last.weight"]


def test_params_ema_dash_preferred_over_params(tmp_path):
    a, b = _sd(), _sd()
    torch.save({"params": a, "params-ema": b}, tmp_path / "w.pth")
    assert torch.equal(load_state_dict(tmp_path / "w.pth")["conv.bias"], b["conv.bias"])


@pytest.mark.parametrize("prefix", ["", "module.", "netG."])
def test_bare_safetensors_of_other_toolkits(tmp_path, prefix):
    from safetensors.torch import save_file

    sd = _sd()
    save_file({prefix + k: v for k, v in sd.items()}, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    got = load_state_dict(tmp_path / "w.safetensors")
    # safetensors keeps no key order (its header is sorted): the same keys and tensors
    assert sorted(got) == sorted(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert ckpt.checkpoint_meta(ckpt.read_checkpoint(tmp_path / "w.safetensors")) is None


def test_safetensors_esrgan_names_and_released_variant(tmp_path):
    """An ESRGAN-named RRDBNet written by another toolkit loads by its keys and shapes alone."""
    from safetensors.torch import save_file

    from srmodels.models.model import build_model, load_model

    model = build_model("rrdbnet_tiny")
    renames = {"conv_body.": "trunk_conv.", "conv_up1.": "upconv1.", "conv_up2.": "upconv2.", "conv_hr.": "HRconv."}

    def esrgan(key: str) -> str:  # xinntao/ESRGAN's names, written out independently of the loader's table
        head, _, rest = key.partition(".")
        if head == "body":
            block, rdb, tail = rest.split(".", 2)
            return f"RRDB_trunk.{block}.{rdb.upper()}.{tail}"
        return next((new + key[len(old):] for old, new in renames.items() if key.startswith(old)), key)

    old = {esrgan(k): v for k, v in model.net.state_dict().items()}
    assert "RRDB_trunk.0.RDB1.conv1.weight" in old
    save_file(old, str(tmp_path / "esrgan.safetensors"))
    with pytest.raises(CheckpointError, match="pass --arch"):  # rrdbnet_tiny and _small share their shapes
        load_model(tmp_path / "esrgan.safetensors")
    loaded = load_model(tmp_path / "esrgan.safetensors", "rrdbnet_tiny")
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("variant", ["rfdn_tiny", "swinir_tiny"])
def test_safetensors_self_describing_round_trip(tmp_path, variant):
    """The same description through .pth and .safetensors; the safetensors file needs no variant."""
    from srmodels.models.model import build_model, load_model

    model = build_model(variant)
    fields = dict(step=7, epoch=2, provenance={"git_commit": "abc+dirty", "params_hash": params_hash({"a": 1})},
                  extra={"val_psnr": 31.25, "members": ["dat", "rfdn"]})
    save_checkpoint(tmp_path / "ours.pth", model.net.state_dict(), **model.describe(), **fields)
    save_checkpoint(tmp_path / "ours.safetensors", model.net.state_dict(), **model.describe(), **fields)
    from_pth = ckpt.checkpoint_meta(ckpt.read_checkpoint(tmp_path / "ours.pth"))
    from_st = ckpt.checkpoint_meta(ckpt.read_checkpoint(tmp_path / "ours.safetensors"))
    assert from_st == from_pth and from_st["kwargs"] == model.kwargs and from_st["input_range"] == 1.0
    # The metadata is plain strings (the safetensors format), each field JSON that other tools can read.
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt" and metadata["srmodels_format"] == ckpt.FORMAT
    assert json.loads(metadata["arch"]) == model.arch and json.loads(metadata["scale"]) == 4
    loaded = load_model(tmp_path / "ours.safetensors")
    assert loaded.variant == variant
    x = torch.rand(1, 3, 16, 20)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_safetensors_keeps_input_range(tmp_path):
    from srmodels.models.model import build_model, load_model

    model = build_model("rfdn_tiny")
    model.input_range = 255.0
    save_checkpoint(tmp_path / "r.safetensors", model.net.state_dict(), **model.describe())
    assert load_model(tmp_path / "r.safetensors").input_range == 255.0


def test_renamed_files_load_by_content(tmp_path):
    from srmodels.models.model import build_model

    model = build_model("rfdn_tiny")
    save_checkpoint(tmp_path / "st.safetensors", model.net.state_dict(), **model.describe())
    (tmp_path / "st.pth").write_bytes((tmp_path / "st.safetensors").read_bytes())
    assert ckpt.checkpoint_meta(ckpt.read_checkpoint(tmp_path / "st.pth"))["arch"] == "rfdn"
    torch.save({"params": model.net.state_dict()}, tmp_path / "torch.safetensors")
    got, want = load_state_dict(tmp_path / "torch.safetensors"), model.net.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_pickle_named_safetensors_is_not_executed(tmp_path):
    import os
    marker = "/tmp/srmodels-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    torch.save({"params": _sd(), "payload": _Evil()}, tmp_path / "evil.safetensors")
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_state_dict(tmp_path / "evil.safetensors")
    assert not os.path.exists(marker)


def _safetensors_blob(tmp_path) -> bytes:
    from safetensors.torch import save_file

    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(tmp_path / "whole.safetensors"))
    return (tmp_path / "whole.safetensors").read_bytes()


@pytest.mark.parametrize("damage,reason", [
    (lambda b: b[:5], "not even the 8-byte header length"),
    (lambda b: b[:40], "truncated: the header alone needs"),
    (lambda b: b[:-100], "truncated: its tensors need"),
    (lambda b: b"", "empty file"),
    (lambda b: b"just some text, not tensors", "not safetensors"),
], ids=["cut-length", "cut-header", "cut-data", "empty", "text"])
def test_damaged_safetensors_say_why(tmp_path, damage, reason):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(damage(_safetensors_blob(tmp_path)))
    assert reason in _reason(path)


def test_our_metadata_missing_fields_is_one_line(tmp_path):
    from safetensors.torch import save_file

    save_file(_sd(), str(tmp_path / "half.safetensors"), metadata={"srmodels_format": ckpt.FORMAT, "arch": '"rfdn"'})
    assert "lacks kwargs, scale, input_range" in _reason(tmp_path / "half.safetensors")


def test_metadata_that_json_cannot_hold_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'provenance'"):
        save_checkpoint(tmp_path / "x.safetensors", _sd(), arch="rfdn", kwargs={}, scale=4, input_range=1.0,
                        provenance={"when": object()})
    assert not (tmp_path / "x.safetensors").exists()

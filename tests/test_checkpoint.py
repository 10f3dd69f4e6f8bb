"""Checkpoint loading: every wrapping, safety, strict reports, self-describing round trip."""
import io
import pickle

import pytest
import torch
from torch import nn

from srmodels import checkpoint as ckpt
from srmodels.checkpoint import CheckpointError, load_into, load_state_dict, save_checkpoint, unwrap_state_dict

from .conftest import reference_path


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
    from srmodels.model import build_model, load_model

    model = build_model("rfdn_tiny")
    path = tmp_path / "ours.pth"
    save_checkpoint(path, model.net.state_dict(), **model.describe(), step=7, epoch=2,
                    provenance={"git_commit": ckpt.git_commit(), "params_hash": ckpt.params_hash({"a": 1})})
    raw = torch.load(path, weights_only=True)
    meta = ckpt.checkpoint_meta(raw)
    assert meta["arch"] == "rfdn" and meta["scale"] == 4 and meta["step"] == 7 and meta["input_range"] == 1.0
    loaded = load_model(path)  # no variant needed
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_released_rfdn_recognised_and_scaled(tmp_path):
    from srmodels.model import load_model

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
    from srmodels.model import load_model

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

"""The CPU instruction-set pin: environment, refusal when too late, and the same bits on every x86-64 CPU.

The pin acts when torch loads, so everything that checks its effect runs in a subprocess.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

from srmodels.core import isa
from srmodels.core.errors import UserError

from .helpers import ROOT

needs_avx2 = pytest.mark.skipif("avx2" not in isa.cpu_flags() or "fma" not in isa.cpu_flags(),
                                reason="this CPU has no AVX2/FMA: the avx2 pin cannot run here")

# A tiny training step and inference of each architecture family, through every kind of kernel the pin governs:
# oneDNN convolutions and packed linears, MKL matmuls (attention, Winograd's batched products), ATen's
# vectorised element-wise ops, softmax, GELU, LayerNorm and Adam. Prints the ATen level and a hash of the bits.
PROBE = r"""
import sys
sys.path.insert(0, {root!r})  # this checkout's srmodels, whatever is installed
from srmodels.core import isa
isa.pin(sys.argv[1])
import hashlib
import torch
from srmodels.models.accelerate import accelerate, winograd_conv3x3
from srmodels.models.model import build_model
from srmodels.core.runtime import seed_everything, set_threads

set_threads(2)
seed_everything(0)
digest = hashlib.sha256()
for variant in ("dat_tiny", "swinir_tiny", "rfdn_tiny", "rrdbnet_tiny"):
    model = build_model(variant)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 24, 20, generator=g), torch.rand(2, 3, 96, 80, generator=g)
    for _ in range(2):
        loss = (model(x) - y).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    accelerate(model.eval())  # the inference kernels the cache stage runs
    with torch.inference_mode():
        digest.update(model(torch.rand(1, 3, 37, 29, generator=g)).numpy().tobytes())
    for p in model.parameters():
        digest.update(p.detach().numpy().tobytes())
g = torch.Generator().manual_seed(2)
w, b = torch.randn(128, 128, 3, 3, generator=g) * 0.03, torch.randn(128, generator=g)
with torch.inference_mode():
    digest.update(winograd_conv3x3(torch.randn(1, 128, 21, 26, generator=g), w, b).numpy().tobytes())
print(torch.backends.cpu.get_cpu_capability(), digest.hexdigest())
"""
# What the probe gives under the avx2 pin, by CPU vendor: an AVX-512 AMD EPYC, and an AVX-512 Intel Xeon (2 MiB
# L2 per core). Within a vendor the pin makes the bits independent of the instruction set; across vendors they
# differ (docs/reproducibility.md, "Across CPU vendors"). A change of a digest is a change of every number.
AVX2_DIGESTS = {"AuthenticAMD": "4e5104928ee528a4aef99c3ac534d6e046b9988a7654af525a51794e10dc4cc4",
                "GenuineIntel": "1066c786441d56221fe080c438dff939a094a68306aeab206aaada6489a29d23"}


@functools.lru_cache(maxsize=None)
def run_probe(level: str, ambient: str = "native") -> tuple[str, str]:
    """(ATen capability, digest) of the probe pinned to ``level`` in a process started with ``ambient``'s pin."""
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)), level], capture_output=True,
                         text=True, env={**os.environ, **isa.environment(ambient)}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    capability, digest = out.stdout.split()
    return capability, digest


def test_levels_map_to_the_three_libraries():
    assert isa.environment("avx2") == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                       "MKL_CBWR": "AVX2,STRICT"}
    assert isa.environment("native") == {}
    assert isa.level_below("avx512") == "avx2" and isa.level_below("avx2") == "sse41"
    with pytest.raises(UserError, match="cpu_isa: 'avx3' is not one of"):
        isa.environment("avx3")


def test_pinning_after_torch_loaded_is_refused(monkeypatch):
    import torch  # noqa: F401  (loaded by the test session anyway)

    for key, value in isa.environment("sse41").items():
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(UserError, match="must be pinned before torch is imported"):
        isa.pin("sse41")


def test_a_level_the_cpu_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(isa, "cpu_flags", lambda: {"sse4_1", "sse4_2"})
    with pytest.raises(UserError, match="needs CPU features this CPU lacks"):
        isa.pin("avx2")


@needs_avx2
@pytest.mark.slow  # four child processes, one per kernel level
def test_the_avx2_pin_gives_the_recorded_bits_whatever_the_isa_and_the_ambient_environment():
    capability, digest = run_probe("avx2")
    assert capability == "AVX2"
    # The pin overrides whatever the environment said before (e.g. CI's lower-level test run).
    assert run_probe("avx2", ambient="sse41")[1] == digest
    vendor = isa.cpu_vendor()
    if vendor not in AVX2_DIGESTS:
        pytest.skip(f"no digest recorded for {vendor} CPUs ({isa.cpu_model()}): this one gives {digest}")
    assert digest == AVX2_DIGESTS[vendor], (
        f"pinned avx2 bits changed on {isa.cpu_model()}: {digest}. Either a kernel escaped the pin on this CPU, "
        "or the code changed the numerics (then every committed metric changes too: re-record all)")


@needs_avx2
def test_the_pin_is_what_changes_the_kernels():
    # Without a pin a CPU runs its own best kernels; the sse41 pin runs ATen's portable ones, other bits.
    assert run_probe("sse41")[0] == "DEFAULT"
    assert run_probe("sse41")[1] != run_probe("avx2")[1]


def test_provenance_names_the_pin_the_kernels_and_the_versions():
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from srmodels.core import isa; isa.pin('native'); "
              "import json; print(json.dumps(isa.provenance()))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    prov = json.loads(out.stdout)
    assert prov["cpu_isa"] == "native" and prov["torch"] and prov["cpu_model"]
    assert prov["onednn"].startswith("v") and prov["mkl"] != ""


@needs_avx2
@pytest.mark.slow  # the command line in its own process
def test_the_command_line_pins_before_torch_loads(tmp_path):
    import numpy as np
    import torch

    from srmodels.models.checkpoint import save_checkpoint
    from srmodels.data.images import write_image
    from srmodels.models.model import build_model

    torch.manual_seed(0)
    model = build_model("rfdn_tiny")
    save_checkpoint(tmp_path / "m.pth", model.net.state_dict(), **model.describe())
    write_image(tmp_path / "hr" / "a.png", np.random.default_rng(0).integers(0, 256, (80, 72, 3), dtype=np.uint8))
    env = {k: v for k, v in os.environ.items() if k not in isa.environment("avx2") and k != isa.ENV_VAR}
    command = [sys.executable, "-m", "srmodels", "eval", "--weights", str(tmp_path / "m.pth"),
               "--hr", str(tmp_path / "hr"), "--json", str(tmp_path / "r.json")]
    done = subprocess.run([*command, "--cpu-isa", "avx2"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    import json

    machine = json.loads((tmp_path / "r.json").read_text())["machine"]
    assert machine["cpu_isa"] == "avx2" and machine["aten_capability"] == "AVX2"
    # Through `python -m srmodels.cli` torch loads first: the pin is refused in one line, not silently skipped.
    late = subprocess.run([sys.executable, "-m", "srmodels.cli", *command[3:], "--cpu-isa", "avx2"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert late.returncode == 2 and late.stderr.strip().count("\n") == 0
    assert "must be pinned before torch is imported" in late.stderr

"""srmodels.core.runtime: device choice and the malloc setting the CLI and stages apply."""
import platform
import subprocess
import sys

import pytest
import torch

from srmodels.core.runtime import resolve_device


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_is_accepted_by_glibc():
    # In a child process, since the setting is process-wide. True: mallopt took all three settings.
    code = "from srmodels.core.runtime import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.split() == ["True"]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")

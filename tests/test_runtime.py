"""srmodels.core.runtime: device choice and the malloc setting the CLI and stages apply."""
import json
import platform
import subprocess
import sys

import pytest
import torch

from srmodels.core.runtime import resolve_device


# Where malloc serves a block from, and whether free gives it back: glibc's mallinfo2() before and after a malloc
# and its free. Prints {"ok": keep_freed_memory() (or null when not called), size in MiB: [mapped, heap growth,
# heap growth left after free, mapped left after free], ...} in MiB.
MALLOC_PROBE = r"""
import ctypes, ctypes.util, json, sys

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
MIB = 1 << 20

def probe(size):
    before = libc.mallinfo2()
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)  # touched: really in use
    held = libc.mallinfo2()
    libc.free(block)
    after = libc.mallinfo2()
    return [(held.hblkhd - before.hblkhd) // MIB, (held.arena - before.arena) // MIB,
            (after.arena - before.arena) // MIB, (after.hblkhd - before.hblkhd) // MIB]

result = {"ok": None}
if sys.argv[1] == "keep":
    from srmodels.core.runtime import keep_freed_memory
    result["ok"] = keep_freed_memory()
result["16"] = probe(16 * MIB)
# Larger than the heap's free space (so it cannot come from there) and than the 32 MiB threshold.
result["big"] = probe(libc.mallinfo2().fordblks + 48 * MIB)
print(json.dumps(result))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_keeps_blocks_up_to_32_mib_on_the_heap():
    """In child processes, since the setting is process-wide: by default glibc maps a fresh 16 MiB block and
    unmaps it on free; after keep_freed_memory() it comes from the heap (grown with 64 MiB of top pad) and stays
    there after free, while a block above 32 MiB is still mapped and handed back."""
    def child(mode: str) -> dict:
        done = subprocess.run([sys.executable, "-c", MALLOC_PROBE, mode], capture_output=True, text=True, check=True,
                              timeout=120)
        return json.loads(done.stdout)

    default, kept = child("default"), child("keep")
    assert default["ok"] is None and default["16"] == [16, 0, 0, 0]    # mapped, then unmapped
    assert kept["ok"] is True                                           # mallopt took all three settings
    mapped, grown, left, mapped_left = kept["16"]
    # From the heap, grown by the block and most of the 64 MiB top pad (less what the heap had free), and kept.
    assert mapped == 0 and grown >= 64 and left == grown and mapped_left == 0
    assert kept["big"][0] >= 48 and kept["big"][1:] == [0, 0, 0]        # mapped, then unmapped


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")

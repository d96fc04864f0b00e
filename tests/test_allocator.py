"""mlip.allocator: large tensors come from glibc's heap (no fresh mmap) after reuse_freed_memory()."""

import platform
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, sys, torch
from mlip.allocator import reuse_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = reuse_freed_memory() if sys.argv[1] == "on" else False
before = libc.mallinfo2()
block = torch.empty(64 << 20, dtype=torch.float32)  # 256 MiB
during = libc.mallinfo2()
del block
after = libc.mallinfo2()
print(int(applied), during.hblkhd - before.hblkhd, during.arena - before.arena, after.arena - before.arena)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_large_blocks_are_served_and_kept_by_the_heap():
    def probe(mode):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return [int(x) for x in out.stdout.split()]

    applied, mmapped, heap_growth, heap_kept = probe("on")
    assert applied == 1
    assert mmapped == 0 and heap_growth >= 200 << 20, "the 256 MiB block did not come from the heap"
    assert heap_kept >= 200 << 20, "the heap was trimmed after the free: the next step would page-fault again"
    applied, mmapped, heap_growth, _ = probe("off")
    assert applied == 0 and mmapped >= 256 << 20, "glibc's default should mmap such a block (else this test proves nothing)"

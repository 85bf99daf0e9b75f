"""mote_edge/cpu_alloc.py: glibc keeps freed memory, so a training step's big temporaries are reused
instead of page-faulted in again every step."""
import subprocess
import sys

SCRIPT = """
import resource, sys, time
import numpy as np
from mote_edge.cpu_alloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def minor():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(16 << 20, np.float32); del a  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
f0 = minor()
for _ in range(20):
    a = np.ones(16 << 20, np.float32)  # allocate and touch, then free, like a step's temporaries
    del a
print(minor() - f0)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_freed_blocks_are_reused_not_faulted_in_again():
    huge_pages = (64 << 20) // (2 << 20)  # numpy asks for 2 MiB pages on arrays this big: the fewest faults
    default, keep = _faults("default"), _faults("keep")
    assert default >= 20 * huge_pages, default  # each of the 20 allocations faults its memory in again
    assert keep <= huge_pages, keep  # the freed block is reused

"""Keep freed memory in the process for CPU training (glibc's malloc only).

A training step allocates and frees the same large tensors every step: AdamW's temporaries (one per
expert matrix, 17 MB at Qwen2.5-0.5B widths), the quantised weights, the logits. glibc serves blocks
above its mmap threshold with a fresh mmap and unmaps them on free, and trims the heap top back to the
OS, so every step page-faults (and zeroes) that memory again: on this 2-core machine about 40% of the
0.5B-width step (benchmarks/train_step.py: 2.73 -> 1.70 s/step MoE-LLaVA, 3.85 -> 2.02 s MoTE).
With mmap off and trimming out of reach, freed blocks are reused; RSS stays at the step's peak, which
it reaches anyway. This is what PyTorch's CPU tuning guide gets from jemalloc or tcmalloc, without
preloading another allocator.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # glibc malloc.h


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for this process (True), or do nothing where libc is not glibc (False)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl's mallopt is a no-op stub
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) and mallopt(M_TOP_PAD, 64 << 20))

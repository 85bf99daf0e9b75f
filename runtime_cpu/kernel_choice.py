"""Which ternary kernel family runs each matrix shape (`--kernel auto`): measured, not guessed.

DESIGN.md section 5: a multiply-add kernel (fewer micro-ops per weight with VNNI) and a lookup-table kernel
(tables shared by many rows; fewer bytes) win on different machines and shapes. So at load, for every
distinct (rows, K) of the model's ternary matrices, both families run on random codes of that shape, for
one token (decode) and a tile of tokens (prefill); the family with the lower weighted time runs that shape.
Results are cached per CPU, ISA path and thread count in ~/.cache/mote-edge/kernel-choice.json (a few ms
per shape the first time; nothing after).

Decode decides: a generated token runs every matrix once, while a prompt's tokens share each weight pass.
The weight: decode time x DECODE_WEIGHT + prefill time per token x PREFILL_TOKENS (a 745-token prompt with
a 384-px image against ~64 answer tokens, the shape mote-bench measures).
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from . import clib
from . import ternary_kernels as tk

CACHE = Path(os.environ.get("MOTE_EDGE_CACHE", Path.home() / ".cache" / "mote-edge")) / "kernel-choice.json"
PREFILL_TILE = 64
DECODE_WEIGHT, PREFILL_TOKENS = 64, 745
_MEMO: dict[str, str] = {}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key(n: int, kp: int) -> str:
    return f"{_cpu_name()}|{clib.best_isa()}|{clib.lib().mote_threads()}t|{n}x{kp}"


def _best_of(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(n: int, kp: int) -> dict:
    """Seconds per call of each family at this shape: {"mad": (decode, prefill tile), "lut": (...)}."""
    from . import lut_kernels

    rng = np.random.default_rng(0)
    m = tk.TernaryMatrix.from_codes(rng.integers(-1, 2, (n, kp)).astype(np.int8), 1.0)
    packed = lut_kernels.lut_pack(m.data, m.block_bytes, m.row_bytes, n, kp)
    out = {}
    for t in (1, PREFILL_TILE):
        q, sumq, step = tk.quantize(rng.standard_normal((t, kp)).astype(np.float32), 1e-5, kp)
        reps = 5 if t == 1 else 2
        out.setdefault("mad", []).append(_best_of(lambda: tk.gemm(m, q, sumq, step), reps))
        out.setdefault("lut", []).append(_best_of(lambda: lut_kernels.lut_gemm(packed, n, kp, q, sumq, step, m.scale), reps))
    return out


def cost(times: list[float]) -> float:
    decode, tile = times
    return decode * DECODE_WEIGHT + tile / PREFILL_TILE * PREFILL_TOKENS


def choose(n: int, kp: int) -> str:
    """"mad" or "lut" for an n x kp ternary matrix on this machine (measured once, cached)."""
    key = _key(n, kp)
    if key in _MEMO:
        return _MEMO[key]
    cached = {}
    try:
        cached = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        pass
    entry = cached.get(key)
    if not isinstance(entry, dict) or entry.get("choice") not in ("mad", "lut"):
        times = measure(n, kp)
        entry = {"choice": min(times, key=lambda f: cost(times[f])), "seconds": times}
        cached[key] = entry
        try:  # best effort: a read-only home still runs, measuring again next time
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            tmp = CACHE.with_name(f"{CACHE.name}.{os.getpid()}.part")
            tmp.write_text(json.dumps(cached, indent=1))
            os.replace(tmp, CACHE)
        except OSError:
            pass
    _MEMO[key] = entry["choice"]
    return entry["choice"]

"""Single-kernel figures for the mote engine's C kernels, against numpy on the same shapes, in one run.

    python -m mote_edge.benchmarks.kernel_bench --family float|ternary [--shapes 0.5b] [--threads 1,2] [--tokens 1,64,512]

Decode (T = 1) is reported as GB/s of the weight bytes each side reads (ours: the file's bytes; numpy: its
float32 matrix), with the matrix "hot" (the same one every call: cache-resident when it fits) and in "DRAM"
(calls rotate over copies totalling >= --dram-mb, twice the L3 by default, so no call finds its matrix cached).
Prefill (T > 1) is GFLOP/s on one matrix. Each figure is the best of --rounds batches, ours and numpy's batches
interleaved so machine load hits both alike; "cpu" columns use the process's CPU time per thread instead of wall
time (what the work gets when other processes share the cores). A family (`--family`) is a function registered in FAMILIES that
yields table rows (dicts); print_table prints any of them. A program, not a test: nothing here asserts speed.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import sys
import time
from typing import Callable, Iterable

import numpy as np

from ..exporters.errors import MoteExportError, cli_entry
from ..exporters.errors import ArgumentParser

FAMILIES: dict[str, Callable[[argparse.Namespace, list[str]], Iterable[dict]]] = {}
MIB = 2 ** 20
# (name, N rows, K) per model shape: the output head, the shared expert's gate/up and its down projection
SHAPES = {
    "0.5b": [("head", 151936, 896), ("shared gate/up", 4864, 896), ("shared down", 896, 4864)],
    "1.5b": [("head", 151936, 1536), ("shared gate/up", 8960, 1536), ("shared down", 1536, 8960)],
}
# (name, N rows, K) of a routed expert's matrices (the ternary family): gate / up, down
EXPERT_SHAPES = {"0.5b": [("expert gate/up", 4864, 896), ("expert down", 896, 4864)],
                 "1.5b": [("expert gate/up", 8960, 1536), ("expert down", 1536, 8960)]}
PREFILL_MAX_F32_BYTES = 64 * MIB  # T > 1 only on matrices up to this (the head's prefill needs only the last token)


def family(name: str):
    def register(fn):
        FAMILIES[name] = fn
        return fn

    return register


# ---- the generic parts ----------------------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def print_table(rows: list[dict], file=sys.stdout) -> None:
    """A markdown table of dict rows: columns in first-seen key order, missing cells empty."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, width)) + " |", file=file)
    print("|" + "|".join("-" * (w + 2) for w in width) + "|", file=file)
    for row in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(row, width)) + " |", file=file)


def best_times(fns: list[Callable[[], None]], rounds: int, batch_s: float) -> list[tuple[float, float]]:
    """(wall, CPU) seconds per call of each fn: calls batched to ~batch_s, the fns' batches interleaved, the
    best batch of each. CPU = the process's CPU time (every thread): with the pools spinning while they wait,
    CPU / threads is the time the work held its cores, what an idle machine gives when others share them."""
    sizes = []
    for fn in fns:
        t = time.perf_counter()
        fn()
        sizes.append(max(1, int(batch_s / max(time.perf_counter() - t, 1e-7))))
    best = [(float("inf"), float("inf"))] * len(fns)
    for _ in range(rounds):
        for i, (fn, n) in enumerate(zip(fns, sizes)):
            t, c = time.perf_counter(), time.process_time()
            for _ in range(n):
                fn()
            wall, cpu = (time.perf_counter() - t) / n, (time.process_time() - c) / n
            best[i] = (min(best[i][0], wall), min(best[i][1], cpu))
    return best


def cache_bytes(level: int) -> int | None:
    for idx in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{idx}/level") as f:
                if int(f.read()) != level:
                    continue
            with open(f"{idx}/size") as f:
                s = f.read().strip()
            return int(s[:-1]) * {"K": 1024, "M": MIB, "G": 1024 * MIB}[s[-1]] if s[-1].isalpha() else int(s)
        except (OSError, ValueError, KeyError):
            continue
    return None


def blas_threads(n: int) -> bool:
    """Set numpy's OpenBLAS thread count (its bundled library, through ctypes); False when not found."""
    import numpy

    libs = glob.glob(os.path.join(os.path.dirname(numpy.__file__), "..", "numpy.libs", "*openblas*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for sym in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
                    "openblas_set_num_threads"):
            if hasattr(lib, sym):
                getattr(lib, sym)(ctypes.c_int(n))
                return True
    return False


class Rotation:
    """Copies of an array whose total reaches `total` bytes (at least 2): calls cycle through them, so each
    call's matrix was evicted from every cache by the ones before it. One copy when total is 0 (hot). The
    copies are slices of one allocation, so every size gets the same pages (numpy asks for transparent huge
    pages on large allocations; a memory-mapped GGUF file gets 4 KiB pages)."""

    def __init__(self, a: np.ndarray, total: int):
        n = 1 if total <= 0 else max(2, -(-total // max(a.nbytes, 1)))
        step = -(-a.nbytes // 64) * 64
        self.buf = np.empty(n * step + 64, np.uint8)
        first = (-self.buf.ctypes.data) % 64
        self.copies = []
        for i in range(n):
            c = self.buf[first + i * step:first + i * step + a.nbytes].view(a.dtype).reshape(a.shape)
            c[...] = a
            self.copies.append(c)
        self.i = 0

    def next(self) -> np.ndarray:
        self.i = (self.i + 1) % len(self.copies)
        return self.copies[self.i]


# ---- the float family -----------------------------------------------------------------------------------

def _float_matrix(qtype, N: int, K: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(the file's bytes [N * row_bytes] uint8, numpy's float32 [N, K] of the same weights). Built from at
    most 4096 quantised rows repeated: the bytes are real gguf-py output, the size is the shape's."""
    from gguf.quants import quantize

    from ..exporters.ternary import dequantize

    base_rows = min(N, 4096)
    w = rng.standard_normal((base_rows, K), dtype=np.float32)
    raw = np.ascontiguousarray(quantize(w, qtype)).view(np.uint8).reshape(base_rows, -1)
    w32 = dequantize(raw, qtype).astype(np.float32)
    reps = -(-N // base_rows)
    return (np.ascontiguousarray(np.tile(raw, (reps, 1))[:N]).reshape(-1),
            np.ascontiguousarray(np.tile(w32, (reps, 1))[:N]))


@family("float")
def bench_float(args, notes: list[str]) -> Iterable[dict]:
    from gguf import GGMLQuantizationType as T
    from tqdm import tqdm

    from ..runtime_cpu import clib, float_kernels as fk

    if not clib.available():
        raise MoteExportError(clib.error())
    types = [fk.wtype_of(T[name.upper()]) if name.upper() in T.__members__ else fk.wtype_of(name)
             for name in args.types.split(",")]
    shapes = _shapes(args.shapes)
    dram = int(args.dram_mb * MIB) if args.dram_mb else max(2 * (cache_bytes(3) or 0), 512 * MIB)
    notes.append(f"DRAM: calls rotate over copies totalling >= {dram / MIB:.0f} MiB (L2 {(cache_bytes(2) or 0) / MIB:.1f} "
                 f"MiB, L3 {(cache_bytes(3) or 0) / MIB:.0f} MiB per cpu0's sysfs); ours: C kernel ({args.isa}, best "
                 f"path here {clib.best_isa()}) on the file's bytes through fk.FloatMatmul; numpy: x @ W32.T, float32 BLAS")
    if not blas_threads(1):
        notes.append("numpy's BLAS thread count could not be set: numpy runs at its default")
    from .bench_measure import memory_bandwidth

    for th in args.threads:  # the roofline: what streaming reads get from DRAM with as many processes as threads
        bw = memory_bandwidth(th, 256 * MIB)
        notes.append(f"stream read bandwidth, {th} process(es) over 256 MiB each: {bw['read_gbs']:.1f} GB/s "
                     f"(copy {bw['copy_gbs']:.1f} GB/s; mote-bench's measure)")
    rng = np.random.default_rng(0)
    plan = [(s, t, th, n_tok, where) for s in shapes for t in types for th in args.threads for n_tok in args.tokens
            for where in (("hot", "DRAM") if n_tok == 1 else ("hot",))
            if n_tok == 1 or s[1] * s[2] * 4 <= PREFILL_MAX_F32_BYTES]
    cache: dict = {}
    for (label, N, K), qtype, th, n_tok, where in tqdm(plan, desc="float kernels", unit="case", file=sys.stderr):
        if cache.get("key") != (N, K, qtype):
            cache = {"key": (N, K, qtype), "m": _float_matrix(qtype, N, K, rng)}
        raw, w32 = cache["m"]
        clib.set_threads(th)
        blas_threads(th)
        x = rng.standard_normal((n_tok, K), dtype=np.float32)
        total = dram if where == "DRAM" else 0
        ours_rot = Rotation(raw, total)
        prods = [fk.FloatMatmul([(r, qtype, N, None)], K, isa=args.isa) for r in ours_rot.copies]
        i_ours = [0]

        def ours():
            i_ours[0] = (i_ours[0] + 1) % len(prods)
            prods[i_ours[0]](x)

        (t_ours, c_ours), = best_times([ours], args.rounds, args.batch_s)
        del prods, ours_rot
        np_rot = Rotation(w32, total)
        (t_np, c_np), = best_times([lambda: x @ np_rot.next().T], args.rounds, args.batch_s)
        del np_rot
        flops = 2.0 * N * K * n_tok
        yield {"shape": f"{label} {N}x{K}".strip(), "type": qtype.name, "threads": th, "T": n_tok, "where": where,
               "MB": raw.nbytes / 1e6, "ours ms": t_ours * 1e3, "ours GB/s": raw.nbytes / t_ours / 1e9,
               "ours GB/s cpu": raw.nbytes * th / c_ours / 1e9, "ours GFLOP/s": flops / t_ours / 1e9,
               "numpy ms": t_np * 1e3, "numpy GB/s": w32.nbytes / t_np / 1e9,
               "numpy GB/s cpu": w32.nbytes * th / c_np / 1e9, "numpy GFLOP/s": flops / t_np / 1e9,
               "numpy/ours time": t_np / t_ours}
    clib.set_threads(1)
    blas_threads(1)


# ---- the ternary family ---------------------------------------------------------------------------------

@family("ternary")
def bench_ternary(args, notes: list[str]) -> Iterable[dict]:
    """Both ternary families on routed-expert shapes (TQ2_0 bytes for multiply-add, the LUT layout for lookup
    tables), hot and in DRAM; then one MoE layer's top-k experts at decode, by stage in one pool job each
    (clinear.TernaryExperts, the engine's path) against one product after another (the path before it)."""
    from tqdm import tqdm

    from ..runtime_cpu import clib, ternary_kernels as tk
    from ..runtime_cpu.clinear import LutMatrix, TernaryExperts, products
    from ..runtime_cpu.kernels import silu

    if not clib.available():
        raise MoteExportError(clib.error())
    shapes = _shapes(args.shapes, EXPERT_SHAPES)
    dram = int(args.dram_mb * MIB) if args.dram_mb else max(2 * (cache_bytes(3) or 0), 512 * MIB)
    notes.append(f"ternary: multiply-add reads 2-bit codes (TQ2_0 code layout, 64 bytes per 256 weights); lookup-table its "
                 f"own layout (1.78); DRAM = calls rotating over copies totalling >= {dram / MIB:.0f} MiB")
    rng = np.random.default_rng(0)
    eps = 1e-5

    def matrix(N, K, lut):
        m = tk.TernaryMatrix.from_codes(rng.integers(-1, 2, (N, K)).astype(np.int8), np.float32(0.02))
        return LutMatrix(m) if lut else m

    plan = [(s, fam, th, n_tok, where) for s in shapes for fam in ("mad", "lut") for th in args.threads
            for n_tok in args.tokens for where in (("hot", "DRAM") if n_tok == 1 else ("hot",))]
    for (label, N, K), fam, th, n_tok, where in tqdm(plan, desc="ternary kernels", unit="case", file=sys.stderr):
        clib.set_threads(th)
        base = matrix(N, K, fam == "lut")
        nbytes = base.nbytes
        copies = 1 if where == "hot" else max(2, -(-dram // nbytes))
        mats = [base] + [matrix(N, K, fam == "lut") for _ in range(copies - 1)]
        q = tk.quantize(rng.standard_normal((n_tok, K)).astype(np.float32), eps, base.kp)
        i = [0]

        def run():
            i[0] = (i[0] + 1) % len(mats)
            products([(mats[i[0]], *q)])

        (t, c), = best_times([run], args.rounds, args.batch_s)
        yield {"shape": f"{label} {N}x{K}", "kernel": fam, "threads": th, "T": n_tok, "where": where,
               "MB": nbytes / 1e6, "ms": t * 1e3, "GB/s": nbytes / t / 1e9, "GB/s cpu": nbytes * th / c / 1e9,
               "GOP/s": 2.0 * N * K * n_tok / t / 1e9}
        del mats
    # a MoE layer at decode: E experts, top-k chosen, every layer's experts distinct (as in a model: DRAM)
    E, k = 4, 2
    for (label, F, H), fam, th in ((s, fam, th) for s in shapes[:1] for fam in ("mad", "lut") for th in args.threads):
        clib.set_threads(th)
        per_layer = 3 * E * F * H / 4
        layers = max(2, int(-(-dram // per_layer)))
        moe = [TernaryExperts(*([matrix(F, H, fam == "lut") for _ in range(E)] for _ in range(2)),
                              [matrix(H, F, fam == "lut") for _ in range(E)], eps) for _ in range(layers)]
        x = rng.standard_normal((1, H)).astype(np.float32)
        probs = np.full((1, E), 1.0 / E, np.float32)
        chosen = list(range(k))
        j = [0, 0]

        def by_stage():
            j[0] = (j[0] + 1) % layers
            moe[j[0]].decode(x, probs, chosen)

        def one_by_one():
            j[1] = (j[1] + 1) % layers
            ex, out = moe[j[1]], np.zeros_like(x)
            for e in chosen:
                a = tk.quantize(x, eps, ex.gate[e].kp)
                g, u = products([(ex.gate[e], *a)])[0], products([(ex.up[e], *a)])[0]
                out += products([(ex.down[e], *tk.quantize(silu(g) * u, eps, ex.down[e].kp))])[0] * probs[0, e]

        (t_s, _), (t_o, _) = best_times([by_stage, one_by_one], args.rounds, args.batch_s)
        nbytes = sum(m.nbytes for e in chosen for m in (moe[0].gate[e], moe[0].up[e], moe[0].down[e]))
        yield {"shape": f"MoE layer top-{k} of {E}, F {F} x H {H}", "kernel": fam, "threads": th, "T": 1, "where": "DRAM",
               "MB": nbytes / 1e6, "ms": t_s * 1e3, "GB/s": nbytes / t_s / 1e9,
               "one-by-one ms": t_o * 1e3, "one-by-one / by-stage": t_o / t_s}
        del moe
    clib.set_threads(1)


def _shapes(spec: str, named: dict = SHAPES) -> list[tuple[str, int, int]]:
    out = []
    for part in spec.split(","):
        if part in named:
            out += named[part]
        elif "x" in part and all(p.isdigit() for p in part.split("x", 1)):
            n, k = map(int, part.split("x", 1))
            out.append(("", n, k))
        else:
            raise MoteExportError(f"shape {part!r}; accepted: {', '.join(SHAPES)} or NxK (rows x K), comma-separated")
    return out


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of integers") from None
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{s!r}: every value must be >= 1")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m mote_edge.benchmarks.kernel_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", required=True, help=f"kernel family: {', '.join(FAMILIES)}")
    p.add_argument("--shapes", default="0.5b", help=f"{', '.join(SHAPES)} or NxK, comma-separated (default 0.5b)")
    p.add_argument("--types", default="f16,bf16,q8_0,q4_0", help="weight types (float family; also f32)")
    p.add_argument("--threads", type=_int_list, default=[1, 2], help="kernel pool (and BLAS) threads, e.g. 1,2")
    p.add_argument("--tokens", type=_int_list, default=[1, 64, 512], help="tokens per call: 1 = decode, more = prefill")
    p.add_argument("--isa", default="auto", help="ISA path: auto, scalar, avx2, avx512, neon")
    p.add_argument("--dram-mb", type=float, default=0, help="bytes the DRAM rotation covers (default: 2 x L3, >= 512)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved batches per figure (best taken)")
    p.add_argument("--batch-s", type=float, default=0.05, help="seconds per batch")
    return p


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.family not in FAMILIES:
        raise MoteExportError(f"kernel family {args.family!r}; accepted: {', '.join(FAMILIES)}")
    notes: list[str] = []
    t0 = time.time()
    rows = list(FAMILIES[args.family](args, notes))
    print(f"kernel_bench --family {args.family}: {len(rows)} figures in {time.time() - t0:.0f} s, "
          f"load average at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print_table(rows)
    for n in notes:
        print(f"- {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

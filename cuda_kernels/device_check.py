"""The one prepared GPU run: correctness of every W2A8 kernel on CUDA and its speed against cuBLAS.

    python -m mote_edge.cuda_kernels.device_check -o OUT            (a CUDA GPU, sm_80 or newer)
    python -m mote_edge.cuda_kernels.device_check -o OUT --interpret (CPU, Triton interpreter, tiny shapes)
    python cuda_kernels/device_check.py -o OUT                        (the same, from a checkout not installed)

Writes OUT/device_check.json and OUT/device_check.md (temporary names, then renamed). Sections:
  correctness  every kernel and shipped config against the torch integer reference (int32 bit-exact,
               fp32 epilogue within 1e-6 relative, bf16 within one bf16 step), outputs poisoned first;
               adversarial inputs (all +1 / all -1 codes with +-127 / -128 activations, K and N tails,
               ragged and empty expert groups, rounding ties); the CUDA C GEMV (built with nvcc)
  bandwidth    the card's measured device-to-device copy bandwidth (the bound the GB/s are set against)
  linear       W2A8 (Triton GEMV / GEMM, CUDA C GEMV) vs cuBLAS bf16 (F.linear) and torch._int_mm at the
               decode (M = 1, 16) and prefill (M = 512) shapes of Qwen2.5-1.5B and 3B; weights rotate over
               enough copies to exceed the L2 cache (decode reads every layer's weights from HBM once)
  sweeps       a few GEMV / GEMM configs per shape (the data to pick SHIPPED and the GEMV/CUDA-C choice from)
  grouped      all experts of a layer in one launch vs a bf16 per-expert loop and torch._grouped_mm
  engine       the GPU engine (engine.py) at the 1.5B and 3B shapes with random weights: batch-1 greedy decode
               tokens/s after a 512-token prefill, against the bound of the bytes a step reads at copy bandwidth
  train        if the training ops (cuda_kernels/train_ops.py) import: one MoTE moe-layer step (Triton
               ternary experts + bf16 shared expert) against the MoE-LLaVA layer (4 bf16 experts, top-2),
               forward + backward at the Qwen2.5-0.5B shape; skipped with the reason otherwise
Timing: CUDA graphs of many calls replayed between CUDA events (launch overhead out, as in a graphed
decode loop); min / median / max of the repeats. Runs in about 3-5 minutes on an H200 (most of it Triton
compiling); torch 2.11 + triton 3.6.0 and torch 2.13 + triton 3.7.1.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `python cuda_kernels/device_check.py` in a checkout that is not installed (a bare device machine):
    # map the folders onto their package names as pyproject's package-dir does, then import as usual
    import importlib.util

    _root = Path(__file__).resolve().parents[1]
    for _name, _folder in (("mote_edge", "mote_edge"), ("mote_edge.exporters", "exporters"),
                           ("mote_edge.runtime_cpu", "runtime_cpu"), ("mote_edge.cuda_kernels", "cuda_kernels")):
        _spec = importlib.util.spec_from_file_location(_name, _root / _folder / "__init__.py",
                                                       submodule_search_locations=[str(_root / _folder)])
        sys.modules[_name] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules[_name])
    __package__ = "mote_edge.cuda_kernels"

from ..exporters.errors import MoteExportError, cli_entry
from ..exporters.errors import ArgumentParser

MODELS = {"qwen2.5-1.5b": (1536, 8960), "qwen2.5-3b": (2048, 11008)}  # hidden, ffn
TINY_MODELS = {"tiny": (64, 96)}
DECODE_M = (1, 16)
PREFILL_M = 512
EXPERTS = 4
# candidates timed per shape (SPLIT_K 0 = auto: about two programs per SM)
GEMV_SWEEP = [dict(BM=1, BN=bn, BK=bk, SPLIT_K=sk, num_warps=w, num_stages=2)
              for bn, bk, sk, w in ((16, 512, 0, 4), (16, 512, 1, 4), (16, 256, 4, 4), (8, 256, 0, 2), (32, 512, 1, 8),
                                    (32, 256, 0, 4), (16, 1024, 0, 8))]
DECODE_GEMM_SWEEP = [dict(BM=16, BN=bn, BK=bk, SPLIT_K=sk, num_warps=w, num_stages=st)
                     for bn, bk, sk, w, st in ((64, 128, 0, 4, 3), (64, 128, 1, 4, 3), (32, 128, 0, 4, 3),
                                               (64, 256, 0, 4, 3), (128, 128, 0, 4, 4))]
PREFILL_SWEEP = [dict(BM=bm, BN=bn, BK=bk, SPLIT_K=1, num_warps=w, num_stages=st)
                 for bm, bn, bk, w, st in ((128, 128, 128, 8, 3), (64, 128, 128, 4, 3), (128, 256, 128, 8, 3),
                                           (128, 128, 64, 4, 4))]
# the GPU engine's decode: Qwen2.5 shapes (every layer MoTE: shared expert + 4 ternary experts, top-1, tied head)
ENGINE_MODELS = {"qwen2.5-1.5b": dict(layers=28, hidden=1536, ffn=8960, heads=12, kv_heads=2, vocab=151936),
                 "qwen2.5-3b": dict(layers=36, hidden=2048, ffn=11008, heads=16, kv_heads=2, vocab=151936)}
TINY_ENGINE = {"tiny": dict(layers=2, hidden=64, ffn=96, heads=4, kv_heads=2, vocab=128)}
FP32_RTOL = 1e-6
BF16_RTOL = 2.0**-7  # one bf16 step (the interpreter truncates where the GPU rounds to nearest)


class Run:
    """Shared state: device, timing settings, the report being built and progress lines."""

    def __init__(self, torch, interpret: bool, repeats: int):
        self.torch = torch
        self.interpret = interpret
        self.dev = torch.device("cpu" if interpret else "cuda")
        self.repeats = 1 if interpret else repeats
        self.t0 = time.perf_counter()
        self.report = {"checks": [], "linear": [], "sweeps": [], "grouped": [], "notes": []}
        props = None if interpret else torch.cuda.get_device_properties(0)
        self.l2 = getattr(props, "L2_cache_size", 50 << 20) if props else 0

    def log(self, msg: str):
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def check(self, name: str, ok: bool, detail: str = ""):
        self.report["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        if not ok:
            self.log(f"FAILED {name}: {detail}")

    def sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def copies(self, nbytes: int) -> int:
        """How many copies of a weight to rotate over so that one pass exceeds the L2 cache three times."""
        if self.interpret:
            return 2
        return max(2, min(64, math.ceil(3 * self.l2 / max(nbytes, 1))))

    def bench(self, calls: list) -> dict:
        """Per-call microseconds of cycling through `calls` (zero-argument functions)."""
        torch = self.torch
        if self.dev.type == "cpu":
            ts = []
            for _ in range(self.repeats):
                t = time.perf_counter()
                for f in calls:
                    f()
                ts.append((time.perf_counter() - t) / len(calls) * 1e6)
            return {"min_us": min(ts), "median_us": statistics.median(ts), "max_us": max(ts), "method": "cpu wall"}
        per = max(len(calls), 100)
        for f in calls:  # compile and warm up outside the capture
            f()
        torch.cuda.synchronize()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for f in calls:
                    f()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(per):
                    calls[i % len(calls)]()
            replay, method = graph.replay, "cuda graph"
        except Exception as exc:  # a launch that cannot be captured: time it eagerly (launch overhead in)
            torch.cuda.synchronize()
            replay, method = (lambda: [calls[i % len(calls)]() for i in range(per)]), f"eager ({type(exc).__name__})"
        replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(self.repeats):
            start.record()
            replay()
            end.record()
            end.synchronize()
            ts.append(start.elapsed_time(end) * 1e3 / per)
        return {"min_us": min(ts), "median_us": statistics.median(ts), "max_us": max(ts), "method": method}


# ------------------------------------------------------------------------------------------ correctness

def _close(ref, got, rtol: float) -> tuple[bool, str]:
    err = (got.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
    scale = ref.float().abs().max().item() if ref.numel() else 0.0
    ok = bool(err <= rtol * max(scale, 1e-30)) and not bool(got.float().isnan().any())
    return ok, f"max |err| {err:.3g} of max |ref| {scale:.3g}"


def _linear_checks(run: Run, W, name: str, a, pk, codes, launch):
    """int32 exact, fp32 and bf16 epilogues of one launch(a, pk, out_int32, out_dtype, out) -> out."""
    torch = run.torch
    m, n = a.xq.shape[0], pk.n
    ref = W.ref_int_dot(a.xq, codes)
    got = launch(a, pk, True, torch.int32, torch.full((m, n), -(2**31) + 7, dtype=torch.int32, device=run.dev))
    run.check(f"{name} int32", torch.equal(got, ref), "bit-exact" if torch.equal(got, ref) else
              f"{int((got != ref).sum())} of {ref.numel()} differ")
    want = W.ref_epilogue(ref, a.xs, pk.scales)
    got = launch(a, pk, False, torch.float32, torch.full((m, n), float("nan"), device=run.dev))
    run.check(f"{name} fp32", *_close(want, got, FP32_RTOL))
    got = launch(a, pk, False, torch.bfloat16, torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=run.dev))
    run.check(f"{name} bf16", *_close(want, got, BF16_RTOL))


def _triton_launch(W, kernel, cfg):
    return lambda a, pk, i32, dt, out: W.w2a8_linear(a, pk, out_dtype=dt, out_int32=i32, kernel=kernel,
                                                      config=cfg, out=out)


def correctness(run: Run, W, cuda_lib):
    torch = run.torch
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(40, 72), (24, 600)] if run.interpret else [(300, 1000), (257, 2112)]  # N, K: tails everywhere

    # per-token quantisation, ties included: amax 127 makes the scale exactly 1, so x.5 values are ties
    x = torch.randn(37, shapes[0][1], generator=g) * 3
    x[0, :8] = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, -126.5, 125.5])
    x[1] = 0.0  # amax clamps to 1e-5
    for dt in (torch.float32, torch.bfloat16):
        xd = x.to(dt).to(run.dev)
        poison = W.QuantizedAct(torch.full(xd.shape, 85, dtype=torch.int8, device=run.dev),
                                torch.full((37,), float("nan"), device=run.dev),
                                torch.full((37,), -(2**31) + 7, dtype=torch.int32, device=run.dev))
        a = W.quantize_act(xd, out=poison)
        rq, rs, rsum = W.ref_quantize_act(xd)
        ok = torch.equal(a.xq, rq) and torch.equal(a.xs, rs) and torch.equal(a.xsum, rsum)
        run.check(f"quantize_act {str(dt)[6:]}", ok, "bit-exact (xq, xs, sum)" if ok else
                  f"xq differs at {int((a.xq != rq).sum())}, xs at {int((a.xs != rs).sum())}")

    configs = [(f"gemv/{bm}", "gemv", c, sorted({bm, max(bm - 1, 1)})) for bm, c in W.SHIPPED["gemv"].items()]
    configs += [("gemm/decode", "gemm", W.SHIPPED["gemm"]["decode"], [5, 16]),
                ("gemm/prefill", "gemm", W.SHIPPED["gemm"]["prefill"], [17, 40 if run.interpret else 200])]
    # split-K forced on (3 splits: uneven, the last one possibly empty), whatever auto picks on this device
    configs += [(f"{label} split3", kernel, {**cfg, "SPLIT_K": 3}, ms) for label, kernel, cfg, ms in configs
                if label in ("gemv/1", "gemv/4", "gemm/decode")]
    for n, k in shapes:
        codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
        pk = W.PackedTernary.from_codes(codes, 0.0371).to(run.dev)
        codes = codes.to(run.dev)
        for label, kernel, cfg, ms in configs:
            for m in ms:
                a = W.quantize_act((torch.randn(m, k, generator=g) * 2).to(run.dev))
                _linear_checks(run, W, f"{label} M={m} N={n} K={k}", a, pk, codes, _triton_launch(W, kernel, cfg))

    # adversarial extremes: every code +1 (or -1) against +-127 / -128 activations
    n, k = shapes[1]
    for sign in (1, -1):
        codes = torch.full((n, k), sign, dtype=torch.int8, device=run.dev)
        pk = W.PackedTernary.from_codes(codes, 1.0)
        xq = torch.full((17, k), 127, dtype=torch.int8, device=run.dev)
        xq[1::2] = -128
        xq[2, ::3] = -127
        a = W.QuantizedAct(xq, torch.full((17,), 1.0 / 127, device=run.dev), xq.to(torch.int32).sum(-1, dtype=torch.int32))
        for label, kernel, cfg, _ in configs:
            m = min(cfg["BM"], 17) if kernel == "gemv" else 17
            sub = W.QuantizedAct(a.xq[:m], a.xs[:m], a.xsum[:m])
            _linear_checks(run, W, f"{label} extremes codes={sign:+d}", sub, pk, codes, _triton_launch(W, kernel, cfg))

    # grouped experts: ragged groups, empty groups (first, middle, last), a group of exactly one tile
    n, k = shapes[0]
    bm = W.SHIPPED["grouped"]["experts"]["BM"]
    for counts in ([0, 37, 0, 91], [bm, 1, bm + 1, 0], [5, 0, 0, 0]):
        e = len(counts)
        codes = torch.randint(-1, 2, (e, n, k), dtype=torch.int8, generator=g)
        scales = torch.tensor([0.5, 0.25, 0.125, 0.0625][:e])
        pk = W.PackedTernary.from_codes(codes, scales).to(run.dev)
        codes = codes.to(run.dev)
        offs = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=run.dev)
        m = sum(counts)
        a = W.quantize_act(torch.randn(m, k, generator=g).to(run.dev))
        ref = torch.cat([W.ref_int_dot(a.xq[offs[i]:offs[i + 1]], codes[i]) for i in range(e)])
        got = W.w2a8_grouped(a, pk, offs, out_int32=True,
                             out=torch.full((m, n), -(2**31) + 7, dtype=torch.int32, device=run.dev))
        run.check(f"grouped counts={counts} int32", torch.equal(got, ref), "bit-exact" if torch.equal(got, ref)
                  else f"{int((got != ref).sum())} of {ref.numel()} differ")
        rows = torch.repeat_interleave(torch.arange(e), torch.tensor(counts)).to(run.dev)
        want = ref.float() * a.xs[:, None] * pk.scales[rows][:, None]
        got = W.w2a8_grouped(a, pk, offs, out=torch.full((m, n), float("nan"), device=run.dev))
        run.check(f"grouped counts={counts} fp32", *_close(want, got, FP32_RTOL))

    # the GGUF route: exporter packing -> runtime_cpu decode -> GPU words equal pack_w2 of the codes
    try:
        from ..exporters.ternary import Q2_0, pack_ternary
        from gguf import GGMLQuantizationType as T

        codes = torch.randint(-1, 2, (2, 8, 256), dtype=torch.int8, generator=g)
        for qtype in (T.TQ2_0, T.TQ1_0, Q2_0, T.Q4_0, T.F16):  # the exporter's types and its exact fallbacks
            raw = pack_ternary(codes.numpy(), [0.5, 0.25], qtype)
            pk = W.pack_gguf_ternary(raw, qtype, tuple(codes.shape), [0.5, 0.25], "check")
            run.check(f"pack_gguf_ternary {qtype.name}", torch.equal(pk.words, W.pack_w2(codes)), "words equal")
    except ImportError as exc:
        run.report["notes"].append(f"GGUF repack check skipped: {exc}")

    # the CUDA C GEMV: built with nvcc here, compared with the reference and with the Triton GEMV's bits
    if run.dev.type != "cuda":
        try:
            lib = cuda_lib.build_gemv_library()
            run.report["notes"].append(f"CUDA C GEMV built ({lib}); not run: no CUDA device in --interpret")
        except MoteExportError as exc:
            run.report["notes"].append(f"CUDA C GEMV skipped: {exc}")
        return
    try:
        cuda_lib.load_gemv()
    except MoteExportError as exc:
        run.check("cuda C GEMV build", False, str(exc))
        return
    launch = lambda a, pk, i32, dt, out: cuda_lib.w2a8_gemv_cuda(a, pk, out_dtype=dt, out_int32=i32, out=out)
    for n, k in ((300, 1024), (37, 64 * 150)):  # fewer chunks than lanes; several unrolled rounds + a tail
        codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
        pk = W.PackedTernary.from_codes(codes, 0.0371).to(run.dev)
        codes = codes.to(run.dev)
        for m in (1, 2, 3, 8, 13):
            a = W.quantize_act(torch.randn(m, k, generator=g).to(run.dev))
            _linear_checks(run, W, f"cuda-C gemv M={m} N={n} K={k}", a, pk, codes, launch)
            same = torch.equal(cuda_lib.w2a8_gemv_cuda(a, pk), W.w2a8_linear(a, pk, kernel="gemm",
                                                                            config=W.SHIPPED["gemm"]["decode"]))
            run.check(f"cuda-C gemv M={m} K={k} fp32 bits == Triton", same, "identical" if same else "differ")
    # all +1 codes against +127 / -128 activations through the CUDA C path too
    n, k = 64, 64 * 40
    codes = torch.ones((n, k), dtype=torch.int8, device=run.dev)
    pk = W.PackedTernary.from_codes(codes, 1.0)
    xq = torch.full((8, k), 127, dtype=torch.int8, device=run.dev)
    xq[1::2] = -128
    a = W.QuantizedAct(xq, torch.full((8,), 1.0 / 127, device=run.dev), xq.to(torch.int32).sum(-1, dtype=torch.int32))
    _linear_checks(run, W, "cuda-C gemv extremes codes=+1", a, pk, codes, launch)


# ---------------------------------------------------------------------------------------------- timing

def bandwidth(run: Run) -> float:
    torch = run.torch
    nbytes = (8 << 20) if run.interpret else (1 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=run.dev)
    dst = torch.empty_like(src)
    t = run.bench([lambda: dst.copy_(src)] * 2) if run.interpret else _bench_big(run, lambda: dst.copy_(src))
    gbs = 2 * nbytes / (t["median_us"] * 1e-6) / 1e9
    run.report["bandwidth"] = {"bytes": nbytes, **t, "copy_GBps": gbs}
    run.log(f"copy bandwidth {gbs:.0f} GB/s")
    return gbs


def _bench_big(run: Run, f) -> dict:
    """Eager timing for calls long enough that launch overhead does not matter (copies of 1 GiB)."""
    torch = run.torch
    f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(max(run.repeats, 5)):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        f()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1e3)
    return {"min_us": min(ts), "median_us": statistics.median(ts), "max_us": max(ts), "method": "events"}


def _weights(run: Run, W, n: int, k: int, g):
    torch = run.torch
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g).to(run.dev)
    pk = W.PackedTernary.from_codes(codes, 0.02)
    bf = (codes.to(torch.bfloat16) * 0.02).contiguous()
    return codes, pk, bf


def linear_bench(run: Run, W, cuda_lib, copy_gbs: float, with_sweeps: bool = True):
    torch = run.torch
    F = torch.nn.functional
    g = torch.Generator(device="cpu").manual_seed(1)
    models = TINY_MODELS if run.interpret else MODELS
    ms = (1, 16, 24) if run.interpret else (*DECODE_M, PREFILL_M)
    have_cuda_c = run.dev.type == "cuda" and _try(cuda_lib.load_gemv) is None
    for model, (hidden, ffn) in models.items():
        for matrix, (n, k) in (("gate/up", (ffn, hidden)), ("down", (hidden, ffn))):
            codes, pk, bf = _weights(run, W, n, k, g)
            i8t = codes.T.contiguous()  # torch._int_mm wants a contiguous [K, N] mat2
            nb = {"bf16": n * k * 2, "int8": n * k, "w2a8": pk.words.numel() * 4}
            rot = {key: run.copies(v) for key, v in nb.items()}
            bfs = [bf] + [bf.clone() for _ in range(rot["bf16"] - 1)]
            i8s = [i8t] + [i8t.clone() for _ in range(rot["int8"] - 1)]
            pks = [pk] + [W.PackedTernary(pk.words.clone(), pk.scales.clone(), k) for _ in range(rot["w2a8"] - 1)]
            for m in ms:
                x = torch.randn(m, k, generator=g).to(run.dev, torch.bfloat16)
                a = W.quantize_act(x)
                mp = max(m, 32)  # torch._int_mm on CUDA needs M > 16
                xq_pad = torch.zeros(mp, k, dtype=torch.int8, device=run.dev)
                xq_pad[:m] = a.xq
                row = {"model": model, "matrix": matrix, "M": m, "N": n, "K": k, "copies": rot, "us": {}, "GBps": {},
                       "dispatch": W.pick_kernel(m)}
                if m == ms[0]:  # the baseline must be right too (a non-contiguous mat2 would silently not be)
                    same = torch.equal(torch._int_mm(xq_pad, i8t)[:m], W.ref_int_dot(a.xq, codes))
                    run.check(f"torch._int_mm baseline {model} {matrix}", same, "equals the reference" if same
                              else "differs from the integer reference")
                act = {"bf16": m * k * 2 + m * n * 2, "int8": mp * k + mp * n * 4, "w2a8": m * k + m * n * 2}
                variants = {
                    "cublas_bf16": ("bf16", [lambda w=w: F.linear(x, w) for w in bfs]),
                    f"int_mm(M={mp})": ("int8", [lambda w=w: torch._int_mm(xq_pad, w) for w in i8s]),
                    "w2a8_quant+linear": ("w2a8", [lambda p=p: W.w2a8_linear(W.quantize_act(x), p, torch.bfloat16)
                                                   for p in pks]),
                    "w2a8_linear": ("w2a8", [lambda p=p: W.w2a8_linear(a, p, torch.bfloat16) for p in pks]),
                    "quant_only": (None, [lambda: W.quantize_act(x)]),
                }
                if m <= 16:
                    variants["triton_gemm_decode"] = ("w2a8", [lambda p=p: W.w2a8_linear(
                        a, p, torch.bfloat16, kernel="gemm", config=W.SHIPPED["gemm"]["decode"]) for p in pks])
                if m <= 16 and have_cuda_c and k % 64 == 0:
                    variants["cuda_c_gemv"] = ("w2a8", [lambda p=p: cuda_lib.w2a8_gemv_cuda(a, p, torch.bfloat16)
                                                        for p in pks])
                for name, (kind, calls) in variants.items():
                    err = _try(lambda: row["us"].__setitem__(name, run.bench(calls)))
                    if err:
                        row["us"][name] = {"error": err}
                        continue
                    if kind:
                        gbs = (nb[kind] + act[kind]) / (row["us"][name]["median_us"] * 1e-6) / 1e9
                        row["GBps"][name] = {"GBps": gbs, "of_copy": gbs / copy_gbs}
                base = row["us"].get("cublas_bf16", {}).get("median_us")
                row["speedup_vs_bf16"] = {v: base / t["median_us"] for v, t in row["us"].items()
                                          if base and "median_us" in t and v != "cublas_bf16"}
                imm = row["us"].get(f"int_mm(M={mp})", {}).get("median_us")
                row["speedup_vs_int_mm"] = {v: imm / t["median_us"] for v, t in row["us"].items()
                                            if imm and "median_us" in t and v.startswith(("w2a8", "cuda", "triton"))}
                run.report["linear"].append(row)
                run.log(f"{model} {matrix} M={m}: " + ", ".join(
                    f"{v} {t['median_us']:.1f}us" for v, t in row["us"].items() if "median_us" in t))
            if with_sweeps:
                sweeps(run, W, model, matrix, pks, k, g)
            del bfs, i8s, pks
            if run.dev.type == "cuda":
                torch.cuda.empty_cache()


def sweeps(run: Run, W, model: str, matrix: str, pks, k: int, g):
    """Candidate configs per kernel at M = 1 (GEMV), 16 (decode GEMM), 512 (prefill GEMM)."""
    torch = run.torch
    plan = (("gemv", 1, GEMV_SWEEP), ("gemm", 16, DECODE_GEMM_SWEEP), ("gemm", 24 if run.interpret else PREFILL_M,
                                                                         PREFILL_SWEEP))
    for kernel, m, cands in plan:
        a = W.quantize_act(torch.randn(m, k, generator=g).to(run.dev, torch.bfloat16))
        results = []
        for cfg in cands[:2] if run.interpret else cands:
            calls = [lambda p=p, cfg=cfg: W.w2a8_linear(a, p, torch.bfloat16, kernel=kernel, config=cfg) for p in pks]
            res = {}
            err = _try(lambda: res.update(run.bench(calls)))
            results.append({"config": cfg, **({"error": err} if err else res)})
        ok = [r for r in results if "median_us" in r]
        best = min(ok, key=lambda r: r["median_us"]) if ok else None
        run.report["sweeps"].append({"model": model, "matrix": matrix, "kernel": kernel, "M": m, "results": results,
                                     "best": best and best["config"], "best_us": best and best["median_us"]})


def grouped_bench(run: Run, W, copy_gbs: float):
    torch = run.torch
    F = torch.nn.functional
    g = torch.Generator(device="cpu").manual_seed(2)
    models = TINY_MODELS if run.interpret else MODELS
    tokens = 24 if run.interpret else PREFILL_M
    for model, (hidden, ffn) in models.items():
        # top-1 routing of a prefill over 4 experts, ragged, one expert empty (as a real batch can be)
        counts = torch.multinomial(torch.tensor([0.45, 0.3, 0.0, 0.25]), tokens, replacement=True, generator=g)
        counts = torch.bincount(counts, minlength=EXPERTS).tolist()
        offs = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=run.dev)
        for matrix, (n, k) in (("gate/up", (ffn, hidden)), ("down", (hidden, ffn))):
            codes = torch.randint(-1, 2, (EXPERTS, n, k), dtype=torch.int8, generator=g).to(run.dev)
            pk = W.PackedTernary.from_codes(codes, torch.full((EXPERTS,), 0.02))
            bf = (codes.to(torch.bfloat16) * 0.02).contiguous()
            x = torch.randn(tokens, k, generator=g).to(run.dev, torch.bfloat16)
            a = W.quantize_act(x)
            bounds = offs.tolist()
            row = {"model": model, "matrix": matrix, "tokens": tokens, "counts": counts, "N": n, "K": k, "us": {}}
            variants = {
                "w2a8_grouped(quant+gemm)": lambda: W.w2a8_grouped(W.quantize_act(x), pk, offs, torch.bfloat16),
                "w2a8_grouped": lambda: W.w2a8_grouped(a, pk, offs, torch.bfloat16),
                "bf16_loop": lambda: torch.cat([F.linear(x[bounds[e]:bounds[e + 1]], bf[e]) for e in range(EXPERTS)]),
            }
            if hasattr(torch, "_grouped_mm") and run.dev.type == "cuda":
                bft = bf.transpose(1, 2)  # [E, K, N] view: the layout _grouped_mm takes
                ends = offs[1:].clone()  # its offs: cumulative ends, an aligned tensor of their own
                variants["torch._grouped_mm_bf16"] = lambda: torch._grouped_mm(x, bft, offs=ends)
            for name, f in variants.items():
                err = _try(lambda: row["us"].__setitem__(name, run.bench([f])))
                if err:
                    row["us"][name] = {"error": err}
            base = row["us"].get("bf16_loop", {}).get("median_us")
            row["speedup_vs_bf16_loop"] = {v: base / t["median_us"] for v, t in row["us"].items()
                                           if base and "median_us" in t and v != "bf16_loop"}
            t = row["us"].get("w2a8_grouped", {}).get("median_us")
            if t:
                gbs = (pk.words.numel() * 4 + tokens * k + tokens * n * 2) / (t * 1e-6) / 1e9
                row["w2a8_GBps"] = {"GBps": gbs, "of_copy": gbs / copy_gbs}
            run.report["grouped"].append(row)
            run.log(f"grouped {model} {matrix}: " + ", ".join(
                f"{v} {t['median_us']:.1f}us" for v, t in row["us"].items() if "median_us" in t))


def engine_bench(run: Run, copy_gbs: float):
    """GPU-engine decode at batch 1 (engine.random_llm: random weights made on the device, no files), each step
    as mote-run's stream takes it (embedding row up, forward, argmax back); against the HBM bound: the bytes a
    step reads (every float weight, top-1 of 4 routed experts, the KV cache) at the measured copy bandwidth."""
    from . import engine as E

    torch = run.torch
    prompt, tokens = (4, 2) if run.interpret else (512, 64)
    for model, shape in (TINY_ENGINE if run.interpret else ENGINE_MODELS).items():
        if run.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        llm = E.random_llm(**shape, n_ctx=prompt + tokens + 8, device=run.dev.type, kernel="triton")
        for decode in E.MOE_DECODE:  # mote-run --moe-decode: GEMV launches after a host read, or grouped, sync-free
            for layer in llm.layers:
                layer.ffn.decode = decode
            t = E.time_decode(llm, prompt, tokens)
            bound = copy_gbs * 1e9 / t["bytes_per_token"]
            row = {"model": model, "moe_decode": decode, **t, "bound_tokens_per_s": bound,
                   "of_bound": t["tokens_per_s"] / bound,
                   "peak_allocated_bytes": torch.cuda.max_memory_allocated() if run.dev.type == "cuda" else None}
            run.report.setdefault("engine", []).append(row)
            run.log(f"engine {model} ({decode} MoE decode): {t['tokens_per_s']:.1f} tokens/s, {row['of_bound']:.0%} "
                    f"of the bound {bound:.0f}")
        del llm
        if run.dev.type == "cuda":
            torch.cuda.empty_cache()


def train_bench(run: Run):
    """One moe-layer step (forward + backward) with the training helper's ops, against MoE-LLaVA's layer."""
    torch = run.torch
    F = torch.nn.functional
    try:
        from . import train_ops
    except Exception as exc:  # absent, or not importable on this torch / triton
        run.report["train"] = {"skipped": f"training ops not importable: {type(exc).__name__}: {exc}"}
        run.log(run.report["train"]["skipped"])
        return
    hidden, ffn = (64, 96) if run.interpret else (896, 4864)  # Qwen2.5-0.5B
    tokens = 32 if run.interpret else 2 * 1024
    dt = torch.float32 if run.interpret else torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(3)

    def mat(*shape, grad=True):
        return (torch.randn(*shape, generator=g) * 0.02).to(run.dev, dt).requires_grad_(grad)

    shared = [mat(ffn, hidden, grad=False), mat(ffn, hidden, grad=False), mat(hidden, ffn, grad=False)]
    router = mat(EXPERTS, hidden)
    tern = {p: [mat(*((ffn, hidden) if p != "down" else (hidden, ffn))) for _ in range(EXPERTS)]
            for p in ("gate", "up", "down")}
    dense = {p: [mat(*((ffn, hidden) if p != "down" else (hidden, ffn))) for _ in range(EXPERTS)]
             for p in ("gate", "up", "down")}
    x0 = (torch.randn(tokens, hidden, generator=g)).to(run.dev, dt)

    def sort_by(idx):
        order = torch.argsort(idx, stable=True)
        counts = torch.bincount(idx, minlength=EXPERTS)
        offs = torch.zeros(EXPERTS + 1, dtype=torch.int32, device=run.dev)
        offs[1:] = counts.cumsum(0)
        return order, offs

    def mote_step():
        x = x0.clone().requires_grad_(True)
        p = torch.softmax(F.linear(x, router).float(), -1)
        top, idx = p.max(-1)
        order, offs = sort_by(idx)
        q = {k: [train_ops.ternary_quantize(w.detach()) for w in ws] for k, ws in tern.items()}  # once per step
        scales = {k: torch.stack([s for s, _ in v]) for k, v in q.items()}  # (scale, codes), as train_ops returns
        codes = {k: torch.stack([c for _, c in v]) for k, v in q.items()}
        xs = x[order]
        h = F.silu(train_ops.grouped_ternary_linear(xs, offs, tern["gate"], codes["gate"], scales["gate"])) * \
            train_ops.grouped_ternary_linear(xs, offs, tern["up"], codes["up"], scales["up"])
        y = torch.empty_like(xs)
        y[order] = train_ops.grouped_ternary_linear(h, offs, tern["down"], codes["down"], scales["down"])
        out = F.linear(F.silu(F.linear(x, shared[0])) * F.linear(x, shared[1]), shared[2]) + top[:, None].to(dt) * y
        out.float().square().mean().backward()

    def llava_step():
        x = x0.clone().requires_grad_(True)
        p = torch.softmax(F.linear(x, router).float(), -1)
        top, idx = p.topk(2, -1)
        flat = idx.reshape(-1)
        order, offs = sort_by(flat)
        b = offs.tolist()
        xs = x.repeat_interleave(2, 0)[order]
        ys = []
        for e in range(EXPERTS):
            xe = xs[b[e]:b[e + 1]]
            ys.append(F.linear(F.silu(F.linear(xe, dense["gate"][e])) * F.linear(xe, dense["up"][e]), dense["down"][e]))
        y = torch.empty_like(xs)
        y[order] = torch.cat(ys)
        out = (y.view(tokens, 2, hidden) * top[..., None].to(dt)).sum(1)
        out.float().square().mean().backward()

    res = {"shape": {"hidden": hidden, "ffn": ffn, "tokens": tokens, "experts": EXPERTS}}
    for name, f in (("mote_layer_step", mote_step), ("moe_llava_layer_step", llava_step)):
        err = _try(lambda: res.__setitem__(name, _bench_steps(run, f)))
        if err:
            res[name] = {"error": err}
    a, b = res.get("mote_layer_step", {}), res.get("moe_llava_layer_step", {})
    if "median_us" in a and "median_us" in b:
        res["ratio_mote_over_moe_llava"] = a["median_us"] / b["median_us"]
        run.log(f"train layer step ratio MoTE / MoE-LLaVA = {res['ratio_mote_over_moe_llava']:.3f} (target <= 1.10)")
    run.report["train"] = res


def _bench_steps(run: Run, f) -> dict:
    """Eager timing of a training step (host work and syncs included, as a real step has them)."""
    ts = []
    for i in range(2 + run.repeats):
        run.sync()
        t = time.perf_counter()
        f()
        run.sync()
        if i >= 2 or run.interpret:
            ts.append((time.perf_counter() - t) * 1e6)
    return {"min_us": min(ts), "median_us": statistics.median(ts), "max_us": max(ts), "method": "wall, synced"}


def _try(f) -> str | None:
    """Run f; the error as one line (a failed variant is recorded, the run goes on)."""
    try:
        f()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


# ---------------------------------------------------------------------------------------------- report

def picks(report: dict) -> dict:
    """Per shape: the fastest decode path at M = 1 and M = 16 (Triton GEMV / GEMM vs CUDA C)."""
    out = {}
    for row in report["linear"]:
        if row["M"] > 16:
            continue
        cands = {v: t["median_us"] for v, t in row["us"].items()
                 if "median_us" in t and v in ("w2a8_linear", "triton_gemm_decode", "cuda_c_gemv")}
        if cands:
            best = min(cands, key=cands.get)
            out[f"{row['model']} {row['matrix']} M={row['M']}"] = {"best": best, "us": cands[best], "all_us": cands}
    return out


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"# device_check ({env['device']})", "",
             f"torch {env['torch']}, triton {env['triton']}, numpy {env['numpy']}, python {env['python']}; "
             f"wall {report['wall_s']:.0f} s; interpret: {env['interpret']}; sections done: "
             f"{', '.join(report.get('done', []))}", ""]
    checks = report["checks"]
    bad = [c for c in checks if not c["ok"]]
    lines += [f"## Correctness: {len(checks) - len(bad)} / {len(checks)} passed", ""]
    lines += [f"- FAILED {c['name']}: {c['detail']}" for c in bad] or ["- all passed (int32 bit-exact, fp32 rtol "
                                                                        f"{FP32_RTOL}, bf16 {BF16_RTOL:g})"]
    lines += [f"- note: {n}" for n in report["notes"]]
    bw = report.get("bandwidth")
    if bw:
        lines += ["", f"## Copy bandwidth: {bw['copy_GBps']:.0f} GB/s (device-to-device, {bw['bytes'] >> 20} MiB)"]
    lines += ["", "## Linear (median us; speedup = cuBLAS bf16 time / this)", "",
              "| model | matrix | M | variant | us | x vs bf16 | x vs int_mm | GB/s | of copy BW |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["linear"]:
        for v, t in r["us"].items():
            if "median_us" not in t:
                lines.append(f"| {r['model']} | {r['matrix']} | {r['M']} | {v} | {t.get('error', '')} | | | | |")
                continue
            gb = r["GBps"].get(v) or {}
            lines.append(f"| {r['model']} | {r['matrix']} | {r['M']} | {v} | {t['median_us']:.2f} | "
                         f"{_fmt(r['speedup_vs_bf16'].get(v), '.2f')} | {_fmt(r['speedup_vs_int_mm'].get(v), '.2f')} | "
                         f"{_fmt(gb.get('GBps'), '.0f')} | {_fmt(gb.get('of_copy'), '.0%')} |")
    lines += ["", "## Decode picks (fastest W2A8 path)", ""]
    lines += [f"- {k}: {v['best']} {v['us']:.2f} us ({', '.join(f'{a} {b:.2f}' for a, b in v['all_us'].items())})"
              for k, v in report["picks"].items()]
    lines += ["", "## Config sweeps (best of each)", ""]
    for s in report["sweeps"]:
        lines.append(f"- {s['model']} {s['matrix']} {s['kernel']} M={s['M']}: best {s['best']} "
                     f"{_fmt(s['best_us'], '.2f')} us; errors: "
                     f"{sum('error' in r for r in s['results'])}")
    lines += ["", "## Grouped experts (median us)", ""]
    for r in report["grouped"]:
        lines.append(f"- {r['model']} {r['matrix']} tokens {r['tokens']} counts {r['counts']}: " + ", ".join(
            f"{v} {t['median_us']:.1f}" if "median_us" in t else f"{v} {t['error']}" for v, t in r["us"].items())
            + "; speedup vs bf16 loop: " + ", ".join(f"{v} {x:.2f}" for v, x in r["speedup_vs_bf16_loop"].items()))
    lines += ["", "## GPU engine decode (batch 1, random weights; target >= 60% of the bound)", ""]
    lines += [f"- {r['model']}, {r.get('moe_decode', 'gemv')} MoE decode: {r['tokens_per_s']:.1f} tokens/s ({r['tokens']} tokens after a {r['prompt']}-token "
              f"prompt); a step reads {r['bytes_per_token'] / 2**20:.1f} MiB: bound {r['bound_tokens_per_s']:.0f} "
              f"tokens/s at copy bandwidth, {r['of_bound']:.0%} of it" for r in report.get("engine", [])]
    tr = report.get("train", {})
    lines += ["", "## Training (one moe layer, forward + backward)", ""]
    if "skipped" in tr:
        lines.append(f"- skipped: {tr['skipped']}")
    else:
        for k in ("mote_layer_step", "moe_llava_layer_step"):
            t = tr.get(k, {})
            lines.append(f"- {k}: {t['median_us']:.0f} us" if "median_us" in t else f"- {k}: {t.get('error')}")
        if "ratio_mote_over_moe_llava" in tr:
            lines.append(f"- ratio MoTE / MoE-LLaVA: {tr['ratio_mote_over_moe_llava']:.3f} (target <= 1.10)")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _environment(interpret: bool):
    """torch, after checking there is what the run needs; one error line otherwise."""
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    try:
        import torch
    except ImportError:
        raise MoteExportError("device_check needs torch and triton: pip install 'mote-edge[gpu]'") from None
    if not interpret:
        if not torch.cuda.is_available():
            raise MoteExportError(f"device_check needs a CUDA GPU (sm_80 or newer) and torch {torch.__version__} "
                                  f"sees none (CUDA build: {torch.version.cuda}); --interpret checks the code paths on CPU")
        cap = torch.cuda.get_device_capability(0)
        if cap < (8, 0):
            raise MoteExportError(f"device_check needs sm_80 or newer (int8 tensor cores, the kernels' targets); "
                                  f"{torch.cuda.get_device_name(0)} is sm_{cap[0]}{cap[1]}")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise MoteExportError("device_check needs triton (3.6 or 3.7): pip install 'mote-edge[gpu]'") from None
    return torch


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="python -m mote_edge.cuda_kernels.device_check",
                                description=__doc__.split("\n")[0])
    p.add_argument("-o", "--out", required=True, help="folder for device_check.json and device_check.md")
    p.add_argument("--interpret", action="store_true",
                   help="run on CPU under TRITON_INTERPRET=1 at tiny shapes (checks the code paths, no timings worth reading)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per variant (GPU; default 10)")
    p.add_argument("--skip-train", action="store_true", help="leave out the training layer step")
    p.add_argument("--skip-sweeps", action="store_true", help="leave out the config sweeps (about a third of the run)")
    a = p.parse_args(argv)
    torch = _environment(a.interpret)
    import numpy
    import triton

    from . import cuda_lib, w2a8 as W

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(torch, a.interpret, a.repeats)
    run.report["env"] = {"device": "cpu (Triton interpreter)" if a.interpret else torch.cuda.get_device_name(0),
                         "capability": None if a.interpret else "sm_%d%d" % torch.cuda.get_device_capability(0),
                         "torch": torch.__version__, "triton": triton.__version__, "numpy": numpy.__version__,
                         "python": platform.python_version(), "interpret": a.interpret, "l2_bytes": run.l2,
                         "shipped": {k: {str(kk): vv for kk, vv in v.items()} for k, v in W.SHIPPED.items()}}
    steps = [("correctness", lambda: correctness(run, W, cuda_lib))]
    steps += [("bandwidth", lambda: run.report.__setitem__("copy_GBps", bandwidth(run))),
              ("linear", lambda: linear_bench(run, W, cuda_lib, run.report["copy_GBps"], not a.skip_sweeps)),
              ("grouped", lambda: grouped_bench(run, W, run.report["copy_GBps"])),
              ("engine", lambda: engine_bench(run, run.report["copy_GBps"]))]
    if not a.skip_train:
        steps.append(("train", lambda: train_bench(run)))
    for name, f in steps:
        run.log(f"{name} ...")
        err = _try(f)
        if err:
            run.report.setdefault("errors", {})[name] = err
            run.log(f"{name} stopped: {err}")
            if name == "bandwidth":
                run.report["copy_GBps"] = float("nan")
        # written after every section: a run cut short by a time limit still leaves what it measured
        run.report["done"] = [n for n, _ in steps[:steps.index((name, f)) + 1]]
        run.report["picks"] = picks(run.report)
        run.report["wall_s"] = time.perf_counter() - run.t0
        _write(out / "device_check.json", json.dumps(run.report, indent=1, default=str))
        _write(out / "device_check.md", markdown(run.report))
    bad = [c for c in run.report["checks"] if not c["ok"]]
    print(f"device_check: {len(run.report['checks']) - len(bad)} / {len(run.report['checks'])} checks passed, "
          f"{len(run.report.get('errors', {}))} sections stopped; wrote {out / 'device_check.md'} "
          f"({run.report['wall_s']:.0f} s)")
    return 1 if bad or run.report.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile a Triton kernel for a GPU target without a GPU (DESIGN.md section 6) and read what came out.

compile_for() wraps triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32)) (the same in
triton 3.6 and 3.7), passes the divisibility-by-16 hints the runtime would give aligned pointers and
sizes (without them loads stay bytewise), and runs the triton wheel's ptxas -v on the PTX for register
and spill counts (triton's own n_spills is only known after loading on a device).
`shipped_kernels()` lists every config w2a8.SHIPPED launches, with its real argument types and the
instructions it must contain.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..exporters.errors import MoteExportError

# usable shared memory per block (bytes): A100 163 KiB, H100/H200 227 KiB
SHARED_LIMIT = {80: 166912, 90: 232448}


@dataclass
class Compiled:
    name: str
    capability: int
    ptx: str
    shared: int
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    ptxas_log: str = field(repr=False, default="")

    def has(self, instruction: str) -> bool:
        return instruction in self.ptx


def ptxas_path() -> str:
    own = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if own.is_file():
        return str(own)
    found = shutil.which("ptxas")
    if not found:
        raise MoteExportError("ptxas not found (neither in the triton wheel nor on PATH); it is needed to "
                              "count registers and spills")
    return found


def _ptxas_stats(ptx: str, capability: int) -> tuple[int, int, int, str]:
    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([ptxas_path(), f"-arch={arch}", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True)
    log = run.stdout + run.stderr
    if run.returncode:
        raise MoteExportError(f"ptxas failed for {arch}: {log.strip().splitlines()[-1] if log.strip() else run.returncode}")
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else 0,
            int(spill.group(2)) if spill else 0, log)


def compile_for(kernel, signature: dict, constexprs: dict, target: int, divisible=(), options=None) -> Compiled:
    """Compile `kernel` (a @triton.jit function) for sm_80 (target=80) or sm_90a (target=90).

    signature: argument name -> Triton type ('*i8', '*fp32', 'i32', ...) for every runtime argument;
    constexprs: name -> value (added to the signature as 'constexpr'); divisible: the argument names that
    get the tt.divisibility=16 hint; options: num_warps, num_stages, enable_fp_fusion, ..."""
    if target not in SHARED_LIMIT:
        raise MoteExportError(f"compile target {target} not supported; accepted: 80 (sm_80), 90 (sm_90a)")
    names = kernel.arg_names
    sig = {}
    for name in names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in signature:
            sig[name] = signature[name]
        else:
            raise MoteExportError(f"{kernel.__name__}: argument {name!r} has no type in the signature")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=kernel, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", target, 32), options=dict(options or {}))
    ptx = ck.asm["ptx"]
    regs, st, ld, log = _ptxas_stats(ptx, target)
    md = ck.metadata
    return Compiled(kernel.__name__, target, ptx, int(md.shared), int(md.num_warps), regs, st, ld, log)


@dataclass
class GateCase:
    """One shipped config: how to compile it and which instructions its PTX must hold per target."""
    label: str
    kernel: object
    signature: dict
    constexprs: dict
    divisible: tuple
    options: dict
    expect: dict  # capability -> instruction substrings that must appear
    forbid: tuple = ()  # substrings that must not (an fma in the quantiser would change its rounding)


def shipped_kernels(out_type: str = "*bf16") -> list[GateCase]:
    """Every config in w2a8.SHIPPED with the argument types the wrappers launch (bf16 output, as the
    engine stores), aligned pointers and the 16-divisible sizes of the real shapes (K, N, KW, strides)."""
    from . import ternary_train as tt
    from . import w2a8 as W

    cases = []
    q = dict(tt.CONFIGS["act_quant_int8"], WITH_SUM=True)  # quantize_act's launch of training's quantiser
    cases.append(GateCase(
        "quant/act", tt.act_quant_int8_kernel,
        {"x_ptr": "*bf16", "q_ptr": "*i8", "step_ptr": "*fp32", "sum_ptr": "*i32", "K": "i32",
         "stride_x": "i32", "stride_q": "i32", "eps": "fp32"},
        {"BLOCK_K": q["BLOCK_K"], "WITH_SUM": True}, ("x_ptr", "q_ptr", "step_ptr", "sum_ptr", "K", "stride_x", "stride_q"),
        {"num_warps": q["num_warps"]} | tt.OPTIONS["act_quant_int8"],
        {80: ("ld.global.v4", "div.rn.f32"), 90: ("ld.global.v4", "div.rn.f32")}, forbid=("fma.",)))
    lin = {"xq_ptr": "*i8", "xsum_ptr": "*i32", "xs_ptr": "*fp32", "w_ptr": "*i32", "ws_ptr": "*fp32",
           "out_ptr": out_type, "part_ptr": "*i32", "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
           "KW": "i32", "stride_xm": "i32", "stride_om": "i32"}
    div = ("xq_ptr", "xsum_ptr", "xs_ptr", "w_ptr", "ws_ptr", "out_ptr", "part_ptr", "lock_ptr", "N", "K", "KW",
           "stride_xm", "stride_om")

    def splits(cfg):  # SPLIT_K = 0 (auto) launches 1 or a split: gate both forms
        return [cfg["SPLIT_K"]] if cfg["SPLIT_K"] > 0 else [1, 4]

    for bm, cfg in W.SHIPPED["gemv"].items():
        for sk in splits(cfg):
            cases.append(GateCase(f"gemv/{bm}" + (f" split{sk}" if sk > 1 else ""), W._gemv_kernel, lin,
                                  {**W._tiles(cfg), "SPLIT_K": sk, "OUT_INT32": False}, div, W._launch_opts(cfg),
                                  {80: ("ld.global.v",), 90: ("ld.global.v",)}))
    for key, cfg in W.SHIPPED["gemm"].items():
        big = cfg["BM"] >= 64 and cfg["num_warps"] % 4 == 0
        for sk in splits(cfg):
            cases.append(GateCase(f"gemm/{key}" + (f" split{sk}" if sk > 1 else ""), W._gemm_kernel, lin,
                                  {**W._tiles(cfg), "SPLIT_K": sk, "OUT_INT32": False}, div, W._launch_opts(cfg),
                                  {80: ("mma.sync",), 90: ("wgmma",) if big else ("mma.sync",)}))
    grp = {**{k: v for k, v in lin.items() if k not in ("M", "part_ptr", "lock_ptr")}, "offs_ptr": "*i32", "E": "i32",
           "stride_we": "i32"}
    div = tuple(d for d in div if d not in ("part_ptr", "lock_ptr"))
    for key, cfg in W.SHIPPED["grouped"].items():
        big = cfg["BM"] >= 64 and cfg["num_warps"] % 4 == 0
        cases.append(GateCase(f"grouped/{key}", W._grouped_kernel, grp, {**W._tiles(cfg), "OUT_INT32": False},
                              (*div, "offs_ptr", "stride_we"), W._launch_opts(cfg),
                              {80: ("mma.sync",), 90: ("wgmma",) if big else ("mma.sync",)}))
    return cases


def gate(case: GateCase, target: int) -> tuple[Compiled, list[str]]:
    """Compile one case; the list names every failed check (empty = passes)."""
    c = compile_for(case.kernel, case.signature, case.constexprs, target, case.divisible, case.options)
    bad = [f"missing {i!r}" for i in case.expect[target] if not c.has(i)]
    bad += [f"has {i!r}" for i in case.forbid if c.has(i)]
    if c.spill_stores or c.spill_loads:
        bad.append(f"spills {c.spill_stores} B stores / {c.spill_loads} B loads")
    if c.shared > SHARED_LIMIT[target]:
        bad.append(f"shared memory {c.shared} B > {SHARED_LIMIT[target]} B")
    return c, bad

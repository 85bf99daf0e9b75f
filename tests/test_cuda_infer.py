"""The W2A8 inference kernels proven without a GPU (DESIGN.md section 6).

- every Triton kernel (per-token int8 quantisation, GEMV, decode / prefill GEMM, grouped experts) runs
  under TRITON_INTERPRET=1 on CPU tensors and equals the torch integer reference bit-exactly (int32),
  the fp32 epilogue within 1e-6 relative and bf16 within one bf16 step; outputs poisoned first;
  adversarial inputs: all +1 / -1 codes with +-127 / -128 activations, K and N tails, ragged and empty
  groups, rounding ties. These are device_check's own correctness checks, run through
  `device_check --interpret` end to end;
- the checks catch an unwritten or a wrong output (so they can fail);
- every shipped config compiles for sm_80 and sm_90a (divisibility hints, no spills, mma / wgmma);
- the CUDA C library builds with nvcc (dp4a + lop3 in its SASS) and its decode helpers, built for the
  host with g++, equal the same integer reference.

Triton is only ever imported in subprocesses: TRITON_INTERPRET must be set before triton's first import,
and this process may already hold (or later need) the other mode.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_LABELS = ("gemv/1", "gemv/2", "gemv/4", "gemm/decode", "gemm/prefill")
SPLIT_LABELS = ("gemv/1 split3", "gemv/4 split3", "gemm/decode split3")  # split-K's atomic fix-up path


def _env(interpret: bool, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["MOTE_EDGE_CACHE"] = str(cache)  # builds land in a temporary folder, never the repository
    return env


def _python(code: str, interpret: bool, cache: Path, timeout: int = 240) -> dict:
    run = subprocess.run([sys.executable, "-c", code], env=_env(interpret, cache), cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mote-cache")


@pytest.fixture(scope="module")
def interpret_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("device-check")
    run = subprocess.run([sys.executable, "-m", "mote_edge.cuda_kernels.device_check", "-o", str(out), "--interpret",
                          "--skip-train"], env=_env(False, cache), cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = json.loads((out / "device_check.json").read_text()) if (out / "device_check.json").is_file() else None
    return run, report, out


def test_every_kernel_equals_the_integer_reference_under_the_interpreter(interpret_run):
    run, report, _ = interpret_run
    assert run.returncode == 0, run.stderr[-3000:]
    checks = {c["name"]: c for c in report["checks"]}
    bad = [f"{c['name']}: {c['detail']}" for c in checks.values() if not c["ok"]]
    assert not bad, "\n".join(bad)
    assert report["env"]["interpret"] is True
    names = list(checks)
    for dt in ("float32", "bfloat16"):
        assert f"quantize_act {dt}" in checks  # ties and an all-zero row included
    for label in (*SHIPPED_LABELS, *SPLIT_LABELS):
        for kind in ("int32", "fp32", "bf16"):
            shape_checks = [n for n in names if n.startswith(f"{label} M=") and n.endswith(kind)]
            assert len(shape_checks) >= 2, (label, kind, shape_checks)  # both shapes: K tail inside a word, K > BK
            for sign in ("+1", "-1"):
                assert f"{label} extremes codes={sign} {kind}" in checks
    for counts in ("[0, 37, 0, 91]", "[64, 1, 65, 0]", "[5, 0, 0, 0]"):
        assert f"grouped counts={counts} int32" in checks and f"grouped counts={counts} fp32" in checks
    for qtype in ("TQ2_0", "TQ1_0", "Q2_0", "Q4_0", "F16"):
        assert f"pack_gguf_ternary {qtype}" in checks  # the GGUF blocks repack to the kernels' words
    assert len(checks) >= 90


def test_device_check_interpret_end_to_end(interpret_run):
    run, report, out = interpret_run
    assert run.returncode == 0, run.stderr[-3000:]
    assert "checks passed" in run.stdout and (out / "device_check.md").is_file()
    assert not report.get("errors")
    assert report["bandwidth"]["copy_GBps"] > 0
    rows = {(r["matrix"], r["M"]): r for r in report["linear"]}
    assert set(rows) == {(mat, m) for mat in ("gate/up", "down") for m in (1, 16, 24)}
    for r in rows.values():
        for v in ("cublas_bf16", "int_mm(M=32)", "w2a8_quant+linear", "w2a8_linear", "quant_only"):
            assert r["us"][v]["median_us"] > 0, (r["matrix"], r["M"], v, r["us"][v])
        assert r["GBps"]["w2a8_linear"]["GBps"] > 0 and r["speedup_vs_bf16"]["w2a8_linear"] > 0
    assert {r["matrix"] for r in report["grouped"]} == {"gate/up", "down"}
    assert all(r["us"]["w2a8_grouped"]["median_us"] > 0 for r in report["grouped"])
    assert all(s["best"] for s in report["sweeps"])
    assert report["picks"]  # decode paths compared per shape
    engine = report["engine"]  # the GPU engine's decode, both --moe-decode paths, each against its bound
    assert {r["moe_decode"] for r in engine} == {"gemv", "grouped"} and all(r["tokens_per_s"] > 0 for r in engine)
    md = (out / "device_check.md").read_text()
    assert "## Linear" in md and "## Grouped experts" in md and "passed" in md


def test_device_check_without_a_gpu_is_one_error_line(tmp_path, cache):
    # the script form (a checkout that is not installed, as on a bare device machine)
    run = subprocess.run([sys.executable, str(ROOT / "cuda_kernels" / "device_check.py"), "-o", str(tmp_path / "o")],
                         env={**_env(False, cache), "CUDA_VISIBLE_DEVICES": ""}, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: device_check needs a CUDA GPU"), run.stderr
    assert not (tmp_path / "o" / "device_check.json").exists()


CATCH = r"""
import json, torch
from mote_edge.cuda_kernels import cuda_lib, device_check as D, w2a8 as W
run = D.Run(torch, True, 1)
g = torch.Generator().manual_seed(5)
codes = torch.randint(-1, 2, (24, 72), dtype=torch.int8, generator=g)
pk = W.PackedTernary.from_codes(codes, 0.5)
a = W.quantize_act(torch.randn(3, 72, generator=g))
cfg = W.SHIPPED["gemv"][4]
def unwritten(a, pk, i32, dt, out):
    return out  # the poisoned buffer, never written
def off_by_one(a, pk, i32, dt, out):
    y = W.w2a8_linear(a, pk, out_dtype=dt, out_int32=i32, kernel="gemv", config=cfg, out=out)
    y[2, 23] += 1
    return y
D._linear_checks(run, W, "unwritten", a, pk, codes, unwritten)
D._linear_checks(run, W, "off_by_one", a, pk, codes, off_by_one)
D._linear_checks(run, W, "real", a, pk, codes, D._triton_launch(W, "gemv", cfg))
print(json.dumps({c["name"]: c["ok"] for c in run.report["checks"]}))
"""


def test_the_checks_catch_unwritten_and_wrong_outputs(cache):
    res = _python(CATCH, True, cache)
    for kind in ("int32", "fp32", "bf16"):
        assert res[f"unwritten {kind}"] is False
        assert res[f"real {kind}"] is True
    assert res["off_by_one int32"] is False and res["off_by_one fp32"] is False


GATE = r"""
import json
from mote_edge.cuda_kernels import compile_gate as G
out = {}
for case in G.shipped_kernels():
    for target in (80, 90):
        c, bad = G.gate(case, target)
        out[f"{case.label} sm{target}"] = {"bad": bad, "mma": c.has("mma.sync"), "wgmma": c.has("wgmma"),
                                          "regs": c.registers, "shared": c.shared}
print(json.dumps(out))
"""


def test_every_shipped_config_compiles_for_sm80_and_sm90a(cache):
    res = _python(GATE, False, cache)
    assert {k for k in res} >= {f"{lab} sm{t}" for lab in (*SHIPPED_LABELS, "quant/act", "grouped/experts",
                                                          "gemv/1 split4", "gemm/decode split4") for t in (80, 90)}
    bad = {k: v["bad"] for k, v in res.items() if v["bad"]}
    assert not bad, bad
    assert res["gemm/prefill sm80"]["mma"] and res["gemm/prefill sm90"]["wgmma"]
    assert res["grouped/experts sm80"]["mma"] and res["grouped/experts sm90"]["wgmma"]
    assert res["gemm/decode sm90"]["mma"]  # BM = 16 is below wgmma's 64 rows: mma.sync on Hopper too
    assert not res["gemv/1 sm90"]["mma"]  # the GEMV is CUDA-core multiply + sum


HOST = r"""
import json, random, torch
from mote_edge.cuda_kernels import cuda_lib, w2a8 as W
h = cuda_lib.HostHelpers()
rnd = random.Random(0)
def lop3_ref(a, b, c, lut):
    return sum(((lut >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1))) & 1) << i for i in range(32))
def dp4a_ref(a, b, c):
    s = lambda v, i: ((v >> (8 * i)) & 255) - (256 if (v >> (8 * i)) & 128 else 0)
    return c + sum(s(a, i) * s(b, i) for i in range(4))
words = [rnd.getrandbits(32) for _ in range(200)] + [0, 0xFFFFFFFF, 0x80000000]
lop3_ok = all(h.lop3_and_or(a, b, c) == lop3_ref(a, b, c, 0xEA) == ((a & b) | c)
              for a, b, c in zip(words, words[1:], words[2:]))
dp4a_ok = all(h.dp4a(a, b, c) == dp4a_ref(a, b, c) for a, b, c in
              zip(words, words[1:], [rnd.randint(-2**20, 2**20) for _ in words]))
g = torch.Generator().manual_seed(0)
res = {"lop3": lop3_ok, "dp4a": dp4a_ok}
for name, (n, k) in {"tail": (5, 40), "square": (33, 256)}.items():
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
    words_t = W.pack_w2(codes)
    dec = h.decode(words_t)
    res[f"decode {name}"] = torch.equal(dec[:, :k], codes) and bool((dec[:, k:] == 0).all())
for sign in (1, -1, 0):
    codes = torch.full((7, 128), sign, dtype=torch.int8) if sign else torch.randint(-1, 2, (7, 128), dtype=torch.int8, generator=g)
    xq = torch.randint(-128, 128, (5, 128), dtype=torch.int8, generator=g)
    xq[0] = 127; xq[1] = -128; xq[2, ::2] = -127
    xsum = xq.to(torch.int32).sum(-1, dtype=torch.int32)
    res[f"gemv codes={sign}"] = torch.equal(h.gemv_int(W.pack_w2(codes), xq, xsum), W.ref_int_dot(xq, codes))
print(json.dumps(res))
"""


def test_host_build_of_the_decode_helpers_equals_the_reference(cache):
    from mote_edge.cuda_kernels import cuda_lib

    try:
        cuda_lib.find_cxx()
    except Exception as exc:
        pytest.skip(f"no C++ compiler: {exc}")
    res = _python(HOST, False, cache)
    assert res == {k: True for k in res} and len(res) == 7, res


def test_cuda_library_builds_with_nvcc(monkeypatch, cache):
    from mote_edge.cuda_kernels import cuda_lib

    monkeypatch.setenv("MOTE_EDGE_CACHE", str(cache))
    try:
        nvcc = cuda_lib.find_nvcc()
    except Exception as exc:
        pytest.skip(f"nvcc absent on this machine: {exc}")
    lib_path = cuda_lib.build_gemv_library()
    assert lib_path.is_file() and ROOT not in lib_path.parents and Path(nvcc).is_file()
    assert cuda_lib.build_gemv_library() == lib_path  # cached: built once per sources + nvcc + flags
    counts = cuda_lib.sass_counts(lib_path)
    assert counts["IDP.4A"] > 0 and counts["LOP3.LUT"] > 0, counts
    lib = ctypes.CDLL(str(lib_path))
    assert lib.mote_w2a8_abi_version() == 1
    # bad shapes are refused before any CUDA call (K must be a multiple of 64): cudaErrorInvalidValue = 1
    vp = ctypes.c_void_p
    lib.mote_w2a8_gemv.argtypes = [vp] * 6 + [ctypes.c_int] * 4 + [vp]
    assert lib.mote_w2a8_gemv(None, None, None, None, None, None, 0, 1, 16, 100, None) == 1
    lib.mote_w2a8_error_string.restype = ctypes.c_char_p
    assert lib.mote_w2a8_error_string(1)


def test_missing_nvcc_is_one_clear_error(monkeypatch, tmp_path):
    from mote_edge.cuda_kernels import cuda_lib
    from mote_edge.exporters.errors import MoteExportError

    for var in ("NVCC", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(cuda_lib, "CUDA_HOMES", (str(tmp_path / "none"),))
    with pytest.raises(MoteExportError, match=r"^nvcc not found .*the Triton kernels need no nvcc$"):
        cuda_lib.build_gemv_library()

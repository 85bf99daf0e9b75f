"""The NEON (and aarch64 scalar) paths of the whole kernel library, built with aarch64-linux-gnu-gcc -static
and run under qemu-aarch64 through tests/native/kernel_driver.c, equal the int64 numpy reference
(runtime_cpu/ternary_ref.py) bit for bit: lookup-table and multiply-add products, and the activation
quantisation. The same driver built natively runs once against the x86 paths, so the driver itself is proven.

Debian packages: gcc-aarch64-linux-gnu, qemu-user (qemu-aarch64). Building takes ~3 s, the whole file ~15 s."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from mote_edge.runtime_cpu import ternary_ref as ref

ROOT = Path(__file__).resolve().parents[1]
CSRC = sorted(str(p) for p in (ROOT / "runtime_cpu" / "csrc").glob("*.c"))
DRIVER = str(ROOT / "tests" / "native" / "kernel_driver.c")
CROSS, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
FLAGS = ["-O2", "-std=gnu11", "-fno-strict-aliasing", "-Wall", "-Werror", "-pthread"]  # warning-free, as setup.py builds it
TIMES: dict[str, float] = {}


def _build(cc: str, out: Path, extra: list[str]) -> Path:
    t0 = time.perf_counter()
    r = subprocess.run([cc, *FLAGS, *extra, DRIVER, *CSRC, "-o", str(out), "-lm"], capture_output=True, text=True)
    TIMES[f"build {Path(cc).name}"] = time.perf_counter() - t0
    assert r.returncode == 0, f"{cc} failed:\n{r.stderr}"
    return out


@pytest.fixture(scope="module")
def arm(tmp_path_factory):
    if not CROSS or not QEMU:
        pytest.skip("aarch64-linux-gnu-gcc and qemu-aarch64 are needed (Debian: gcc-aarch64-linux-gnu qemu-user)")
    exe = _build(CROSS, tmp_path_factory.mktemp("arm") / "kernel_driver", ["-static"])
    yield [QEMU, str(exe)]
    print("\nneon harness times: " + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(TIMES.items())))


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> list[str]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.skip("no native C compiler")
    return [str(_build(cc, tmp_path_factory.mktemp("x86") / "kernel_driver", []))]


def _run(cmd: list[str], *args) -> None:
    t0 = time.perf_counter()
    r = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=120)
    key = "run qemu" if cmd[0] == QEMU else "run native"
    TIMES[key] = TIMES.get(key, 0.0) + time.perf_counter() - t0
    assert r.returncode == 0, f"{' '.join(map(str, args))}: {r.stderr}"


def _gemm(cmd, tmp: Path, kernel: str, isa: str, codes, q, step, scale, threads=1, offset=0, block_bytes=64):
    n, k = codes.shape
    kp = ref.padded(k)
    w = ref.pack_tq2_codes(codes).reshape(n, kp // 256, 64)
    if block_bytes == 66:  # GGUF TQ2_0 blocks: the fp16 d follows the 64 code bytes and is not read
        w = np.concatenate([w, np.full((n, kp // 256, 2), 0x7b, np.uint8)], axis=2)
    t = q.shape[0]
    sumq = q.astype(np.int32).sum(axis=1).astype(np.int32)
    hdr = np.array([n, kp, t, block_bytes, kp // 256 * block_bytes], "<i8")
    inp, out = tmp / f"in_{kernel}_{isa}", tmp / f"out_{kernel}_{isa}"
    inp.write_bytes(b"MOTEGIN1" + hdr.tobytes() + w.tobytes() + q.astype(np.int8).tobytes() + sumq.astype("<i4").tobytes()
                    + step.astype("<f4").tobytes() + scale.astype("<f4").tobytes())
    _run(cmd, "gemm", kernel, isa, threads, inp, out, offset)
    y = np.fromfile(out, "<f4").reshape(t, n)
    want = ref.ref_gemm(codes, q, step, scale)
    bad = np.flatnonzero(y.view(np.int32) != want.view(np.int32))
    assert bad.size == 0, f"{kernel} {isa}: {bad.size} of {y.size} differ, first at {np.unravel_index(bad[0], y.shape)}"


def _cases():
    rng = np.random.default_rng(0)
    for weights, acts in [("plus", 127), ("plus", -128), ("minus", 127), ("minus", -128), ("random", None)]:
        for t in (1, 5):
            n, k = 67, 4864
            codes = {"plus": np.ones((n, k), np.int8), "minus": -np.ones((n, k), np.int8),
                     "random": rng.integers(-1, 2, (n, k)).astype(np.int8)}[weights]
            q = np.full((t, k), acts, np.int8) if acts is not None else rng.integers(-128, 128, (t, k)).astype(np.int8)
            yield f"{weights}{acts}-t{t}", codes, q, 1, 0
    for n, k, t, threads, offset in [(1, 256, 1, 1, 1), (3, 768, 2, 2, 1), (17, 896, 5, 1, 3), (33, 256, 9, 2, 0),
                                     (67, 1280, 19, 2, 1)]:
        codes = rng.integers(-1, 2, (n, k)).astype(np.int8)
        q = np.zeros((t, ref.padded(k)), np.int8)
        q[:, :k] = rng.integers(-128, 128, (t, k))
        yield f"n{n}-k{k}-t{t}-th{threads}-off{offset}", codes, q, threads, offset


CASES = list(_cases())


@pytest.mark.parametrize("kernel", ["lut", "mad"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_neon_gemm(arm, tmp_path, kernel, case):
    _, codes, q, threads, offset = case
    rng = np.random.default_rng(len(case[0]))
    step = (rng.random(q.shape[0]) + 0.1).astype(np.float32)
    scale = rng.standard_normal(codes.shape[0]).astype(np.float32)
    for isa in ("neon", "scalar"):
        _gemm(arm, tmp_path, kernel, isa, codes, q, step, scale, threads, offset)


def test_neon_gguf_blocks(arm, tmp_path):
    """Both families read 66-byte GGUF TQ2_0 blocks in place."""
    rng = np.random.default_rng(9)
    codes = rng.integers(-1, 2, (40, 512)).astype(np.int8)
    q = rng.integers(-128, 128, (3, 512)).astype(np.int8)
    for kernel in ("lut", "mad"):
        _gemm(arm, tmp_path, kernel, "neon", codes, q, np.ones(3, np.float32), np.ones(40, np.float32), block_bytes=66)


def test_neon_quant_act(arm, tmp_path):
    """mote_quant_act on aarch64 (rintf, float32 products) equals the numpy statement, ties included."""
    rng = np.random.default_rng(4)
    t, k, kp, eps = 6, 896, 1024, 1e-5
    x = rng.standard_normal((t, k)).astype(np.float32)
    x[1] = 0.0                               # all zero: amax = eps
    x[2] = np.clip(x[2], -0.9, 0.9)
    x[2, :6] = np.float32([1.0, -1.0, 0.5, 1.5, 2.5, -2.5]) / np.float32([1, 1, 127, 127, 127, 127])  # near-ties
    x[3] *= 1e-30                            # tiny values below eps
    inp, out = tmp_path / "qin", tmp_path / "qout"
    inp.write_bytes(b"MOTEQIN1" + np.array([t, k, kp], "<i8").tobytes() + np.float32(eps).tobytes() + x.tobytes())
    for isa in ("neon", "scalar"):
        _run(arm, "quant", isa, 1, inp, out)
        raw = out.read_bytes()
        q = np.frombuffer(raw[: t * kp], np.int8).reshape(t, kp)
        sumq = np.frombuffer(raw[t * kp: t * kp + 4 * t], "<i4")
        step = np.frombuffer(raw[t * kp + 4 * t:], "<f4")
        rq, rsumq, rstep = ref.quant_act_ref(x, eps, kp)
        assert np.array_equal(q, rq) and np.array_equal(sumq, rsumq) and np.array_equal(step.view(np.int32), rstep.view(np.int32))


def test_driver_native(native, tmp_path):
    """The driver built for this machine reproduces the reference on its best path and on scalar."""
    out = subprocess.run([*native, "isas"], capture_output=True, text=True, check=True).stdout.split()
    assert "scalar" in out
    _, codes, q, threads, offset = CASES[-1]
    rng = np.random.default_rng(1)
    step, scale = rng.random(q.shape[0]).astype(np.float32), rng.random(codes.shape[0]).astype(np.float32)
    for kernel in ("lut", "mad"):
        for isa in ("auto", "scalar"):
            _gemm(native, tmp_path, kernel, isa, codes, q, step, scale, threads, offset)


def test_driver_rejects_bad_input(native, tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"MOTEGIN1" + np.array([4, 200, 1, 64, 64], "<i8").tobytes())
    r = subprocess.run([*native, "gemm", "lut", "scalar", "1", str(bad), str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode != 0 and "kernel_driver:" in r.stderr

"""The C float-weight kernels (runtime_cpu/csrc/float_gemm.c) on real GGUF bytes, every ISA path this CPU runs.

Reference: float64 products of the weights as gguf-py decodes the same bytes (exporters.ternary.dequantize =
gguf.quants.dequantize), the bytes written by gguf-py's own quantize.

Tolerance, derived: every decoded weight w is exact in fp32 (an fp16 / bf16 / fp32 value, or an int8 / nibble
code times an fp16 d: <= 19 significant bits), so a kernel's only roundings are those of its fp32 sums. Whatever
the summation order (vector lanes, horizontal sums, scalar tails, a Q block's dot scaled by d, the bias), each
term x_k w_k passes through at most K + 3 roundings, so (Higham, dot products)
    |y - exact| <= gamma_(K+3) * (S + |bias|),   S = sum_k |x_k w_k|,   gamma_n = n u / (1 - n u), u = 2^-24,
and the float64 reference is within K 2^-53 S of exact. Two paths are within twice the bound of each other.
A wrong decode (a swapped nibble, a lost scale, a missed tail) is off by about |x_k w_k| itself, far outside.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

from mote_edge.exporters.errors import MoteExportError
from mote_edge.exporters.ternary import QUANT_SIZES, dequantize
from mote_edge.runtime_cpu import clib

pytestmark = pytest.mark.skipif(not clib.available(), reason=f"C kernels not built: {clib.error()}")

if clib.available():
    from mote_edge.runtime_cpu import float_kernels as fk

FLOAT_TYPES = (T.F32, T.F16, T.BF16)
QUANT_TYPES = (T.Q8_0, T.Q4_0)
U = 2.0 ** -24


@pytest.fixture
def threads():
    """Set the pool's thread count for a test; back to one thread after."""
    yield clib.set_threads
    clib.set_threads(1)


def raw_bytes(w: np.ndarray, qtype, offset: int = 0) -> np.ndarray:
    """gguf-py's bytes of w [N, K] as a flat uint8 array starting `offset` bytes past an aligned address."""
    q = np.ascontiguousarray(quantize(w, qtype)).view(np.uint8).reshape(-1)
    buf = np.empty(q.nbytes + 64 + offset, np.uint8)
    start = (-buf.ctypes.data) % 64 + offset
    out = buf[start:start + q.nbytes]
    out[:] = q
    return out


def decoded(raw: np.ndarray, qtype, N: int) -> np.ndarray:
    return dequantize(raw.reshape(N, -1), qtype).astype(np.float64)


def bound(x: np.ndarray, w64: np.ndarray, bias) -> np.ndarray:
    K = x.shape[1]
    n = K + 3
    S = np.abs(x.astype(np.float64)) @ np.abs(w64).T
    if bias is not None:
        S = S + np.abs(bias.astype(np.float64))
    return n * U / (1 - n * U) * S + K * 2.0 ** -53 * S


def reference(x: np.ndarray, w64: np.ndarray, bias) -> np.ndarray:
    y = x.astype(np.float64) @ w64.T
    return y if bias is None else y + bias.astype(np.float64)


def check(y: np.ndarray, ref: np.ndarray, tol: np.ndarray, what: str, factor: float = 1.0) -> None:
    assert y.dtype == np.float32 and y.shape == ref.shape, what
    err = np.abs(y.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(err - factor * tol), err.shape)
    assert np.all(err <= factor * tol), f"{what}: |err| {err[worst]:.3g} > bound {factor * tol[worst]:.3g} at {worst}"


CASES = [(t, K) for t in FLOAT_TYPES + QUANT_TYPES for K in (32, 96, 4864)] + \
        [(t, K) for t in FLOAT_TYPES for K in (1, 40, 72, 95)]


@pytest.mark.parametrize("qtype,K", CASES, ids=[f"{t.name}-K{K}" for t, K in CASES])
def test_every_path_within_the_bound(qtype, K, threads):
    """Odd N, T = 1 / 2 / 7 / 9, with and without bias, 1 and 2 threads, every ISA path: within the bound of the
    float64 reference, and the paths within twice the bound of each other."""
    rng = np.random.default_rng(K * 131 + int(qtype))
    for N in (1, 3, 17, 67):
        w = rng.standard_normal((N, K), dtype=np.float32)
        raw = raw_bytes(w, qtype, offset=2 if qtype == T.F16 else 0)
        w64 = decoded(raw, qtype, N)
        bias = rng.standard_normal(N, dtype=np.float32)
        for Tn in (1, 2, 7, 9):  # 9: two token chunks at K = 4864 (TC = 8)
            x = rng.standard_normal((Tn, K), dtype=np.float32)
            for b in (None, bias):
                ref, tol = reference(x, w64, b), bound(x, w64, b)
                outs = {}
                for n_threads in (1, 2):
                    threads(n_threads)
                    for isa in clib.isas_here():
                        y = fk.float_gemm(raw, qtype, N, K, x, bias=b, isa=isa)
                        check(y, ref, tol, f"{qtype.name} {isa} N={N} K={K} T={Tn} bias={b is not None} threads={n_threads}")
                        outs[isa, n_threads] = y
                first = next(iter(outs.values()))
                for key, y in outs.items():
                    check(y, first.astype(np.float64), tol, f"{key} vs {next(iter(outs))}", factor=2.0)


@pytest.mark.parametrize("qtype", FLOAT_TYPES + QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_unaligned_weights_and_strided_activations(qtype, offset):
    """Weights at odd and 2-byte offsets; x a column slice of a wider array (row stride > K)."""
    rng = np.random.default_rng(offset)
    N, K, Tn = 37, 128, 5
    raw = raw_bytes(rng.standard_normal((N, K), dtype=np.float32), qtype, offset)
    wide = rng.standard_normal((Tn, K + 24), dtype=np.float32)
    x = wide[:, 8:8 + K]
    w64 = decoded(raw, qtype, N)
    for isa in clib.isas_here():
        check(fk.float_gemm(raw, qtype, N, K, x, isa=isa), reference(x, w64, None), bound(x, w64, None),
              f"{qtype.name} offset {offset} {isa}")


def _random_blocks(rng, qtype, N: int, K: int) -> np.ndarray:
    """Q8_0 / Q4_0 bytes with every code (int8 -128..127, nibbles 0..15) and finite fp16 d of both signs,
    normal and subnormal: what a file may hold, not only what a quantizer makes."""
    block, size = QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (N * K // block, size), dtype=np.uint8)
    d = (rng.standard_normal(len(b)) * 10.0 ** rng.integers(-7, 2, len(b))).astype(np.float16)
    d[::7] = np.float16(6e-8)  # subnormal fp16
    b[:, :2] = d.view(np.uint8).reshape(-1, 2)
    return b.reshape(-1)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quant_blocks_with_every_code(qtype):
    rng = np.random.default_rng(7)
    N, K = 19, 256
    raw = _random_blocks(rng, qtype, N, K)
    w64 = decoded(raw, qtype, N)
    for Tn in (1, 6):
        x = rng.standard_normal((Tn, K), dtype=np.float32)
        for isa in clib.isas_here():
            check(fk.float_gemm(raw, qtype, N, K, x, isa=isa), reference(x, w64, None), bound(x, w64, None),
                  f"{qtype.name} T={Tn} {isa}")


def test_fp16_and_bf16_special_finite_values():
    """Subnormal fp16 (decoded exactly), +-0, the largest fp16, and bf16 across the fp32 range."""
    rng = np.random.default_rng(3)
    N, K = 9, 72
    h = rng.integers(0, 0x400, (N, K)).astype(np.uint16) | (rng.integers(0, 2, (N, K)).astype(np.uint16) << 15)
    h[0, :4] = [0x0000, 0x8000, 0x7BFF, 0xFBFF]  # +0, -0, +-65504
    h[1] = rng.integers(0, 0x7C00, K).astype(np.uint16)  # any finite positive fp16
    bf = (rng.standard_normal((N, K)).astype(np.float32) * np.float32(2.0) ** rng.integers(-140, 100, (N, K)).astype(np.float32))
    bf = (bf.view(np.uint32) >> 16).astype(np.uint16)
    x = rng.standard_normal((3, K), dtype=np.float32)
    for qtype, bits in ((T.F16, h), (T.BF16, bf)):
        raw = bits.view(np.uint8).reshape(-1)
        w64 = decoded(raw, qtype, N)
        assert np.all(np.isfinite(w64))
        for isa in clib.isas_here():
            check(fk.float_gemm(raw, qtype, N, K, x, isa=isa), reference(x, w64, None), bound(x, w64, None),
                  f"{qtype.name} specials {isa}")


def test_multi_matrix_product_mixed_types(threads):
    """One call over several matrices of different types and sizes on the same x (the row ranges of the pool
    cross matrix boundaries at rows that are not multiples of a tile)."""
    rng = np.random.default_rng(11)
    K, Tn = 160, 7
    specs = [(T.Q8_0, 3), (T.F16, 17), (T.BF16, 67), (T.Q4_0, 45), (T.F32, 21)]
    mats, refs = [], []
    x = rng.standard_normal((Tn, K), dtype=np.float32)
    for i, (qtype, N) in enumerate(specs):
        raw = raw_bytes(rng.standard_normal((N, K), dtype=np.float32), qtype)
        b = rng.standard_normal(N, dtype=np.float32) if i % 2 else None
        mats.append((raw, qtype, N, b))
        w64 = decoded(raw, qtype, N)
        refs.append((reference(x, w64, b), bound(x, w64, b)))
    for n_threads in (1, 2):
        threads(n_threads)
        for isa in clib.isas_here():
            prod = fk.FloatMatmul(mats, K, isa=isa)
            for _ in range(2):  # a prepared product is reusable
                for (ref, tol), y, (_, qtype, N, _) in zip(refs, prod(x), mats):
                    check(y, ref, tol, f"multi {qtype.name} N={N} {isa} threads={n_threads}")


def test_empty_products():
    raw = raw_bytes(np.ones((4, 64), np.float32), T.F16)
    assert fk.float_gemm(raw, T.F16, 4, 64, np.zeros((0, 64), np.float32)).shape == (0, 4)
    assert fk.float_gemm(np.zeros(0, np.uint8), T.Q8_0, 0, 64, np.ones((3, 64), np.float32)).shape == (3, 0)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def test_bad_input_is_one_error_line():
    rng = np.random.default_rng(0)
    raw = raw_bytes(rng.standard_normal((4, 64), dtype=np.float32), T.Q8_0)
    x = rng.standard_normal((2, 64), dtype=np.float32)
    bad = [
        (lambda: fk.float_gemm(raw[:-1], T.Q8_0, 4, 64, x), "needs 4 x 68"),
        (lambda: fk.float_gemm(raw, T.Q8_0, 5, 64, x), "needs 5 x 68"),
        (lambda: fk.float_gemm(raw, T.Q8_0, 4, 48, x[:, :48]), "multiple of 32"),
        (lambda: fk.float_gemm(raw, T.Q4_K, 4, 64, x), "no float kernel"),
        (lambda: fk.float_gemm(raw, T.Q8_0, 4, 64, x.astype(np.float64)), "float32 [T, 64]"),
        (lambda: fk.float_gemm(raw, T.Q8_0, 4, 64, x[:, :32]), "float32 [T, 64]"),
        (lambda: fk.float_gemm(raw, T.Q8_0, 4, 64, x[0]), "float32 [T, 64]"),
        (lambda: fk.float_gemm(raw, T.Q8_0, 4, 64, x, bias=np.ones(3, np.float32)), "bias"),
        (lambda: fk.float_gemm(raw.view(np.int8), T.Q8_0, 4, 64, x), "uint8"),
        (lambda: fk.float_gemm(np.zeros((4, 80), np.uint8)[:, :68], T.Q8_0, 4, 64, x), "C-contiguous"),
        (lambda: fk.float_gemm(raw, T.Q8_0, 4, 64, x, isa="sse9"), "accepted: auto"),
        (lambda: fk.FloatMatmul([(raw, T.Q8_0, 4, None)] * (fk.MAX_MATS + 1), 64), "1 to 16"),
    ]
    if "neon" not in clib.isas_here():
        bad.append((lambda: fk.float_gemm(raw, T.Q8_0, 4, 64, x, isa="neon"), "does not run the neon path"))
    for call, words in bad:
        with pytest.raises(MoteExportError) as exc:
            call()
        assert words in _one_line(exc)


def test_c_side_refuses_bad_sizes():
    """The C entry point checks sizes itself (a caller other than the Python wrapper cannot make it over-read)."""
    L = clib.lib()
    f = L.mote_float_gemm
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    f.argtypes = [ctypes.c_int, vp, i64, i64, i64, vp, i64, i64, vp, vp, i64, ctypes.c_int]
    f.restype = ctypes.c_int
    w = np.zeros(4 * 68, np.uint8)
    x = np.zeros((2, 64), np.float32)
    y = np.zeros((2, 4), np.float32)
    ok = (8, w.ctypes.data, 68, 4, 64, x.ctypes.data, 64, 2, None, y.ctypes.data, 4, -1)
    assert f(*ok) == 0

    def call(**kw):
        args = dict(zip(["wt", "w", "rb", "N", "K", "x", "xs", "T", "b", "y", "ys", "isa"], ok)) | kw
        return f(*args.values())

    assert call(rb=67) == -2  # row_bytes shorter than K weights of the type
    assert call(K=48, xs=64) == -2  # not a multiple of the 32-block
    assert call(xs=63) == -2
    assert call(ys=3) == -2
    assert call(K=0) == -2
    assert call(w=None) == -2
    assert call(wt=12) == -3  # Q4_K: no kernel
    if "neon" not in clib.isas_here():
        assert call(isa=3) == -1


@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.Q8_0, T.Q4_0])
def test_engine_group_prefill_takes_blas_tiles_within_the_bound(qtype):
    """clinear.FloatGroup: from BLAS_TOKENS tokens on, row tiles decoded to float32 scratch + BLAS (tiles
    smaller than the matrix, so several are stitched); the same bound as the kernels, and with a bias."""
    from mote_edge.runtime_cpu import clinear

    rng = np.random.default_rng(int(qtype))
    K, Ns, Tn = 96, (40, 9), clinear.BLAS_TOKENS + 3
    mats, refs = [], []
    for N in Ns:
        w = rng.standard_normal((N, K)).astype(np.float32)
        raw = raw_bytes(w, qtype)
        bias = rng.standard_normal(N).astype(np.float32)
        mats.append((raw, qtype, N, bias))
        refs.append((decoded(raw, qtype, N), bias))
    x = rng.standard_normal((Tn, K)).astype(np.float32)
    before = clinear.BLAS_TILE_BYTES
    clinear.BLAS_TILE_BYTES = 4 * K * 16  # 16-row tiles: 40 rows take three, the last one short
    try:
        group = clinear.FloatGroup(mats, K)
        outs = group(x)
        small = group(x[:5])  # below BLAS_TOKENS: the C kernels
    finally:
        clinear.BLAS_TILE_BYTES = before
    for y, ys, (w64, bias) in zip(outs, small, refs):
        check(y, reference(x, w64, bias), bound(x, w64, bias), f"{qtype.name} BLAS tiles", factor=2.0)
        check(ys, reference(x[:5], w64, bias), bound(x[:5], w64, bias), f"{qtype.name} kernels")

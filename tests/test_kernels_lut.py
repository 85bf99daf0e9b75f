"""The lookup-table ternary kernels (runtime_cpu/csrc/ternary_lut.c) equal the int64 numpy reference
(runtime_cpu/ternary_ref.py) bit for bit on every ISA path this CPU runs, on adversarial inputs: all +1 / all -1
codes with activations +127 and -128 (an int16 lane of the tables' sums wraps there if the flush interval were
one column longer), K tails, odd row counts, token blocks and super-blocks, unaligned buffers, 1 and 2 threads."""
from __future__ import annotations

import numpy as np
import pytest

from mote_edge.exporters.errors import MoteExportError
from mote_edge.runtime_cpu import clib
from mote_edge.runtime_cpu import ternary_ref as ref

if not clib.available():
    pytest.skip(f"the C kernel library is not built: {clib.error()}", allow_module_level=True)

from mote_edge.runtime_cpu import lut_kernels as lk  # noqa: E402

ISAS = clib.isas_here()


def _unaligned(a: np.ndarray) -> np.ndarray:
    """A copy of `a` whose data starts 1 byte past a 64-byte boundary."""
    buf = np.empty(a.nbytes + 65, np.uint8)
    off = (-buf.ctypes.data) % 64 + 1
    v = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    v[...] = a
    assert v.ctypes.data % 64 == 1
    return v


def _pack(codes: np.ndarray) -> tuple[np.ndarray, int]:
    n, k = codes.shape
    kp = ref.padded(k)
    return lk.lut_pack(ref.pack_tq2_codes(codes), 64, kp // 4, n, kp), kp


def _check(codes, q, step, scale, isa, threads=1, unaligned=False, packed=None):
    n, k = codes.shape
    kp = ref.padded(k)
    if packed is None:
        packed, _ = _pack(codes)
    sumq = q.astype(np.int32).sum(axis=1).astype(np.int32)
    args = [packed, q, sumq, step, scale]
    if unaligned:
        args = [_unaligned(a) for a in args]
    clib.set_threads(threads)
    try:
        y = lk.lut_gemm(args[0], n, kp, args[1], args[2], args[3], args[4], isa=isa)
    finally:
        clib.set_threads(1)
    want = ref.ref_gemm(codes, q, step, scale)
    assert y.shape == want.shape and y.dtype == np.float32
    bad = np.flatnonzero(y.view(np.int32) != want.view(np.int32))
    assert bad.size == 0, f"{isa}: {bad.size} of {y.size} outputs differ, first at {np.unravel_index(bad[0], y.shape)}"


def _acts(rng, t, kp, kind):
    if kind == "max":
        return np.full((t, kp), 127, np.int8)
    if kind == "min":
        return np.full((t, kp), -128, np.int8)
    if kind == "alt":
        return np.where(rng.random((t, kp)) < 0.5, 127, -128).astype(np.int8)
    return rng.integers(-128, 128, (t, kp)).astype(np.int8)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("weights,acts", [("plus", "max"), ("plus", "min"), ("minus", "max"), ("minus", "min"),
                                          ("plus", "alt"), ("random", "random")])
@pytest.mark.parametrize("t", [1, 5])
def test_adversarial_extremes(isa, weights, acts, t):
    """|acc| = 128 K: every int16 partial sum sits at the edge of its range (K = 4864: 19 blocks, 541 columns;
    decode runs long column chunks, prefill short ones, so both flush paths are hit)."""
    rng = np.random.default_rng(1)
    n, k = 131, 4864  # 5 tiles: a 4-tile group (decode) and a single one
    codes = {"plus": np.ones((n, k), np.int8), "minus": -np.ones((n, k), np.int8),
             "random": rng.integers(-1, 2, (n, k)).astype(np.int8)}[weights]
    q = _acts(rng, t, k, acts)
    _check(codes, q, rng.random(t).astype(np.float32) + 0.5, rng.random(n).astype(np.float32) + 0.5, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 3, 17, 33, 67, 131])
@pytest.mark.parametrize("k", [256, 768, 896])
@pytest.mark.parametrize("t", [1, 2, 5])
def test_shapes(isa, n, k, t):
    """Odd row counts (a partial last tile), K = one block, 3 blocks (not a multiple of 512), and 896 (zero padding
    to 1024, which the packer does not store), 1, 2 and 5 tokens."""
    rng = np.random.default_rng(n * 1000 + k + t)
    codes = rng.integers(-1, 2, (n, k)).astype(np.int8)
    kp = ref.padded(k)
    q = rng.integers(-128, 128, (t, kp)).astype(np.int8)
    q[:, k:] = 0
    _check(codes, q, rng.random(t).astype(np.float32), rng.standard_normal(n).astype(np.float32), isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
def test_unaligned_threads_and_token_blocks(isa, threads):
    """Every buffer 1 byte off a 64-byte boundary; 2 threads; T = 19 (two full 8-token blocks and a tail)."""
    rng = np.random.default_rng(threads)
    n, k, t = 131, 1280, 19
    codes = rng.integers(-1, 2, (n, k)).astype(np.int8)
    codes[:7] = 1
    q = _acts(rng, t, k, "alt")
    q[3] = -128
    _check(codes, q, rng.random(t).astype(np.float32), rng.random(n).astype(np.float32), isa, threads, unaligned=True)


@pytest.mark.parametrize("isa", ISAS)
def test_super_blocks_and_strided_output(isa):
    """More tokens than one table super-block holds (K = 256: 752 tokens per block), activation rows further
    apart than Kp, and y written into a wider array."""
    rng = np.random.default_rng(7)
    n, k, t = 33, 256, 770
    codes = rng.integers(-1, 2, (n, k)).astype(np.int8)
    qwide = rng.integers(-128, 128, (t, k + 64)).astype(np.int8)
    q = qwide[:, :k]
    packed, kp = _pack(codes)
    step, scale = rng.random(t).astype(np.float32), rng.random(n).astype(np.float32)
    ywide = np.full((t, n + 5), np.nan, np.float32)
    y = lk.lut_gemm(packed, n, kp, q, q.astype(np.int32).sum(1).astype(np.int32), step, scale, isa=isa,
                    out=ywide[:, :n])
    want = ref.ref_gemm(codes, q, step, scale)
    assert np.array_equal(y.view(np.int32), want.view(np.int32))
    assert np.isnan(ywide[:, n:]).all()  # nothing written past N


def test_all_zero_and_tail_weights():
    """A matrix with no non-zero weight, and one whose only non-zero weight is the last of K = 511."""
    rng = np.random.default_rng(3)
    q = rng.integers(-128, 128, (2, 512)).astype(np.int8)
    tail = np.zeros((5, 511), np.int8)
    tail[2, -1] = -1
    for codes in (np.zeros((5, 512), np.int8), tail):
        for isa in ISAS:
            _check(codes, q, np.ones(2, np.float32), np.ones(5, np.float32), isa)


def test_equals_multiply_add_kernels():
    """The two kernel families give the same bits (when the library has the multiply-add family)."""
    if not hasattr(clib.lib(), "mote_tern_gemm"):
        pytest.skip("the library has no multiply-add kernels yet (runtime_cpu/csrc/ternary_mad.c)")
    from mote_edge.runtime_cpu import ternary_kernels as tk

    rng = np.random.default_rng(5)
    n, k, t = 70, 896, 3
    codes = rng.integers(-1, 2, (n, k)).astype(np.int8)
    x = rng.standard_normal((t, k)).astype(np.float32)
    scale = rng.random(n).astype(np.float32)
    m = tk.TernaryMatrix.from_codes(codes, scale)
    q, sumq, step = tk.quantize(x, 1e-5, m.kp)
    rq, rsumq, rstep = ref.quant_act_ref(x, 1e-5, m.kp)
    assert np.array_equal(q, rq) and np.array_equal(sumq, rsumq) and np.array_equal(step, rstep)
    packed = lk.lut_pack(m.data, m.block_bytes, m.row_bytes, n, m.kp)
    for isa in ISAS:
        y_mad = tk.gemm(m, q, sumq, step, isa=isa)
        y_lut = lk.lut_gemm(packed, n, m.kp, q, sumq, step, m.scale, isa=isa)
        assert np.array_equal(y_mad.view(np.int32), y_lut.view(np.int32)), isa


def test_gguf_block_bytes():
    """Packing reads the GGUF TQ2_0 blocks in place: 66-byte blocks (64 code bytes + an fp16 d it skips)."""
    rng = np.random.default_rng(11)
    n, k = 9, 512
    codes = rng.integers(-1, 2, (n, k)).astype(np.int8)
    tq = ref.pack_tq2_codes(codes).reshape(n, 2, 64)
    blocks = np.concatenate([tq, rng.integers(0, 256, (n, 2, 2), dtype=np.uint8)], axis=2).reshape(-1)
    packed = lk.lut_pack(blocks, 66, 132, n, k)
    assert np.array_equal(packed, _pack(codes)[0])


def test_bad_input_is_one_error():
    rng = np.random.default_rng(2)
    codes = rng.integers(-1, 2, (4, 256)).astype(np.int8)
    packed, kp = _pack(codes)
    q = np.zeros((1, kp), np.int8)
    one = np.ones(1, np.float32)
    args = (q, np.zeros(1, np.int32), one, np.ones(4, np.float32))
    with pytest.raises(MoteExportError, match="not a packed 40 x 256"):
        lk.lut_gemm(packed, 40, kp, *args[:3], np.ones(40, np.float32))
    with pytest.raises(MoteExportError, match="valid 5 x 256 header"):  # same size (one tile), other N
        lk.lut_gemm(packed, 5, kp, *args[:3], np.ones(5, np.float32))
    with pytest.raises(MoteExportError, match="valid 4 x 256 header"):
        lk.lut_gemm(np.zeros_like(packed), 4, kp, *args)
    with pytest.raises(MoteExportError, match="activations"):
        lk.lut_gemm(packed, 4, kp, q.astype(np.int16), *args[1:])
    with pytest.raises(MoteExportError, match="scale"):
        lk.lut_gemm(packed, 4, kp, q, args[1], one, np.ones(3, np.float32))
    with pytest.raises(MoteExportError, match="multiple of 256"):
        lk.lut_pack(ref.pack_tq2_codes(codes), 64, 64, 4, 200)
    with pytest.raises(MoteExportError, match="do not hold"):
        lk.lut_pack(ref.pack_tq2_codes(codes)[:3], 64, 64, 4, 256)
    bad = ref.pack_tq2_codes(codes).copy()
    bad[2, 5] |= 0b11000000
    with pytest.raises(MoteExportError, match="code 3"):
        lk.lut_pack(bad, 64, 64, 4, 256)
    with pytest.raises(MoteExportError, match="ISA"):
        lk.lut_gemm(packed, 4, kp, *args, isa="sse9")


def test_packed_size_is_smaller_than_tq2():
    """1.78 bits per weight where K is a multiple of 9 columns; K's padding to Kp is not stored or read."""
    assert lk.packed_bytes(4864, 1024) == 64 + 152 * 114 * 64
    rng = np.random.default_rng(4)
    codes = rng.integers(-1, 2, (64, 896)).astype(np.int8)
    packed, _ = _pack(codes)
    assert lk.stored_bytes(packed) == 64 + 2 * 100 * 64  # ceil(896 / 9) columns, not ceil(1024 / 9) = 114
    assert packed.ctypes.data % 64 == 0

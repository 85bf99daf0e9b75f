"""The multiply-add ternary kernels (csrc/ternary_mad.c) on every ISA path this CPU runs equal the int64
numpy reference bit for bit, on the inputs that break integer kernels: all +1 / all -1 codes against
activations of +127 / -128 (the largest sums; int16 accumulators would wrap), K tails padded to 256, odd row
counts, token counts that are not a multiple of the token tile, unaligned buffers, 1 and 2 threads; and the
GGUF TQ2_0 bytes used in place give the same product as a repacked copy."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from mote_edge.exporters.ternary import pack_ternary
from mote_edge.runtime_cpu import clib, kernels
from mote_edge.runtime_cpu import ternary_kernels as tk
from mote_edge.runtime_cpu.ternary_ref import quant_act_ref, ref_gemm

ISAS = clib.isas_here()


def test_the_install_built_the_c_kernels():
    """setup.py's extension is optional (an install without a C compiler still works, on numpy kernels);
    here, with gcc present, it must have been built, or every kernel test below would test nothing."""
    assert clib.available(), clib.error()
    assert "scalar" in ISAS and len(ISAS) >= 2


def _unaligned(a: np.ndarray) -> np.ndarray:
    """The same values at an address one byte past a 64-byte boundary."""
    buf = np.empty(a.nbytes + 65, np.uint8)
    off = (-buf.ctypes.data) % 64 + 1
    out = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _cases(rng):
    for n, k, t in [(1, 256, 1), (3, 200, 2), (17, 896, 5), (33, 1000, 4), (67, 512, 9), (8, 4864, 1)]:
        codes = rng.integers(-1, 2, (n, k)).astype(np.int8)
        yield "random", codes, rng.standard_normal((t, k)).astype(np.float32) * 3
    for fill in (1, -1):
        codes = np.full((5, 768), fill, np.int8)
        x = np.where(np.arange(768) % 2, 1.0, -1.0).astype(np.float32)[None].repeat(3, 0)  # -> +-127
        x[1], x[2] = -1.0, 1.0  # all -127, all +127 (quantisation never gives -128: test_extremes feeds it)
        yield f"all {fill:+d}", codes, x


@pytest.mark.parametrize("threads", [1, 2])
def test_mad_kernels_equal_the_int64_reference(threads):
    clib.set_threads(threads)
    rng = np.random.default_rng(threads)
    for what, codes, x in _cases(rng):
        n, k = codes.shape
        scale = (rng.random(n) + 0.05).astype(np.float32)
        q, sumq, step = quant_act_ref(x, 1e-5, tk.padded(k))
        want = ref_gemm(codes, q, step, scale)
        m = tk.TernaryMatrix(_unaligned(tk.pack_codes(codes)), n, k, scale)
        for isa in ISAS:
            q2, sumq2, step2 = tk.quantize(_unaligned(x), 1e-5, m.kp, isa)
            assert np.array_equal(q2, q) and np.array_equal(sumq2, sumq) and np.array_equal(step2, step), (what, isa)
            got = tk.gemm(m, _unaligned(q), sumq, step, isa)
            assert np.array_equal(got, want), f"{what} [{n}x{k}] T={x.shape[0]} {isa}: max diff {np.abs(got - want).max()}"
    clib.set_threads(1)


def test_extremes_reach_the_int_limits():
    """The adversarial case really sums +-128 * K (so a wrapped accumulator would show)."""
    k = 4864
    codes = np.ones((2, k), np.int8)
    q = np.full((1, k), -128, np.int8)
    want = ref_gemm(codes, q, np.ones(1, np.float32), np.ones(2, np.float32))
    assert want[0, 0] == -128 * k
    m = tk.TernaryMatrix.from_codes(codes, 1.0)
    qp = np.zeros((1, m.kp), np.int8)
    qp[:, :k] = q
    for isa in ISAS:
        got = tk.gemm(m, qp, qp.astype(np.int32).sum(1).astype(np.int32), np.ones(1, np.float32), isa)
        assert np.array_equal(got, want), isa


def test_gguf_tq2_0_bytes_in_place_equal_the_numpy_linear():
    """The file's TQ2_0 blocks (66 bytes, fp16 d skipped) read in place = kernels.TernaryLinear (what the
    numpy engine and PyTorch's deployable forward compute)."""
    rng = np.random.default_rng(3)
    e, n, k = 2, 40, 512
    codes = rng.integers(-1, 2, (e, n, k)).astype(np.int8)
    codes[1, :4] = 0  # all-zero rows: blocks with d = 0 in the file
    scales = np.array([0.02, 0.5], np.float32)
    raw = pack_ternary(codes, scales, T.TQ2_0).reshape(-1)
    per = raw.nbytes // e
    x = rng.standard_normal((3, k)).astype(np.float32)
    for i in range(e):
        m = tk.TernaryMatrix(raw[i * per:(i + 1) * per], n, k, scales[i], tk.TQ2_0_BLOCK_BYTES)
        want = kernels.TernaryLinear(codes[i], scales[i], 1e-5)(x)
        for isa in ISAS:
            q, sumq, step = tk.quantize(x, 1e-5, m.kp, isa)
            assert np.array_equal(tk.gemm(m, q, sumq, step, isa), want), (i, isa)


def test_bad_sizes_are_one_error_line():
    from mote_edge.exporters.errors import MoteExportError

    with pytest.raises(MoteExportError, match="do not hold"):
        tk.TernaryMatrix(np.zeros(100, np.uint8), 4, 256, 1.0)
    m = tk.TernaryMatrix.from_codes(np.zeros((4, 256), np.int8), 1.0)
    with pytest.raises(MoteExportError, match="do not fit"):
        tk.gemm(m, np.zeros((1, 128), np.int8), np.zeros(1, np.int32), np.ones(1, np.float32))
    with pytest.raises(MoteExportError, match="accepted: auto"):
        tk.quantize(np.zeros((1, 256), np.float32), 1e-5, 256, "sse9")

"""Linears of the mote engine that run on the C kernels, with the interface of kernels.py's numpy ones
(called on x [T, K] float32, returning y [T, N] float32; groups return a list, one y per matrix).

Ternary: activations quantised once per call (per token, as MoTE trains) and shared by every matrix of a
group (an expert's gate and up read the same x), then the integer product of the chosen family:
"mad" (multiply-add, csrc/ternary_mad.c) or "lut" (lookup tables, csrc/ternary_lut.c). Both equal
kernels.TernaryLinear bit for bit.
"""
from __future__ import annotations

import numpy as np

from . import ternary_kernels as tk


class LutMatrix:
    """A ternary matrix in the lookup-table kernels' own layout (csrc/ternary_lut.c), made from the codes
    layout of a TernaryMatrix."""

    def __init__(self, m: tk.TernaryMatrix):
        from . import lut_kernels

        self.n, self.k, self.kp, self.scale = m.n, m.k, m.kp, m.scale
        self.packed = lut_kernels.lut_pack(m.data, m.block_bytes, m.row_bytes, m.n, m.kp)

    def product(self, q, sumq, step) -> np.ndarray:
        from . import lut_kernels

        return lut_kernels.lut_gemm(self.packed, self.n, self.kp, q, sumq, step, self.scale)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


def _product(m, q, sumq, step) -> np.ndarray:
    return m.product(q, sumq, step) if isinstance(m, LutMatrix) else tk.gemm(m, q, sumq, step)


class TernaryGroup:
    """Ternary matrices (TernaryMatrix: multiply-add kernels; LutMatrix: lookup-table kernels) on the same
    input: one quantisation, one product each."""

    def __init__(self, mats: list, eps: float):
        self.mats, self.eps = mats, eps
        self.kp = mats[0].kp

    def products(self, x: np.ndarray) -> list[np.ndarray]:
        q, sumq, step = tk.quantize(x, self.eps, self.kp)
        return [_product(m, q, sumq, step) for m in self.mats]

    __call__ = products


class TernaryOne(TernaryGroup):
    """One ternary matrix: y = x W^T with per-token int8 activations."""

    def __init__(self, mat, eps: float):
        super().__init__([mat], eps)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.products(x)[0]


# prefill: from this many tokens on, float products decode row tiles for BLAS (kernel_bench: the C
# kernels reach 0.8-1.2x of BLAS at 64 tokens and 0.5-0.9x at 512)
BLAS_TOKENS = 128
BLAS_TILE_BYTES = 4 * 2 ** 20


class FloatGroup:
    """Float matrices on the same input (q/k/v, gate/up) in one C call over all their rows, each weight
    read in place from the file's bytes (F16 / BF16 / Q8_0 / Q4_0 decoded in registers, fp32 activations)."""

    def __init__(self, mats: list[tuple], k: int):
        from .float_kernels import FloatMatmul, row_bytes

        self.mats, self.k = mats, k  # [(raw bytes, ggml type, rows, bias or None)]
        self.product = FloatMatmul(mats, k)  # checked once here; a call checks only x
        self.row_bytes = [row_bytes(t, k) for _, t, _, _ in mats]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        if x.shape[0] < BLAS_TOKENS:
            return self.product(x)
        return [self._blas(x, raw, t, n, b, rb) for (raw, t, n, b), rb in zip(self.mats, self.row_bytes)]

    def _blas(self, x, raw, qtype, n, bias, rb) -> np.ndarray:
        """Many tokens: row tiles decoded to float32 scratch, then BLAS (which out-computes the in-register
        kernels once enough tokens share each weight); the scratch stays one tile big."""
        from .quants import decode_float

        rows = max(1, BLAS_TILE_BYTES // (4 * self.k))
        y = np.empty((x.shape[0], n), np.float32)
        for r in range(0, n, rows):
            m = min(rows, n - r)
            w = decode_float(raw[r * rb:(r + m) * rb], qtype, (m, self.k))
            np.matmul(x, w.T, out=y[:, r:r + m])
        return y if bias is None else y + bias


class FloatOne(FloatGroup):
    def __init__(self, raw: np.ndarray, qtype, n: int, k: int, bias: np.ndarray | None = None):
        super().__init__([(raw, qtype, n, bias)], k)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return super().__call__(x)[0]

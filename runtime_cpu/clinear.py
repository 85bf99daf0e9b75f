"""Linears of the mote engine that run on the C kernels, with the interface of kernels.py's numpy ones
(called on x [T, K] float32, returning y [T, N] float32; groups return a list, one y per matrix).

Ternary: activations quantised once per stage (per token, as MoTE trains) and shared by every matrix that
reads them (the chosen experts' gate and up read the same x), then the integer product of the chosen family:
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
        self.ptrs = (tk._ptr(self.packed), tk._ptr(self.scale))

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


def products(items: list[tuple], isa: str | None = None) -> list[np.ndarray]:
    """[(matrix, q, sumq, step)] -> [y [T, N]]: every product of one kernel family in one pool job, so the
    threads take rows of all the matrices (a MoE layer's chosen experts) with one wake-up. Matrices are
    TernaryMatrix (multiply-add) or LutMatrix (lookup tables); each equals its single product bit for bit."""
    ys: list = [None] * len(items)
    for lut in (False, True):
        idx = [i for i, it in enumerate(items) if isinstance(it[0], LutMatrix) == lut]
        if not idx:
            continue
        calls = []
        for i in idx:
            m, q, sumq, step = items[i]
            w, scale = m.ptrs
            bb, rb = (0, 0) if lut else (m.block_bytes, m.row_bytes)
            calls.append((w, bb, rb, m.n, m.kp, scale, q, sumq, step))
        for i, y in zip(idx, tk.run_batch(calls, lut, isa)):
            ys[i] = y
    return ys


class TernaryExperts:
    """A MoE layer's routed ternary experts on the C kernels, by stage rather than by expert: the chosen
    experts' gate and up products in one pool job, then their down products in one, so the threads share out
    the rows of every chosen expert (2 wake-ups a layer instead of 2 per expert). Activations are quantised once
    per stage: per token, so a token's int8 row is the same whichever expert reads it. The result equals
    running each expert's FFN in turn (llm.ExpertList) bit for bit: the same products, the same float sums in
    the same order."""

    def __init__(self, gate: list, up: list, down: list, eps: float):
        self.gate, self.up, self.down, self.eps = gate, up, down, eps

    def _stages(self, x: np.ndarray, rows: list[tuple[int, np.ndarray | None]]) -> list[np.ndarray]:
        """rows [(expert, token indices or None = all of x)] -> each expert's down(silu(gate(x)) * up(x))."""
        from .kernels import silu

        q, sumq, step = tk.quantize(x, self.eps, self.gate[0].kp)
        sel = [(q, sumq, step) if tok is None else (q[tok], sumq[tok], step[tok]) for _, tok in rows]
        gu = products([it for (e, _), a in zip(rows, sel) for it in ((self.gate[e], *a), (self.up[e], *a))])
        h = np.concatenate([silu(gu[2 * i]) * gu[2 * i + 1] for i in range(len(rows))])
        q, sumq, step = tk.quantize(h, self.eps, self.down[0].kp)
        items, r = [], 0
        for e, _ in rows:
            t = gu[2 * len(items)].shape[0]
            items.append((self.down[e], q[r:r + t], sumq[r:r + t], step[r:r + t]))
            r += t
        return products(items)

    def decode(self, x: np.ndarray, probs: np.ndarray, chosen: list[int]) -> np.ndarray:
        out = np.zeros_like(x)
        for e, y in zip(chosen, self._stages(x, [(e, None) for e in chosen])):
            out += y * probs[0, e]
        return out

    def prefill(self, x: np.ndarray, probs: np.ndarray, top: np.ndarray) -> np.ndarray:
        out = np.zeros_like(x)
        rows = [(e, tok) for e in range(len(self.gate)) if (tok := np.nonzero(top == e)[0]).size]
        for (e, tok), y in zip(rows, self._stages(x, rows) if rows else []):
            out[tok] += y * probs[tok, e][:, None]
        return out


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

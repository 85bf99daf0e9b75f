"""The int64 numpy statement of the ternary kernels' arithmetic (csrc/mote_kernels.h), for their tests.

Every C ternary kernel (multiply-add and lookup-table, every ISA path) must equal these functions bit for
bit: the integer dot is computed here in int64 (no wrap is possible), the epilogue in float64 exactly as the
header writes it, y = (float)((double)acc * ((double)step * (double)scale)).
"""
from __future__ import annotations

import numpy as np

BLOCK = 256
_SHIFTS = np.array([0, 2, 4, 6], np.uint8)


def padded(k: int) -> int:
    return -(-k // BLOCK) * BLOCK


def pack_tq2_codes(codes: np.ndarray) -> np.ndarray:
    """Ternary weights int8 [N, K] in {-1, 0, 1} -> uint8 [N, Kp / 4]: the TQ2_0 code layout with
    block_bytes = 64 (row_bytes = Kp / 4), K padded with zero weights (code 1) to Kp = a multiple of 256.
    In each block, byte j of half h holds the codes of weights h*128 + j + 32*s at bits 2s (s = 0..3)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.size and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("codes must be a 2-D array of -1, 0, 1")
    n, k = codes.shape
    kp = padded(k)
    c = np.ones((n, kp), np.uint8)
    c[:, :k] = (codes + 1).astype(np.uint8)
    c = c.reshape(n, kp // BLOCK, 2, 4, 32)  # [row, block, half, shift s, byte j]
    return np.bitwise_or.reduce(c << _SHIFTS.reshape(1, 1, 1, 4, 1), axis=3).reshape(n, kp // 4)


def ref_acc(codes: np.ndarray, q: np.ndarray) -> np.ndarray:
    """acc [T, N] int64 = sum_k q[t, k] * codes[n, k] (q [T, >= K] int8, extra columns are padding)."""
    codes = np.asarray(codes, np.int64)
    q = np.asarray(q)[:, : codes.shape[1]].astype(np.int64)
    return q @ codes.T


def ref_gemm(codes: np.ndarray, q: np.ndarray, step: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """y [T, N] float32 as every ternary kernel computes it."""
    acc = ref_acc(codes, q)
    f = np.asarray(step, np.float32).astype(np.float64)[:, None] * np.asarray(scale, np.float32).astype(np.float64)[None, :]
    return (acc.astype(np.float64) * f).astype(np.float32)


def quant_act_ref(x: np.ndarray, eps: float, kp: int):
    """Per-token int8 activations as mote_quant_act (and mote_edge.quant) make them, in float32:
    amax = max(max|x|, eps), q = clip(rint(x * ((1 / amax) * 127)), -128, 127) (round half to even), zero padding
    to kp, sumq = sum q (int32), step = amax / 127. Returns (q int8 [T, kp], sumq int32 [T], step f32 [T])."""
    x = np.asarray(x, np.float32)
    t, k = x.shape
    amax = np.maximum(np.abs(x).max(axis=1), np.float32(eps)).astype(np.float32)
    inv = ((np.float32(1.0) / amax) * np.float32(127.0)).astype(np.float32)  # torch's 127 / amax
    qf = np.clip(np.rint(x * inv[:, None]), -128, 127)
    q = np.zeros((t, kp), np.int8)
    q[:, :k] = qf.astype(np.int8)
    return q, q.astype(np.int32).sum(axis=1).astype(np.int32), (amax / np.float32(127.0)).astype(np.float32)

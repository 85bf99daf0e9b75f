"""The deployable ternary form in numpy, and its exact packing into GGUF block types.

Form (bit-exact twin of mote_edge/quant.py): s = float32(mean|W| in float64) clamped to >= 1e-5,
codes = clip(round_half_even(float32(W) / s), -1, 1) as int8; the value of a weight is codes * s.

Packing, one fp16 block scale d = fp16(s) per block, so a packed matrix holds codes * fp16(s)
exactly (the only loss is the fp16 rounding of s):
  TQ2_0  256-weight blocks, 2.0625 bpw     TQ1_0  256-weight blocks, 1.6875 bpw
  Q4_0   32-weight blocks, 4.5 bpw: the fallback for rows (ne0, the input width) that are not a
         multiple of 256. Codes 7/8/9 stand for -1/0/+1 (Q4_0's value is (q - 8) * d); gguf-py's
         own Q4_0 quantizer would map a ternary row to multiples of s/8 and lose it.
  F16    any width (rows not a multiple of 32): c * fp16(s) is exact in fp16.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import quantize

from .errors import MoteExportError

EPS = 1e-5
TERNARY_TYPES = {"tq2_0": T.TQ2_0, "tq1_0": T.TQ1_0}


def ternary_scale(w: np.ndarray) -> np.float32:
    """Absmean of the matrix, accumulated in float64 so the summation order cannot matter."""
    s = np.float32(np.abs(np.asarray(w, dtype=np.float64)).mean())
    return max(s, np.float32(EPS))


def ternary_codes(w: np.ndarray, scale: np.float32 | None = None) -> np.ndarray:
    """int8 codes in {-1, 0, 1}; the division is done in float32 exactly like the torch code."""
    s = ternary_scale(w) if scale is None else np.float32(scale)
    return np.clip(np.rint(np.asarray(w, dtype=np.float32) / s), -1, 1).astype(np.int8)


def ternary_form(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    s = ternary_scale(w)
    return ternary_codes(w, s), s


def ternary_gguf_type(requested: T, ne0: int) -> T:
    """The exact type a ternary matrix with rows of `ne0` weights is written in."""
    for qtype in (requested, T.Q4_0):
        if ne0 % GGML_QUANT_SIZES[qtype][0] == 0:
            return qtype
    return T.F16


def pack_ternary(codes: np.ndarray, scales, qtype: T) -> np.ndarray:
    """Pack stacked ternary matrices: codes [..., rows, ne0] int8, one scale per matrix
    (shape codes.shape[:-2]). Returns the raw bytes [..., rows, row_bytes] (uint8), or float16
    values for F16. Only codes go in, never weights: a ternary type cannot be given to a tensor
    that is not already ternary."""
    codes = np.asarray(codes)
    scales = np.asarray(scales, dtype=np.float32)
    if codes.dtype != np.int8 or codes.ndim < 2 or scales.shape != codes.shape[:-2]:
        raise ValueError(f"pack_ternary wants int8 codes [..., rows, cols] and one scale per matrix, "
                         f"got {codes.dtype} {codes.shape} and scales {scales.shape}")
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("ternary codes must be in {-1, 0, 1}")
    d16 = scales.astype(np.float16)
    if not np.all(np.isfinite(d16)):
        raise MoteExportError(f"a ternary scale ({scales.max():.3g}) overflows fp16, the GGUF block scale type")
    mats = codes.reshape(-1, *codes.shape[-2:])
    flat_s = scales.reshape(-1)
    if qtype == T.F16:
        # a float32 product c * s is +-s or 0 exactly; its fp16 rounding is then fp16(s), as elsewhere
        return (mats * flat_s[:, None, None]).astype(np.float16).reshape(codes.shape)
    if qtype == T.Q4_0:
        out = [_pack_q4_0(m, s) for m, s in zip(mats, d16.reshape(-1))]
    elif qtype in (T.TQ2_0, T.TQ1_0):
        # gguf-py's quantizer takes d = max|block|, which is s for every block holding a nonzero code
        # (an all-zero block gets d = 0 and still dequantizes to 0); code = round(w / d) is exact.
        out = [quantize(m.astype(np.float32) * s, qtype) for m, s in zip(mats, flat_s)]
    else:
        raise ValueError(f"{qtype.name} is not an exact ternary packing")
    packed = np.stack(out)
    return packed.reshape(*codes.shape[:-1], packed.shape[-1])


def _pack_q4_0(codes: np.ndarray, d16: np.float16) -> np.ndarray:
    """Q4_0 block: fp16 d, then 16 bytes; byte j holds weight j (low nibble) and j + 16 (high)."""
    rows, cols = codes.shape
    q = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(rows, cols // 32, 2, 16)
    qs = q[:, :, 0, :] | (q[:, :, 1, :] << np.uint8(4))
    d = np.broadcast_to(np.array([d16], dtype=np.float16).view(np.uint8), (rows, cols // 32, 2))
    return np.concatenate([d, qs], axis=-1).reshape(rows, cols // 32 * 18)

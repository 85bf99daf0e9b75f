"""The deployable ternary form in numpy, and its exact packing into GGUF block types.

Form (bit-exact twin of mote_edge/quant.py): s = float32(mean|W| in float64) clamped to >= 1e-5,
codes = clip(round_half_even(float32(W) / s), -1, 1) as int8; the value of a weight is codes * s.

Packing, one fp16 block scale d = fp16(s) per block, so a packed matrix holds codes * fp16(s)
exactly (the only loss is the fp16 rounding of s):
  TQ2_0  256-weight blocks, 2.0625 bpw     TQ1_0  256-weight blocks, 1.6875 bpw
  Q2_0   64-weight blocks, 2.25 bpw (ggml type 42): the fallback for rows (ne0, the input width) that
         are not a multiple of 256 but of 64, e.g. Qwen2.5-0.5B's 896-wide gate/up. Block = fp16 d +
         16 bytes; weight j's code q = c + 1 sits in bits 2*(j%4) of byte j//4; value (q - 1) * d
         (q = 3, value 2d, is never written). Byte for byte ggml's own quantizer on c * s (tested).
  Q4_0   32-weight blocks, 4.5 bpw: the fallback for rows that are not a multiple of 64 but of 32.
         Codes 7/8/9 stand for -1/0/+1 (Q4_0's value is (q - 8) * d); gguf-py's own Q4_0 quantizer
         would map a ternary row to multiples of s/8 and lose it.
  F16    any width (rows not a multiple of 32): c * fp16(s) is exact in fp16.

gguf-py 0.19 has no constant for Q2_0: `Q2_0` below stands in for a GGMLQuantizationType member
(an int 42 with .name / .value), QUANT_SIZES is GGML_QUANT_SIZES with its block size, ggml_type()
turns a type id read from a file into either, and dequantize() decodes Q2_0 too. (gguf.GGUFReader
cannot open a file holding a Q2_0 tensor; exporters/gguf_header.py can.)
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from .errors import MoteExportError


class GGMLType(int):
    """A ggml type id that this gguf-py has no GGMLQuantizationType member for, usable where one is
    (an int with .name and .value: ==, hashing and struct packing go by the id)."""

    def __new__(cls, value: int, name: str):
        obj = super().__new__(cls, value)
        obj._name = name
        return obj

    @property
    def name(self) -> str:
        return self._name

    @property
    def value(self) -> int:
        return int(self)

    def __getnewargs__(self):  # pickle / copy
        return int(self), self._name

    def __repr__(self) -> str:
        return f"<GGMLQuantizationType.{self._name}: {int(self)}>"

    __str__ = __repr__


Q2_0 = T.__members__.get("Q2_0") or GGMLType(42, "Q2_0")  # a later gguf-py's own member, when it has one
QUANT_SIZES = {**GGML_QUANT_SIZES, Q2_0: GGML_QUANT_SIZES.get(Q2_0, (64, 18))}  # (block weights, block bytes)
EXTRA_TYPES = {int(Q2_0): Q2_0}


def ggml_type(value: int):
    """A GGUF tensor's type id -> GGMLQuantizationType, or Q2_0; ValueError for an unknown id."""
    if int(value) in EXTRA_TYPES:
        return EXTRA_TYPES[int(value)]
    return T(value)


EPS = 1e-5
TERNARY_TYPES = {"tq2_0": T.TQ2_0, "tq1_0": T.TQ1_0, "q2_0": Q2_0}


SCALE_BLOCK = 1 << 16  # weights per partial sum of the scale (256 KiB of float32: stays in L2)
SCALE_LANES = 16


def abs_sum(w: np.ndarray) -> float:
    """sum|w| in float64 in a fixed order, which runtime_cpu's C (ternary_values.c, used while training on
    CPU) repeats exactly: blocks of SCALE_BLOCK weights; in a block, 16 float64 lanes, lane j adding
    |w[16 r + j]| row after row (numpy's sum over axis 0 of the [rows, 16] view); the lanes added in order,
    then the block's last size % 16 weights one by one; the blocks' sums in order. |w| is exact in float32
    and needs no float64 copy of the matrix, nor (block by block) a float32 one."""
    flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    buf = np.empty(min(SCALE_BLOCK, flat.size), np.float32)
    total = 0.0
    for i in range(0, flat.size, SCALE_BLOCK):
        x = flat[i:i + SCALE_BLOCK]
        a = np.abs(x, out=buf[:x.size])
        m = x.size // SCALE_LANES * SCALE_LANES
        s = 0.0
        for v in a[:m].reshape(-1, SCALE_LANES).sum(axis=0, dtype=np.float64).tolist():
            s += v
        for v in a[m:].tolist():
            s += v
        total += s
    return total


def scale_from_sum(total: float, n: int) -> np.float32:
    """The absmean scale: the float64 sum divided by n, rounded once to float32, at least EPS."""
    return max(np.float32(total / max(n, 1)), np.float32(EPS))


def ternary_scale(w: np.ndarray) -> np.float32:
    """Absmean of the matrix (abs_sum's float64 sum / n, rounded once): float64 accumulation makes the
    order of the sum immaterial in practice, and the fixed order makes it exact between exporters and
    training, bit for bit."""
    return scale_from_sum(abs_sum(w), np.asarray(w).size)


def ternary_codes(w: np.ndarray, scale: np.float32 | None = None) -> np.ndarray:
    """int8 codes in {-1, 0, 1}; the division is done in float32 exactly like the torch code.

    clip(round_half_even(q), -1, 1) is 1 exactly when q > 0.5 and -1 exactly when q < -0.5 (a tie
    at +-0.5 rounds to even, 0), so two comparisons give the same codes as rint + clip, without
    their float temporaries."""
    s = ternary_scale(w) if scale is None else np.float32(scale)
    q = np.divide(np.asarray(w, dtype=np.float32), s, dtype=np.float32)
    return (q > 0.5).view(np.int8) - (q < -0.5).view(np.int8)


def ternary_form(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    s = ternary_scale(w)
    return ternary_codes(w, s), s


def ternary_gguf_type(requested: T, ne0: int) -> T:
    """The exact type a ternary matrix with rows of `ne0` weights is written in: the requested
    type (TQ2_0 / TQ1_0 need ne0 % 256 == 0, Q2_0 ne0 % 64), else Q2_0, else Q4_0 (ne0 % 32), else F16."""
    for qtype in (requested, Q2_0, T.Q4_0):
        if ne0 % QUANT_SIZES[qtype][0] == 0:
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
    elif qtype == Q2_0:
        out = [_pack_q2_0(m, s) for m, s in zip(mats, d16.reshape(-1))]
    elif qtype in (T.TQ2_0, T.TQ1_0):
        out = [_pack_tq(m, s, qtype) for m, s in zip(mats, d16.reshape(-1))]
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


def _pack_q2_0(codes: np.ndarray, d16: np.float16) -> np.ndarray:
    """Q2_0 blocks (fp16 d, then 16 bytes; byte j holds weights 4j..4j+3, 2 bits each, the first in
    the low bits), byte for byte what ggml_quantize_chunk(Q2_0) makes of codes * s (tested): ggml takes
    d = max|block|, so s for a block holding a nonzero code and 0 for an all-zero block (which still
    dequantizes to 0), and q = round(w / d) + 1."""
    blocks = codes.reshape(-1, 64)
    nb = blocks.shape[0]
    nonzero = np.bitwise_or.reduce(blocks.view(np.uint8), axis=1) != 0
    d = np.where(nonzero, d16, np.float16(0)).astype(np.float16).view(np.uint8).reshape(nb, 2)
    q = (blocks + np.int8(1)).view(np.uint8).reshape(nb, 16, 4)  # 0, 1, 2
    qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return np.concatenate([d, qs], axis=1).reshape(codes.shape[0], -1)


def dequantize(data: np.ndarray, qtype) -> np.ndarray:
    """gguf.quants.dequantize, and Q2_0 (raw block bytes [..., row_bytes] -> float32 [..., ne0])."""
    if qtype != Q2_0 or Q2_0 in GGML_QUANT_SIZES:  # a gguf-py that knows Q2_0 dequantizes it itself
        from gguf.quants import dequantize as gguf_dequantize

        return gguf_dequantize(data, qtype)
    raw = np.ascontiguousarray(data, dtype=np.uint8)
    block, size = QUANT_SIZES[Q2_0]
    if raw.shape[-1] % size:
        raise ValueError(f"Q2_0 rows of {raw.shape[-1]} bytes are not a multiple of {size}")
    b = raw.reshape(-1, size)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)  # [nb, 1]
    qs = b[:, 2:]
    q = np.stack([(qs >> np.uint8(2 * k)) & np.uint8(3) for k in range(4)], axis=-1).reshape(-1, block)
    return ((q.astype(np.float32) - 1) * d).reshape(*raw.shape[:-1], raw.shape[-1] // size * block)


def _pack_tq(codes: np.ndarray, d16: np.float16, qtype: T) -> np.ndarray:
    """TQ2_0 / TQ1_0 blocks straight from the codes, byte for byte what gguf-py's quantizer makes of
    codes * s (tested), 10x faster. gguf-py takes d = max|block|: s for a block holding a nonzero
    code, 0 for an all-zero block (which still dequantizes to 0), so both are written that way."""
    blocks = codes.reshape(-1, 256)
    nb = blocks.shape[0]
    nonzero = np.bitwise_or.reduce(blocks.view(np.uint8), axis=1) != 0
    d = np.where(nonzero, d16, np.float16(0)).astype(np.float16).view(np.uint8).reshape(nb, 2)
    q = (blocks + np.int8(1)).view(np.uint8)  # 0, 1, 2
    if qtype == T.TQ2_0:  # byte j of each 32-byte half holds weights j, j+32, j+64, j+96 (2 bits each)
        q = q.reshape(nb, 2, 4, 32)
        qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
        return np.concatenate([qs.reshape(nb, 64), d], axis=1).reshape(codes.shape[0], -1)
    # TQ1_0: 5 trits a byte for weights 0..239 (two groups), 4 for the last 16 (qh), each byte the
    # base-3 number (first weight most significant) scaled to 0..255 as ceil(v * 256 / 243).
    def trits(x: np.ndarray, per_byte: int, width: int) -> np.ndarray:
        x = x.reshape(nb, -1, per_byte, width).astype(np.uint16)
        v = np.zeros((nb, x.shape[1], width), np.uint16)
        for j in range(per_byte):
            v = v * 3 + x[:, :, j]
        v = v * 3 ** (5 - per_byte)
        return ((v * 256 + 242) // 243).astype(np.uint8).reshape(nb, -1)

    packed = [trits(q[:, :160], 5, 32), trits(q[:, 160:240], 5, 16), trits(q[:, 240:], 4, 4), d]
    return np.concatenate(packed, axis=1).reshape(codes.shape[0], -1)

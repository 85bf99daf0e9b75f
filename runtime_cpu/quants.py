"""Each GGUF tensor type -> the form the numpy kernels use, decoded once at load.

Float tensors -> float32 [rows, K]: F32 is used in place (a view of the mapping, no copy); F16, BF16,
Q8_0 and Q4_0 are dequantized to a float32 copy; any other type gguf-py can dequantize (K-quants, ...)
is converted the same way with a notice (FLOAT_NATIVE lists the types that need none).

Ternary tensors (MoTE routed experts) -> int8 codes in {-1, 0, 1} [..., rows, K] + one fp32 scale per
matrix, from TQ2_0 / TQ1_0 / Q2_0 / Q4_0 (codes 7/8/9) / F16 (the exporter's exact fallbacks,
exporters/ternary.py). The scale is the file's mote.ternary_scales (fp32, as trained); every block is
checked to hold d = fp16(scale) (or d = 0 and so value 0) and codes -1/0/+1 only, so a tensor that is not
the exporter's exact ternary form is one error line, never a silently different model.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from ..exporters.errors import MoteExportError
from ..exporters.ternary import Q2_0, QUANT_SIZES, dequantize

FLOAT_NATIVE = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0)
TERNARY_NATIVE = (T.TQ2_0, T.TQ1_0, Q2_0, T.Q4_0, T.F16)
_SHIFTS = np.array([0, 2, 4, 6], np.uint8)
_POW3 = np.array([1, 3, 9, 27, 81], np.uint8)


def decode_float(raw: np.ndarray, qtype, shape: tuple[int, ...], name: str = "", notices: list | None = None) -> np.ndarray:
    """float32 values in numpy `shape`; F32 stays a view of `raw` (the mapping)."""
    if qtype == T.F32:
        return raw.view(np.float32).reshape(shape)
    if qtype == T.F16:
        return raw.view(np.float16).reshape(shape).astype(np.float32)
    if qtype == T.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    rows = raw.reshape(-1, QUANT_SIZES[qtype][1] * (shape[-1] // QUANT_SIZES[qtype][0]))
    try:
        out = dequantize(rows, qtype)
    except (NotImplementedError, ValueError, KeyError) as exc:
        raise MoteExportError(f"tensor {name!r}: type {qtype.name} cannot be decoded ({exc}); accepted: "
                              f"{', '.join(t.name for t in FLOAT_NATIVE)} and the types gguf-py dequantizes") from None
    if qtype not in FLOAT_NATIVE and notices is not None:
        notices.append(f"{name}: {qtype.name} has no kernel here; converted to F32 at load")
    return np.ascontiguousarray(out, dtype=np.float32).reshape(shape)


def decode_float_rows(raw: np.ndarray, qtype, row_width: int, rows: np.ndarray) -> np.ndarray:
    """float32 values of some rows of a [n, row_width] tensor (embedding lookups: only those rows are read)."""
    block, size = QUANT_SIZES[qtype]
    row_bytes = row_width // block * size
    picked = raw.reshape(-1, row_bytes)[rows]
    if qtype == T.F32:
        return picked.view(np.float32).copy()
    return decode_float(np.ascontiguousarray(picked).reshape(-1), qtype, (len(rows), row_width))


def _tq2_0(b: np.ndarray):
    """[nb, 66] blocks -> codes+1 [nb, 256], d [nb]. Byte j of each 32-byte half: weights j, j+32, j+64, j+96."""
    q = (b[:, :64].reshape(-1, 2, 1, 32) >> _SHIFTS.reshape(1, 1, 4, 1)) & np.uint8(3)
    return q.reshape(-1, 256), b[:, 64:66].copy().view(np.float16)[:, 0]


def _trits(qs: np.ndarray, digits: int) -> np.ndarray:
    """ggml's TQ1_0 decode: digit n of byte v is ((uint8)(v * 3^n) * 3) >> 8, first digit most significant.
    qs [nb, width] -> [nb, digits, width]"""
    v = (qs[:, None, :] * _POW3[:digits, None]).astype(np.uint8)  # uint8 wrap-around, as in ggml
    return ((v.astype(np.uint16) * 3) >> 8).astype(np.uint8)


def _tq1_0(b: np.ndarray):
    """[nb, 54] blocks: 32 bytes x 5 trits (weights 0..159), 16 x 5 (160..239), 4 x 4 (240..255), fp16 d."""
    q = np.concatenate([_trits(b[:, :32], 5).reshape(-1, 160), _trits(b[:, 32:48], 5).reshape(-1, 80),
                        _trits(b[:, 48:52], 4).reshape(-1, 16)], axis=1)
    return q, b[:, 52:54].copy().view(np.float16)[:, 0]


def _q2_0(b: np.ndarray):
    """[nb, 18] blocks: fp16 d, then weight j's code+1 in bits 2*(j%4) of byte j//4."""
    q = (b[:, 2:, None] >> _SHIFTS) & np.uint8(3)
    return q.reshape(-1, 64), b[:, :2].copy().view(np.float16)[:, 0]


def _q4_0(b: np.ndarray):
    """[nb, 18] blocks: fp16 d, then byte j = weight j (low nibble) | weight j+16 (high); code = nibble - 8,
    returned as code + 1 like the others (so 7/8/9 -> 0/1/2)."""
    qs = b[:, 2:]
    q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=1).astype(np.int16) - 7
    bad = (q < 0) | (q > 2)
    return np.where(bad, 3, q).astype(np.uint8), b[:, :2].copy().view(np.float16)[:, 0]


_BLOCK_DECODERS = {T.TQ2_0: _tq2_0, T.TQ1_0: _tq1_0, Q2_0: _q2_0, T.Q4_0: _q4_0}


def decode_ternary(raw: np.ndarray, qtype, shape: tuple[int, ...], scales: np.ndarray, name: str) -> np.ndarray:
    """int8 codes [..., rows, K] of stacked ternary matrices whose fp32 scales are `scales`
    (shape[:-2]); every block checked to be the exact form codes x fp16(scale)."""
    scales = np.asarray(scales, np.float32).reshape(shape[:-2])
    d16 = scales.astype(np.float16)
    if qtype not in TERNARY_NATIVE:
        raise MoteExportError(f"tensor {name!r}: {qtype.name} is not a ternary type; accepted for MoTE routed "
                              f"experts: {', '.join(t.name for t in TERNARY_NATIVE)}")
    mats = int(np.prod(shape[:-2], dtype=np.int64))
    per_mat = raw.reshape(mats, -1)
    out = np.empty((mats, *shape[-2:]), np.int8)
    for m in range(mats):  # one matrix at a time: the temporaries stay one matrix big
        want = d16.reshape(-1)[m]
        if qtype == T.F16:
            v = per_mat[m].view(np.float16).reshape(shape[-2:])
            codes = (v == want).view(np.int8) - (v == -want).view(np.int8)
            if not np.array_equal(codes.astype(np.float16) * want, v):
                raise MoteExportError(f"tensor {name!r} (matrix {m}): F16 values are not codes x fp16(scale) "
                                      "with codes in {-1, 0, 1}; not an exact ternary matrix")
            out[m] = codes
            continue
        block = QUANT_SIZES[qtype]
        q, d = _BLOCK_DECODERS[qtype](per_mat[m].reshape(-1, block[1]))
        zero = d == 0
        if not np.all(zero | (d == want)) or np.any(q > 2):
            raise MoteExportError(f"tensor {name!r} (matrix {m}): blocks hold scales other than fp16 of "
                                  f"mote.ternary_scales ({float(scales.reshape(-1)[m]):.6g}) or codes outside "
                                  "{-1, 0, 1}; not the exporter's exact ternary form")
        codes = q.view(np.int8) - np.int8(1)
        codes[zero] = 0  # a block with d = 0 holds zeros whatever its codes
        out[m] = codes.reshape(shape[-2:])
    return out.reshape(shape)

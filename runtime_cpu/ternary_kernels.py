"""The multiply-add ternary kernels of the C library (csrc/ternary_mad.c), for numpy callers.

A TernaryMatrix is N rows of ternary codes in the TQ2_0 code layout (csrc/mote_kernels.h): either the GGUF
file's TQ2_0 blocks used in place (66-byte blocks, the fp16 d skipped) or a repacked copy (64-byte blocks)
made from decoded codes for the other ternary types. Activations are quantised per token in C exactly as
MoTE trains (kernels.quantize_per_token is the numpy statement of the same rule), so the product equals
kernels.TernaryLinear's bit for bit.
"""
from __future__ import annotations

import ctypes

import numpy as np

from ..exporters.errors import MoteExportError
from . import clib

BLOCK = 256
TQ2_0_BLOCK_BYTES = 66  # 64 code bytes + fp16 d
PACKED_BLOCK_BYTES = 64
_SHIFTS = np.array([0, 2, 4, 6], np.uint8)

_P = ctypes.c_void_p
_I = ctypes.c_int64


_L: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    """The library with this family's functions declared (once: decode calls these hundreds of times a token)."""
    global _L
    if _L is None:
        L = clib.lib()
        if L is None:
            raise MoteExportError(clib.error())
        L.mote_quant_act.argtypes = [_P, _I, _I, _I, _I, ctypes.c_float, _P, _I, _P, _P, ctypes.c_int]
        L.mote_tern_gemm.argtypes = [_P, _I, _I, _I, _I, _P, _I, _P, _P, _P, _I, _P, _I, ctypes.c_int]
        L.mote_tern_gemm_batch.argtypes = [_P, ctypes.c_int, ctypes.c_int]
        L.mote_lut_gemm_batch.argtypes = [_P, ctypes.c_int, ctypes.c_int]
        _L = L
    return _L


class TernCall(ctypes.Structure):
    """mote_tern_call (csrc/mote_kernels.h): one product of a batch."""
    _fields_ = [("w", _P), ("block_bytes", _I), ("row_bytes", _I), ("N", _I), ("Kp", _I), ("q", _P), ("q_stride", _I),
                ("sumq", _P), ("step", _P), ("scale", _P), ("T", _I), ("y", _P), ("y_stride", _I)]


MAX_BATCH = 64  # MOTE_MAX_TASKS


def padded(k: int) -> int:
    return -(-k // BLOCK) * BLOCK


def _ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]  # the cheap form of a.ctypes.data


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """int8 codes in {-1, 0, 1} [N, K] -> uint8 [N, Kp / 4] in the TQ2_0 code layout (64-byte blocks), K
    padded with zero weights (code 1) to Kp, a multiple of 256."""
    n, k = codes.shape
    kp = padded(k)
    c = np.ones((n, kp), np.uint8)
    c[:, :k] = (codes + 1).astype(np.uint8)
    c = c.reshape(n, kp // BLOCK, 2, 4, 32)  # [row, block, half, shift s, byte j]: weight h*128 + 32 s + j
    return np.bitwise_or.reduce(c << _SHIFTS.reshape(1, 1, 1, 4, 1), axis=3).reshape(n, kp // 4)


class TernaryMatrix:
    """N x K ternary codes (+ one fp32 scale per row) the kernels read: `data` rows of `row_bytes`, K padded
    to Kp in `block_bytes` blocks. `data` may be a read-only view of the file mapping."""

    def __init__(self, data: np.ndarray, n: int, k: int, scale, block_bytes: int = PACKED_BLOCK_BYTES,
                 row_bytes: int | None = None):
        self.n, self.k, self.kp = n, k, padded(k)
        self.block_bytes = block_bytes
        self.row_bytes = row_bytes or self.kp // BLOCK * block_bytes
        if data.dtype != np.uint8 or not data.flags.c_contiguous:
            raise MoteExportError("ternary codes must be contiguous uint8 bytes")
        need = (n - 1) * self.row_bytes + self.kp // BLOCK * block_bytes if n else 0
        if block_bytes < 64 or self.row_bytes < self.kp // BLOCK * block_bytes or data.nbytes < need:
            raise MoteExportError(f"ternary codes of {data.nbytes} bytes do not hold {n} x {k} in {block_bytes}-byte "
                                  f"blocks ({need} bytes needed)")
        self.data = data.reshape(-1)
        self.scale = np.ascontiguousarray(np.broadcast_to(np.asarray(scale, np.float32), (n,)))
        self.ptrs = (_ptr(self.data), _ptr(self.scale))  # fixed for the matrix's life

    @classmethod
    def from_codes(cls, codes: np.ndarray, scale) -> "TernaryMatrix":
        n, k = codes.shape
        return cls(pack_codes(codes).reshape(-1), n, k, scale)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def quantize(x: np.ndarray, eps: float, kp: int, isa: str | None = None):
    """Per-token int8 activations of x [T, K] -> (q int8 [T, kp] zero padded, sumq int32 [T], step f32 [T])."""
    x = np.ascontiguousarray(x, np.float32)
    t, k = x.shape
    q = np.empty((t, kp), np.int8)
    sumq, step = np.empty(t, np.int32), np.empty(t, np.float32)
    rc = _lib().mote_quant_act(_ptr(x), k, t, k, kp, eps, _ptr(q), kp, _ptr(sumq), _ptr(step),
                               clib.AUTO if isa is None else clib.isa_code(isa))
    if rc:
        raise MoteExportError(f"activation quantisation failed (code {rc}) for [{t}, {k}] into {kp}")
    return q, sumq, step


def gemm(m: TernaryMatrix, q: np.ndarray, sumq: np.ndarray, step: np.ndarray, isa: str | None = None,
         out: np.ndarray | None = None) -> np.ndarray:
    """y [T, N] float32 = the ternary product of quantised activations (quantize()) with m."""
    t = q.shape[0]
    if q.dtype != np.int8 or q.ndim != 2 or q.shape[1] != m.kp or not q.flags.c_contiguous:
        raise MoteExportError(f"activations [{', '.join(map(str, q.shape))}] {q.dtype} do not fit a [{m.n}, {m.k}] "
                              f"ternary matrix (int8 [T, {m.kp}] expected)")
    if sumq.shape != (t,) or step.shape != (t,) or sumq.dtype != np.int32 or step.dtype != np.float32:
        raise MoteExportError("sumq / step must be int32 / float32 vectors of one value per token")
    y = np.empty((t, m.n), np.float32) if out is None else out
    if y.shape != (t, m.n) or y.dtype != np.float32 or not y.flags.c_contiguous:
        raise MoteExportError(f"output must be float32 [{t}, {m.n}]")
    w, scale = m.ptrs
    rc = _lib().mote_tern_gemm(w, m.block_bytes, m.row_bytes, m.n, m.kp, _ptr(q), m.kp, _ptr(sumq), _ptr(step), scale,
                               t, _ptr(y), m.n, clib.AUTO if isa is None else clib.isa_code(isa))
    if rc:
        raise MoteExportError(f"ternary product failed (code {rc}) for [{t}, {m.kp}] x [{m.n}, {m.kp}]")
    return y


def check_activations(n: int, kp: int, q, sumq, step) -> int:
    """T of quantised activations (quantize()) that fit an [n, kp] ternary matrix; rows of q may be further apart
    than kp (a row slice of a wider set)."""
    if not isinstance(q, np.ndarray) or q.dtype != np.int8 or q.ndim != 2 or q.shape[1] != kp or q.strides[1] != 1 \
            or (q.shape[0] > 1 and q.strides[0] < kp):
        raise MoteExportError(f"activations {getattr(q, 'dtype', type(q))} {list(np.shape(q))} do not fit a "
                              f"[{n}, {kp}] ternary matrix (int8 [T, {kp}] rows expected)")
    t = q.shape[0]
    for a, dt, what in ((sumq, np.int32, "sumq"), (step, np.float32, "step")):
        if not isinstance(a, np.ndarray) or a.dtype != dt or a.shape != (t,) or not a.flags.c_contiguous:
            raise MoteExportError(f"{what} must be a contiguous {np.dtype(dt).name} vector of one value per token")
    return t


def run_batch(calls: list[tuple], lut: bool, isa: str | None = None) -> list[np.ndarray]:
    """[(w pointer, block_bytes, row_bytes, n, kp, scale pointer, q, sumq, step)] -> their products y [T, n], all
    in one pool job (mote_tern_gemm_batch, or mote_lut_gemm_batch when `lut`: w is then the LUT-packed matrix)."""
    L, ys = _lib(), []
    fn = L.mote_lut_gemm_batch if lut else L.mote_tern_gemm_batch
    code = clib.AUTO if isa is None else clib.isa_code(isa)
    for b in range(0, len(calls), MAX_BATCH):
        part = calls[b:b + MAX_BATCH]
        arr = (TernCall * len(part))()
        for i, (w, bb, rb, n, kp, scale, q, sumq, step) in enumerate(part):
            t = check_activations(n, kp, q, sumq, step)
            y = np.empty((t, n), np.float32)
            ys.append(y)
            arr[i] = TernCall(w, bb, rb, n, kp, _ptr(q), q.strides[0] if t > 1 else kp, _ptr(sumq), _ptr(step), scale,
                              t, _ptr(y), n)
        rc = fn(arr, len(part), code)
        if rc:
            raise MoteExportError(f"batched ternary product failed (code {rc})")
    return ys

"""The C float-weight kernels (runtime_cpu/csrc/float_gemm.c) through ctypes: y = x @ W.T (+ b), x float32,
W the GGUF bytes of an F32 / F16 / BF16 / Q8_0 / Q4_0 tensor used in place (a view of the mapping, no
float32 copy: the weights are decoded in registers). Activations stay float32, so the result is the float32
product of the file's exact weights up to the summation order (float_gemm.c states the bound).

Everything a kernel touches is checked here first (buffer sizes, strides, dtypes, block multiples), so bad
input is one MoteExportError line, never a read outside a buffer in C."""
from __future__ import annotations

import ctypes

import numpy as np
from gguf import GGMLQuantizationType as T

from ..exporters.errors import MoteExportError
from ..exporters.ternary import QUANT_SIZES
from . import clib

TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0)
MAX_MATS = 16  # MOTE_FLOAT_MAX_MATS in float_gemm.c
_C_ERRORS = {-1: "the ISA path does not run here", -2: "sizes the kernel refuses", -3: "an unknown weight type"}


class FloatMat(ctypes.Structure):
    """mote_float_mat in float_gemm.c: one weight matrix of a (multi-)product and where its output goes."""
    _fields_ = [("wtype", ctypes.c_int), ("w", ctypes.c_void_p), ("row_bytes", ctypes.c_int64),
                ("N", ctypes.c_int64), ("bias", ctypes.c_void_p), ("y", ctypes.c_void_p),
                ("y_stride", ctypes.c_int64)]


_FUNCS = None


def _lib():
    global _FUNCS
    if _FUNCS is None:
        L = clib.lib()
        if L is None:
            raise MoteExportError(clib.error())
        i64, vp = ctypes.c_int64, ctypes.c_void_p
        L.mote_float_gemm_multi.argtypes = [ctypes.c_int, ctypes.POINTER(FloatMat), i64, vp, i64, i64, ctypes.c_int]
        L.mote_float_gemm_multi.restype = ctypes.c_int
        _FUNCS = L
    return _FUNCS


def wtype_of(wtype) -> T:
    try:
        t = T(int(wtype))
    except ValueError:
        t = None
    if t not in TYPES:
        raise MoteExportError(f"weight type {getattr(wtype, 'name', wtype)} has no float kernel; accepted: "
                              f"{', '.join(t.name for t in TYPES)}")
    return t


def row_bytes(wtype, K: int) -> int:
    """Bytes of one row of K weights of `wtype` (K a multiple of the type's block)."""
    t = wtype_of(wtype)
    block, size = QUANT_SIZES[t]
    if K < 1 or K % block:
        raise MoteExportError(f"{t.name} rows of {K} weights: K must be a positive multiple of {block}")
    return K // block * size


def _weights(raw, wtype, N: int, K: int, name: str) -> tuple[T, int]:
    t = wtype_of(wtype)
    rb = row_bytes(t, K)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or not raw.flags.c_contiguous:
        raise MoteExportError(f"{name}: weights must be a C-contiguous uint8 array of the tensor's bytes")
    if N < 0 or raw.nbytes != N * rb:
        raise MoteExportError(f"{name}: {raw.nbytes} bytes of weights; {t.name} [{N}, {K}] needs {N} x {rb} = {N * rb}")
    return t, rb


def _activations(x, K: int) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != K:
        raise MoteExportError(f"activations must be float32 [T, {K}]; got "
                              f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
    inner_ok = K == 1 or x.strides[1] == 4
    rows_ok = x.shape[0] <= 1 or (x.strides[0] % 4 == 0 and x.strides[0] >= 4 * K)
    if not (inner_ok and rows_ok):
        x = np.ascontiguousarray(x)  # row-strided views (a column slice of a wider array) are used as they are
    return x


def _row_stride(x: np.ndarray, K: int) -> int:
    """x's row stride in floats (one row or none: any stride numpy reports is unused, so K)."""
    return x.strides[0] // 4 if x.shape[0] > 1 else K


def _bias(bias, N: int, name: str):
    if bias is None:
        return None
    if not isinstance(bias, np.ndarray) or bias.dtype != np.float32 or bias.shape != (N,) or not bias.flags.c_contiguous:
        raise MoteExportError(f"{name}: bias must be a contiguous float32 [{N}]; got "
                              f"{getattr(bias, 'dtype', type(bias).__name__)} {list(getattr(bias, 'shape', []))}")
    return bias


class FloatMatmul:
    """A product prepared once (at load): several matrices on the same x (fused q/k/v, gate/up: one kernel
    call over all their rows), each checked here once, so a call checks only x (decode makes hundreds).
    mats: [(raw uint8 bytes, wtype, N, bias or None), ...]; call(x [T, K]) -> [y [T, N] float32, ...]."""

    def __init__(self, mats, K: int, isa: str | None = "auto"):
        if not 1 <= len(mats) <= MAX_MATS:
            raise MoteExportError(f"{len(mats)} matrices in one float product; accepted: 1 to {MAX_MATS}")
        self.K, self.isa, self._lib = int(K), clib.isa_code(isa), _lib()
        self._arr = (FloatMat * len(mats))()
        self._keep, self.sizes = [], []  # the arrays the C structs point into stay alive with this object
        for i, (raw, wtype, N, bias) in enumerate(mats):
            name = f"matrix {i}"
            t, rb = _weights(raw, wtype, int(N), self.K, name)
            b = _bias(bias, int(N), name)
            self._keep += [raw, b]
            self.sizes.append(int(N))
            self._arr[i] = FloatMat(int(t), raw.ctypes.data if raw.nbytes else None, rb, int(N),
                                    None if b is None else b.ctypes.data, None, int(N))

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        x = _activations(x, self.K)
        outs = [np.empty((x.shape[0], n), np.float32) for n in self.sizes]
        for m, y in zip(self._arr, outs):
            m.y = y.ctypes.data if y.nbytes else None
        rc = self._lib.mote_float_gemm_multi(len(outs), self._arr, self.K, x.ctypes.data if x.nbytes else None,
                                             _row_stride(x, self.K), x.shape[0], self.isa)
        if rc != 0:
            raise MoteExportError(f"the float kernel refused the call ({_C_ERRORS.get(rc, f'code {rc}')})")
        return outs


def float_gemm(raw: np.ndarray, wtype, N: int, K: int, x: np.ndarray, bias: np.ndarray | None = None,
               isa: str | None = "auto") -> np.ndarray:
    """y [T, N] = x [T, K] @ W.T (+ bias), W [N, K] of `wtype` given as its raw GGUF bytes."""
    return FloatMatmul([(raw, wtype, N, bias)], K, isa)(x)[0]

"""The lookup-table ternary kernels of the C library (csrc/ternary_lut.c), for numpy callers.

The LUT kernels read their own weight layout (rows interleaved 32 to a tile, groups of 3 weights as 5-bit
table indices, 1.78 bits per weight; the comment at the top of ternary_lut.c), made once at load by
lut_pack from the TQ2_0 code layout (mote_kernels.h). The product equals the multiply-add kernels' bit for
bit: y = (float)((double)acc * ((double)step * (double)scale)) with the integer dot acc exact.
"""
from __future__ import annotations

import ctypes

import numpy as np

from ..exporters.errors import MoteExportError
from . import clib

_P = ctypes.c_void_p
_I = ctypes.c_int64


def _lib() -> ctypes.CDLL:
    L = clib.lib()
    if L is None:
        raise MoteExportError(clib.error())
    if not getattr(L, "_mote_lut", False):
        L.mote_lut_packed_bytes.argtypes = [_I, _I]
        L.mote_lut_packed_bytes.restype = _I
        L.mote_lut_pack.argtypes = [_P, _I, _I, _I, _I, _P]
        L.mote_lut_gemm.argtypes = [_P, _I, _I, _P, _I, _P, _P, _P, _I, _P, _I, ctypes.c_int]
        L._mote_lut = True
    return L


def _check_sizes(n: int, kp: int) -> None:
    if n < 0 or kp <= 0 or kp % 256:
        raise MoteExportError(f"LUT weights of {n} x {kp}: N must be >= 0 and Kp a positive multiple of 256")


def packed_bytes(n: int, kp: int) -> int:
    """Bytes of the LUT layout of an N x Kp ternary matrix (header included)."""
    _check_sizes(n, kp)
    return int(_lib().mote_lut_packed_bytes(n, kp))


def stored_bytes(packed: np.ndarray) -> int:
    """Bytes of a packed matrix the kernels read (header + tiles; K's padding to Kp is not stored): the
    memory the repacked copy really takes, as its header says."""
    packed = _bytes_view(packed)
    if packed.nbytes < 64 or packed[:8].tobytes() != b"MOTELUT1":
        raise MoteExportError("not a LUT-packed ternary matrix (no MOTELUT1 header)")
    n, _, ncols = (int(v) for v in np.frombuffer(packed[24:48].tobytes(), "<i8"))
    return 64 + -(-n // 32) * ncols * 64


def _bytes_view(buf) -> np.ndarray:
    a = np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf
    if a.dtype != np.uint8 or not a.flags.c_contiguous:
        raise MoteExportError(f"ternary codes must be contiguous uint8 bytes, not {a.dtype} with strides {a.strides}")
    return a.reshape(-1)


def lut_pack(codes_layout_bytes, block_bytes: int, row_bytes: int, n: int, kp: int) -> np.ndarray:
    """TQ2_0-layout codes (N rows of `row_bytes`, Kp / 256 blocks of `block_bytes`: 66 = GGUF TQ2_0 in place,
    64 = repacked) -> uint8 [packed_bytes(N, Kp)] in the LUT layout, 64-byte aligned (keep it so when copying
    it elsewhere: the kernels are correct at any alignment, ~20% slower off cache lines). Pages past the
    stored columns (K's padding to Kp) are never touched. A code 3 (not ternary) is refused."""
    _check_sizes(n, kp)
    src = _bytes_view(codes_layout_bytes)
    need = (n - 1) * row_bytes + kp // 256 * block_bytes if n else 0
    if block_bytes < 64 or row_bytes < kp // 256 * block_bytes or src.nbytes < need:
        raise MoteExportError(f"ternary codes of {src.nbytes} bytes do not hold {n} x {kp} in {block_bytes}-byte blocks "
                              f"{row_bytes} bytes apart ({need} bytes needed)")
    size = packed_bytes(n, kp)
    buf = np.empty(size + 64, np.uint8)  # tiles on 64-byte lines: a split line per load costs ~20% (any alignment is correct)
    dst = buf[(-buf.ctypes.data) % 64:][:size]
    rc = _lib().mote_lut_pack(src.ctypes.data, block_bytes, row_bytes, n, kp, dst.ctypes.data)
    if rc == -3:
        raise MoteExportError(f"the {n} x {kp} ternary codes hold a code 3, which is not a ternary weight (0, 1, 2 = -1, 0, +1)")
    if rc:
        raise MoteExportError(f"LUT packing failed (code {rc}) for {n} x {kp}")
    return dst


def _vec(a, dtype, length: int, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != dtype or a.shape != (length,) or not a.flags.c_contiguous:
        raise MoteExportError(f"{what} must be a contiguous {np.dtype(dtype).name} vector of {length}, "
                              f"not {a.dtype} {list(a.shape)}")
    return a


def lut_gemm(packed: np.ndarray, n: int, kp: int, q: np.ndarray, sumq: np.ndarray, step: np.ndarray,
             scale: np.ndarray, isa: str | None = "auto", out: np.ndarray | None = None) -> np.ndarray:
    """y [T, N] float32 = the ternary product of per-token int8 activations q [T, Kp] (rows may be further
    apart than Kp; any alignment) with LUT-packed weights, y = acc * (step[t] * scale[n])."""
    _check_sizes(n, kp)
    packed = _bytes_view(packed)
    L = _lib()
    if packed.nbytes != L.mote_lut_packed_bytes(n, kp):
        raise MoteExportError(f"LUT weights of {packed.nbytes} bytes are not a packed {n} x {kp} matrix "
                              f"({L.mote_lut_packed_bytes(n, kp)} bytes)")
    if not isinstance(q, np.ndarray) or q.dtype != np.int8 or q.ndim != 2 or q.shape[1] != kp or q.strides[1] != 1 \
            or q.strides[0] < kp:
        raise MoteExportError(f"activations {getattr(q, 'dtype', type(q))} {list(np.shape(q))} do not fit a "
                              f"[{n}, {kp}] ternary matrix (int8 [T, {kp}] rows expected)")
    t = q.shape[0]
    sumq = _vec(sumq, np.int32, t, "sumq")
    step = _vec(step, np.float32, t, "step")
    scale = _vec(scale, np.float32, n, "scale")
    y = np.empty((t, n), np.float32) if out is None else out
    if not isinstance(y, np.ndarray) or y.dtype != np.float32 or y.ndim != 2 or y.shape != (t, n) \
            or y.strides[1] != 4 or y.strides[0] % 4 or y.strides[0] < 4 * n:
        raise MoteExportError(f"output must be float32 [{t}, {n}] with unit column stride")
    rc = L.mote_lut_gemm(packed.ctypes.data, n, kp, q.ctypes.data, q.strides[0], sumq.ctypes.data, step.ctypes.data,
                         scale.ctypes.data, t, y.ctypes.data, y.strides[0] // 4, clib.isa_code(isa))
    if rc == -2:
        raise MoteExportError(f"LUT weights do not carry a valid {n} x {kp} header (not made by lut_pack for this shape)")
    if rc:
        raise MoteExportError(f"LUT ternary product failed (code {rc}) for [{t}, {kp}] x [{n}, {kp}]")
    return y

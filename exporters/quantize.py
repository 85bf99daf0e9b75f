"""Full-precision tensors -> GGUF types, by name (`f16`, `q8_0`, `q4_k`, ...).

gguf-py quantizes F32/F16/BF16 and the 32-weight legacy types in numpy; the K-quants come from
ggml's own C quantizer `ggml_quantize_chunk`, exported by the libggml-base.so that
llama-cpp-python bundles, called through ctypes (the way gguf-py's tests check their numpy
quantizers against the reference). Rows whose width a type's block does not divide fall back to
F16, and the caller reports it.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

from .errors import MoteExportError
from .ternary import QUANT_SIZES, TERNARY_TYPES

NUMPY_TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q5_0": T.Q5_0,
               "q5_1": T.Q5_1, "q4_0": T.Q4_0, "q4_1": T.Q4_1}
GGML_TYPES = {"q6_k": T.Q6_K, "q5_k": T.Q5_K, "q4_k": T.Q4_K, "q3_k": T.Q3_K, "q2_k": T.Q2_K}
FLOAT_TYPES = {**NUMPY_TYPES, **GGML_TYPES}
_CHUNK = 1 << 24  # weights quantized per call: bounds the float32 temporaries to ~64 MB


def parse_type(name: str, option: str) -> T:
    """A full-precision target type by name; ternary names are refused with the reason."""
    key = str(name).strip().lower()
    if key in TERNARY_TYPES:
        raise MoteExportError(f"{option} {name}: ternary types are only for MoTE routed experts "
                              f"(trained ternary); accepted: {', '.join(FLOAT_TYPES)}")
    if key not in FLOAT_TYPES:
        raise MoteExportError(f"{option} {name!r} is not a known type; accepted: {', '.join(FLOAT_TYPES)}")
    if FLOAT_TYPES[key] in GGML_TYPES.values():
        ggml_lib()  # fail now, before anything is written, if the C quantizer is missing
    return FLOAT_TYPES[key]


def all_finite(a: np.ndarray) -> bool:
    """No NaN / inf, by two reductions (no array-sized temporaries, unlike np.isfinite(a).all()).
    float16 is tested on its exponent bits instead: numpy reduces float16 one element at a time,
    which made this check 85% of an F16 export."""
    if a.size and a.dtype == np.float16:
        return not np.any((a.view(np.uint16) & np.uint16(0x7C00)) == np.uint16(0x7C00))
    return a.size == 0 or bool(np.isfinite(a.max()) and np.isfinite(a.min()))


def fitting_type(qtype: T, ne0: int) -> T:
    """`qtype` if its block divides the row width `ne0`, else F16."""
    return qtype if ne0 % QUANT_SIZES[qtype][0] == 0 else T.F16


def nbytes(shape: tuple[int, ...], qtype: T) -> int:
    """Bytes of a tensor of numpy `shape` (rows of shape[-1] weights) in `qtype`, Q2_0 included."""
    if qtype in (T.F32, T.F16):
        return int(np.prod(shape, dtype=np.int64)) * (4 if qtype == T.F32 else 2)
    block, size = QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise ValueError(f"Quantized tensor row size ({shape[-1]}) is not a multiple of {qtype.name} block size ({block})")
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def quantize_tensor(arr: np.ndarray, qtype: T, name: str = "tensor") -> np.ndarray:
    """Float array [..., ne0] -> float32/float16 values or raw block bytes (uint8 [..., row_bytes])."""
    arr = np.asarray(arr)
    if qtype == T.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == T.F16:
        out = np.asarray(arr, dtype=np.float16)
        if not all_finite(out) and all_finite(arr):
            raise MoteExportError(f"{name} has values beyond the fp16 range (max |w| = "
                                  f"{max(arr.max(), -arr.min()):.4g}); choose bf16 or f32")
        return out
    rows = arr.reshape(-1, arr.shape[-1])
    step = max(1, _CHUNK // max(1, rows.shape[1]))
    row_bytes = nbytes((rows.shape[1],), qtype)
    out = np.empty((rows.shape[0], row_bytes), dtype=np.uint8)
    if qtype in GGML_TYPES.values():
        _ggml_quantize_rows(rows, out, qtype, step)
        return out.reshape(*arr.shape[:-1], row_bytes)
    for i in range(0, rows.shape[0], step):
        out[i:i + step] = quantize(np.ascontiguousarray(rows[i:i + step], dtype=np.float32), qtype)
    return out.reshape(*arr.shape[:-1], row_bytes)


@lru_cache(maxsize=1)
def ggml_lib() -> ctypes.CDLL:
    """ggml's quantizer from llama-cpp-python's bundled libggml-base (found without importing it)."""
    spec = importlib.util.find_spec("llama_cpp")
    hint = "K-quants (q2_k..q6_k) need ggml's C quantizer from llama-cpp-python: pip install 'mote-edge[llama]'"
    if spec is None or spec.origin is None:
        raise MoteExportError(f"llama-cpp-python is not installed; {hint}")
    lib_dir = Path(spec.origin).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*")) + sorted(lib_dir.glob("ggml-base.dll"))
    if not candidates:
        raise MoteExportError(f"no libggml-base library in {lib_dir}; {hint}")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def _ggml_quantize_rows(rows: np.ndarray, out: np.ndarray, qtype: T, step: int) -> None:
    """ggml's quantizer over row chunks on every core: it is reentrant and ctypes releases the GIL,
    and the K-quants' search (about 50 ns a weight for Q4_K) would otherwise hold one core for
    minutes at real shapes. Each chunk lands at its own rows, so the bytes do not depend on threads."""
    threads = max(1, min(os.cpu_count() or 1, 8))
    step = max(1, min(step, -(-rows.shape[0] // threads)))  # at least one chunk per thread

    def work(i: int) -> None:
        out[i:i + step] = _ggml_quantize(np.ascontiguousarray(rows[i:i + step], dtype=np.float32), qtype)

    starts = range(0, rows.shape[0], step)
    if threads == 1 or len(starts) == 1:
        for i in starts:
            work(i)
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, starts))  # list(): re-raise a worker's exception here


def _ggml_quantize(rows: np.ndarray, qtype: T) -> np.ndarray:
    lib = ggml_lib()
    if lib.ggml_quantize_requires_imatrix(int(qtype)):  # ggml would abort the process instead
        raise MoteExportError(f"{qtype.name.lower()} needs an importance matrix, which this exporter does not compute")
    n_rows, n_per_row = rows.shape
    out = np.empty((n_rows, nbytes((n_per_row,), qtype)), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, None)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out

"""The mote engine's C kernel library (runtime_cpu/csrc, built by the package install): loading it, its
ISA paths and its thread pool. Each kernel family declares its own functions (ternary_kernels.py,
float_kernels.py, lut_kernels.py); this module only finds the library and says what it runs.

ctypes releases the GIL for the duration of every call, so the pool's threads and Python do not contend."""
from __future__ import annotations

import ctypes
import glob
import os

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2, "neon": 3}
AUTO = -1
_LIB: ctypes.CDLL | None = None
_ERROR: str | None = None


def _find() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    hits = sorted(glob.glob(os.path.join(here, "_mote_kernels*.so")) + glob.glob(os.path.join(here, "_mote_kernels*.pyd")))
    return os.environ.get("MOTE_KERNELS_LIB") or (hits[0] if hits else None)


def lib() -> ctypes.CDLL | None:
    """The loaded library, or None when the install could not build it (error() says why)."""
    global _LIB, _ERROR
    if _LIB is None and _ERROR is None:
        path = _find()
        if path is None:
            _ERROR = ("the C kernels were not built (no C compiler at install?); reinstall with a C compiler "
                      "(gcc or clang) to get them")
            return None
        try:
            L = ctypes.CDLL(path)
        except OSError as exc:
            _ERROR = f"the C kernels at {path} do not load ({exc})"
            return None
        L.mote_isa_runs.argtypes = [ctypes.c_int]
        L.mote_isa_pick.argtypes = [ctypes.c_int]
        L.mote_set_threads.argtypes = [ctypes.c_int]
        _LIB = L
    return _LIB


def error() -> str | None:
    lib()
    return _ERROR


def available() -> bool:
    return lib() is not None


def isas_here() -> list[str]:
    """The ISA paths this CPU runs, lowest first (the scalar path always)."""
    L = lib()
    return [] if L is None else [name for name, v in ISAS.items() if L.mote_isa_runs(v)]


def best_isa() -> str:
    v = lib().mote_isa_best()
    return next(n for n, i in ISAS.items() if i == v)


def isa_code(name: str | None) -> int:
    """ISA name (or None / "auto") -> the library's code; a path this CPU does not run is one error line."""
    from ..exporters.errors import MoteExportError

    if name in (None, "auto"):
        return AUTO
    if name not in ISAS:
        raise MoteExportError(f"ISA {name!r}; accepted: auto, {', '.join(ISAS)}")
    if not lib().mote_isa_runs(ISAS[name]):
        raise MoteExportError(f"this CPU (or this build) does not run the {name} path; it runs: {', '.join(isas_here())}")
    return ISAS[name]


def set_threads(n: int | None) -> int:
    """Threads of the kernel pool (None / 0: one per online CPU); returns the count in use."""
    return lib().mote_set_threads(int(n or 0))

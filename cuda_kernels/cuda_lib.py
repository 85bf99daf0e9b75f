"""The CUDA C W2A8 GEMV (csrc/w2a8.cu), built on demand with nvcc and loaded with ctypes.

Why ctypes and not a torch extension: torch's CPU wheel cannot build CUDA extensions, and an extension
would tie the .so to one torch build; an extern "C" library with static cudart launched on the torch
stream's handle works with any torch (BitNet's GPU kernel does the same). The library is built the first
time it is needed, never at install (nvcc is absent on most machines), into a cache folder keyed by the
sources, the nvcc version and the flags: $MOTE_EDGE_CACHE, else $XDG_CACHE_HOME/mote-edge, else
~/.cache/mote-edge. The decode helpers it uses (csrc/w2a8_decode.cuh) also build for the host with g++
(build_host_helpers), so the lop3 / dp4a logic is tested on machines without a GPU.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ..exporters.errors import MoteExportError

CSRC = Path(__file__).resolve().parent / "csrc"
GPU_SOURCES = ("w2a8.cu", "w2a8_decode.cuh")
HOST_SOURCES = ("w2a8_host.cpp", "w2a8_decode.cuh")
# sm_80 (A100) and sm_90a (H100/H200) machine code, plus compute_80 PTX that later GPUs compile at load
# a register spill or local-memory use fails the build (-warn-* with -Werror): the GEMV must stay in registers
NVCC_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static",
              "-Xptxas=-warn-spills,-warn-lmem-usage,-Werror",
              "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
              "-gencode", "arch=compute_80,code=compute_80")
CXX_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC")
OUT_MODES = {"float32": 0, "bfloat16": 1, "int32": 2}
CUDA_HOMES = ("/usr/local/cuda",)  # where a toolkit sits when neither PATH nor $CUDA_HOME names it


def cache_dir() -> Path:
    root = os.environ.get("MOTE_EDGE_CACHE") or (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                                 / "mote-edge")
    return Path(root) / "cuda"


def find_nvcc() -> str:
    """nvcc from $NVCC, PATH, $CUDA_HOME/bin or /usr/local/cuda/bin; one clear error when there is none."""
    cands = [os.environ.get("NVCC"), shutil.which("nvcc")]
    homes = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), *CUDA_HOMES)
    cands += [str(Path(h) / "bin" / "nvcc") for h in homes if h]
    for c in cands:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise MoteExportError("nvcc not found (looked at $NVCC, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): the CUDA C "
                          "W2A8 GEMV is built on first use with nvcc from a CUDA toolkit >= 12 (sm_80 / sm_90a); "
                          "the Triton kernels need no nvcc")


def find_cxx() -> str:
    for c in (os.environ.get("CXX"), shutil.which("c++"), shutil.which("g++"), shutil.which("clang++")):
        if c and Path(c).is_file():
            return c
    raise MoteExportError("no C++ compiler found ($CXX, c++, g++ or clang++): it builds the host test library of "
                          "the W2A8 decode helpers")


def _tool_version(exe: str) -> str:
    run = subprocess.run([exe, "--version"], capture_output=True, text=True)
    return run.stdout.strip()


def _build(compiler: str, flags: tuple, source: str, deps: tuple, name: str) -> Path:
    """Compile CSRC/source into the cache (once per sources + compiler + flags); written to a temporary
    name and renamed, so a concurrent or interrupted build never leaves a half-written library."""
    h = hashlib.sha256()
    for f in deps:
        h.update((CSRC / f).read_bytes())
    h.update(_tool_version(compiler).encode())
    h.update(" ".join(flags).encode())
    out = cache_dir() / h.hexdigest()[:16] / name
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{name}.{os.getpid()}.tmp")
    print(f"building {name} with {Path(compiler).name} (once, into {out.parent}) ...", file=sys.stderr, flush=True)
    run = subprocess.run([compiler, *flags, f"-I{CSRC}", "-o", str(tmp), str(CSRC / source)],
                         capture_output=True, text=True)
    if run.returncode:
        tmp.unlink(missing_ok=True)
        lines = [ln for ln in (run.stderr + run.stdout).splitlines() if ln.strip()]
        raise MoteExportError(f"{Path(compiler).name} failed to build {source}: {lines[0] if lines else run.returncode}")
    os.replace(tmp, out)
    return out


def build_gemv_library() -> Path:
    """The GPU library (.so), built with nvcc if the cache does not hold it yet."""
    return _build(find_nvcc(), NVCC_FLAGS, "w2a8.cu", GPU_SOURCES, "libmote_w2a8.so")


def build_host_helpers() -> Path:
    """The host test library of the decode helpers (.so), built with the C++ compiler."""
    return _build(find_cxx(), CXX_FLAGS, "w2a8_host.cpp", HOST_SOURCES, "libmote_w2a8_host.so")


def sass_counts(lib: Path, patterns=("IDP.4A", "LOP3.LUT")) -> dict[str, int]:
    """How often each SASS instruction appears in the library (cuobjdump of the triton wheel or PATH)."""
    import importlib.util

    spec = importlib.util.find_spec("triton")  # its path only: importing triton here would fix TRITON_INTERPRET
    own = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump" if spec and spec.origin else None
    exe = str(own) if own and own.is_file() else shutil.which("cuobjdump")
    if not exe:
        raise MoteExportError("cuobjdump not found (triton wheel or PATH)")
    sass = subprocess.run([exe, "-sass", str(lib)], capture_output=True, text=True, check=True).stdout
    return {p: len(re.findall(re.escape(p), sass)) for p in patterns}


_GEMV = None


def load_gemv():
    """ctypes handle of the GPU library (built on first use)."""
    global _GEMV
    if _GEMV is None:
        lib = ctypes.CDLL(str(build_gemv_library()))
        vp, i = ctypes.c_void_p, ctypes.c_int
        lib.mote_w2a8_gemv.argtypes = [vp, vp, vp, vp, vp, vp, i, i, i, i, vp]
        lib.mote_w2a8_gemv.restype = i
        lib.mote_w2a8_error_string.argtypes = [i]
        lib.mote_w2a8_error_string.restype = ctypes.c_char_p
        lib.mote_w2a8_abi_version.restype = i
        if lib.mote_w2a8_abi_version() != 1:
            raise MoteExportError("libmote_w2a8.so has an unexpected ABI version; delete the cache folder "
                                  f"{cache_dir()} and retry")
        _GEMV = lib
    return _GEMV


def w2a8_gemv_cuda(a, w, out_dtype=None, out_int32: bool = False, out=None):
    """The CUDA C GEMV: a = w2a8.QuantizedAct [M, K] on a CUDA device, w = w2a8.PackedTernary [N, K / 16]
    (K % 64 == 0); out [M, N] fp32 / bf16, or the int32 dot with out_int32. Same result bits as the Triton
    GEMV. Launched on torch's current stream."""
    import torch

    out_dtype = out_dtype or torch.float32
    m, k = a.xq.shape
    n = w.words.shape[-2]
    if a.xq.device.type != "cuda" or w.words.device != a.xq.device:
        raise MoteExportError(f"the CUDA C GEMV needs activations and weights on one CUDA device, got "
                              f"{a.xq.device} and {w.words.device}")
    if k % 64 or w.k != k or tuple(w.words.shape) != (n, k // 16):
        raise MoteExportError(f"the CUDA C GEMV needs K % 64 == 0 and words [N, K / 16]; got K={k}, words "
                              f"{tuple(w.words.shape)} for input width {w.k} (the Triton kernels take any K)")
    tensors = (w.words, a.xq, a.xsum, a.xs, w.scales)
    if any(not t.is_contiguous() or t.data_ptr() % 16 for t in tensors):
        raise MoteExportError("the CUDA C GEMV needs contiguous, 16-byte aligned inputs")
    key = "int32" if out_int32 else str(out_dtype).removeprefix("torch.")
    if key not in OUT_MODES:
        raise MoteExportError(f"the CUDA C GEMV writes float32, bfloat16 or int32, not {out_dtype}")
    mode = OUT_MODES[key]
    want = torch.int32 if out_int32 else out_dtype
    if out is None:
        out = torch.empty((m, n), dtype=want, device=a.xq.device)
    elif tuple(out.shape) != (m, n) or out.dtype != want or out.device != a.xq.device or not out.is_contiguous():
        raise MoteExportError(f"the CUDA C GEMV: out must be a contiguous {want} ({m}, {n}) on {a.xq.device}")
    if m == 0 or n == 0:
        return out
    stream = torch.cuda.current_stream(a.xq.device).cuda_stream
    lib = load_gemv()
    err = lib.mote_w2a8_gemv(*(t.data_ptr() for t in tensors), out.data_ptr(), mode, m, n, k, stream)
    if err:
        raise MoteExportError(f"CUDA C W2A8 GEMV launch failed: {lib.mote_w2a8_error_string(err).decode()} "
                              f"(error {err}); it runs on sm_80 or newer")
    return out


class HostHelpers:
    """The host build of csrc/w2a8_decode.cuh: lop3, dp4a, word decode and an integer GEMV, for tests."""

    def __init__(self):
        lib = ctypes.CDLL(str(build_host_helpers()))
        u32, i32, vp = ctypes.c_uint32, ctypes.c_int32, ctypes.c_void_p
        lib.mote_host_lop3_and_or.argtypes = [u32, u32, u32]
        lib.mote_host_lop3_and_or.restype = u32
        lib.mote_host_dp4a.argtypes = [u32, u32, i32]
        lib.mote_host_dp4a.restype = i32
        lib.mote_host_decode.argtypes = [vp, ctypes.c_int64, vp]
        lib.mote_host_gemv_int.argtypes = [vp, vp, vp, ctypes.c_int, ctypes.c_int, ctypes.c_int, vp]
        self.lib = lib

    def lop3_and_or(self, a: int, b: int, c: int) -> int:
        return self.lib.mote_host_lop3_and_or(a, b, c)

    def dp4a(self, a: int, b: int, c: int) -> int:
        return self.lib.mote_host_dp4a(a, b, c)

    def decode(self, words):
        """int32 words (any shape, CPU) -> int8 codes [..., 16 * last]."""
        import torch

        w = words.contiguous()
        out = torch.empty((*w.shape[:-1], w.shape[-1] * 16), dtype=torch.int8)
        self.lib.mote_host_decode(w.data_ptr(), w.numel(), out.data_ptr())
        return out

    def gemv_int(self, words, xq, xsum):
        """int32 [M, N] = xq . codes^T through the helpers (K % 16 == 0)."""
        import torch

        m, k = xq.shape
        n = words.shape[0]
        if k % 16 or tuple(words.shape) != (n, k // 16):
            raise MoteExportError(f"host GEMV needs K % 16 == 0 and words [N, K / 16], got K={k}, {tuple(words.shape)}")
        w, x, s = words.contiguous(), xq.contiguous(), xsum.to(torch.int32).contiguous()
        out = torch.empty((m, n), dtype=torch.int32)
        self.lib.mote_host_gemv_int(w.data_ptr(), x.data_ptr(), s.data_ptr(), m, n, k, out.data_ptr())
        return out

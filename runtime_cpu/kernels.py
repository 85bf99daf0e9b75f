"""The mote engine's numpy kernels: float linears, and ternary linears computed as MoTE trains them.

Ternary linear (mote_edge/quant.py, TernaryLinear with the deployable codes):
  per input row (token) x: amax = max(max|x|, eps), q = clip(round_half_even(x * ((1 / amax) * 127)), -128, 127)
  (in float32, the same operations as quantize_activation_int8), then the integer dot
  acc = sum_k q_k * codes_k, and y = acc * (amax / 127) * scale.
The integer dot runs as a float32 BLAS product of the int8 values: exact, because every partial sum is an
integer of magnitude <= 128 * K, and float32 holds every integer up to 2^24 exactly, whatever the order
of summation (blocking, FMA). So K <= EXACT_F32_K = 2^24 / 128 = 131072 (Qwen2.5 widths are <= 18944);
a wider matrix takes an int64 product.
"""
from __future__ import annotations

import ctypes
import glob
import os

import numpy as np

QB = 127
EXACT_F32_K = 2 ** 24 // 128  # the widest K whose int8 x ternary dot products float32 sums exactly
CAST_BYTES = 8 * 2 ** 20  # float32 codes made per call, at most this many bytes at a time (codes="int8")


def quantize_per_token(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(int8-valued codes as float32 [T, K], step amax / 127 as float32 [T, 1]) exactly as
    mote_edge.quant.quantize_activation_int8 (float32 throughout, round half to even). torch evaluates
    its `QB / amax` (a Python number over a tensor) as amax.reciprocal() * QB, two roundings, which differs
    from one correctly rounded 127 / amax for a quarter of all amax values: so the same two steps here."""
    x = np.asarray(x, np.float32)
    amax = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(eps))
    q = np.clip(np.rint(x * ((np.float32(1) / amax) * np.float32(QB))), -QB - 1, QB)
    return q, amax / np.float32(QB)


class FloatLinear:
    """y = x @ W.T (+ b) in float32; W [N, K] (a view of the mapping for F32 tensors)."""

    def __init__(self, w: np.ndarray, b: np.ndarray | None = None):
        self.w, self.b = w, b

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.w.T
        return y + self.b if self.b is not None else y


class Fused:
    """Several linears on the same input run as one product over their stacked rows: returns the parts
    (+ each part's bias). `linear` is a FloatLinear or TernaryLinear over the stacked matrices."""

    def __init__(self, linear, sizes: list[int], biases: list | None = None):
        self.linear, self.cuts = linear, np.cumsum(sizes)[:-1]
        self.biases = biases or [None] * len(sizes)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        parts = np.split(self.linear(x), self.cuts, axis=-1)
        return [y if b is None else y + b for y, b in zip(parts, self.biases)]


class Separate:
    """The same interface as Fused, one product per linear (F32 weights used in place are not stacked:
    that would copy them)."""

    def __init__(self, linears: list):
        self.linears = linears

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return [lin(x) for lin in self.linears]


class TernaryLinear:
    """int8 codes [N, K] in {-1, 0, 1} and one fp32 scale per matrix (a vector [N] when matrices are
    stacked, e.g. an expert's gate and up); activations int8 per token (module docstring).

    codes="int8" keeps only the int8 matrix (1 byte a weight) and makes float32 copies of row chunks per
    call; codes="f32" keeps a float32 copy instead (4 bytes a weight, faster decode)."""

    def __init__(self, codes: np.ndarray, scale, eps: float, codes_form: str = "int8"):
        self.n, self.k = codes.shape
        self.scale, self.eps = np.asarray(scale, np.float32).astype(np.float64), eps
        self.exact_f32 = self.k <= EXACT_F32_K
        self.codes = codes.astype(np.float32) if codes_form == "f32" and self.exact_f32 else codes
        self.chunk = max(1, CAST_BYTES // (4 * self.k))

    def int_dot(self, q: np.ndarray) -> np.ndarray:
        """sum_k q[t, k] * codes[n, k] exactly, [T, N] (float32 when exact, else int64)."""
        c = self.codes
        if not self.exact_f32:
            return q.astype(np.int64) @ c.astype(np.int64).T
        if c.dtype == np.float32:
            return q @ c.T
        if self.n <= self.chunk:
            return q @ c.astype(np.float32).T
        return np.concatenate([q @ c[i:i + self.chunk].astype(np.float32).T for i in range(0, self.n, self.chunk)],
                              axis=1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        q, step = quantize_per_token(x, self.eps)
        acc = self.int_dot(q)
        return (acc.astype(np.float64) * (step.astype(np.float64) * self.scale)).astype(np.float32)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x / (np.float32(1) + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """Qwen2RMSNorm in float32: w * x / sqrt(mean(x^2) + eps)."""
    var = np.mean(np.square(x), axis=-1, keepdims=True)
    return w * (x / np.sqrt(var + np.float32(eps)))


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mu).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + np.float32(eps)) * w + b


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """gelu_pytorch_tanh (SigLIP's)."""
    c = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * x * (np.float32(1) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """GELU with erf (HF "gelu", the LLaVA connector's): numpy has no erf, so Abramowitz & Stegun 7.1.26
    in float64 (|error| <= 1.5e-7, below float32's resolution of the result), rounded to float32."""
    z = np.asarray(x, np.float64) / np.sqrt(2.0)
    a = np.abs(z)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = np.sign(z) * (1.0 - poly * np.exp(-a * a))
    return (0.5 * np.asarray(x, np.float64) * (1.0 + erf)).astype(np.float32)


def quick_gelu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(np.float32(-1.702) * x))


def set_threads(n: int | None) -> bool:
    """Threads of numpy's OpenBLAS (the bundled scipy-openblas of numpy wheels); False where not found."""
    if not n:
        return False
    import numpy

    for path in glob.glob(os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs", "*openblas*")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for fn in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            if hasattr(lib, fn):
                getattr(lib, fn)(int(n))
                return True
    return False

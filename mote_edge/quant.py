"""BitNet b1.58 quantizers with a straight-through estimator, and the ternary linear layer.

Weights: absmean per matrix, s = mean|W|, codes = clip(round(W / s), -1, 1), value codes * s.
Activations: absmax per token to int8 (Qb = 127), value = round(x * 127 / max|x|) * max|x| / 127.

The latent weights change once per optimizer step, so TernaryLinear quantises its weight once per
change (QuantCache), not on every call: across gradient-accumulation micro-batches, repeated calls and
evaluation the cached form is reused. Its straight-through backward is one autograd node
(_TernaryMatmul) instead of the elementwise STE graph on the whole matrix.
"""
from __future__ import annotations

import ctypes
import math
import os
import weakref

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from .exporters import ternary as _tern

EPS = 1e-5
QB = 127


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward value exactly `q`, gradient passed straight to `x`.

    Written as q + (x - x.detach()) rather than x + (q - x).detach(): the latter rounds, so the
    forward would differ from q in the last bit and the deployable form would not match exactly.
    """
    return q.detach() + (x - x.detach())


def ternary_scale(w: torch.Tensor) -> torch.Tensor:
    """mean|W| accumulated in float64, then rounded to fp32: the sum order of torch and numpy then
    no longer matters, so torch-free exporters reproduce the exact same scale (and codes).

    On CPU this is the exporters' own sum (exporters/ternary.py abs_sum, a fixed-order float64 sum with
    no copy of W), in runtime_cpu's C (one pass, its blocks on torch's thread count) when the library is
    built: bit for bit the same. numpy takes the array through DLPack:
    Tensor.numpy() would mark the storage unresizable, which FSDP2's resharding needs."""
    w = w.detach()
    if w.device.type == "cpu" and not torch.compiler.is_compiling():
        wf = w.float().contiguous()
        c = _c_kernels()
        total = c.abs_sum(wf.numel(), wf.data_ptr()) if c else _tern.abs_sum(np.from_dlpack(wf))
        return torch.tensor(_tern.scale_from_sum(total, wf.numel()), dtype=torch.float32)
    return w.abs().double().mean().float().clamp(min=EPS)


def ternary_codes(w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """int8 codes in {-1, 0, 1} of a weight matrix (absmean scale)."""
    s = ternary_scale(w) if scale is None else scale
    return (w.detach().float() / s).round().clamp(-1, 1).to(torch.int8)


def quantize_weight_ternary(w: torch.Tensor) -> torch.Tensor:
    """Fake-quantized ternary weight (value codes * s) with STE gradient."""
    s = ternary_scale(w)
    q = ternary_codes(w, s).to(w.dtype) * s.to(w.dtype)
    return ste(w, q)


def int8_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """The value of quantize_activation_int8(x), without its gradient graph. A contiguous float32 CPU tensor
    goes through runtime_cpu's C form (one pass over each row while it is in L1, instead of torch's six
    over the whole tensor): the same operations in the same order, bit for bit."""
    c = _c_kernels() if (x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
                         and x.dim() and x.numel() and not torch.compiler.is_compiling()) else None
    if c is not None:
        out = torch.empty_like(x)
        c.act_fake_quant(x.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], out.data_ptr())
        return out
    xf = x.detach().float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_(min=EPS)
    return (xf * (QB / amax)).round_().clamp_(-QB - 1, QB).mul_(amax / QB).to(x.dtype)


def quantize_activation_int8(x: torch.Tensor) -> torch.Tensor:
    """Per-token (last dim) absmax int8 fake quantization with STE gradient; computed in fp32."""
    return ste(x, int8_fake_quant(x))


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """The value of the ternary weight, codes * s in w's dtype, without gradient: equal to
    quantize_weight_ternary(w) bit for bit, in three passes over W instead of five."""
    w = w.detach()
    return ternary_values(w, ternary_scale(w))


def ternary_values(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """codes * s of w for a float32 scale s, codes = clip(round_half_even(fl(w / s)), -1, 1).

    That code is +1 exactly when w > s/2, with no division: w = s/2 divides to 0.5, a tie that rounds
    to even (0); the float32 after s/2 divides to more than the midpoint 0.5 + 2^-25 between 0.5 and
    the next float32 (its spacing from s/2 is more than 2^-24 of it) and rounds up, and division is
    correctly rounded. s/2 is exact in float32. So hardshrink(w, s/2) keeps exactly the weights with
    code +-1 (the rest become +0), sign_ makes them +-1 and mul_ gives codes * s. A NaN weight makes s
    NaN and every value NaN, as the division form does."""
    # the division form itself: off the CPU (float(s) there would be a host read that waits for the device,
    # once per matrix per step), for other dtypes, and where a NaN or inf weight made s not finite
    if w.device.type != "cpu" or w.dtype != torch.float32 or not math.isfinite(sv := float(s)):
        q = (w.float() / s).clamp_(-1, 1).round_()
        return q.mul_(s).add_(0.0).to(w.dtype)  # + 0 turns the -0 of a rounded small negative into +0
    c = _c_kernels() if w.is_contiguous() else None
    if c is None:
        return F.hardshrink(w, sv * 0.5).sign_().mul_(s)
    out = torch.empty_like(w)
    c.values(w.data_ptr(), w.numel(), sv, out.data_ptr())
    return out


class _CKernels:
    """runtime_cpu's C forms of the scale's sum, of ternary_values and of int8_fake_quant
    (csrc/ternary_values.c)."""

    def __init__(self, L):
        self._sum, self._values, self._act = L.mote_abs_sum_f32, L.mote_ternary_values_f32, L.mote_act_fake_quant_f32
        self._sum.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        self._sum.restype = ctypes.c_double
        self._values.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                                 ctypes.c_int]
        self._values.restype = ctypes.c_int
        self._act.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p,
                              ctypes.c_int, ctypes.c_int]
        self._act.restype = ctypes.c_int
        self.set_team = L.mote_train_set_team
        self.set_team.argtypes, self.set_team.restype = [ctypes.c_void_p], None
        self.set_team(torch_openmp_parallel())  # their threads (csrc/ternary_values.c says why)

    def abs_sum(self, n: int, ptr: int, threads: int | None = None, isa: int = -1) -> float:
        """exporters/ternary.py abs_sum of n float32 at ptr, its blocks on torch's thread count; isa: a
        runtime_cpu.clib ISA level (-1: the best this CPU runs; one it does not run gives NaN)."""
        sums = (ctypes.c_double * max(1, -(-n // _tern.SCALE_BLOCK)))()
        return self._sum(ptr, n, threads or torch.get_num_threads(), sums, isa)

    def values(self, src: int, n: int, s: float, dst: int, threads: int | None = None, isa: int = -1) -> bool:
        """ternary_values of n float32 at src into dst for a finite scale s; isa as abs_sum's (-1: the best
        path for this size); False: this CPU does not run isa, nothing written."""
        return self._values(src, n, s, dst, threads or torch.get_num_threads(), isa) == 0

    def act_fake_quant(self, src: int, rows: int, k: int, dst: int, threads: int | None = None, isa: int = -1) -> bool:
        """int8_fake_quant of rows x k contiguous float32 at src into dst; isa as abs_sum's; False: this CPU
        does not run isa, nothing written."""
        return self._act(src, rows, k, EPS, dst, threads or torch.get_num_threads(), isa) == 0


_C_KERNELS: list = []
OPENMP_RUNTIMES = ("libgomp.so.1", "libiomp5.so", "libomp.so")  # each exports libgomp's GOMP_parallel


def torch_openmp_parallel() -> int | None:
    """The address of GOMP_parallel in the OpenMP runtime torch runs its CPU threads on, or None (another
    parallel backend, or a runtime this process has not loaded). Only an already-loaded runtime is taken
    (RTLD_NOLOAD): that is torch's, and its workers are the threads the C kernels then run on."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    for name in OPENMP_RUNTIMES:
        try:
            rt = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            return ctypes.cast(rt.GOMP_parallel, ctypes.c_void_p).value
        except (OSError, AttributeError):  # not loaded here / no such entry point
            continue
    return None


def _c_kernels() -> _CKernels | None:
    """The C kernels, or None without the C library (numpy sums the scale, three torch passes make the
    values: the same numbers, slower)."""
    if not _C_KERNELS:
        from .runtime_cpu import clib

        L = clib.lib()
        _C_KERNELS.append(_CKernels(L) if L is not None and hasattr(L, "mote_train_set_team") else None)
    return _C_KERNELS[0]


# ---------------------------------------------------------------------------------------------
# quantise once per change of the latent weight

_generation = 0


def invalidate_quantized_weights(*_args) -> None:
    """Mark every cached quantised weight stale. Runs after every torch.optim step (a global post-step
    hook, below): an in-place update bumps a parameter's version counter, which the cache checks too,
    but fused AdamW updates without a bump, FSDP2 refills its unsharded parameters without one, and
    `p.data` edits bypass it (call this after those yourself)."""
    global _generation
    _generation += 1


register_optimizer_step_post_hook(invalidate_quantized_weights)


class QuantCache:
    """The quantised form of some latent weights, made again only when one of them changed: a new
    optimizer step (version counter, or invalidate_quantized_weights), new storage (.to(), FSDP's
    all-gather), or another tensor in its place. Gradient accumulation and DDP keep weights fixed
    between steps, so micro-batches share one quantisation. Not cached while torch.compile traces.

    Memory: the cached form is what the forward saves for the backward anyway (codes * s for the torch
    path, int8 codes for Triton), so it adds nothing to the peak; between steps it stays resident."""

    def __init__(self):
        self._key, self._refs, self.value = None, (), None

    def get(self, weights: list[torch.Tensor], make):
        if torch.compiler.is_compiling():
            return make()
        key = (_generation, *((w._version, w.data_ptr(), w.dtype, w.device) for w in weights))
        if (self.value is None or key != self._key or len(self._refs) != len(weights)
                or any(r() is not w for r, w in zip(self._refs, weights))):
            self.value = None  # free the stale form before making the new one
            with torch.no_grad():
                self.value = make()
            self._key, self._refs = key, tuple(weakref.ref(w) for w in weights)
        return self.value

    # a copied or pickled module starts without a cache (weakrefs cannot be pickled; a copy would
    # only hold a stale duplicate)
    def __deepcopy__(self, memo):
        return QuantCache()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class _TernaryMatmul(torch.autograd.Function):
    """F.linear(q8(x), wq, bias) with both straight-through estimators in one node: the gradient for the
    int8 activations goes to x, the one for wq to the latent weight w. The backward takes the products
    autograd takes through F.linear (grad_y @ wq for x; grad_y^T @ xq for the weight, which comes out in
    the weight's own layout, so AccumulateGrad stores it without a copy), so gradients are bit-identical
    to the elementwise STE graph (quantize_activation_int8, quantize_weight_ternary), which costs two more
    passes over every activation and a transposed weight gradient that is copied once more."""

    @staticmethod
    def forward(ctx, x, w, wq, bias):
        xq = int8_fake_quant(x)
        ctx.save_for_backward(xq, wq)
        ctx.has_bias = bias is not None
        return F.linear(xq, wq, bias)

    @staticmethod
    def backward(ctx, grad_y):
        xq, wq = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        dt = g.dtype  # under autocast the forward ran in bf16; grads come back in it
        grad_x = g.mm(wq.to(dt)).reshape(xq.shape).to(xq.dtype) if ctx.needs_input_grad[0] else None
        grad_w = g.t().mm(xq.reshape(-1, xq.shape[-1]).to(dt)).to(wq.dtype) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, grad_w, None, grad_b


class TernaryLinear(nn.Linear):
    """nn.Linear whose forward uses ternary weights and int8 per-token activations.

    The latent full-precision weight is what trains; it is quantised once per optimizer step.
    `kernels` ("torch" or "triton", set by mote_edge.moe.set_kernels) picks the forward: fake-quantised
    float matmul, or int8 codes on int8 tensor cores (cuda_kernels/train_ops.py).
    """

    kernels = "torch"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.quant_cache = QuantCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.kernels == "triton":
            from .cuda_kernels import train_ops

            scale, codes = self.quant_cache.get([w], lambda: train_ops.ternary_quantize(w.detach()))
            y = train_ops.ternary_linear(x, w, codes, scale)
            return y if self.bias is None else y + self.bias
        return _TernaryMatmul.apply(x, w, self.quant_cache.get([w], lambda: fake_quant_weight(w)), self.bias)

"""The training kernels of ternary_train.py as torch ops (torch.library.custom_op + register_fake +
register_autograd), so autograd, opcheck and torch.compile see them as single opaque ops.

    ternary_quantize(w) -> (scale fp32 [], codes int8)          once per optimizer step per matrix
    act_quant_int8(x [N, K]) -> (step fp32 [N], q int8)
    ternary_linear(x, w, codes, scale) -> y                       one expert matrix
    grouped_ternary_linear(x, offsets, weights, codes, scales)    all experts of a layer, one launch

Forward: y = (q @ codes^T) * step * s from int8 codes on int8 tensor cores (int32 accumulate). The
backward is the straight-through estimator of mote_edge/quant.py's fake quantisation, in floating
point: grad_x = grad_y @ (codes * s), grad_W = grad_y^T @ (q * step), the same products in the same
order as autograd takes through F.linear of the fake-quantised tensors. `w` / `weights` enter the
forward ops only so that their gradients have somewhere to go: the forward reads the codes.

Under TRITON_INTERPRET=1 (set before this module is imported) the same kernels run on CPU tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ternary_train as tt

# ---------------------------------------------------------------------------------------------
# quantisers (no gradient: the STE is in the linear ops' backward). Float outputs come first: opcheck's
# autograd harness sums all outputs into the first one's dtype.


@torch.library.custom_op("mote::ternary_quantize", mutates_args=())
def ternary_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    codes, scale = tt.ternary_quantize(w)
    return scale, codes


@ternary_quantize.register_fake
def _(w):
    return w.new_empty((), dtype=torch.float32), torch.empty(w.shape, dtype=torch.int8, device=w.device)


@torch.library.custom_op("mote::act_quant_int8", mutates_args=())
def act_quant_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    q, step = tt.act_quant_int8(x)
    return step, q


@act_quant_int8.register_fake
def _(x):
    return x.new_empty(x.shape[0], dtype=torch.float32), torch.empty(x.shape, dtype=torch.int8, device=x.device)


# ---------------------------------------------------------------------------------------------
# one expert matrix


@torch.library.custom_op("mote::ternary_linear_fwd", mutates_args=())
def ternary_linear_fwd(x: Tensor, w: Tensor, codes: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(y [N, M] in x's dtype, q, step) for x [N, K]; q and step are kept for the backward."""
    q, step = tt.act_quant_int8(x)
    y = torch.empty((x.shape[0], codes.shape[0]), dtype=x.dtype, device=x.device)
    return tt.int8_gemm(q, codes, step, scale, y), q, step


@ternary_linear_fwd.register_fake
def _(x, w, codes, scale):
    n, k = x.shape
    return (x.new_empty((n, codes.shape[0])), torch.empty((n, k), dtype=torch.int8, device=x.device),
            x.new_empty(n, dtype=torch.float32))


def _linear_setup(ctx, inputs, output):
    x, w, codes, scale = inputs
    _, q, step = output
    ctx.save_for_backward(q, step, codes, scale)
    ctx.w_dtype = w.dtype


def _linear_backward(ctx, grad_y, _grad_q, _grad_step):
    q, step, codes, scale = ctx.saved_tensors
    dt = grad_y.dtype
    wq = codes.to(dt) * scale.to(dt)
    xq = q.to(dt) * step.to(dt)[:, None]
    grad_x = grad_y.mm(wq) if ctx.needs_input_grad[0] else None
    grad_w = xq.t().mm(grad_y).t().to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None, None


ternary_linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


def ternary_linear(x: Tensor, w: Tensor, codes: Tensor, scale: Tensor) -> Tensor:
    """y = x W^T with W ternary (codes, scale of w) and x quantised per token to int8; any leading dims."""
    y, _, _ = ternary_linear_fwd(x.reshape(-1, x.shape[-1]), w, codes, scale)
    return y.reshape(*x.shape[:-1], codes.shape[0])


# ---------------------------------------------------------------------------------------------
# all experts of a layer: rows of x sorted by expert, expert e owns rows offsets[e]:offsets[e+1]


@torch.library.custom_op("mote::grouped_ternary_linear_fwd", mutates_args=())
def grouped_ternary_linear_fwd(x: Tensor, offsets: Tensor, weights: list[Tensor], codes: Tensor,
                               scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q, step = tt.act_quant_int8(x)
    y = torch.empty((x.shape[0], codes.shape[1]), dtype=x.dtype, device=x.device)
    return tt.grouped_int8_gemm(q, codes, step, scales, offsets, y), q, step


@grouped_ternary_linear_fwd.register_fake
def _(x, offsets, weights, codes, scales):
    n, k = x.shape
    return (x.new_empty((n, codes.shape[1])), torch.empty((n, k), dtype=torch.int8, device=x.device),
            x.new_empty(n, dtype=torch.float32))


@torch.library.custom_op("mote::grouped_ternary_linear_bwd", mutates_args=())
def grouped_ternary_linear_bwd(grad_y: Tensor, q: Tensor, step: Tensor, offsets: Tensor, codes: Tensor,
                               scales: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_x [T, K], grad_W [E, M, K]) by expert, in grad_y's dtype: float products per group. An op
    of its own because the group bounds are read on the host, which a traced backward could not do."""
    dt = grad_y.dtype
    grad_x = grad_y.new_zeros(q.shape)
    grad_w = grad_y.new_zeros(codes.shape)
    bounds = offsets.tolist()
    for e in range(codes.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue  # no tokens: a zero gradient, as the torch path's empty expert gets
        gy = grad_y[lo:hi]
        grad_x[lo:hi] = gy.mm(codes[e].to(dt) * scales[e].to(dt))
        grad_w[e] = (q[lo:hi].to(dt) * step[lo:hi].to(dt)[:, None]).t().mm(gy).t()
    return grad_x, grad_w


@grouped_ternary_linear_bwd.register_fake
def _(grad_y, q, step, offsets, codes, scales):
    return grad_y.new_empty(q.shape), grad_y.new_empty(codes.shape)


def _grouped_setup(ctx, inputs, output):
    x, offsets, weights, codes, scales = inputs
    _, q, step = output
    ctx.save_for_backward(q, step, offsets, codes, scales)
    ctx.w_dtypes = [w.dtype for w in weights]


def _grouped_backward(ctx, grad_y, _grad_q, _grad_step):
    q, step, offsets, codes, scales = ctx.saved_tensors
    grad_x, grad_w = grouped_ternary_linear_bwd(grad_y.contiguous(), q, step, offsets, codes, scales)
    return grad_x, None, [g.to(d) for g, d in zip(grad_w.unbind(0), ctx.w_dtypes)], None, None


grouped_ternary_linear_fwd.register_autograd(_grouped_backward, setup_context=_grouped_setup)


def grouped_ternary_linear(x: Tensor, offsets: Tensor, weights: list[Tensor], codes: Tensor, scales: Tensor) -> Tensor:
    """y [T, M] for x [T, K] sorted by expert; offsets [E + 1] int32, codes [E, M, K] int8, scales [E]
    fp32 are the experts' quantised `weights` (E latent [M, K] matrices, which receive the gradients)."""
    return grouped_ternary_linear_fwd(x, offsets, weights, codes, scales)[0]

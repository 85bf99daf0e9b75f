"""BitNet b1.58 quantizers with a straight-through estimator, and the ternary linear layer.

Weights: absmean per matrix, s = mean|W|, codes = clip(round(W / s), -1, 1), value codes * s.
Activations: absmax per token to int8 (Qb = 127), value = round(x * 127 / max|x|) * max|x| / 127.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    no longer matters, so torch-free exporters reproduce the exact same scale (and codes)."""
    return w.detach().abs().double().mean().float().clamp(min=EPS)


def ternary_codes(w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """int8 codes in {-1, 0, 1} of a weight matrix (absmean scale)."""
    s = ternary_scale(w) if scale is None else scale
    return (w.detach().float() / s).round().clamp(-1, 1).to(torch.int8)


def quantize_weight_ternary(w: torch.Tensor) -> torch.Tensor:
    """Fake-quantized ternary weight (value codes * s) with STE gradient."""
    s = ternary_scale(w)
    q = ternary_codes(w, s).to(w.dtype) * s.to(w.dtype)
    return ste(w, q)


def quantize_activation_int8(x: torch.Tensor) -> torch.Tensor:
    """Per-token (last dim) absmax int8 fake quantization with STE gradient; computed in fp32."""
    xf = x.detach().float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    q = (xf * (QB / amax)).round().clamp(-QB - 1, QB) * (amax / QB)
    return ste(x, q.to(x.dtype))


class TernaryLinear(nn.Linear):
    """nn.Linear whose forward uses ternary weights and int8 per-token activations.

    The latent full-precision weight is what trains; quantization happens on the fly.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(quantize_activation_int8(x), quantize_weight_ternary(self.weight), self.bias)

"""The MoTE feed-forward block that replaces a dense Qwen2 MLP.

out = FFN_shared(x) + sum_{i in topk} p_i * E_i(x),  p = softmax(router(x)) over all experts,
top-k taken from p without renormalisation (GShard). `x` is the post-attention-norm hidden state;
the decoder layer adds the residual itself. MoE-LLaVA variant: no shared expert, fp experts.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MoTEConfig
from .quant import QuantCache, TernaryLinear

KERNELS = ("torch", "triton")
PROJS = ("gate_proj", "up_proj", "down_proj")


class Expert(nn.Module):
    """SwiGLU expert `down(silu(gate(x)) * up(x))`, ternary or full precision."""

    def __init__(self, hidden: int, ffn: int, ternary: bool):
        super().__init__()
        linear = TernaryLinear if ternary else nn.Linear
        self.gate_proj = linear(hidden, ffn, bias=False)
        self.up_proj = linear(hidden, ffn, bias=False)
        self.down_proj = linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTEBlock(nn.Module):
    """Router + routed experts (+ frozen shared expert for MoTE)."""

    def __init__(self, hidden: int, ffn: int, cfg: MoTEConfig, shared_expert: nn.Module | None):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.shared_expert = shared_expert
        self.router = nn.Linear(hidden, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, ffn, cfg.ternary) for _ in range(cfg.num_experts))
        # Routing of the latest forward, read by the load-balance loss (like HF's router_logits).
        self.last_router_probs: torch.Tensor | None = None
        self.last_topk_index: torch.Tensor | None = None
        # "triton": ternary experts run grouped, all in one launch per projection (set_kernels)
        self.kernels = "torch"
        self.quant_caches = {p: QuantCache() for p in PROJS}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.router(x).float(), dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        if self.kernels == "triton" and isinstance(self.experts[0].gate_proj, TernaryLinear):
            out = self._grouped_experts(x, top_p, top_i)
        else:
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                # Every expert runs, even on zero tokens, so each trainable weight is in the graph on
                # every rank (DDP needs that; find_unused_parameters would cost a graph walk per step).
                tok, slot = (top_i == e).nonzero(as_tuple=True)
                y = expert(x[tok]) * top_p[tok, slot].unsqueeze(-1).to(x.dtype)
                out.index_add_(0, tok, y)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        self.last_router_probs, self.last_topk_index = probs, top_i
        return out.reshape(shape)

    def _grouped_experts(self, x: torch.Tensor, top_p: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        """The routed experts as three grouped int8 GEMMs over the (token, slot) pairs sorted by expert.
        Same sums in the same order as the per-expert loop (sorting is stable, so each expert's rows keep
        token order and index_add_ adds a token's experts in expert order); every expert weight is an
        input of every launch, so each gets a gradient (zero when it had no tokens), as DDP needs."""
        from .cuda_kernels import train_ops

        n_exp, k = len(self.experts), top_i.shape[1]
        flat = top_i.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // k
        offsets = torch.zeros(n_exp + 1, dtype=torch.int32, device=x.device)
        offsets[1:] = torch.bincount(flat, minlength=n_exp).cumsum(0)

        def project(h: torch.Tensor, proj: str) -> torch.Tensor:
            ws = [getattr(e, proj).weight for e in self.experts]

            def quantize():
                scales, codes = zip(*(train_ops.ternary_quantize(w.detach()) for w in ws))
                return torch.stack(scales), torch.stack(codes)

            scales, codes = self.quant_caches[proj].get(ws, quantize)
            return train_ops.grouped_ternary_linear(h, offsets, ws, codes, scales)

        xs = x[tok]
        h = F.silu(project(xs, "gate_proj")) * project(xs, "up_proj")
        y = project(h, "down_proj") * top_p.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tok, y)


def moe_blocks(model: nn.Module) -> list[MoTEBlock]:
    return [m for m in model.modules() if isinstance(m, MoTEBlock)]


def set_kernels(model: nn.Module, kernels: str) -> None:
    """Run the model's ternary experts on `kernels`: "torch" (fake-quantised float matmuls, any device)
    or "triton" (int8 tensor-core kernels; the caller checks that they can run: mote_edge.train)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, not {kernels!r}")
    if kernels == "triton":
        from .cuda_kernels import train_ops  # noqa: F401  (fails here, not mid-forward)
    for m in model.modules():
        if isinstance(m, (MoTEBlock, TernaryLinear)):
            m.kernels = kernels

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
from .quant import TernaryLinear


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.router(x).float(), dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
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


def moe_blocks(model: nn.Module) -> list[MoTEBlock]:
    return [m for m in model.modules() if isinstance(m, MoTEBlock)]

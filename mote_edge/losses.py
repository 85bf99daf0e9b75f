"""Training losses. Both normalise by counts summed over all ranks, so DistributedDataParallel's
gradient average equals the gradient of one process that saw the whole global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .moe import MoTEBlock

IGNORE = -100


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a (gradient-free) tensor over ranks, returned on the tensor's own device."""
    x = x.detach().clone()
    if world_size() > 1:
        # nccl reduces CUDA tensors only; gloo reduces CPU tensors (and CUDA ones by copy)
        comm = x.cuda() if dist.get_backend() == "nccl" else x
        dist.all_reduce(comm)
        x = comm.to(x.device)
    return x


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled (response) positions."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def load_balance_loss(blocks: list[MoTEBlock], token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch load-balance loss E * sum_i f_i * P_i, averaged over MoE layers.

    f_i: fraction of (token, slot) assignments routed to expert i; P_i: mean router probability.
    1 for a perfectly uniform router, up to E when every token goes to one expert. Padding tokens
    (token_mask == 0) are left out.
    """
    if not blocks:
        return torch.zeros(())
    losses = []
    for b in blocks:
        probs, top_i = b.last_router_probs, b.last_topk_index
        mask = torch.ones(probs.size(0), device=probs.device) if token_mask is None else token_mask.reshape(-1).to(probs)
        n_tok = global_sum(mask.sum())
        counts = torch.zeros(b.num_experts, device=probs.device)
        counts.index_add_(0, top_i.reshape(-1), mask.repeat_interleave(top_i.size(1)))
        f = global_sum(counts) / (n_tok * top_i.size(1))
        # local sum over the global count, times world size: DDP's mean then gives the global mean
        p = (probs * mask[:, None]).sum(0) / n_tok * world_size()
        losses.append(b.num_experts * (f * p).sum())
    return torch.stack(losses).mean()

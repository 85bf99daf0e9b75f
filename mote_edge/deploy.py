"""The deployable form of trained routed experts: int8 codes in {-1, 0, 1} and one fp32 scale per
matrix. Exporters read this form; `use_deployable_` runs a model from it alone, so tests can prove
the eval forward equals a forward that uses exactly these codes and scales.
"""
from __future__ import annotations

import numpy as np
import torch

from .moe import MoTEBlock
from .quant import TernaryLinear, quantize_activation_int8, ternary_codes, ternary_scale


def ternary_experts(model) -> dict[str, tuple[np.ndarray, np.float32]]:
    """{weight name: (codes int8 [out, in], scale fp32)} for every ternary expert matrix."""
    out = {}
    for mod_name, block in model.named_modules():
        if not isinstance(block, MoTEBlock):
            continue
        for e, expert in enumerate(block.experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                lin = getattr(expert, proj)
                if not isinstance(lin, TernaryLinear):
                    continue
                s = ternary_scale(lin.weight)
                codes = ternary_codes(lin.weight, s)
                out[f"{mod_name}.experts.{e}.{proj}.weight"] = (codes.cpu().numpy(), np.float32(s.item()))
    return out


class DeployedTernaryLinear(torch.nn.Module):
    """A linear layer that computes from the deployable form only: int8 codes and an fp32 scale."""

    def __init__(self, codes: np.ndarray, scale: np.float32):
        super().__init__()
        self.register_buffer("codes", torch.from_numpy(np.ascontiguousarray(codes)))
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.codes.float() * torch.tensor(self.scale, dtype=torch.float32)
        return torch.nn.functional.linear(quantize_activation_int8(x), w.to(x.dtype))


def use_deployable_(model, deployable: dict[str, tuple[np.ndarray, np.float32]]):
    """Swap every ternary expert linear for one that reads only `deployable` (in place)."""
    for name, (codes, scale) in deployable.items():
        parent_name, attr = name.removesuffix(".weight").rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, DeployedTernaryLinear(codes, scale))
    return model

"""The deployable form of trained routed experts: int8 codes in {-1, 0, 1} and one fp32 scale per
matrix. Exporters read this; `dequantized_state` rebuilds weights from it so tests can prove the
model's eval forward equals a forward that uses exactly these codes and scales.
"""
from __future__ import annotations

import numpy as np
import torch

from .moe import MoTEBlock
from .quant import ternary_codes, ternary_scale


def ternary_experts(model) -> dict[str, tuple[np.ndarray, np.float32]]:
    """{weight name: (codes int8 [out, in], scale fp32)} for every ternary expert matrix."""
    out = {}
    for mod_name, block in model.named_modules():
        if not isinstance(block, MoTEBlock):
            continue
        for e, expert in enumerate(block.experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                lin = getattr(expert, proj)
                if not hasattr(lin, "weight") or type(lin).__name__ != "TernaryLinear":
                    continue
                s = ternary_scale(lin.weight)
                codes = ternary_codes(lin.weight, s)
                out[f"{mod_name}.experts.{e}.{proj}.weight"] = (codes.cpu().numpy(), np.float32(s.item()))
    return out


def dequantized_state(deployable: dict[str, tuple[np.ndarray, np.float32]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(c).float() * torch.tensor(s, dtype=torch.float32) for k, (c, s) in deployable.items()}

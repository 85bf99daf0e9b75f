"""MoTE configuration: which layers become MoE, how many experts, ternary or not.

Stored in the checkpoint's config.json under the key "mote", beside the LLaVA config.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import MoteError

VARIANTS = ("mote", "moe-llava")
INITS = ("ffn", "random")


@dataclass
class MoTEConfig:
    num_experts: int = 4
    top_k: int = 1
    layers: list[int] = field(default_factory=list)  # decoder layer indices that hold an MoE
    variant: str = "mote"  # "mote": frozen shared expert + ternary routed; "moe-llava": fp experts only
    init: str = "ffn"  # how routed experts were initialised (kept for the record)
    balance_coef: float = 0.01  # Switch load-balance loss coefficient

    @property
    def ternary(self) -> bool:
        return self.variant == "mote"

    @property
    def shared_expert(self) -> bool:
        return self.variant == "mote"

    def validate(self, num_layers: int) -> "MoTEConfig":
        if self.variant not in VARIANTS:
            raise MoteError(f"unknown variant {self.variant!r}; accepted: {', '.join(VARIANTS)}")
        if self.init not in INITS:
            raise MoteError(f"unknown init {self.init!r}; accepted: {', '.join(INITS)}")
        if self.num_experts < 1:
            raise MoteError(f"--experts must be at least 1 (got {self.num_experts})")
        if not 1 <= self.top_k <= self.num_experts:
            raise MoteError(
                f"--top-k must be between 1 and the number of experts {self.num_experts} (got {self.top_k})"
            )
        if not self.layers:
            raise MoteError("no decoder layer selected for MoE; accepted: all, sparse, or indices like 0,2,5")
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise MoteError(f"layer indices {bad} out of range; the model has layers 0..{num_layers - 1}")
        if self.balance_coef < 0:
            raise MoteError(f"balance coefficient must be >= 0 (got {self.balance_coef})")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MoTEConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """`all` | `sparse` (every other layer, MoE-LLaVA's sparse mode: 1, 3, 5, ...) | `0,2,5`."""
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(num_layers))
    if spec == "sparse":
        return list(range(1, num_layers, 2)) or [0]
    try:
        layers = sorted({int(p) for p in spec.split(",") if p.strip()})
    except ValueError:
        raise MoteError(f"--layers {spec!r} not understood; accepted: all, sparse, or indices like 0,2,5") from None
    return layers

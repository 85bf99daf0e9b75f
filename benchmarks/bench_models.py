"""What mote-bench and mote-bench --accuracy build and measure: one exported model of a preset or ladder
(ModelSpec), and whether a cached export of it is out of date (stale_routed_types)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..exporters.errors import MoteExportError


@dataclass(frozen=True)
class ModelSpec:
    """One exported model of a preset: checkpoint variant and the GGUF types of its FFN weights."""
    name: str
    variant: str  # mote | moe-llava | dense
    ternary: str | None = None  # MoTE routed experts
    shared: str = "f16"  # MoTE shared expert, or the dense FFN
    expert: str | None = None  # MoE-LLaVA experts

    @property
    def label(self) -> str:
        if self.variant == "mote":
            return f"MoTE: {self.ternary.upper()} experts + {self.shared.upper()} shared"
        if self.variant == "moe-llava":
            return f"MoE-LLaVA: 4 x {self.expert.upper()} experts, top-2" + (" (PTQ)" if self.expert != "f16" else "")
        return f"dense: {self.shared.upper()} FFN"


def stale_routed_types(path: Path, spec: ModelSpec) -> bool:
    """Whether a cached MoTE file's routed experts are in other types than mote-export writes today (e.g.
    the exact Q4_0 fallback older exporters wrote for 896-wide rows, now Q2_0), a cached MoTE / MoE-LLaVA
    file lacks the mote.* keys (older exporters; the mote engine refuses such qwen2moe files), or the
    file is unreadable: such a file is rebuilt rather than measured."""
    if spec.variant == "dense":
        return False
    from ..exporters.gguf_header import read_gguf_header
    from ..exporters.ternary import TERNARY_TYPES, ternary_gguf_type

    try:
        h = read_gguf_header(path)
    except MoteExportError:
        return True
    if h.fields.get("mote.variant") != spec.variant:
        return True
    if spec.variant != "mote":
        return False
    tensors = h.tensors
    want = TERNARY_TYPES[spec.ternary]
    return any(t.qtype != ternary_gguf_type(want, t.dims[0]) for t in tensors if t.name.endswith("_exps.weight"))

"""What mote-bench and mote-bench --accuracy build and measure: one exported model of a preset or ladder
(ModelSpec), and whether a cached export of it is out of date (stale_routed_types); the same model exported
to ONNX for onnxruntime: its types (onnx_types, the one mapping from GGUF types), bodies, row label, and
whether a cached folder is out of date (stale_onnx_folder)."""
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


# ---- the same models exported for onnxruntime (mote-export --format onnx) ----------------------------------

# A ModelSpec's GGUF type of a weight group -> the ONNX export's type for that group (write_onnx_folder's
# shared_type / other_type / expert_type: f32 | f16 | q8_0 | q4_0): the same numbers where the ONNX export has
# the type (q8_0, q4_0: MatMulNBits with GGUF's blocks), else the nearest it has. ONNX has no bf16 MatMul on
# CPU: bf16 -> f16 (the same bytes; 3 mantissa bits more); K-quants -> q4_0 (no K-quant blocks in ONNX).
# The row label (onnx_label) says what the folder holds.
ONNX_TYPE = {"f32": "f32", "f16": "f16", "bf16": "f16", "q8_0": "q8_0", "q4_0": "q4_0", "q4_k": "q4_0", "q3_k": "q4_0"}
# A type -> the label bench_measure_onnx.onnx_costs gives the weights it writes (a MatMulNBits weight: its blocks)
ONNX_LABEL = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
# The routed-expert body (--onnx-kernels) of a MoTE export -> the label of its ternary weights
TERNARY_LABEL = {"exact": "TERNARY-I8", "fast": "TERNARY-2BIT"}


def _onnx_type(gguf_type: str, what: str) -> str:
    if gguf_type not in ONNX_TYPE:
        raise MoteExportError(f"{what} {gguf_type}: the ONNX export has no type for it; with --engines onnxruntime "
                              f"accepted: {', '.join(ONNX_TYPE)}")
    return ONNX_TYPE[gguf_type]


def onnx_types(spec: ModelSpec, other: str) -> dict[str, str]:
    """write_onnx_folder's type keywords for `spec` exported with GGUF --other-type `other` (the one mapping
    from GGUF types to the ONNX export's)."""
    types = {"other_type": _onnx_type(other, "--other-type")}
    if spec.variant == "moe-llava":
        return types | {"expert_type": _onnx_type(spec.expert, f"{spec.name}'s experts")}
    return types | {"shared_type": _onnx_type(spec.shared, f"{spec.name}'s shared expert / FFN")}


def onnx_bodies(spec: ModelSpec, bodies: list[str]) -> list[str]:
    """The --onnx-kernels bodies to export `spec` with: a body is how the ternary experts run, so a model
    without them (MoE-LLaVA, dense) is one graph whatever the body: exported once, as exact (none asked: none)."""
    return list(bodies) if spec.variant == "mote" or not bodies else ["exact"]


def onnx_label(spec: ModelSpec, body: str, group_types: dict[str, list[str]]) -> str:
    """What an ONNX folder of `spec` holds, for the report's rows: from the types its weights are stored in
    (bench_measure_onnx.onnx_costs's group_types), not from the types asked."""
    def t(group: str) -> str:
        return "/".join(group_types.get(group, [])) or "-"

    rest = f"{t('attention')} attention, {t('token_embd')} embedding" + (
        f", {t('output')} head" if "output" in group_types else " (tied head)")
    if spec.variant == "mote":
        experts = {"exact": "int8 ternary codes (MatMulInteger)", "fast": "2-bit ternary codes (MatMulNBits)"}
        return f"MoTE, ONNX {body}: {experts.get(body, body)} experts + {t('shared')} shared; {rest}"
    if spec.variant == "moe-llava":
        return f"MoE-LLaVA, ONNX: 4 x {t('routed')} experts, top-2; {rest}"
    return f"dense, ONNX: {t('ffn')} FFN; {rest}"


def stale_onnx_folder(folder: Path, spec: ModelSpec, body: str, types: dict[str, str]) -> bool:
    """Whether a cached ONNX folder must be rebuilt: missing or partial (a file gone, the weights file shorter
    than its tensors), written with another body or from another variant, or its weights in other types than
    asked (an exporter from before the low-bit types wrote f32 everywhere)."""
    from .bench_measure_onnx import onnx_costs

    try:
        costs = onnx_costs(folder)
    except MoteExportError:
        return True
    if costs["kernels"] != body or costs["variant"] != spec.variant:
        return True
    want = {"attention": ONNX_LABEL[types["other_type"]]}
    if spec.variant == "mote":
        want |= {"shared": ONNX_LABEL[types["shared_type"]], "routed": TERNARY_LABEL.get(body)}
    elif spec.variant == "moe-llava":
        want["routed"] = ONNX_LABEL[types["expert_type"]]
    else:
        want["ffn"] = ONNX_LABEL[types["shared_type"]]
    # "in": a type's fallback for a row its blocks do not divide may sit beside it in the same group
    return any(label not in costs["group_types"].get(group, []) for group, label in want.items())

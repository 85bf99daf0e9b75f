"""mote-plan: the memory plan of a MoTE / MoE-LLaVA export from a config alone (no weights, no torch),
and the memory-budget search behind `mote-export --memory-budget`. File bytes only: what a run keeps
resident is each engine's own estimate (runtime_cpu), which mote-plan prints beside this plan.

    mote-plan CONFIG_OR_CKPT [--experts 4] [--variant mote|moe-llava|dense] [--shared-type T] ...
    mote-plan --preset qwen2.5-3b --experts 4 --shared-type bf16 [--json] [--paper]
    mote-plan --preset qwen2.5-3b --memory-budget 3.4GB --budget-scope experts

Sizes: GB = GiB = 2^30 bytes, as everywhere in this project (units.py).

Exactness: bytes come from gguf_llm.llm_tensors and gguf_mmproj._Plan, the very lists the exporter
writes, fed shapes from the config (ConfigShapes) instead of a checkpoint; so every fallback the
exporter applies (Q2_0 for ternary rows not a multiple of 256 but of 64, e.g. Qwen2.5-0.5B's 896-wide
gate/up, then Q4_0 / F16 for rows not a multiple of 64 / 32; F16 for rows a block size does not divide,
e.g. K-quants on 896-wide rows; Q4_0 zero padding) is in
the plan, and the planned bytes equal the GGUF tensor bytes (tested group by group).

Two conventions are printed side by side:
  real   the GGUF bytes: TQ2_0 2.0625, TQ1_0 1.6875, Q2_0 2.25, Q8_0 8.5, Q6_K 6.5625, Q4_K / Q4_0 4.5 bits per
         weight, block scales included;
  paper  the paper's accounting: exactly 2 bits per ternary weight, 16 / 8 / 4 ... bits per weight of
         the type asked for (BF16 / INT8 / INT4), no block scales, no fallbacks, in GiB. With Qwen2.5
         shapes and E = 4 this reproduces every expert-memory figure of the paper (`--paper`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from gguf import GGMLQuantizationType as T

from .errors import MoteExportError
from .ternary import Q2_0, TERNARY_TYPES
from .units import GIB, MIB, SIZE_HELP, human, parse_size
from .errors import ArgumentParser

LM = "model.language_model."

# ---- configs: presets, files, checkpoint folders ----------------------------------------------------------

# SigLIP so400m-patch14-384: the tower of the paper's models.
SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                     num_hidden_layers=27, num_attention_heads=16, image_size=384, patch_size=14,
                     hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# name: (layers, hidden, ffn, heads, kv heads); all vocab 151936, tied embeddings
QWEN25 = {"qwen2.5-0.5b": (24, 896, 4864, 14, 2), "qwen2.5-1.5b": (28, 1536, 8960, 12, 2),
          "qwen2.5-3b": (36, 2048, 11008, 16, 2)}
PRESETS = ("tiny", *QWEN25)
VARIANTS = ("mote", "moe-llava", "dense")


def preset_config(name: str) -> dict:
    """A LLaVA config.json dict: `tiny` is the embedded tiny MoTE checkpoint's; the Qwen2.5 presets are
    SigLIP so400m + 2-layer GELU MLP (1152 -> hidden -> hidden) + Qwen2.5, dense (no "mote" entry)."""
    if name == "tiny":
        return json.loads((resources.files("mote_edge") / "assets" / "tiny" / "mote" / "config.json").read_text())
    if name not in QWEN25:
        raise MoteExportError(f"--preset {name!r}; accepted: {', '.join(PRESETS)}")
    layers, hidden, ffn, heads, kv = QWEN25[name]
    text = dict(model_type="qwen2", hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, vocab_size=151936, max_position_embeddings=32768,
                rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True)
    return dict(model_type="llava", text_config=text, vision_config=dict(SIGLIP_SO400M), projector_hidden_act="gelu",
                vision_feature_layer=-2, vision_feature_select_strategy="full", tie_word_embeddings=True)


def load_config(path: str | Path) -> dict:
    """config.json of a checkpoint folder, or a config file itself, validated like mote-export does."""
    from .ckpt import read_config

    p = Path(path)
    if p.is_dir() or p.name == "config.json":
        return read_config(p if p.is_dir() else p.parent)
    if not p.is_file():
        raise MoteExportError(f"{str(p)!r} does not exist; give a config.json or a checkpoint folder")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoteExportError(f"{p} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "llava" or \
            (cfg.get("text_config") or {}).get("model_type") != "qwen2":
        raise MoteExportError(f"{p}: not a LLaVA (SigLIP + Qwen2) config.json; accepted: model_type 'llava' "
                              "with a 'qwen2' text_config")
    return cfg


def with_moe(cfg: dict, experts: int | None, variant: str | None, top_k: int | None) -> dict:
    """The config as up-cycled with these settings (None: keep the config's own, or 4 experts)."""
    cfg = json.loads(json.dumps(cfg))
    mote = dict(cfg.get("mote") or {})
    if variant is None:
        variant = mote.get("variant", "mote") if mote or experts else "dense"
    if variant not in VARIANTS:
        raise MoteExportError(f"--variant {variant!r}; accepted: {', '.join(VARIANTS)}")
    if variant == "dense":
        cfg.pop("mote", None)
        return cfg
    if experts is not None and experts < 1:
        raise MoteExportError(f"--experts must be at least 1 (got {experts})")
    n = experts or int(mote.get("num_experts", 4))
    k = top_k or (int(mote["top_k"]) if mote.get("top_k") and mote.get("variant", "mote") == variant
                  else (1 if variant == "mote" else 2))
    if not 1 <= k <= n:
        raise MoteExportError(f"--top-k must be between 1 and the number of experts {n} (got {k})")
    layers = mote.get("layers") or list(range(int(cfg["text_config"]["num_hidden_layers"])))
    cfg["mote"] = dict(mote, num_experts=n, top_k=k, variant=variant, layers=layers)
    return cfg


class ConfigShapes:
    """Stands in for exporters.ckpt.Weights where only shapes are asked: the tensors a checkpoint with
    this config.json holds (Qwen2 q/k/v biases, experts as wide as the FFN, lm_head when untied).
    gguf_llm.llm_tensors and gguf_mmproj._Plan list their tensors from it without any weights."""

    def __init__(self, cfg: dict, where: str):
        from .gguf_mmproj import feature_layers

        t, v = cfg["text_config"], cfg["vision_config"]
        self.path = Path(where)
        self.hidden, self.ffn = int(t["hidden_size"]), int(t["intermediate_size"])
        self.tied = bool(t.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))
        n_feat = len(feature_layers(cfg, int(v["num_hidden_layers"])))
        self.connector_in = int(v["hidden_size"]) * n_feat

    def __contains__(self, name: str) -> bool:
        return True

    def lm_name(self, suffix: str) -> str:
        return LM + suffix

    def has_lm(self, suffix: str) -> bool:
        return True

    def check_shape(self, name: str, shape) -> None:
        return None

    def shape(self, name: str) -> tuple[int, ...]:
        if name.endswith(".mlp.experts.0.gate_proj.weight"):
            return (self.ffn, self.hidden)
        if name.endswith("multi_modal_projector.linear_1.weight"):  # 2-layer MLP: vision -> hidden -> hidden
            return (self.hidden, self.connector_in)
        raise KeyError(f"ConfigShapes has no shape rule for {name}")

    def lm_head_name(self) -> str | None:
        return None if self.tied else "lm_head.weight"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


# ---- types ------------------------------------------------------------------------------------------------

# Nominal bits per weight of a type: what the paper's convention counts (16 for BF16, 8 for INT8,
# 4 for INT4, 2 for a ternary weight) and what the precision-loss rule below compares.
NOMINAL_BITS = {T.F32: 32, T.F16: 16, T.BF16: 16, T.Q8_0: 8, T.Q6_K: 6, T.Q5_K: 5, T.Q5_0: 5, T.Q5_1: 5,
                T.Q4_K: 4, T.Q4_0: 4, T.Q4_1: 4, T.Q3_K: 3, T.Q2_K: 2, T.TQ2_0: 2, T.TQ1_0: 2, Q2_0: 2}
# Candidates of the budget search, most precise first.
FLOAT_CANDIDATES = ("f16", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0", "q3_k")
CANDIDATES = {
    # MoTE: both exact for trained ternary weights; TQ2_0 decodes faster. q2_0 (exact too) is no candidate: it
    # is never smaller than tq2_0 (2.25 vs 2.0625 bpw on rows of 256k weights, the same Q2_0 bytes on other
    # rows), so it could not win; it is accepted as a fixed --ternary-type (CUDA runs Q2_0, not TQ2_0).
    "routed": ("tq2_0", "tq1_0"),
    "routed-float": FLOAT_CANDIDATES,      # MoE-LLaVA's full-precision experts
    "shared": FLOAT_CANDIDATES,
    "attention": ("f16", "q8_0", "q6_k", "q4_k", "q4_0"),
    "embedding": ("f16", "q8_0", "q6_k", "q4_k", "q4_0"),
}
SEARCH_GROUPS = ("routed", "shared", "attention", "embedding")
K_QUANTS = {"q6_k", "q5_k", "q4_k", "q3_k", "q2_k"}


def gguf_type(name: str, option: str) -> T:
    """A type name (tq2_0, f16, q4_k ...) -> GGMLQuantizationType, without loading ggml."""
    from .quantize import FLOAT_TYPES
    from .ternary import TERNARY_TYPES

    key = str(name).strip().lower()
    types = {**TERNARY_TYPES, **FLOAT_TYPES}
    if key not in types:
        raise MoteExportError(f"{option} {name!r} is not a known type; accepted: {', '.join(types)}")
    return types[key]


# ---- the plan ---------------------------------------------------------------------------------------------

ROW_LABELS = {"routed": "routed experts", "shared": "shared expert", "ffn": "FFN (dense)",
              "padding": "zero padding", "attention": "attention", "embedding": "embeddings/output",
              "fixed": "norms/router (f32)", "vision": "vision tower+connector"}


def search_group(p) -> str:
    """The budget-search group of a planned LLM tensor (gguf_llm's groups folded into four + fixed)."""
    if p.group == "padding":  # zeros take the type of the role they pad
        return "routed" if "_exps" in p.name else "shared"
    return {"routed": "routed", "shared": "shared", "ffn": "shared", "attention": "attention",
            "embedding": "embedding"}.get(p.group, "fixed")


def numel(shape) -> int:
    return math.prod(int(d) for d in shape)


def bits_lost(p, variant: str) -> int:
    """Precision lost by one planned tensor, in bits x weights, against the 16-bit checkpoint.

    Rule (the budget search minimises its sum over all tensors): (16 - nominal bits of the type
    written) x the tensor's weight count, floored at 0; F16/BF16/F32 lose 0. MoTE's routed experts
    lose 0 whatever they are packed in (TQ2_0, TQ1_0, Q2_0, the Q4_0 / F16 fallbacks all hold the trained
    ternary weights exactly), and so do zero padding, norms and routers (always F32). It is a proxy:
    every bit dropped counts the same in every matrix. Ties are broken towards the earlier candidates
    (e.g. TQ2_0 over TQ1_0, which is exact too but decodes slower; Q4_K over Q4_0), then the smaller plan."""
    if p.group in ("padding", "router", "norm") or (p.group == "routed" and variant == "mote"):
        return 0
    return max(0, 16 - NOMINAL_BITS[p.qtype]) * numel(p.shape)


def paper_bits(p, variant: str) -> float:
    """Bits per weight in the paper's convention: 2 per ternary weight, the nominal bits of the type
    asked for otherwise (BF16 16, INT8 8, INT4 4), no block scales, no fallbacks; padding is 0."""
    if p.group == "padding":
        return 0
    if p.group == "routed" and variant == "mote":
        return 2
    return NOMINAL_BITS[p.requested or p.qtype]


@dataclass
class Row:
    group: str
    type: str                     # the type asked for
    written: Counter = field(default_factory=Counter)  # written GGUF type -> tensors
    tensors: int = 0
    params: int = 0
    bytes: int = 0
    paper_bytes: float = 0.0

    @property
    def bpw(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0


@dataclass
class Plan:
    source: str
    cfg: dict
    variant: str
    experts: int
    top_k: int
    moe_layers: list[int]
    layers: int
    types: dict[str, str]          # routed / shared / attention / embedding / mmproj -> asked type
    rows: dict[str, Row]
    fallbacks: list[str]
    mmproj: bool = True
    notes: list[str] = field(default_factory=list)
    search: dict | None = None     # the budget search that chose the types, when there was one
    loss: int = 0

    def bytes(self, *groups: str) -> int:
        return sum(self.rows[g].bytes for g in groups if g in self.rows)

    @property
    def expert_memory_bytes(self) -> int:  # shared + routed experts (a dense model: its FFNs), as mote-export reports
        return self.bytes("routed", "shared", "ffn")

    @property
    def llm_bytes(self) -> int:
        return sum(r.bytes for g, r in self.rows.items() if g != "vision")

    @property
    def mmproj_bytes(self) -> int:
        return self.bytes("vision")

    @property
    def total_bytes(self) -> int:
        return self.llm_bytes + self.mmproj_bytes

    def scope_bytes(self, scope: str) -> int:
        return self.expert_memory_bytes if scope == "experts" else self.total_bytes

    @property
    def paper_expert_bytes(self) -> float:
        return sum(self.rows[g].paper_bytes for g in ("routed", "shared", "ffn") if g in self.rows)

    @property
    def paper_total_bytes(self) -> float:
        return sum(r.paper_bytes for r in self.rows.values())


def _llm(cfg: dict, where: str):
    from .gguf_llm import llm_config

    return llm_config(cfg, where)


def _resolve(c, types: dict) -> tuple:
    """(routed, shared, attention, embedding) GGUF types from names, with the exporter's defaults."""
    routed = None
    if c.variant == "mote":
        routed = gguf_type(types.get("routed") or "tq2_0", "--ternary-type")
        if routed not in TERNARY_TYPES.values():
            raise MoteExportError(f"--ternary-type {types.get('routed')!r}; accepted: {', '.join(TERNARY_TYPES)}")
    elif c.variant == "moe-llava":
        routed = gguf_type(types.get("routed") or "f16", "--expert-type")
    out = [routed]
    for g, opt in (("shared", "--shared-type"), ("attention", "--other-type"), ("embedding", "--other-type")):
        t = gguf_type(types.get(g) or "f16", opt)
        if t in TERNARY_TYPES.values():
            raise MoteExportError(f"{opt} {types.get(g)}: ternary types are only for MoTE routed experts")
        out.append(t)
    return tuple(out)


def _tensors(cfg: dict, where: str, types: dict, weights=None):
    from .gguf_llm import llm_tensors

    c = _llm(cfg, where)
    routed, shared, attention, embedding = _resolve(c, types)
    w = weights if weights is not None else ConfigShapes(cfg, where)
    return c, llm_tensors(w, c, routed, shared, attention, embedding)


def _mmproj_items(cfg: dict, where: str, mmproj_type: str, weights=None) -> list:
    from .gguf_mmproj import _Plan

    t = gguf_type(mmproj_type, "--mmproj-type")
    return _Plan(weights if weights is not None else ConfigShapes(cfg, where), cfg, t).items


def plan_tensors(plan: Plan) -> list:
    """The LLM tensors a plan writes (name, qtype, nbytes ...), for an engine's resident estimate."""
    return _tensors(plan.cfg, plan.source, {g: plan.types.get(g) for g in SEARCH_GROUPS})[1]


def make_plan(cfg: dict, where: str = "config", types: dict | None = None, mmproj_type: str = "f16",
              mmproj: bool = True, weights=None) -> Plan:
    """The plan of one set of types: `types` maps routed / shared / attention / embedding to a type
    name (missing: the exporter's defaults, tq2_0 or f16). `weights`: a checkpoint's Weights to read
    exact shapes from (mote-export does), else shapes come from the config."""
    from .quantize import nbytes

    types = dict(types or {})
    c, planned = _tensors(cfg, where, types, weights)
    rows: dict[str, Row] = {}
    fallbacks = Counter()
    for p in planned:
        key = "fixed" if search_group(p) == "fixed" else p.group
        asked = (p.requested or p.qtype).name.lower()
        if key == "fixed":
            asked = "f32"
        elif key == "padding":
            asked = "zeros"
        elif key == "attention" or key == "embedding":
            asked = types.get(key) or "f16"
        r = rows.setdefault(key, Row(ROW_LABELS[key], asked))
        r.written[p.qtype.name] += 1
        r.tensors += 1
        r.params += numel(p.shape)
        r.bytes += p.nbytes
        r.paper_bytes += paper_bits(p, c.variant) * numel(p.shape) / 8
        if p.requested is not None and p.group != "padding":
            fallbacks[(p.requested.name, p.qtype.name, p.shape[-1])] += 1
    notes: list[str] = []
    if mmproj:
        r = rows["vision"] = Row(ROW_LABELS["vision"], mmproj_type.lower())
        for _, shape, qt, _ in _mmproj_items(cfg, where, mmproj_type, weights):
            r.written[qt.name] += 1
            r.tensors += 1
            r.params += numel(shape)
            r.bytes += nbytes(shape, qt)
            r.paper_bytes += NOMINAL_BITS[qt] * numel(shape) / 8
    order = ("routed", "shared", "ffn", "padding", "attention", "embedding", "fixed", "vision")
    names = {"routed": types.get("routed") or ("tq2_0" if c.variant == "mote" else "f16"),
             "shared": types.get("shared") or "f16", "attention": types.get("attention") or "f16",
             "embedding": types.get("embedding") or "f16", "mmproj": mmproj_type.lower()}
    if c.variant == "dense":
        names.pop("routed")
    return Plan(source=where, cfg=cfg, variant=c.variant, experts=c.experts, top_k=c.top_k, moe_layers=c.moe_layers,
                layers=c.layers, types=names, rows={k: rows[k] for k in order if k in rows},
                fallbacks=[f"{n} x {a} -> {b} (row width {w})" for (a, b, w), n in fallbacks.items()],
                mmproj=mmproj, notes=notes, loss=sum(bits_lost(p, c.variant) for p in planned))


# ---- the budget search ------------------------------------------------------------------------------------


def candidates(variant: str, fixed: dict, k_quants: bool = True) -> dict[str, tuple[str, ...]]:
    """Ordered candidates per search group; a fixed group has its one type."""
    out = {}
    for g in SEARCH_GROUPS:
        if g == "routed" and variant == "dense":
            continue
        if fixed.get(g):
            out[g] = (str(fixed[g]).lower(),)
        elif g == "shared" and variant == "moe-llava":
            out[g] = ("f16",)  # only the zero padding qwen2moe needs (written as Q4_0 anyway)
        else:
            out[g] = CANDIDATES["routed" if variant == "mote" else "routed-float"] if g == "routed" else CANDIDATES[g]
        if not k_quants:
            kept = tuple(t for t in out[g] if t not in K_QUANTS)
            out[g] = kept or out[g]
    return out


def budget_search(cfg: dict, budget: int, scope: str = "model", fixed: dict | None = None, where: str = "config",
                  mmproj_type: str = "f16", mmproj: bool = True, weights=None, k_quants: bool = True) -> Plan:
    """The plan that fits `budget` bytes (scope: "experts" = shared + routed experts, "model" = every
    tensor of the LLM file and, with mmproj, the projector file) with the least precision lost
    (bits_lost); `fixed` types (routed / shared / attention / embedding) are kept as given.
    Raises MoteExportError naming the smallest reachable size when nothing fits."""
    from .quantize import nbytes

    if scope not in ("experts", "model"):
        raise MoteExportError(f"--budget-scope {scope!r}; accepted: experts, model")
    fixed = {k: v for k, v in (fixed or {}).items() if v}
    c = _llm(cfg, where)
    cands = candidates(c.variant, fixed, k_quants)
    # A tensor's written type depends on its own role's type only, so each group's bytes and loss per
    # candidate come from a few plans (the i-th candidate of every group at once), not from every combination.
    stats: dict[tuple[str, str], list[int]] = {}  # (group, type) -> [bytes, loss, expert-memory bytes]
    base = 0
    for i in range(max(len(v) for v in cands.values())):
        pick = {g: v[min(i, len(v) - 1)] for g, v in cands.items()}
        _, planned = _tensors(cfg, where, pick, weights)
        acc: dict[str, list[int]] = {g: [0, 0, 0] for g in cands}
        base = 0
        for p in planned:
            g = search_group(p)
            if g not in cands:  # norms, routers: F32 whatever the types
                base += p.nbytes
                continue
            acc[g][0] += p.nbytes
            acc[g][1] += bits_lost(p, c.variant)
            acc[g][2] += p.nbytes if p.group in ("routed", "shared", "ffn") else 0  # Plan.expert_memory_bytes
        for g, v in cands.items():
            if i < len(v):
                stats[(g, v[i])] = acc[g]
    vision = 0
    if mmproj and scope == "model":
        vision = sum(nbytes(shape, qt) for _, shape, qt, _ in _mmproj_items(cfg, where, mmproj_type, weights))
    const, col = (base + vision, 0) if scope == "model" else (0, 2)

    best = smallest = None
    groups = list(cands)
    for combo in itertools.product(*(range(len(cands[g])) for g in groups)):
        types = {g: cands[g][i] for g, i in zip(groups, combo)}
        size = const + sum(stats[(g, t)][col] for g, t in types.items())
        key = (sum(stats[(g, t)][1] for g, t in types.items()), sum(combo), size)
        if smallest is None or size < smallest[0]:
            smallest = (size, types)
        if size <= budget and (best is None or key < best[0]):
            best = (key, types)
    what = "shared + routed experts" if scope == "experts" else \
        "all tensors of the LLM" + (" and mmproj files" if mmproj else " file")
    if best is None:
        size, types = smallest
        if scope == "experts":  # the other groups do not count: do not name them
            types = {g: t for g, t in types.items() if g in ("routed", "shared")}
        given = ", ".join(f"{g} {t}" for g, t in fixed.items())
        raise MoteExportError(
            f"memory budget {human(budget)} ({budget} bytes, scope {scope}: {what}) cannot be met; the smallest "
            f"reachable size is {human(size)} ({size} bytes) with {', '.join(f'{g} {t}' for g, t in types.items())}"
            + (f" (fixed: {given})" if given else ""))
    plan = make_plan(cfg, where, best[1], mmproj_type, mmproj, weights)
    if plan.scope_bytes(scope) != best[0][2]:  # the per-group sums must add up to the plan itself
        raise AssertionError(f"budget search ({best[0][2]}) and plan ({plan.scope_bytes(scope)}) disagree")
    plan.search = {"budget_bytes": budget, "scope": scope, "what": what, "fixed": fixed,
                   "candidates": {g: list(v) for g, v in cands.items()}, "smallest_bytes": smallest[0],
                   "smallest_types": smallest[1], "loss_bits": best[0][0]}
    return plan


# ---- the paper's figures ----------------------------------------------------------------------------------

# (preset, variant, nominal bits of the shared expert (MoTE) or of the experts (MoE-LLaVA)) -> the paper's
# expert memory (shared + routed, all layers, E = 4) in its "GB", which are GiB (DESIGN.md section 1).
PUBLISHED = {("qwen2.5-0.5b", "mote", 16): 0.9, ("qwen2.5-1.5b", "mote", 16): 3.2, ("qwen2.5-3b", "mote", 16): 6.8,
             ("qwen2.5-1.5b", "mote", 8): 2.2, ("qwen2.5-1.5b", "mote", 4): 1.6,
             ("qwen2.5-3b", "mote", 8): 4.5, ("qwen2.5-3b", "mote", 4): 3.4,
             ("qwen2.5-0.5b", "moe-llava", 16): 2.3, ("qwen2.5-1.5b", "moe-llava", 16): 8.6,
             ("qwen2.5-3b", "moe-llava", 16): 18.1}
PAPER_TYPES = {16: "bf16", 8: "q8_0", 4: "q4_k"}  # the real GGUF type standing in for BF16 / INT8 / INT4


def published_figure(preset: str | None, plan: Plan) -> float | None:
    if preset is None or plan.experts != 4 or len(plan.moe_layers) != plan.layers:
        return None
    group = "shared" if plan.variant == "mote" else "routed"
    t = plan.types.get(group)
    bits = NOMINAL_BITS.get(gguf_type(t, "type")) if t else None
    return PUBLISHED.get((preset, plan.variant, bits))


def why_different(plan: Plan) -> str:
    """Where the real-format bytes part from the paper's accounting, for this plan."""
    reasons = []
    r = plan.rows.get("routed")
    if plan.variant == "mote" and r:
        asked = (plan.types.get("routed") or "tq2_0").upper()
        for t in sorted(r.written):
            bpw = {"TQ2_0": 2.0625, "TQ1_0": 1.6875, "Q2_0": 2.25, "Q4_0": 4.5, "F16": 16}.get(t)
            why = {"Q2_0": "rows not a multiple of 256", "Q4_0": "rows not a multiple of 64",
                   "F16": "rows not a multiple of 32"}.get(t) if t != asked else None
            reasons.append(f"routed {t} {bpw} bpw vs 2 bits" + (f" (exact fallback: {why})" if why else ""))
    for g in ("shared", "ffn") if plan.variant != "moe-llava" else ("routed",):
        s = plan.rows.get(g)
        paper = s.paper_bytes * 8 / s.params if s and s.params else 0
        if s and abs(s.bpw - paper) > 1e-9:
            fb = " and F16 fallbacks" if "F16" in s.written and s.type not in ("f16", "bf16") else ""
            reasons.append(f"{g} {s.written.most_common(1)[0][0]} {s.bpw:.4g} bpw vs {paper:g} bits (block scales{fb})")
    return "; ".join(reasons) or "no difference: no block scales in these types"


def paper_reproduction() -> list[dict]:
    """Every expert-memory figure of the paper, recomputed with this planner (real and paper convention)."""
    rows = []
    for (preset, variant, bits), gb in PUBLISHED.items():
        t = PAPER_TYPES[bits]
        types = {"shared": t} if variant == "mote" else {"routed": t}
        plan = make_plan(with_moe(preset_config(preset), 4, variant, None), preset, types, mmproj=False)
        paper, real = plan.paper_expert_bytes / GIB, plan.expert_memory_bytes / GIB
        rows.append({"preset": preset, "variant": variant, "shared_or_expert_bits": bits, "type": t, "paper_gb": gb,
                     "paper_convention_gib": paper, "paper_convention_diff_pct": 100 * (paper / gb - 1),
                     "real_gib": real, "real_diff_pct": 100 * (real / gb - 1), "real_gb_1e9": plan.expert_memory_bytes / 1e9,
                     "why": why_different(plan)})
    return rows


def format_paper_reproduction(rows: list[dict]) -> str:
    lines = ["paper expert-memory figures (E = 4, all layers) vs this planner; paper 'GB' = GiB",
             (f"  {'model':<13} {'variant':<9} {'shared/exp':<10} {'paper':>6} {'paper conv.':>11} {'diff':>7} "
              f"{'real GGUF':>10} {'diff':>7} {'real 1e9 B':>10}  real types")]
    for r in rows:
        what = {16: "BF16", 8: "INT8", 4: "INT4"}[r["shared_or_expert_bits"]]
        lines.append(f"  {r['preset']:<13} {r['variant']:<9} {what + ' ' + r['type']:<10} {r['paper_gb']:>6.1f} "
                     f"{r['paper_convention_gib']:>11.3f} {r['paper_convention_diff_pct']:>+6.1f}% {r['real_gib']:>10.3f} "
                     f"{r['real_diff_pct']:>+6.1f}% {r['real_gb_1e9']:>10.3f}  {r['why']}")
    lines.append("  paper conv.: 2 bits per ternary weight, 16/8/4 bits per shared weight, no block scales, GiB "
                 "(DESIGN.md section 1); real GGUF: the bytes mote-export writes (TQ2_0 2.0625 bpw, Q8_0 8.5, "
                 "Q4_K 4.5, exact Q2_0 2.25 bpw fallback for 896-wide ternary rows); in 10^9-byte GB every figure reads "
                 "7.4% higher")
    return "\n".join(lines)


# ---- output -----------------------------------------------------------------------------------------------


def plan_json(plan: Plan, preset: str | None = None, resident: dict | None = None) -> dict:
    """The plan as JSON; `resident`: an engine's resident-memory estimate to include (mote-plan's)."""
    groups = {g: {"label": r.group, "type": r.type, "written": dict(r.written), "tensors": r.tensors,
                  "params": r.params, "bytes": r.bytes, "bpw": r.bpw, "paper_bytes": round(r.paper_bytes)}
              for g, r in plan.rows.items()}
    out = {"source": plan.source, "variant": plan.variant, "experts": plan.experts, "top_k": plan.top_k,
           "layers": plan.layers, "moe_layers": plan.moe_layers, "types": plan.types, "groups": groups,
           "expert_memory_bytes": plan.expert_memory_bytes, "expert_memory_gib": plan.expert_memory_bytes / GIB,
           "llm_bytes": plan.llm_bytes, "mmproj_bytes": plan.mmproj_bytes, "total_bytes": plan.total_bytes,
           "total_gib": plan.total_bytes / GIB, "fallbacks": plan.fallbacks, "notes": plan.notes, "precision_loss_bits": plan.loss,
           "paper_convention": {"expert_memory_bytes": round(plan.paper_expert_bytes),
                                "expert_memory_gib": plan.paper_expert_bytes / GIB,
                                "total_bytes": round(plan.paper_total_bytes),
                                "rule": "2 bits per ternary weight, nominal bits of the type asked for (16/8/4) "
                                        "otherwise, no block scales, GiB"},
           "units": "bytes; GiB = 2^30 bytes; the paper's GB are GiB"}
    fig = published_figure(preset, plan)
    if fig is not None:
        out["paper_figure"] = {"gb": fig, "paper_convention_diff_pct": 100 * (plan.paper_expert_bytes / GIB / fig - 1),
                               "real_diff_pct": 100 * (plan.expert_memory_bytes / GIB / fig - 1),
                               "why": why_different(plan)}
    if resident:
        out["resident"] = resident
    if plan.search:
        out["budget"] = plan.search
    return out


def format_plan(plan: Plan, preset: str | None = None, resident_line: str | None = None) -> str:
    """The plan as a table; `resident_line`: an engine's resident-memory estimate, printed last."""
    head = f"plan: {plan.source}, {plan.variant}"
    if plan.variant != "dense":
        head += f", {plan.experts} experts top-{plan.top_k}, MoE layers {len(plan.moe_layers)}/{plan.layers}"
    lines = [head]
    if plan.search:
        s = plan.search
        fixed = ", ".join(f"{g} {t}" for g, t in s["fixed"].items()) or "none"
        lines.append(f"budget {human(s['budget_bytes'])} on {s['what']} (scope {s['scope']}); fixed: {fixed}; "
                     f"smallest reachable {human(s['smallest_bytes'])}; chosen: {human(plan.scope_bytes(s['scope']))}, "
                     f"least precision lost = {s['loss_bits']:.4g} bit-weights (sum of (16 - bits) x weights)")
    unit, u = (GIB, "GiB") if plan.total_bytes >= GIB else (MIB, "MiB")
    lines.append(f"  {'group':<23} {'type':<6} {'written':<22} {'params':>14} {'bytes':>15} {u:>9} {'bpw':>7} "
                 f"{'paper ' + u:>9}")
    for r in plan.rows.values():
        written = ", ".join(f"{t} x{n}" for t, n in r.written.most_common())
        lines.append(f"  {r.group:<23} {r.type:<6} {written:<22} {r.params:>14,} {r.bytes:>15,} {r.bytes / unit:>9.4f} "
                     f"{r.bpw:>7.4f} {r.paper_bytes / unit:>9.4f}")
    lines.append(f"  {'expert memory (shared + routed)':<53} {plan.expert_memory_bytes:>15,} "
                 f"{plan.expert_memory_bytes / unit:>9.4f} {'':>7} {plan.paper_expert_bytes / unit:>9.4f}")
    lines.append(f"  {'LLM file tensors':<53} {plan.llm_bytes:>15,} {plan.llm_bytes / unit:>9.4f}")
    if plan.mmproj:
        lines.append(f"  {'mmproj file tensors':<53} {plan.mmproj_bytes:>15,} {plan.mmproj_bytes / unit:>9.4f}")
    lines.append(f"  {'total':<53} {plan.total_bytes:>15,} {plan.total_bytes / unit:>9.4f} {'':>7} "
                 f"{plan.paper_total_bytes / unit:>9.4f}")
    lines += [f"  fallback: {f}" for f in plan.fallbacks]
    lines += [f"  note: {n}" for n in plan.notes]
    fig = published_figure(preset, plan)
    if fig is not None:
        p, r = plan.paper_expert_bytes / GIB, plan.expert_memory_bytes / GIB
        lines.append(f"  paper: {fig} GB (= GiB) expert memory; paper convention {p:.3f} GiB ({100 * (p / fig - 1):+.1f}%), "
                     f"real GGUF {r:.3f} GiB ({100 * (r / fig - 1):+.1f}%: {why_different(plan)})")
    if resident_line:
        lines.append(f"  {resident_line}")
    lines.append("  units: GiB = 2^30 bytes (the paper's GB), MiB = 2^20; paper columns = 2 bits per ternary weight, "
                 "16/8/4 bits per weight of the type asked for, no block scales")
    return "\n".join(lines)


# ---- mote-plan's arguments (the command itself is runtime_cpu.plan_cli: it adds the engine's resident
# estimate, which the engine owns) -------------------------------------------------------------------------


def plan_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mote-plan", description="Memory plan of a MoTE / MoE-LLaVA GGUF export from a "
                                "config alone (no weights): bytes per tensor group in the real GGUF types and in "
                                "the paper's convention. Sizes: GB = GiB = 2^30 bytes, as the MoTE paper's.")
    p.add_argument("config", nargs="?", help="config.json or a checkpoint folder (or use --preset)")
    p.add_argument("--preset", help=f"built-in shapes: {', '.join(PRESETS)} (Qwen2.5 + SigLIP so400m-patch14-384)")
    p.add_argument("--experts", type=int, default=None, help="routed experts E (default: the config's, or 4)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default 1 for MoTE, 2 for MoE-LLaVA)")
    p.add_argument("--variant", default=None, help="mote | moe-llava | dense (default: the config's, presets: mote)")
    p.add_argument("--ternary-type", default=None, help="MoTE routed experts: tq2_0 (default) | tq1_0 | q2_0; all "
                   "exact. Rows whose width the type's block (256 weights; q2_0: 64) does not divide fall back to exact "
                   "Q2_0 (widths a multiple of 64), else Q4_0 (of 32), else F16")
    p.add_argument("--shared-type", default=None, help="shared expert / dense FFN (default f16): f16, bf16, q8_0, q4_k, ...")
    p.add_argument("--other-type", default=None, help="attention, embeddings and output (default f16)")
    p.add_argument("--expert-type", default=None, help="MoE-LLaVA experts (default f16)")
    p.add_argument("--mmproj-type", default="f16", help="vision tower + connector weights (default f16)")
    p.add_argument("--no-mmproj", action="store_true", help="leave the projector file out of the totals")
    p.add_argument("--memory-budget", default=None, help=f"choose the types that fit this size ({SIZE_HELP}); "
                   "types given explicitly stay fixed, the search chooses the rest")
    p.add_argument("--budget-scope", default="model", choices=("experts", "model"),
                   help="what the budget covers: experts = shared + routed experts (the paper's 'expert memory'), "
                        "model = every tensor of both GGUF files (default)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context for the resident-memory estimate (default 2048; 0: none)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument("--paper", action="store_true", help="also recompute every expert-memory figure of the paper")
    return p


def plan_from_args(a) -> tuple[Plan | None, str | None, list[dict] | None]:
    """(plan, preset, the paper's figures recomputed) for mote-plan's parsed arguments."""
    if a.config and a.preset:
        raise MoteExportError("give a config (or checkpoint folder) or --preset, not both")
    plan, preset = None, None
    if a.config or a.preset:
        preset = a.preset.lower() if a.preset else None
        cfg = preset_config(preset) if preset else load_config(a.config)
        # the Qwen2.5 presets are dense configs: they plan MoTE unless told otherwise
        variant = a.variant or ("mote" if preset in QWEN25 else None)
        cfg = with_moe(cfg, a.experts, variant, a.top_k)
        where = f"{preset} preset" if preset else str(a.config)
        if not cfg.get("mote") and (a.ternary_type or a.expert_type):
            raise MoteExportError("--ternary-type / --expert-type are for MoE models; this plan is dense "
                                  "(give --experts N or --variant mote|moe-llava)")
        if (cfg.get("mote") or {}).get("variant") == "moe-llava":
            routed = a.expert_type
            if a.ternary_type:
                raise MoteExportError("--ternary-type is for MoTE; MoE-LLaVA experts take --expert-type")
        else:
            routed = a.ternary_type
            if a.expert_type:
                raise MoteExportError("--expert-type is for MoE-LLaVA; MoTE routed experts take --ternary-type")
        types = {"routed": routed, "shared": a.shared_type, "attention": a.other_type, "embedding": a.other_type}
        if a.memory_budget is not None:
            budget = parse_size(a.memory_budget, "--memory-budget")
            plan = budget_search(cfg, budget, a.budget_scope, types, where, a.mmproj_type, not a.no_mmproj)
        else:
            plan = make_plan(cfg, where, types, a.mmproj_type, not a.no_mmproj)
    elif not a.paper:
        raise MoteExportError("give a config.json, a checkpoint folder or --preset (or --paper)")
    return plan, preset, paper_reproduction() if a.paper else None


# ---- mote-export --memory-budget ----------------------------------------------------------------------------


def export_budget_types(ckpt: str | Path, out: str | Path, a) -> dict:
    """mote-export --memory-budget: search the plan for this checkpoint (exact shapes from its
    safetensors header, nothing else read), print it, and return write_llm_gguf's type arguments.
    Raises MoteExportError before anything is written when the budget cannot be met."""
    from .ckpt import Weights, read_config
    from .gguf_llm import _check_layers, llm_config, resolve_types
    from .quantize import ggml_lib

    budget = parse_size(a.memory_budget, "--memory-budget")
    cfg = read_config(ckpt)
    c = llm_config(cfg, str(ckpt))
    resolve_types(c, a.ternary_type, a.shared_type or "f16", a.other_type or "f16", a.expert_type)  # option misuse
    try:
        ggml_lib()
        k_quants = True
    except MoteExportError:  # no llama-cpp-python: the K-quants cannot be written, so they are not candidates
        k_quants = False
    fixed = {"routed": a.expert_type if c.variant == "moe-llava" else a.ternary_type, "shared": a.shared_type,
             "attention": a.other_type, "embedding": a.other_type}
    with Weights(ckpt) as w:
        w.check_shape(w.lm_name("embed_tokens.weight"), (c.vocab, c.hidden))
        _check_layers(w, c)
        plan = budget_search(cfg, budget, a.budget_scope or "model", fixed, str(ckpt), a.mmproj_type,
                             not a.no_mmproj, weights=w, k_quants=k_quants)
    print(format_plan(plan))
    t = plan.types
    return dict(ternary_type=t.get("routed") if c.variant == "mote" else None,
                expert_type=t.get("routed") if c.variant == "moe-llava" else None,
                shared_type=t["shared"], other_type=t["attention"], embedding_type=t["embedding"])

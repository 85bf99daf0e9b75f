"""MoTE / MoE-LLaVA checkpoint -> the LLM half of a llama.cpp GGUF (architecture `qwen2moe`).

Mapping (numpy shapes; ggml's ne is the reverse), per decoder layer:
  router [E, H]                      -> ffn_gate_inp (F32: routing is sensitive and the tensor small)
  experts.e.{gate,up}_proj [F, H]    -> ffn_{gate,up}_exps [E, F, H]   ternary type (MoTE) / --expert-type
                                        (ternary rows H wide: TQ2_0/TQ1_0 if H % 256 == 0, else Q2_0 if
                                        H % 64 == 0, else Q4_0, else F16: all exact; ternary.py)
  experts.e.down_proj [H, F]         -> ffn_down_exps [E, H, F]
  shared_expert.{gate,up,down}_proj  -> ffn_{gate,up,down}_shexp, with down multiplied by 2
qwen2moe scales the shared expert by sigmoid(ffn_gate_inp_shexp . x); MoTE has no such gate. The
gate vector is 2^-64 everywhere, so the dot product y is tiny and sigmoid(y) = 0.5 exactly in
fp32, and the doubled down projection makes the product exact. Not zero: this llama.cpp computes
the sigmoid as silu(y) / y, which is 0/0 = NaN at y = 0 (measured: all logits NaN). Only a hidden
state whose fp32 sum is exactly 0, or below 2^-61, would still leave the exact range.

What the qwen2moe graph cannot express directly is encoded exactly rather than refused:
  * dense layers of a partially up-cycled model ("--layers sparse"): the FFN becomes the shared
    expert (as above), the router and the E routed experts are zeros, so whichever experts are
    picked add exactly 0;
  * MoE-LLaVA (no shared expert, which qwen2moe requires): a zero shared expert, 32 wide (or the
    FFN width when dense layers also need it, as the width is one key for all layers).
Routing matches MoTE: softmax over all experts, top-k, no renormalisation.
A dense checkpoint (no "mote" entry) is written as plain `qwen2`, FFNs in --shared-type.

Keys of our own, `mote.*` (ignored by llama.cpp, read by runtime_cpu's engine; _write_mote_kv): format
version, variant, routing, top-k, MoE layers, layers with a real shared expert, the shared-expert gate
rewrite to undo (x mote.shared_expert_scale = 0.5), the activation quantiser and every ternary matrix's
exact fp32 scale (mote.ternary_scales).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType as T, GGUFWriter, LlamaFileType

from .ckpt import Weights, read_config
from .gguf_file import check_output, gguf_writer, write_tensors
from .errors import MoteExportError
from .gguf_vocab import add_vocab
from .quantize import fitting_type, nbytes, parse_type, quantize_tensor
from .ternary import (EPS as TERNARY_EPS, Q2_0, QUANT_SIZES, TERNARY_TYPES, pack_ternary, ternary_form,
                      ternary_gguf_type, ternary_scale)

LLAMA_FTYPE_MOSTLY_Q2_0 = 41  # llama.h of llama-cpp-python 0.3.36; gguf-py 0.19's LlamaFileType lacks it
SHEXP_GATE = np.float32(2.0 ** -64)
ZERO_SHEXP_WIDTH = 32
PROJS = ("gate", "up", "down")


@dataclass
class Planned:
    """One output tensor: GGUF name, numpy shape, type, and how to make its data when it is written."""
    name: str
    shape: tuple[int, ...]
    qtype: T
    group: str  # routed | shared | ffn | padding | router | attention | embedding | norm
    make: Callable[[], np.ndarray]
    requested: T | None = None  # the type asked for, when a fallback replaced it

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.qtype)


@dataclass
class LLMConfig:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    ctx: int
    rope_theta: float
    rms_eps: float
    tied: bool
    variant: str  # mote | moe-llava | dense
    experts: int = 0
    top_k: int = 0
    moe_layers: list[int] = field(default_factory=list)

    @property
    def arch(self) -> str:
        return "qwen2" if self.variant == "dense" else "qwen2moe"


def llm_config(cfg: dict, where: str) -> LLMConfig:
    """The LLM hyper-parameters from config.json, refusing what the llama.cpp graphs lack."""
    t, mote = cfg["text_config"], cfg.get("mote") or {}
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise MoteExportError(f"{where}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not exported; "
                              "accepted: default RoPE")
    if t.get("use_sliding_window"):
        raise MoteExportError(f"{where}: sliding-window attention is not exported; accepted: full attention")
    if t.get("hidden_act", "silu") != "silu":
        raise MoteExportError(f"{where}: FFN activation {t.get('hidden_act')!r}; accepted: silu (SwiGLU)")
    variant = mote.get("variant", "mote") if mote else "dense"
    if variant not in ("mote", "moe-llava", "dense"):
        raise MoteExportError(f"{where}: unknown variant {variant!r}; accepted: mote, moe-llava")
    try:
        n_layers, heads = int(t["num_hidden_layers"]), int(t["num_attention_heads"])
        c = LLMConfig(hidden=int(t["hidden_size"]), ffn=int(t["intermediate_size"]), layers=n_layers, heads=heads,
                      kv_heads=int(t.get("num_key_value_heads") or heads), vocab=int(t["vocab_size"]),
                      ctx=int(t.get("max_position_embeddings", 32768)),
                      rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
                      rms_eps=float(t.get("rms_norm_eps", 1e-6)),
                      tied=bool(t.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))), variant=variant)
        if mote:
            c.experts, c.top_k = int(mote["num_experts"]), int(mote["top_k"])
            c.moe_layers = sorted(int(i) for i in mote.get("layers") or range(n_layers))
    except (KeyError, TypeError, ValueError) as exc:
        raise MoteExportError(f"{where}/config.json: text_config or mote lacks a usable {exc}") from None
    if t.get("head_dim") not in (None, c.hidden // heads):
        raise MoteExportError(f"{where}: head_dim {t['head_dim']} != hidden_size / heads; not supported")
    if mote and not (c.moe_layers and all(0 <= i < n_layers for i in c.moe_layers)):
        raise MoteExportError(f"{where}: mote.layers {mote.get('layers')} do not fit {n_layers} layers")
    if mote and not 1 <= c.top_k <= c.experts:
        raise MoteExportError(f"{where}: top_k {c.top_k} must be between 1 and num_experts {c.experts}")
    return c


def resolve_types(c: LLMConfig, ternary_type, shared_type, other_type, expert_type) -> tuple[T | None, T, T]:
    """(routed, shared, other) GGUF types; ternary types go to MoTE routed experts only."""
    if c.variant != "mote" and ternary_type is not None:
        raise MoteExportError(f"--ternary-type is for MoTE checkpoints; this {c.variant} checkpoint has no "
                              "ternary experts" + (": use --expert-type" if c.variant == "moe-llava" else ""))
    if c.variant != "moe-llava" and expert_type is not None:
        raise MoteExportError("--expert-type is for MoE-LLaVA checkpoints (full-precision experts)"
                              + ("; MoTE routed experts are ternary: use --ternary-type" if c.variant == "mote" else ""))
    routed = None
    if c.variant == "mote":
        key = str(ternary_type or "tq2_0").lower()
        if key not in TERNARY_TYPES:
            raise MoteExportError(f"--ternary-type {ternary_type!r}; accepted: {', '.join(TERNARY_TYPES)}")
        routed = TERNARY_TYPES[key]
    elif c.variant == "moe-llava":
        routed = parse_type(expert_type or "f16", "--expert-type")
    return routed, parse_type(shared_type, "--shared-type"), parse_type(other_type, "--other-type")


def _bits(qtype: T) -> float:
    block, size = QUANT_SIZES[qtype]
    return 8 * size / block


def _fit(qtype: T, ne0: int) -> T:
    """The type actually written for rows of `ne0` weights (exact ternary or F16 fallbacks)."""
    return ternary_gguf_type(qtype, ne0) if qtype in TERNARY_TYPES.values() else fitting_type(qtype, ne0)


class _Planner:
    """Builds the ordered tensor list; each tensor's data is made lazily, when it is written."""

    def __init__(self, w: Weights, c: LLMConfig, routed: T | None, shared: T, other: T, embedding: T | None = None):
        self.w, self.c, self.routed, self.shared, self.other = w, c, routed, shared, other
        self.embedding = other if embedding is None else embedding  # token_embd and output
        self.out: list[Planned] = []
        self.dense_layers = [i for i in range(c.layers) if i not in c.moe_layers]
        self.exp_ffn = self.sh_ffn = 0
        if c.moe_layers:
            self.exp_ffn = w.shape(w.lm_name(f"layers.{c.moe_layers[0]}.mlp.experts.0.gate_proj.weight"))[0]
            self.sh_ffn = c.ffn if c.variant == "mote" or self.dense_layers else ZERO_SHEXP_WIDTH

    def add(self, name: str, shape: tuple, qtype: T, group: str, make: Callable[[T], np.ndarray]) -> None:
        if qtype in TERNARY_TYPES.values() and group not in ("routed", "padding"):
            raise MoteExportError(f"{name}: ternary types are only for MoTE routed experts")
        got = _fit(qtype, shape[-1])
        self.out.append(Planned(name, tuple(shape), got, group, lambda: make(got),
                                qtype if got != qtype else None))

    def tensor(self, name: str, src: str, shape: tuple, qtype: T, group: str, scale: float = 1.0) -> None:
        """A language-model tensor (shape checked now, before the file exists), times `scale`."""
        self.w.check_shape(self.w.lm_name(src), shape)

        def make(q):
            a = self.w.lm(src)
            return quantize_tensor(a * np.float32(scale) if scale != 1.0 else a, q, name)
        self.add(name, shape, qtype, group, make)

    def zeros(self, name: str, shape: tuple, qtype: T, group: str) -> None:
        """Exact zeros. Every type holds them, so padding takes the smaller of the requested type and
        Q4_0 (which every llama.cpp backend runs): zero experts in f16 would be 16 bits of nothing."""
        if group == "padding" and qtype not in TERNARY_TYPES.values() and _bits(T.Q4_0) < _bits(qtype) \
                and shape[-1] % QUANT_SIZES[T.Q4_0][0] == 0:
            qtype = T.Q4_0

        def make(q):
            if qtype in TERNARY_TYPES.values():  # the ternary packer covers its Q4_0 / F16 fallbacks
                return pack_ternary(np.zeros(shape, np.int8), np.zeros(shape[:-2], np.float32), q)
            return quantize_tensor(np.zeros(shape, np.float32), q, name)
        self.add(name, shape, qtype, group, make)

    def routed_experts(self, name: str, sources: list[str], shape: tuple) -> None:
        for s in sources:
            self.w.check_shape(self.w.lm_name(s), shape[1:])
        if self.c.variant == "mote":  # exact packing of the deployable form, never a lossy quantizer
            make = lambda q: np.stack([pack_ternary(*ternary_form(self.w.lm(s)), q) for s in sources])  # noqa: E731
        else:
            make = lambda q: np.stack([quantize_tensor(self.w.lm(s), q, name) for s in sources])  # noqa: E731
        self.add(name, shape, self.routed, "routed", make)

    def plan(self) -> list[Planned]:
        c, H = self.c, self.c.hidden
        kv = H // c.heads * c.kv_heads
        self.tensor("token_embd.weight", "embed_tokens.weight", (c.vocab, H), self.embedding, "embedding")
        for i in range(c.layers):
            L, b = f"layers.{i}.", f"blk.{i}."
            self.tensor(b + "attn_norm.weight", L + "input_layernorm.weight", (H,), T.F32, "norm")
            for p, rows in (("q", H), ("k", kv), ("v", kv)):
                self.tensor(f"{b}attn_{p}.weight", f"{L}self_attn.{p}_proj.weight", (rows, H), self.other, "attention")
                if self.w.has_lm(f"{L}self_attn.{p}_proj.bias"):
                    self.tensor(f"{b}attn_{p}.bias", f"{L}self_attn.{p}_proj.bias", (rows,), T.F32, "attention")
            self.tensor(b + "attn_output.weight", L + "self_attn.o_proj.weight", (H, H), self.other, "attention")
            self.tensor(b + "ffn_norm.weight", L + "post_attention_layernorm.weight", (H,), T.F32, "norm")
            if c.variant == "dense":
                for p in PROJS:
                    shape = (H, c.ffn) if p == "down" else (c.ffn, H)
                    self.tensor(f"{b}ffn_{p}.weight", f"{L}mlp.{p}_proj.weight", shape, self.shared, "ffn")
            else:
                self._moe_ffn(i, b, L + "mlp.")
        self.tensor("output_norm.weight", "norm.weight", (H,), T.F32, "norm")
        self._output()
        return self.out

    def _moe_ffn(self, i: int, b: str, M: str) -> None:
        c, H, F, E = self.c, self.c.hidden, self.exp_ffn, self.c.experts
        moe = i in c.moe_layers
        if moe:
            self.tensor(b + "ffn_gate_inp.weight", M + "router.weight", (E, H), T.F32, "router")
        else:  # a dense layer: routing over zero experts adds exactly 0
            self.zeros(b + "ffn_gate_inp.weight", (E, H), T.F32, "router")
        for p in PROJS:
            shape, name = ((E, H, F) if p == "down" else (E, F, H)), f"{b}ffn_{p}_exps.weight"
            if moe:
                self.routed_experts(name, [f"{M}experts.{e}.{p}_proj.weight" for e in range(E)], shape)
            else:
                self.zeros(name, shape, self.routed, "padding")
        gate = np.full(H, SHEXP_GATE, dtype=np.float32)
        self.add(b + "ffn_gate_inp_shexp.weight", (H,), T.F32, "router", lambda q: gate)
        for p in PROJS:
            shape, name = ((H, self.sh_ffn) if p == "down" else (self.sh_ffn, H)), f"{b}ffn_{p}_shexp.weight"
            if moe and c.variant == "moe-llava":
                self.zeros(name, shape, self.shared, "padding")
            else:  # x2 on down undoes the 0.5 gate; exact, as 2 is a power of two
                src = f"{M}shared_expert.{p}_proj.weight" if moe else f"{M}{p}_proj.weight"
                self.tensor(name, src, shape, self.shared, "shared", scale=2.0 if p == "down" else 1.0)

    def _output(self) -> None:
        c, head = self.c, self.w.lm_head_name()
        if head is None and not c.tied:
            raise MoteExportError(f"{self.w.path}: no lm_head.weight and tie_word_embeddings is false")
        if head is None or c.tied:
            if c.arch == "qwen2moe":  # qwen2moe requires `output` (qwen2 reuses token_embd): write it twice
                self.tensor("output.weight", "embed_tokens.weight", (c.vocab, c.hidden), self.embedding, "embedding")
            return
        self.w.check_shape(head, (c.vocab, c.hidden))
        self.add("output.weight", (c.vocab, c.hidden), self.embedding, "embedding",
                 lambda q: quantize_tensor(np.asarray(self.w.get(head), np.float32), q, "output.weight"))


def llm_tensors(w, c: LLMConfig, routed: T | None, shared: T, other: T, embedding: T | None = None) -> list[Planned]:
    """The tensors write_llm_gguf writes for these types: GGUF name, numpy shape, written type (after
    the ternary / block-size fallbacks) and group; no data is read or made. The memory planner
    (exporters/plan.py) sizes plans with this same list, so its bytes are the exporter's. `w` is only
    asked for shapes: a checkpoint's Weights, or plan.ConfigShapes for a config.json alone."""
    return _Planner(w, c, routed, shared, other, embedding).plan()


def _check_layers(w: Weights, c: LLMConfig) -> None:
    """Every MoE layer holds E experts (and a shared expert for MoTE); every other layer an FFN."""
    for i in range(c.layers):
        M = f"layers.{i}.mlp."
        if i in c.moe_layers:
            need = [M + "router.weight"] + [f"{M}experts.{e}.{p}_proj.weight" for e in range(c.experts) for p in PROJS]
            need += [f"{M}shared_expert.{p}_proj.weight" for p in PROJS] if c.variant == "mote" else []
        else:
            need = [f"{M}{p}_proj.weight" for p in PROJS]
        missing = [w.lm_name(n) for n in need if not w.has_lm(n)]
        if missing:
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MoteExportError(f"{w.path}: layer {i} lacks {missing[0]}{more}; the weights do not match "
                                  "config.json")
        if i in c.moe_layers and w.has_lm(f"{M}experts.{c.experts}.gate_proj.weight"):
            raise MoteExportError(f"{w.path}: layer {i} has more than mote.num_experts={c.experts} experts")


def _write_kv(wr: GGUFWriter, c: LLMConfig, name: str, routed: T | None, planner: _Planner) -> None:
    wr.add_name(name)
    ftype = LlamaFileType.__members__.get(f"MOSTLY_{(routed or planner.shared).name}")
    if ftype is None and routed == Q2_0:
        ftype = LLAMA_FTYPE_MOSTLY_Q2_0
    if ftype is not None:
        wr.add_file_type(int(ftype))
    wr.add_quantization_version(GGML_QUANT_VERSION)
    wr.add_context_length(c.ctx)
    wr.add_embedding_length(c.hidden)
    wr.add_block_count(c.layers)
    wr.add_feed_forward_length(c.ffn)
    wr.add_head_count(c.heads)
    wr.add_head_count_kv(c.kv_heads)
    wr.add_rope_freq_base(c.rope_theta)
    wr.add_layer_norm_rms_eps(c.rms_eps)
    if c.arch == "qwen2moe":
        wr.add_expert_count(c.experts)
        wr.add_expert_used_count(c.top_k)
        wr.add_expert_feed_forward_length(planner.exp_ffn)
        wr.add_expert_shared_feed_forward_length(planner.sh_ffn)


MOTE_FORMAT_VERSION = 1
SHEXP_GATE_TEXT = ("ffn_gate_inp_shexp is 2^-64 everywhere, so llama.cpp's sigmoid(ffn_gate_inp_shexp . x) is exactly 0.5, "
                   "and ffn_down_shexp holds 2 x the shared expert's down_proj: an engine without that gate multiplies "
                   "the shared expert's output by mote.shared_expert_scale (0.5) and ignores ffn_gate_inp_shexp")
TERNARY_TEXT = ("routed experts ffn_{gate,up,down}_exps: codes in {-1,0,1} x one fp32 scale per matrix "
                "(mote.ternary_scales; every nonzero block's d is fp16 of it); each input row (token) quantised to int8: "
                "q = clip(round_half_even(x * (127 / max(max|x|, mote.activation_eps))), -128, 127), "
                "y = (q . codes) * max(max|x|, eps) / 127 * scale")


def _write_mote_kv(wr: GGUFWriter, c: LLMConfig, w: Weights, planner: _Planner) -> None:
    """MoTE facts in keys of our own (llama.cpp ignores them; runtime_cpu's engine reads them, so it infers
    nothing from tensor values): what the model is, how it routes, what the shared-expert rewrite did, and
    the exact fp32 scale of every ternary matrix (the GGUF blocks hold its fp16 rounding). The scales take
    one extra read of the routed expert weights, since keys are written before any tensor data."""
    wr.add_uint32("mote.format_version", MOTE_FORMAT_VERSION)
    wr.add_string("mote.variant", c.variant)
    if c.variant == "dense":
        return
    wr.add_string("mote.routing", "softmax_topk_no_renorm")
    wr.add_uint32("mote.expert_count", c.experts)
    wr.add_uint32("mote.top_k", c.top_k)
    wr.add_array("mote.moe_layers", [int(i) for i in c.moe_layers])
    # per layer: do its ffn_*_shexp hold a real FFN (MoTE: its shared expert / a dense layer's FFN), or zero
    # padding (MoE-LLaVA's MoE layers), which an engine may skip. A mask, as gguf-py writes no empty array.
    wr.add_array("mote.layer_has_shared_expert", [c.variant == "mote" or i not in c.moe_layers for i in range(c.layers)])
    wr.add_string("mote.shared_expert_gate", SHEXP_GATE_TEXT)
    wr.add_float32("mote.shared_expert_scale", 0.5)
    if c.variant != "mote":
        return
    wr.add_string("mote.ternary", TERNARY_TEXT)
    wr.add_float32("mote.activation_eps", TERNARY_EPS)
    wr.add_uint32("mote.activation_bits", 8)
    # order: mote.moe_layers, then gate / up / down, then expert 0..E-1
    scales = [float(ternary_scale(w.lm(f"layers.{i}.mlp.experts.{e}.{p}_proj.weight")))
              for i in c.moe_layers for p in PROJS for e in range(c.experts)]
    wr.add_array("mote.ternary_scales", scales)


def write_llm_gguf(ckpt_dir: str | Path, out_path: str | Path, ternary_type: str | None = None,
                   shared_type: str = "f16", other_type: str = "f16", expert_type: str | None = None,
                   progress: bool = True, embedding_type: str | None = None) -> dict:
    """Write the LLM GGUF of a MoTE / MoE-LLaVA (qwen2moe) or dense (qwen2) checkpoint.

    `other_type` covers attention and, unless `embedding_type` is given, token_embd / output too
    (the memory-budget planner, exporters/plan.py, chooses the two separately).

    Returns the summary (see `format_summary`). The file is written under a temporary name beside
    `out_path` and renamed at the end; on any failure nothing is left at the destination."""
    ckpt, out = Path(ckpt_dir), Path(out_path)
    c = llm_config(read_config(ckpt), str(ckpt))
    routed, shared, other = resolve_types(c, ternary_type, shared_type, other_type, expert_type)
    embedding = parse_type(embedding_type, "embedding type") if embedding_type is not None else other
    check_output(out, "model.gguf")
    with Weights(ckpt) as w:
        w.check_shape(w.lm_name("embed_tokens.weight"), (c.vocab, c.hidden))
        _check_layers(w, c)
        planner = _Planner(w, c, routed, shared, other, embedding)
        planned = planner.plan()
        with gguf_writer(out, c.arch) as wr:
            _write_kv(wr, c, ckpt.resolve().name, routed, planner)
            _write_mote_kv(wr, c, w, planner)
            vocab = add_vocab(wr, ckpt, c.vocab)
            write_tensors(wr, [(p.name, p.shape, p.qtype, p.nbytes) for p in planned], [p.make for p in planned],
                          progress=progress)
    return _summary(out, c, planned, planner.dense_layers if c.moe_layers else [], vocab)


def _summary(out: Path, c: LLMConfig, planned: list[Planned], dense_layers: list[int], vocab: dict) -> dict:
    count, by_type, groups = Counter(), Counter(), Counter()
    for p in planned:
        count[p.qtype.name] += 1
        by_type[p.qtype.name] += p.nbytes
        groups[p.group] += p.nbytes
    routed = [p for p in planned if p.group == "routed"]
    routed_weights = sum(int(np.prod(p.shape)) for p in routed)
    fallbacks = Counter((p.requested.name, p.qtype.name, p.shape[-1]) for p in planned if p.requested is not None)
    return {
        "path": str(out), "arch": c.arch, "file_bytes": out.stat().st_size, "variant": c.variant,
        "experts": c.experts, "top_k": c.top_k, "moe_layers": c.moe_layers, "dense_layers": dense_layers,
        "tensors_by_type": {k: (count[k], by_type[k]) for k in by_type},
        "group_bytes": dict(groups),
        "routed_types": sorted({p.qtype.name for p in routed}),
        "routed_bpw": 8 * groups["routed"] / routed_weights if routed_weights else 0.0,
        "expert_bytes": groups["routed"] + groups["shared"],
        "fallbacks": [f"{n} x {a} -> {b} (row width {w})" for (a, b, w), n in fallbacks.items()],
        "vocab": vocab,
    }


def format_summary(s: dict) -> str:
    mib = 2 ** 20
    g = s["group_bytes"]
    head = f"{s['path']}: {s['arch']}, {s['variant']}"
    if s["variant"] != "dense":
        head += f", {s['experts']} experts top-{s['top_k']}, MoE layers {s['moe_layers']}"
    if s["dense_layers"]:
        head += f", dense layers {s['dense_layers']} (exact: FFN as shared expert, zero routed experts)"
    lines = [head, f"  {'type':<8} {'tensors':>8} {'MiB':>10}"]
    lines += [f"  {k:<8} {n:>8} {b / mib:>10.2f}"
              for k, (n, b) in sorted(s["tensors_by_type"].items(), key=lambda kv: -kv[1][1])]
    if s["variant"] == "dense":
        lines.append(f"  FFN memory: {g.get('ffn', 0) / 2 ** 30:.4f} GiB")
    else:
        lines += [f"  routed experts: {', '.join(s['routed_types'])}, {s['routed_bpw']:.4f} bits per weight",
                  f"  expert memory (shared + routed): {s['expert_bytes'] / 2 ** 30:.4f} GiB "
                  f"= {g.get('shared', 0) / mib:.2f} + {g.get('routed', 0) / mib:.2f} MiB"]
    if g.get("padding"):
        lines.append(f"  zero padding (exact; qwen2moe needs it): {g['padding'] / mib:.2f} MiB")
    lines += [f"  fallback: {f}" for f in s["fallbacks"]]
    lines.append(f"  file size: {s['file_bytes'] / mib:.2f} MiB ({s['file_bytes']} bytes)")
    return "\n".join(lines)

"""The language-model half of the ONNX export: decoder.onnx (Qwen2 with MoTE / MoE-LLaVA / dense FFNs and
a KV cache) and embedding.onnx (token embeddings with the image features put in place of the image tokens).

decoder.onnx, optimum's names (primitive ops only, besides the ai.mote functions):
  inputs   input_ids int64 [batch, seq]          embedded (Gather) when inputs_embeds is empty; give [batch, 0]
                                                 with inputs_embeds
           inputs_embeds float [batch, seq, H]   overridable initializer, default [1, 0, H]: text-only callers
                                                 (optimum, onnxruntime-genai) need not know it
           attention_mask int64 [batch, past + seq], position_ids int64 [batch, seq]
           past_key_values.{i}.key / .value float [batch, kv_heads, past, head_dim]
           logits_to_keep int64 []               overridable, default 0: logits for every position; k > 0: for
                                                 the last k only (a prefill needs 1: the head is V x H per row)
  outputs  logits float [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past + seq, head_dim]
Qwen2 attention: q/k/v biases, NEOX RoPE (rotate_half) from position_ids, grouped-query attention by
broadcasting q [B, kv, rep, S, D] against k [B, kv, 1, T, D] (no repeated copies), causal + padding mask
from attention_mask (masked scores get float32's lowest value, as transformers' eager attention), fp32
softmax; RMSNorm as transformers' Qwen2RMSNorm.

FFN per layer, by checkpoint:
  MoTE layer   h + shared(x) + sum_e w_e * E_e(x), x = RMSNorm(h); p = Softmax(router(x)) over all E
               experts, TopK(p, k): not renormalised. Sparse dispatch: expert e runs on the rows that
               picked it (NonZero -> GatherND), its output x p is added back with ScatterND(reduction
               "add"), experts in ascending order: the same additions, in the same order, as MoTEBlock's
               index_add_, and top-k FLOPs (an expert no token picked runs on 0 rows). Every routed
               linear is ai.mote::TernaryMatMul (exact: int8 codes [K, N] + fp32 scale) or
               ai.mote::TernaryMatMulNBits (fast: 2-bit codes, MatMulNBits), see onnx_graph.py.
  MoE-LLaVA    the same routing, fp experts in the --expert-type (below), no shared expert.
  dense layer  (a dense checkpoint, or a layer --layers sparse left dense) the SwiGLU FFN.
Float weights by group (WeightTypes; mote-export --shared-type / --other-type / --expert-type):
  shared     MoTE's shared expert, a dense model's (or a dense layer's) FFN       --shared-type
  attention  q/k/v/o projections (biases stay fp32)                             --other-type
  head       the output head                                                    --other-type
  embedding  the token embedding (embedding.onnx and the decoder's input_ids path) --other-type
  expert     MoE-LLaVA's fp experts (the PTQ baseline)                          --expert-type
  router     always fp32 (as in the GGUF export)
each in one of
  f32   MatMul on fp32 [K, N] (transposed from the checkpoint's [N, K]);
  f16   fp16 [K, N] stored, Cast to fp32 before the MatMul: onnxruntime folds that Cast into an fp32
        initializer when the session loads (measured: same speed as f32, the file half the size, fp32 in
        memory; a fp16 MatMul is no faster on CPU: onnxruntime inserts the same casts around it);
  q8_0 / q4_0  com.microsoft::MatMulNBits (bits 8 / 4, block 32, accuracy_level 4: int8 activations per
        32-block) holding exactly GGUF's Q8_0 / Q4_0 numbers (onnx_graph.quantize_nbits); the embedding
        as com.microsoft::GatherBlockQuantized on the same bytes. A width that 32 does not divide falls
        back to f16, as the GGUF export does (the summary counts it).
The head of a tied model is the token embedding itself (Gemm transB; f16: the one folded fp32 copy;
q8_0 / q4_0: MatMulNBits viewing the embedding's bytes), so the embedding is stored once for every use.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType
from onnx import TensorProto, helper

from .ckpt import Weights
from .gguf_llm import LLMConfig
from .onnx_graph import (GGUF_BLOCK, MOTE_DOMAIN, MS_DOMAIN, NBITS_TYPES, Graph, WeightFile, pack_nbits2,
                         quantize_nbits, ternary_matmul_exact, ternary_matmul_nbits)
from .quantize import quantize_tensor
from .ternary import ternary_form

F32, F16, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64
EMBED_KEY = "embed_tokens"
MASK_VALUE = float(np.finfo(np.float32).min)
GROUP_OPTION = {"attention": "other", "head": "other", "embedding": "other", "shared": "shared",
                "expert": "expert", "router": None}  # which --*-type sets each group (router: always f32)


@dataclass
class GroupStats:
    type: str
    bytes: int = 0
    tensors: int = 0
    f16_fallback: int = 0  # q8_0 / q4_0 tensors whose width 32 does not divide, stored f16 (as the GGUF export)


@dataclass
class WeightTypes:
    """The type of each weight group (module docstring) and what each group holds, counted once per tensor
    (the embedding: once, although embedding.onnx and decoder.onnx both use it)."""
    shared: str = "f32"
    other: str = "f32"
    expert: str = "f32"
    groups: dict = field(default_factory=dict)

    def of(self, group: str) -> str:
        option = GROUP_OPTION[group]
        return "f32" if option is None else getattr(self, option)

    def count(self, group: str, nbytes: int, fallback: bool = False) -> None:
        st = self.groups.setdefault(group, GroupStats(self.of(group)))
        st.bytes += nbytes
        st.tensors += 1
        st.f16_fallback += fallback

    def stored(self, group: str, k: int) -> tuple[str, bool]:
        """(type a [., K] weight of `group` is stored in, whether that is the f16 fallback)."""
        t = self.of(group)
        return ("f16", True) if t in NBITS_TYPES and k % GGUF_BLOCK else (t, False)


@dataclass
class DecoderInfo:
    ternary_nodes: int = 0
    routed_bytes: int = 0
    shared_bytes: int = 0


def _f16(a: np.ndarray, name: str) -> np.ndarray:
    return quantize_tensor(a, GGMLQuantizationType.F16, name)  # refuses values beyond the fp16 range


def typed_linear(g: Graph, types: WeightTypes, x: str, base: str, shape: tuple[int, int], load, group: str,
                 hint: str, rank: int) -> str:
    """y = x @ W.T for a float weight W [N, K] = load() (float32) in its group's type (module docstring);
    initializers are named after `base`; `rank` is x's rank (for the value info of MatMulNBits, whose
    output shape onnx cannot infer)."""
    n, k = shape
    t, fallback = types.stored(group, k)
    if t == "f32":
        wt = g.weight(base + ".weight", make=lambda: np.ascontiguousarray(load().T))
        types.count(group, n * k * 4)
        return g.op("MatMul", x, wt, hint=hint)
    if t == "f16":
        w16 = g.weight(base + ".f16", make=lambda: np.ascontiguousarray(_f16(load(), base).T))
        types.count(group, n * k * 2, fallback)
        return g.op("MatMul", x, g.op("Cast", w16, to=F32, hint=f"{hint}.w"), hint=hint)
    b, sc = quantize_nbits(load(), t, base)
    bw, sw = g.weight(f"{base}.{t}", b), g.weight(f"{base}.{t}.scales", sc)
    types.count(group, b.nbytes + sc.nbytes)
    y = g.op("MatMulNBits", x, bw, sw, domain=MS_DOMAIN, K=k, N=n, bits=NBITS_TYPES[t], block_size=GGUF_BLOCK,
             accuracy_level=4, hint=hint)
    g.value_info.append(helper.make_tensor_value_info(y, F32, [None] * (rank - 1) + [n]))
    return y


class Embedding:
    """The token embedding [V, H] in the embedding group's type, written once under EMBED_KEY (and
    EMBED_KEY.scales) for embedding.onnx, the decoder's input_ids path and a tied head."""

    def __init__(self, w: Weights, c: LLMConfig, types: WeightTypes):
        self.w, self.c, self.types = w, c, types
        self.type, self.fallback = types.stored("embedding", c.hidden)
        self._names: dict[int, tuple[str, str | None]] = {}  # per graph: its initializers of the table

    def _table(self, g: Graph) -> tuple[str, str | None]:
        """Initializers of the table (and its block scales) in g; counted the first time they are written."""
        if id(g) in self._names:
            return self._names[id(g)]
        V, H = self.c.vocab, self.c.hidden
        first = g.weights is None or not g.weights.has(EMBED_KEY)
        load = lambda: self.w.lm("embed_tokens.weight", (V, H))  # noqa: E731
        scales = None
        if self.type == "f32":
            name, nbytes = g.weight("embed_tokens.weight", key=EMBED_KEY, make=load), V * H * 4
        elif self.type == "f16":
            name = g.weight("embed_tokens.f16", key=EMBED_KEY, make=lambda: _f16(load(), "embed_tokens.weight"))
            nbytes = V * H * 2
        else:
            bits, q = NBITS_TYPES[self.type], []

            def quantized() -> list:  # one quantization for the codes and the scales
                if not q:
                    q.extend(quantize_nbits(load(), self.type, "embed_tokens.weight"))
                return q
            name = g.weight(f"embed_tokens.{self.type}", key=EMBED_KEY, shape=(V, H * bits // 8),
                            make=lambda: quantized()[0].reshape(V, -1))
            scales = g.weight(f"embed_tokens.{self.type}.scales", key=EMBED_KEY + ".scales",
                              make=lambda: quantized()[1])
            nbytes = V * H * bits // 8 + V * (H // GGUF_BLOCK) * 4
        if first:
            self.types.count("embedding", nbytes, self.fallback)
        self._names[id(g)] = name, scales
        return name, scales

    def lookup_in(self, g: Graph, sub: Graph, ids: str, hint: str) -> str:
        """Rows of the table for `ids`, as float32: the table's initializers in g, the nodes in sub (g itself,
        or a subgraph of it: an If branch reads g's initializers)."""
        table, scales = self._table(g)
        if self.type == "f32":
            return sub.op("Gather", table, ids, axis=0, hint=hint)
        if self.type == "f16":
            return sub.op("Cast", sub.op("Gather", table, ids, axis=0, hint=f"{hint}.f16"), to=F32, hint=hint)
        return sub.op("GatherBlockQuantized", table, ids, scales, domain=MS_DOMAIN, bits=NBITS_TYPES[self.type],
                      block_size=GGUF_BLOCK, quantize_axis=1, gather_axis=0, hint=hint)

    def head(self, g: Graph, x: str) -> str:
        """logits = x @ table.T (a tied head) on the same bytes; x [rows, H]."""
        V, H = self.c.vocab, self.c.hidden
        table, scales = self._table(g)
        if self.type == "f32":
            return g.op("Gemm", x, table, transB=1, hint="head")
        if self.type == "f16":  # folded to one fp32 copy at load (the decoder's lookup reads the fp16 rows)
            return g.op("Gemm", x, g.op("Cast", table, to=F32, hint="head.w"), transB=1, hint="head")
        bits = NBITS_TYPES[self.type]
        blocks = g.weight(f"embed_tokens.{self.type}.blocks", key=EMBED_KEY, shape=(V, H // GGUF_BLOCK, GGUF_BLOCK * bits // 8))
        y = g.op("MatMulNBits", x, blocks, scales, domain=MS_DOMAIN, K=H, N=V, bits=bits, block_size=GGUF_BLOCK,
                 accuracy_level=4, hint="head")
        g.value_info.append(helper.make_tensor_value_info(y, F32, [None, V]))
        return y


def _rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """transformers' default RoPE: 1 / theta^(arange(0, D, 2) / D), in float32 as torch computes it."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent, dtype=np.float32)).astype(np.float32)


class _Decoder:
    def __init__(self, w: Weights, c: LLMConfig, wf: WeightFile, kernels: str, types: WeightTypes):
        self.w, self.c, self.kernels, self.types = w, c, kernels, types
        self.embedding = Embedding(w, c, types)
        self.g = Graph("decoder", wf)
        self.D = c.hidden // c.heads
        self.info = DecoderInfo()

    # ---- weights ------------------------------------------------------------------------------------------------

    def linear(self, x: str, suffix: str, group: str, hint: str, rank: int = 2) -> str:
        """x @ W.T for the language-model weight `suffix` in its group's type (typed_linear)."""
        if not self.w.has_lm(suffix):
            self.w.lm(suffix)  # the one-line error naming the missing tensor
        shape = tuple(self.w.shape(self.w.lm_name(suffix)))
        return typed_linear(self.g, self.types, x, suffix.removesuffix(".weight"), shape,
                            lambda: self.w.lm(suffix), group, hint, rank)

    def vec(self, suffix: str) -> str:
        return self.g.weight(suffix, self.w.lm(suffix))

    def ternary(self, suffix: str, x: str, hint: str) -> str:
        codes, scale = ternary_form(self.w.lm(suffix))  # [N, K], the deployable form
        base = suffix.removesuffix(".weight")
        self.info.ternary_nodes += 1
        if self.kernels == "fast":
            packed, scales = pack_nbits2(codes, scale)
            wt = self.g.weight(base + ".nbits2", packed)
            sc = self.g.weight(base + ".scales", scales)
            self.info.routed_bytes += packed.nbytes + scales.nbytes
            n, k = codes.shape
            y = self.g.op("TernaryMatMulNBits", x, wt, sc, domain=MOTE_DOMAIN, hint=hint, K=k, N=n)
            self.g.value_info.append(helper.make_tensor_value_info(y, F32, [None, n]))  # rows: unnamed, each its own
            return y
        wt = self.g.weight(base + ".codes", np.ascontiguousarray(codes.T))
        sc = self.g.weight(base + ".scale", np.asarray(scale, np.float32))
        self.info.routed_bytes += codes.nbytes + 4
        return self.g.op("TernaryMatMul", x, wt, sc, domain=MOTE_DOMAIN, hint=hint)

    # ---- blocks -------------------------------------------------------------------------------------------------

    def rms_norm(self, x: str, weight: str, hint: str) -> str:
        g = self.g
        var = g.op("ReduceMean", g.op("Mul", x, x, hint=f"{hint}.sq"), g.ints(-1), keepdims=1, hint=f"{hint}.var")
        inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(self.c.rms_eps), hint=f"{hint}.eps"),
                                      hint=f"{hint}.std"), hint=f"{hint}.inv")
        return g.op("Mul", g.op("Mul", x, inv, hint=f"{hint}.normed"), weight, hint=hint)

    def swiglu(self, x: str, prefix: str, hint: str, group: str, rank: int = 2) -> str:
        """SwiGLU FFN; group "routed" = MoTE's ternary experts, else a float group (typed_linear)."""
        g = self.g

        def proj(p: str, inp: str) -> str:
            if group == "routed":
                return self.ternary(f"{prefix}{p}_proj.weight", inp, f"{hint}.{p}")
            return self.linear(inp, f"{prefix}{p}_proj.weight", group, f"{hint}.{p}", rank)
        gate, up = proj("gate", x), proj("up", x)
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate, hint=f"{hint}.sig"), hint=f"{hint}.silu"), up,
                   hint=f"{hint}.act")
        return proj("down", act)

    def moe(self, x: str, i: int) -> str:
        """Router, top-k, and a sparse dispatch: expert e runs on exactly the tokens that picked it (NonZero ->
        Gather -> expert -> x p -> ScatterND add), experts in ascending order as MoTEBlock's index_add_."""
        g, c, M = self.g, self.c, f"layers.{i}.mlp."
        g.scope = f"layers.{i}/moe/"
        flat = g.op("Reshape", x, g.ints(-1, c.hidden), hint="tokens")
        logits = self.linear(flat, M + "router.weight", "router", "router")
        probs = g.op("Softmax", logits, axis=-1, hint="probs")
        top_p, top_i = g.op("TopK", probs, g.ints(c.top_k), axis=-1, largest=1, sorted=1, outputs=2, hint="topk")
        out = g.op("ConstantOfShape", g.op("Shape", flat), value=helper.make_tensor("zero", F32, [1], [0.0]),
                   hint="zeros")
        experts = "routed" if c.variant == "mote" else "expert"
        for e in range(c.experts):
            picked = g.op("Equal", top_i, g.const(e, np.int64), hint=f"expert{e}.picked")  # [N, k], one True at most
            p = g.op("ReduceSum", g.op("Where", picked, top_p, g.const(0.0), hint=f"expert{e}.p_k"), g.ints(-1),
                     keepdims=1, hint=f"expert{e}.p")  # its top-k weight (exactly: the other terms are 0)
            rows = g.op("NonZero", g.op("ReduceMax", g.op("Cast", picked, to=TensorProto.INT32, hint=f"expert{e}.pi"),
                                        g.ints(-1), keepdims=0, hint=f"expert{e}.any"), hint=f"expert{e}.nz")
            rows = g.op("Transpose", rows, perm=[1, 0], hint=f"expert{e}.rows")  # [n_e, 1]
            xe = g.op("GatherND", flat, rows, hint=f"expert{e}.x")
            y = self.swiglu(xe, f"{M}experts.{e}.", f"expert{e}", experts)
            y = g.op("Mul", y, g.op("GatherND", p, rows, hint=f"expert{e}.pe"), hint=f"expert{e}.weighted")
            out = g.op("ScatterND", out, rows, y, reduction="add", hint=f"expert{e}.added")
        if c.variant == "mote":
            shared = self.swiglu(flat, M + "shared_expert.", "shared", "shared")
            out = g.op("Add", out, shared, hint="ffn_out")
        out = g.op("Reshape", out, g.op("Shape", x, hint="x.shape"), hint="ffn_out.bsh")
        g.scope = ""
        return out

    def attention(self, x: str, i: int, cos: str, sin: str, mask: str) -> tuple[str, str, str]:
        g, c, D = self.g, self.c, self.D
        L = f"layers.{i}.self_attn."
        g.scope = f"layers.{i}/attn/"
        rep = c.heads // c.kv_heads

        def proj(p: str, heads: int) -> str:
            bias = self.vec(f"{L}{p}_proj.bias") if self.w.has_lm(f"{L}{p}_proj.bias") else None
            y = self.linear(x, f"{L}{p}_proj.weight", "attention", p, rank=3)
            y = g.op("Add", y, bias, hint=f"{p}.bias") if bias else y
            y = g.op("Reshape", y, g.ints(0, 0, heads, D), hint=f"{p}.heads")
            return g.op("Transpose", y, perm=[0, 2, 1, 3], hint=f"{p}.bhsd")

        def rope(t: str, hint: str) -> str:
            a, b = g.op("Split", t, axis=-1, num_outputs=2, outputs=2, hint=f"{hint}.halves")
            rot = g.op("Concat", g.op("Neg", b, hint=f"{hint}.neg"), a, axis=-1, hint=f"{hint}.rot")
            return g.op("Add", g.op("Mul", t, cos, hint=f"{hint}.cos"), g.op("Mul", rot, sin, hint=f"{hint}.sin"),
                        hint=f"{hint}.rope")

        q = rope(proj("q", c.heads), "q")
        k = rope(proj("k", c.kv_heads), "k")
        v = proj("v", c.kv_heads)
        past_k = g.input(f"past_key_values.{i}.key", F32, ["batch", c.kv_heads, "past", D])
        past_v = g.input(f"past_key_values.{i}.value", F32, ["batch", c.kv_heads, "past", D])
        present_k = g.op("Concat", past_k, k, axis=2, hint="present_k")
        present_v = g.op("Concat", past_v, v, axis=2, hint="present_v")
        q5 = g.op("Reshape", q, g.ints(0, c.kv_heads, rep, -1, D), hint="q.groups")
        k5 = g.op("Transpose", g.op("Unsqueeze", present_k, g.ints(2), hint="k.groups"), perm=[0, 1, 2, 4, 3],
                  hint="k.t")
        scores = g.op("Mul", g.op("MatMul", q5, k5, hint="qk"), g.const(D ** -0.5), hint="scores")
        probs = g.op("Softmax", g.op("Add", scores, mask, hint="masked"), axis=-1, hint="attn")
        ctx = g.op("MatMul", probs, g.op("Unsqueeze", present_v, g.ints(2), hint="v.groups"), hint="ctx")
        ctx = g.op("Reshape", ctx, g.ints(0, c.heads, -1, D), hint="ctx.heads")
        ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3], hint="ctx.bshd"), g.ints(0, 0, c.hidden),
                   hint="ctx.flat")
        out = self.linear(ctx, f"{L}o_proj.weight", "attention", "o", rank=3)
        g.scope = ""
        return out, present_k, present_v

    def build(self):
        g, c = self.g, self.c
        H, V = c.hidden, c.vocab
        input_ids = g.input("input_ids", I64, ["batch", "seq"])  # required (onnxruntime-genai looks it up)
        mask_in = g.input("attention_mask", I64, ["batch", "total"])
        pos = g.input("position_ids", I64, ["batch", "seq"])
        # inputs_embeds is declared last among the inputs after the KV cache (below); its default is empty
        # embeds: text-only callers (optimum, onnxruntime-genai) give input_ids, embedding.onnx users embeds.
        embeds_in = "inputs_embeds"
        g.inits.append(helper.make_tensor(embeds_in, F32, [1, 0, H], []))
        sub = Graph("from_ids")
        sub.scope = "from_ids/"
        rows = self.embedding.lookup_in(g, sub, input_ids, "rows")
        sub.output(rows, "from_ids", F32, None)
        then_g = sub.graph()
        else_g = helper.make_graph([helper.make_node("Identity", [embeds_in], ["from_embeds"])], "from_embeds",
                                   [], [helper.make_tensor_value_info("from_embeds", F32, None)])
        empty = g.op("Equal", g.op("Size", embeds_in, hint="embeds.size"), g.const(0, np.int64), hint="embeds.empty")
        h = g.op("If", empty, then_branch=then_g, else_branch=else_g, hint="embeds")

        # rotary tables [B, 1, S, D] and the additive mask [B, 1, 1, S, T], shared by every layer
        freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=F32, hint="pos.f"), g.ints(-1), hint="pos.col"),
                     g.const(_rope_inv_freq(self.D, c.rope_theta)), hint="freqs")
        emb = g.op("Concat", freqs, freqs, axis=-1, hint="rope.emb")
        cos = g.op("Unsqueeze", g.op("Cos", emb, hint="rope.cos"), g.ints(1), hint="cos")
        sin = g.op("Unsqueeze", g.op("Sin", emb, hint="rope.sin"), g.ints(1), hint="sin")
        total, seq = g.shape_dim(mask_in, 1), g.shape_dim(h, 1)
        kv_idx = g.op("Range", g.const(0, np.int64), total, g.const(1, np.int64), hint="kv_idx")
        q_idx = g.op("Range", g.op("Sub", total, seq, hint="past_len"), total, g.const(1, np.int64), hint="q_idx")
        causal = g.op("LessOrEqual", g.op("Unsqueeze", kv_idx, g.ints(0), hint="kv_row"),
                      g.op("Unsqueeze", q_idx, g.ints(1), hint="q_col"), hint="causal")
        keep = g.op("Unsqueeze", g.op("Cast", mask_in, to=TensorProto.BOOL, hint="mask.b"), g.ints(1, 2, 3),
                    hint="mask.5d")
        mask = g.op("Where", g.op("And", causal, keep, hint="allowed"), g.const(0.0), g.const(MASK_VALUE),
                    hint="mask_bias")

        presents = []
        for i in range(c.layers):
            L = f"layers.{i}."
            x = self.rms_norm(h, self.vec(L + "input_layernorm.weight"), f"layers.{i}/input_norm")
            attn, pk, pv = self.attention(x, i, cos, sin, mask)
            presents += [(f"present.{i}.key", pk), (f"present.{i}.value", pv)]
            h = g.op("Add", h, attn, hint=f"layers.{i}/attn_residual")
            x = self.rms_norm(h, self.vec(L + "post_attention_layernorm.weight"), f"layers.{i}/post_norm")
            if i in c.moe_layers:
                ffn = self.moe(x, i)
            else:
                g.scope = f"layers.{i}/mlp/"
                ffn = self.swiglu(x, L + "mlp.", "ffn", "shared", rank=3)
                g.scope = ""
            h = g.op("Add", h, ffn, hint=f"layers.{i}/ffn_residual")
        h = self.rms_norm(h, self.vec("norm.weight"), "final_norm")
        # logits_to_keep (as transformers' generate): k > 0 keeps the last k positions, 0 (default) all
        keep = "logits_to_keep"
        g.inits.append(helper.make_tensor(keep, I64, [], [0]))
        start = g.op("Where", g.op("Greater", keep, g.const(0, np.int64), hint="keep.some"),
                     g.op("Sub", seq, keep, hint="keep.start"), g.const(0, np.int64), hint="keep.from")
        h = g.op("Slice", h, g.op("Unsqueeze", start, g.ints(0), hint="keep.starts"), g.ints(2 ** 62), g.ints(1),
                 hint="head.rows")
        flat = g.op("Reshape", h, g.ints(-1, H), hint="head.in")
        head = self.w.lm_head_name()
        if head is None or c.tied:
            logits = self.embedding.head(g, flat)
        else:
            self.w.check_shape(head, (V, H))
            logits = typed_linear(g, self.types, flat, "lm_head", (V, H), lambda: np.asarray(self.w.get(head), np.float32),
                                  "head", "head", rank=2)
        out_shape = g.op("Concat", g.op("Shape", h, start=0, end=2, hint="bs"), g.ints(V), axis=0, hint="logits.shape")
        logits = g.op("Reshape", logits, out_shape, hint="logits.bsv")
        g.input(embeds_in, F32, ["batch", "seq", H])
        g.input(keep, I64, [])
        g.output(logits, "logits", F32, ["batch", "logits_seq", V])
        for name, value in presents:
            g.output(value, name, F32, ["batch", c.kv_heads, "total", self.D])
        functions = [] if not self.info.ternary_nodes else [ternary_matmul_nbits() if self.kernels == "fast"
                                                              else ternary_matmul_exact()]
        doc = (f"MoTE Edge decoder: Qwen2, {c.layers} layers, {c.variant}"
               + (f", {c.experts} experts top-{c.top_k}, MoE layers {c.moe_layers}" if c.moe_layers else "")
               + (f", ternary experts as ai.mote::TernaryMatMul ({self.kernels} body)" if self.info.ternary_nodes else ""))
        return g.model(functions, doc)


def build_decoder(w: Weights, c: LLMConfig, wf: WeightFile, kernels: str = "exact", types: WeightTypes | None = None):
    """(ModelProto of decoder.onnx, DecoderInfo); weights go to `wf` as the graph is built."""
    if kernels not in ("exact", "fast"):
        raise ValueError(kernels)
    d = _Decoder(w, c, wf, kernels, types or WeightTypes())
    return d.build(), d.info


def build_embedding(w: Weights, c: LLMConfig, wf: WeightFile, image_token_id: int, types: WeightTypes | None = None):
    """embedding.onnx: input_ids [batch, seq] + image_features [n, H] -> inputs_embeds [batch, seq, H].
    The i-th image token (in reading order over the whole batch, as LLaVA's masked_scatter) gets row i
    of image_features; image_features may be empty ([0, H]) when the ids hold no image token."""
    g, H = Graph("embedding", wf), c.hidden
    ids = g.input("input_ids", I64, ["batch", "seq"])
    feats = g.input("image_features", F32, ["num_image_tokens", H])
    tok = Embedding(w, c, types or WeightTypes()).lookup_in(g, g, ids, "tokens")
    is_img = g.op("Equal", ids, g.const(image_token_id, np.int64), hint="is_image")
    flat = g.op("Reshape", g.op("Cast", is_img, to=I64, hint="is_image.i"), g.ints(-1), hint="is_image.flat")
    n = g.op("Shape", feats, start=0, end=1, hint="n_features")
    rank = g.op("Sub", g.op("CumSum", flat, g.const(0, np.int64), hint="rank1"), g.const(1, np.int64), hint="rank")
    idx = g.op("Where", g.op("Reshape", is_img, g.ints(-1), hint="is_image.flat_b"), rank, n, hint="feature_index")
    padded = g.op("Concat", feats, g.const(np.zeros((1, H), np.float32)), axis=0, hint="features_and_zero")
    picked = g.op("Reshape", g.op("Gather", padded, idx, axis=0, hint="picked.flat"), g.op("Shape", tok), hint="picked")
    out = g.op("Where", g.op("Unsqueeze", is_img, g.ints(-1), hint="is_image.col"), picked, tok, hint="embeds")
    g.output(out, "inputs_embeds", F32, ["batch", "seq", H])
    return g.model(doc=f"MoTE Edge embedding: token embeddings, image token {image_token_id} replaced by "
                       "image_features in order")

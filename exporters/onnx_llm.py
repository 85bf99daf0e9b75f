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
  MoE-LLaVA    the same routing, fp32 experts as MatMul, no shared expert.
  dense layer  (a dense checkpoint, or a layer --layers sparse left dense) the SwiGLU FFN.
Float weights are fp32 ([K, N], transposed from the checkpoint's [N, K]); the head of a tied model is a
Gemm(transB) on the token embedding itself, so the embedding is stored once for every use.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from .ckpt import Weights
from .gguf_llm import LLMConfig
from .onnx_graph import MOTE_DOMAIN, Graph, WeightFile, pack_nbits2, ternary_matmul_exact, ternary_matmul_nbits
from .ternary import ternary_form

F32, I64 = TensorProto.FLOAT, TensorProto.INT64
EMBED_KEY = "embed_tokens"
MASK_VALUE = float(np.finfo(np.float32).min)


@dataclass
class DecoderInfo:
    ternary_nodes: int = 0
    routed_bytes: int = 0
    shared_bytes: int = 0


def _rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """transformers' default RoPE: 1 / theta^(arange(0, D, 2) / D), in float32 as torch computes it."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent, dtype=np.float32)).astype(np.float32)


class _Decoder:
    def __init__(self, w: Weights, c: LLMConfig, wf: WeightFile, kernels: str):
        self.w, self.c, self.kernels = w, c, kernels
        self.g = Graph("decoder", wf)
        self.D = c.hidden // c.heads
        self.info = DecoderInfo()

    # ---- weights ------------------------------------------------------------------------------------------------

    def lin_w(self, suffix: str) -> str:
        """A float linear weight of the language model, as [K, N] for MatMul."""
        return self.g.weight(suffix, make=lambda: np.ascontiguousarray(self.w.lm(suffix).T))

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

    def swiglu(self, x: str, prefix: str, hint: str, ternary: bool) -> str:
        g = self.g
        if ternary:
            gate = self.ternary(f"{prefix}gate_proj.weight", x, f"{hint}.gate")
            up = self.ternary(f"{prefix}up_proj.weight", x, f"{hint}.up")
        else:
            gate = g.op("MatMul", x, self.lin_w(f"{prefix}gate_proj.weight"), hint=f"{hint}.gate")
            up = g.op("MatMul", x, self.lin_w(f"{prefix}up_proj.weight"), hint=f"{hint}.up")
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate, hint=f"{hint}.sig"), hint=f"{hint}.silu"), up,
                   hint=f"{hint}.act")
        if ternary:
            return self.ternary(f"{prefix}down_proj.weight", act, f"{hint}.down")
        return g.op("MatMul", act, self.lin_w(f"{prefix}down_proj.weight"), hint=f"{hint}.down")

    def moe(self, x: str, i: int) -> str:
        """Router, top-k, and a sparse dispatch: expert e runs on exactly the tokens that picked it (NonZero ->
        Gather -> expert -> x p -> ScatterND add), experts in ascending order as MoTEBlock's index_add_."""
        g, c, M = self.g, self.c, f"layers.{i}.mlp."
        g.scope = f"layers.{i}/moe/"
        flat = g.op("Reshape", x, g.ints(-1, c.hidden), hint="tokens")
        logits = g.op("MatMul", flat, self.lin_w(M + "router.weight"), hint="router")
        probs = g.op("Softmax", logits, axis=-1, hint="probs")
        top_p, top_i = g.op("TopK", probs, g.ints(c.top_k), axis=-1, largest=1, sorted=1, outputs=2, hint="topk")
        out = g.op("ConstantOfShape", g.op("Shape", flat), value=helper.make_tensor("zero", F32, [1], [0.0]),
                   hint="zeros")
        ternary = c.variant == "mote"
        for e in range(c.experts):
            picked = g.op("Equal", top_i, g.const(e, np.int64), hint=f"expert{e}.picked")  # [N, k], one True at most
            p = g.op("ReduceSum", g.op("Where", picked, top_p, g.const(0.0), hint=f"expert{e}.p_k"), g.ints(-1),
                     keepdims=1, hint=f"expert{e}.p")  # its top-k weight (exactly: the other terms are 0)
            rows = g.op("NonZero", g.op("ReduceMax", g.op("Cast", picked, to=TensorProto.INT32, hint=f"expert{e}.pi"),
                                        g.ints(-1), keepdims=0, hint=f"expert{e}.any"), hint=f"expert{e}.nz")
            rows = g.op("Transpose", rows, perm=[1, 0], hint=f"expert{e}.rows")  # [n_e, 1]
            xe = g.op("GatherND", flat, rows, hint=f"expert{e}.x")
            y = self.swiglu(xe, f"{M}experts.{e}.", f"expert{e}", ternary)
            y = g.op("Mul", y, g.op("GatherND", p, rows, hint=f"expert{e}.pe"), hint=f"expert{e}.weighted")
            out = g.op("ScatterND", out, rows, y, reduction="add", hint=f"expert{e}.added")
        if c.variant == "mote":
            shared = self.swiglu(flat, M + "shared_expert.", "shared", ternary=False)
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
            y = g.linear(x, self.lin_w(f"{L}{p}_proj.weight"), bias, hint=p)
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
        out = g.op("MatMul", ctx, self.lin_w(f"{L}o_proj.weight"), hint="o")
        g.scope = ""
        return out, present_k, present_v

    def build(self):
        g, c = self.g, self.c
        H, V = c.hidden, c.vocab
        embed = g.weight("embed_tokens.weight", key=EMBED_KEY, make=lambda: self.w.lm("embed_tokens.weight"))
        input_ids = g.input("input_ids", I64, ["batch", "seq"])  # required (onnxruntime-genai looks it up)
        mask_in = g.input("attention_mask", I64, ["batch", "total"])
        pos = g.input("position_ids", I64, ["batch", "seq"])
        # inputs_embeds is declared last among the inputs after the KV cache (below); its default is empty
        # embeds: text-only callers (optimum, onnxruntime-genai) give input_ids, embedding.onnx users embeds.
        embeds_in = "inputs_embeds"
        g.inits.append(helper.make_tensor(embeds_in, F32, [1, 0, H], []))
        then_g = helper.make_graph([helper.make_node("Gather", [embed, input_ids], ["from_ids"], axis=0)], "from_ids",
                                   [], [helper.make_tensor_value_info("from_ids", F32, None)])
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
                ffn = self.swiglu(x, L + "mlp.", "ffn", ternary=False)
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
            logits = g.op("Gemm", flat, embed, transB=1, hint="head")
        else:
            self.w.check_shape(head, (V, H))
            wt = g.weight("lm_head.weight", make=lambda: np.asarray(self.w.get(head), np.float32))
            logits = g.op("Gemm", flat, wt, transB=1, hint="head")
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


def build_decoder(w: Weights, c: LLMConfig, wf: WeightFile, kernels: str = "exact"):
    """(ModelProto of decoder.onnx, DecoderInfo); weights go to `wf` as the graph is built."""
    if kernels not in ("exact", "fast"):
        raise ValueError(kernels)
    d = _Decoder(w, c, wf, kernels)
    return d.build(), d.info


def build_embedding(w: Weights, c: LLMConfig, wf: WeightFile, image_token_id: int):
    """embedding.onnx: input_ids [batch, seq] + image_features [n, H] -> inputs_embeds [batch, seq, H].
    The i-th image token (in reading order over the whole batch, as LLaVA's masked_scatter) gets row i
    of image_features; image_features may be empty ([0, H]) when the ids hold no image token."""
    g, H = Graph("embedding", wf), c.hidden
    embed = g.weight("embed_tokens.weight", key=EMBED_KEY, make=lambda: w.lm("embed_tokens.weight"))
    ids = g.input("input_ids", I64, ["batch", "seq"])
    feats = g.input("image_features", F32, ["num_image_tokens", H])
    tok = g.op("Gather", embed, ids, axis=0, hint="tokens")
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

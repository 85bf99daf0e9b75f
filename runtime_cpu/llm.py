"""The language model of a mote-export GGUF in numpy: Qwen2 attention (q/k/v biases, NEOX RoPE with the
file's rope.freq_base, GQA, causal, KV cache), RMSNorm, and per layer either a dense SwiGLU FFN (qwen2) or
the MoTE block (qwen2moe): shared expert + router + routed experts.

MoE layer, exactly mote_edge/moe.py (the file's mote.* keys say which parts are real):
  p = softmax(router(x)) over all E experts, top-k of p (ties: lower index), NO renormalisation,
  out = sum over experts e (in index order) of p_e * E_e(x) for the tokens that chose e,
        + shared(x) * mote.shared_expert_scale   (the file's ffn_down_shexp is doubled for llama.cpp's
                                                  0.5 gate; ffn_gate_inp_shexp is ignored)
Layers outside mote.moe_layers skip the router and routed experts (zeros in the file); layers outside
mote.layer_has_shared_expert skip the shared expert (MoE-LLaVA's zero padding).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from ..exporters.errors import MoteExportError
from .gguf_model import GGUFModel
from . import clib
from .clinear import FloatGroup, FloatOne, LutMatrix, TernaryExperts
from .float_kernels import TYPES as C_FLOAT_TYPES
from .kernels import FloatLinear, Fused, Separate, TernaryLinear, rms_norm, silu, softmax
from .quants import FLOAT_NATIVE, decode_float, decode_float_rows, decode_ternary
from .ternary_kernels import TQ2_0_BLOCK_BYTES, TernaryMatrix, pack_codes, padded

PROJS = ("gate", "up", "down")
PREFILL_CHUNK = 512  # tokens per forward pass when a prompt is longer (bounds the attention buffers)
KERNELS = ("auto", "mad", "lut", "numpy")  # ternary kernel family: C multiply-add / C lookup-table / numpy


def resolve_kernel(kernel: str, notices: list | None = None) -> str:
    """The kernels to run: "numpy", or with the C library "mad" / "lut" (forced) or "auto" (measured per
    ternary shape, ternary_family); "auto" without the C library -> "numpy" (noticed)."""
    if kernel not in KERNELS:
        raise MoteExportError(f"kernel {kernel!r}; accepted: {', '.join(KERNELS)}")
    if kernel == "numpy":
        return kernel
    if not clib.available():
        if kernel != "auto":
            raise MoteExportError(f"--kernel {kernel}: {clib.error()}")
        if notices is not None:
            notices.append(f"{clib.error()}; running the numpy kernels")
        return "numpy"
    return kernel


def ternary_family(kernel: str, n: int, k: int) -> str:
    """The C family of an n x k ternary matrix: the one forced, or the measured choice (kernel_choice)."""
    if kernel != "auto":
        return kernel
    from .kernel_choice import choose

    return choose(n, padded(k))


@dataclass
class LLMConfig:
    arch: str
    variant: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    vocab: int
    ctx: int
    rope_base: float
    rms_eps: float
    experts: int = 0
    top_k: int = 0
    moe_layers: tuple = ()
    shared_layers: tuple = ()
    shared_scale: float = 1.0
    act_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def read_config(g: GGUFModel) -> LLMConfig:
    """The model's facts from the standard keys and mote.* (refusing what this engine does not run)."""
    arch = g.arch
    if arch not in ("qwen2", "qwen2moe"):
        raise MoteExportError(f"{g.path}: architecture {arch!r}; accepted: qwen2, qwen2moe (mote-export's LLM files)")
    k = g.arch_key
    variant = g.fields.get("mote.variant")
    if variant is None:
        if arch == "qwen2moe":
            raise MoteExportError(f"{g.path}: a qwen2moe file without mote.* keys (an older mote-export, or not "
                                  "mote-export's): its routing and ternary facts are not stated; re-export it with "
                                  "this mote-export, or run it with --engine llama.cpp")
        variant = "dense"  # plain qwen2: nothing MoTE to know
    expect = "qwen2" if variant == "dense" else "qwen2moe"
    if variant not in ("mote", "moe-llava", "dense") or arch != expect:
        raise MoteExportError(f"{g.path}: mote.variant {variant!r} with architecture {arch!r}; accepted: "
                              "mote / moe-llava (qwen2moe), dense (qwen2)")
    c = LLMConfig(arch=arch, variant=variant, layers=int(k("block_count")), hidden=int(k("embedding_length")),
                  heads=int(k("attention.head_count")), kv_heads=int(k("attention.head_count_kv", k("attention.head_count"))),
                  vocab=g.shape("token_embd.weight")[0], ctx=int(k("context_length", 2048, False)),
                  rope_base=float(k("rope.freq_base", 10000.0, False)),
                  rms_eps=float(k("attention.layer_norm_rms_epsilon")))
    if c.heads <= 0 or c.hidden % c.heads or c.kv_heads <= 0 or c.heads % c.kv_heads or c.head_dim % 2:
        raise MoteExportError(f"{g.path}: {c.heads} heads / {c.kv_heads} KV heads do not divide hidden {c.hidden}")
    if variant != "dense":
        if g.fields.get("mote.routing") != "softmax_topk_no_renorm":
            raise MoteExportError(f"{g.path}: mote.routing {g.fields.get('mote.routing')!r}; accepted: softmax_topk_no_renorm")
        c.experts, c.top_k = int(g.key("mote.expert_count")), int(g.key("mote.top_k"))
        c.moe_layers = tuple(int(i) for i in g.key("mote.moe_layers"))
        has = g.key("mote.layer_has_shared_expert")
        if len(has) != c.layers:
            raise MoteExportError(f"{g.path}: mote.layer_has_shared_expert has {len(has)} entries for {c.layers} layers")
        c.shared_layers = tuple(i for i, v in enumerate(has) if v)
        c.shared_scale = float(g.key("mote.shared_expert_scale"))
        if not 1 <= c.top_k <= c.experts or any(not 0 <= i < c.layers for i in c.moe_layers + c.shared_layers):
            raise MoteExportError(f"{g.path}: mote.top_k {c.top_k} / mote.moe_layers {list(c.moe_layers)} do not fit "
                                  f"{c.experts} experts and {c.layers} layers")
        if c.experts != int(k("expert_count")) or c.top_k != int(k("expert_used_count")):
            raise MoteExportError(f"{g.path}: mote.expert_count / mote.top_k disagree with {arch}.expert_count / "
                                  "expert_used_count")
    if variant == "mote":
        c.act_eps = float(g.key("mote.activation_eps"))
        if int(g.key("mote.activation_bits")) != 8:
            raise MoteExportError(f"{g.path}: mote.activation_bits {g.key('mote.activation_bits')}; accepted: 8")
    return c


class Loader:
    """Decodes tensors once, records what stayed mapped, what was repacked and what was never touched."""

    def __init__(self, g: GGUFModel, codes_form: str = "int8", kernel: str = "numpy"):
        self.g, self.codes_form = g, codes_form
        self.mapped = self.repacked = 0
        self.repacked_by = {}  # "TQ2_0 -> int8 codes" etc. -> bytes
        self.notices: list[str] = []
        self.kernel = resolve_kernel(kernel, self.notices)
        self.families: dict[str, str] = {}  # ternary "rows x K" -> the C family that runs it
        self.used: set[str] = set()

    def _repacked(self, kind: str, nbytes: int) -> None:
        self.repacked += nbytes
        self.repacked_by[kind] = self.repacked_by.get(kind, 0) + nbytes

    def _count(self, name: str, out: np.ndarray | None, kind: str | None) -> None:
        self.used.add(name)
        if kind is None:  # used in place
            self.mapped += self.g.info(name).nbytes
        else:
            self.repacked += out.nbytes
            self.repacked_by[kind] = self.repacked_by.get(kind, 0) + out.nbytes
            self.g.release(name)

    def floats(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        t = self.g.require(name, shape)
        out = decode_float(self.g.raw(name), t.qtype, shape, name, self.notices)
        self._count(name, out, None if t.qtype == T.F32 else f"{t.qtype.name} -> F32")
        return out

    def in_place(self, name: str) -> bool:
        """Whether the C float kernels read this tensor in place (not F32: BLAS reads those in place too)."""
        return self.kernel != "numpy" and self.g.info(name).qtype in C_FLOAT_TYPES and self.g.info(name).qtype != T.F32

    def mapped_view(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        t = self.g.require(name, shape)
        self.used.add(name)
        self.mapped += t.nbytes
        return self.g.raw(name)

    def linear(self, name: str, shape: tuple[int, int], bias: str | None = None):
        b = self.floats(bias, shape[:1]) if bias and bias in self.g else None
        if self.in_place(name):
            return FloatOne(self.mapped_view(name, shape), self.g.info(name).qtype, shape[0], shape[1], b)
        return FloatLinear(self.floats(name, shape), b)

    def stacked(self, names: list[str], shapes: list[tuple[int, int]], biases: list[str | None]):
        """Linears on the same input (q/k/v, gate/up) as one product over stacked rows when their weights
        are copied at load anyway (not F32): the copy is then one array, no bigger. F32 weights stay
        mapped, one product each."""
        bias = [self.floats(b, s[:1]) if b and b in self.g else None for b, s in zip(biases, shapes)]
        types = [self.g.require(n, s).qtype for n, s in zip(names, shapes)]
        if all(self.in_place(n) for n in names):
            return FloatGroup([(self.mapped_view(n, s), t, s[0], b) for n, s, t, b in zip(names, shapes, types, bias)],
                              shapes[0][1])
        if T.F32 in types:
            return Separate([FloatLinear(self.floats(n, s), b) for n, s, b in zip(names, shapes, bias)])
        out = np.empty((sum(s[0] for s in shapes), shapes[0][1]), np.float32)
        row = 0
        for n, s in zip(names, shapes):
            out[row:row + s[0]] = self.floats(n, s)
            row += s[0]
        return Fused(FloatLinear(out), [s[0] for s in shapes], bias)

    def ternary(self, name: str, shape: tuple[int, ...], scales: np.ndarray) -> np.ndarray:
        """int8 codes [E, rows, K] of stacked ternary matrices (checked against their scales)."""
        t = self.g.require(name, shape)
        codes = decode_ternary(self.g.raw(name), t.qtype, shape, scales, name)
        self.used.add(name)
        kind = f"{t.qtype.name} -> {'float32' if self.codes_form == 'f32' else 'int8'} codes"
        self._repacked(kind, codes.size * (4 if self.codes_form == "f32" else 1))
        self.g.release(name)
        return codes

    def ternary_matrices(self, name: str, shape: tuple[int, int, int], scales: np.ndarray, family: str) -> list:
        """The C kernels' matrices [E] of stacked ternary matrices. Multiply-add ("mad"): a TQ2_0 tensor is
        used in place when its code bytes are exactly the packing of its checked codes (the exporter's form:
        a d = 0 block holds zero codes); anything else is repacked to 2-bit codes (K padded to a multiple of
        256). Lookup-table ("lut"): repacked from those into the LUT kernels' row tiles."""
        t = self.g.require(name, shape)
        raw = self.g.raw(name)
        codes = decode_ternary(raw, t.qtype, shape, scales, name)  # every block checked; a transient copy
        self.used.add(name)
        self.families[f"{shape[1]}x{shape[2]}"] = family
        E, N, K = shape
        mats = None
        if t.qtype == T.TQ2_0:
            blocks = raw.reshape(E, N, K // 256, TQ2_0_BLOCK_BYTES)
            if all(np.array_equal(blocks[e, :, :, :64].reshape(N, -1), pack_codes(codes[e])) for e in range(E)):
                per = N * (K // 256) * TQ2_0_BLOCK_BYTES
                mats = [TernaryMatrix(raw[e * per:(e + 1) * per], N, K, scales[e], TQ2_0_BLOCK_BYTES) for e in range(E)]
            else:
                self.notices.append(f"{name}: TQ2_0 blocks with d = 0 hold non-zero codes; repacked")
        if family == "lut":  # one matrix at a time: the 2-bit temporary stays one matrix big
            out = [LutMatrix(mats[e] if mats else TernaryMatrix.from_codes(codes[e], scales[e])) for e in range(E)]
            self._repacked(f"{t.qtype.name} -> LUT tiles", sum(m.nbytes for m in out))
            self.g.release(name)
            return out
        if mats is not None:
            self.mapped += t.nbytes
            return mats
        mats = [TernaryMatrix.from_codes(codes[e], scales[e]) for e in range(E)]
        self._repacked(f"{t.qtype.name} -> 2-bit codes", sum(m.nbytes for m in mats))
        self.g.release(name)
        return mats


class FFN:
    """SwiGLU down(silu(gate(x)) * up(x)), float or ternary linears, times `scale` (exact: a power of two).
    gate_up(x) -> (gate(x), up(x)): one stacked product (kernels.Fused) or two (kernels.Separate)."""

    def __init__(self, gate_up, down, scale: float = 1.0):
        self.gate_up, self.down, self.scale = gate_up, down, np.float32(scale)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        g, u = self.gate_up(x)
        y = self.down(silu(g) * u)
        return y * self.scale if self.scale != 1 else y


class ExpertList:
    """Routed experts run one after another, each its own FFN (numpy kernels; full-precision experts)."""

    def __init__(self, ffns: list[FFN]):
        self.ffns = ffns

    def decode(self, x: np.ndarray, probs: np.ndarray, chosen: list[int]) -> np.ndarray:
        out = np.zeros_like(x)
        for e in chosen:
            out += self.ffns[e](x) * probs[0, e]
        return out

    def prefill(self, x: np.ndarray, probs: np.ndarray, top: np.ndarray) -> np.ndarray:
        out = np.zeros_like(x)
        for e, ffn in enumerate(self.ffns):
            tok, _ = np.nonzero(top == e)
            if tok.size:
                out[tok] += ffn(x[tok]) * probs[tok, e][:, None]
        return out


class MoE:
    """Router + routed experts (+ shared expert), the routing of mote_edge/moe.py. `experts` runs the chosen
    experts: ExpertList (one FFN after another) or clinear.TernaryExperts (by stage on the C kernels); both
    add the experts' outputs in expert-index order."""

    def __init__(self, router: np.ndarray | None, experts, top_k: int, shared: FFN | None):
        self.router, self.experts, self.top_k, self.shared = router, experts, top_k, shared
        self.trace: list | None = None  # when a list: every call's [T, top_k] expert ids are appended (routes)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros_like(x)
        if self.router is not None:
            probs = softmax(x @ self.router.T)
            top = np.argsort(-probs, axis=-1, kind="stable")[:, :self.top_k]
            if self.trace is not None:
                self.trace.append(top.copy())
            if x.shape[0] == 1:  # decode: only the chosen experts, in index order
                out = self.experts.decode(x, probs, sorted(int(e) for e in top[0]))
            else:
                out = self.experts.prefill(x, probs, top)
        if self.shared is not None:
            out = out + self.shared(x)
        return out


@dataclass
class Layer:
    attn_norm: np.ndarray
    qkv: Fused | Separate
    o: FloatLinear
    ffn_norm: np.ndarray
    ffn: FFN | MoE


def _ternary_scales(g: GGUFModel, c: LLMConfig) -> dict:
    """(layer, proj) -> fp32 scales [E] from mote.ternary_scales (order: moe layers, gate/up/down, experts)."""
    flat = np.asarray(g.key("mote.ternary_scales"), np.float32)
    if flat.size != len(c.moe_layers) * 3 * c.experts or not np.all(np.isfinite(flat)) or np.any(flat <= 0):
        raise MoteExportError(f"{g.path}: mote.ternary_scales holds {flat.size} values; expected "
                              f"{len(c.moe_layers) * 3 * c.experts} positive scales (moe layers x 3 x experts)")
    s = flat.reshape(len(c.moe_layers), 3, c.experts)
    return {(layer, p): s[i, j] for i, layer in enumerate(c.moe_layers) for j, p in enumerate(PROJS)}


class LLM:
    """Weights of the language model, decoded at load, and its forward pass."""

    def __init__(self, g: GGUFModel, codes_form: str = "int8", kernel: str = "numpy"):
        self.g, self.c = g, read_config(g)
        c, H = self.c, self.c.hidden
        kv = c.kv_heads * c.head_dim
        ld = self.loader = Loader(g, codes_form, kernel)
        emb = g.require("token_embd.weight", (c.vocab, H))
        self.embd_raw, self.embd_type = g.raw("token_embd.weight"), emb.qtype
        ld.used.add("token_embd.weight")
        ld.mapped += emb.nbytes  # rows are decoded on demand from the mapping
        scales = _ternary_scales(g, c) if c.variant == "mote" else {}
        self.layers = []
        for i in range(c.layers):
            b = f"blk.{i}."
            layer = Layer(attn_norm=ld.floats(b + "attn_norm.weight", (H,)),
                          qkv=ld.stacked([f"{b}attn_{p}.weight" for p in "qkv"], [(H, H), (kv, H), (kv, H)],
                                         [f"{b}attn_{p}.bias" for p in "qkv"]),
                          o=ld.linear(b + "attn_output.weight", (H, H), b + "attn_output.bias"),
                          ffn_norm=ld.floats(b + "ffn_norm.weight", (H,)), ffn=None)
            layer.ffn = self._dense_ffn(b, H) if c.variant == "dense" else self._moe(i, b, H, scales)
            self.layers.append(layer)
        self.norm = ld.floats("output_norm.weight", (H,))
        head = "output.weight" if "output.weight" in g else "token_embd.weight"
        self.output = ld.linear(head, (c.vocab, H))
        if head == "token_embd.weight" and (emb.qtype == T.F32 or ld.in_place(head)):
            ld.mapped -= emb.nbytes  # token_embd counted once
        self.inv_freq = (np.float32(1.0) / np.float32(c.rope_base) ** (
            np.arange(0, c.head_dim, 2, dtype=np.float32) / np.float32(c.head_dim))).astype(np.float32)
        self.unused_bytes = sum(t.nbytes for n, t in g.infos.items() if n not in ld.used)
        if emb.qtype not in FLOAT_NATIVE:
            ld.notices.append(f"token_embd.weight: {emb.qtype.name} has no kernel here; rows converted to F32 as read")
        self.embed([0])  # the embedding type decodes (checked at load, not at the first token)

    def _dense_ffn(self, b: str, H: int) -> FFN:
        F = self.g.shape(b + "ffn_gate.weight")[0]
        ld = self.loader
        return FFN(ld.stacked([b + "ffn_gate.weight", b + "ffn_up.weight"], [(F, H), (F, H)], [None, None]),
                   ld.linear(b + "ffn_down.weight", (H, F)))

    def _moe(self, i: int, b: str, H: int, scales: dict) -> MoE:
        c, ld, g = self.c, self.loader, self.g
        router, experts, shared = None, [], None
        if i in c.moe_layers:
            E = c.experts
            router = ld.floats(b + "ffn_gate_inp.weight", (E, H))
            F = g.shape(b + "ffn_gate_exps.weight")[1]
            shapes = {"gate": (E, F, H), "up": (E, F, H), "down": (E, H, F)}
            if c.variant == "mote" and ld.kernel != "numpy":  # C kernels: gate and up share one quantisation
                gate, up, down = (ld.ternary_matrices(f"{b}ffn_{p}_exps.weight", shapes[p], scales[(i, p)],
                                                      ternary_family(ld.kernel, *shapes[p][1:])) for p in PROJS)
                experts = TernaryExperts(gate, up, down, c.act_eps)
            elif c.variant == "mote":  # an expert's gate and up: one int8 matrix [2F, H], a scale per half
                gu = np.empty((E, 2 * F, H), np.int8)
                gu[:, :F] = ld.ternary(f"{b}ffn_gate_exps.weight", shapes["gate"], scales[(i, "gate")])
                gu[:, F:] = ld.ternary(f"{b}ffn_up_exps.weight", shapes["up"], scales[(i, "up")])
                down = ld.ternary(f"{b}ffn_down_exps.weight", shapes["down"], scales[(i, "down")])
                form, eps = ld.codes_form, c.act_eps
                for e in range(E):
                    s = np.repeat(np.stack([scales[(i, "gate")][e], scales[(i, "up")][e]]), F)
                    experts.append(FFN(Fused(TernaryLinear(gu[e], s, eps, form), [F, F]),
                                       TernaryLinear(down[e], scales[(i, "down")][e], eps, form)))
            else:  # MoE-LLaVA: full-precision experts (F32 ones used in place, one product each)
                names = [f"{b}ffn_{p}_exps.weight" for p in PROJS]
                if all(ld.in_place(n) for n in names):  # C kernels on the file's bytes, one view per expert
                    raw = {p: (ld.mapped_view(n, shapes[p]), g.info(n).qtype) for n, p in zip(names, PROJS)}
                    per = {p: raw[p][0].nbytes // E for p in PROJS}
                    view = {p: [raw[p][0][e * per[p]:(e + 1) * per[p]] for e in range(E)] for p in PROJS}
                    experts = [FFN(FloatGroup([(view["gate"][e], raw["gate"][1], F, None),
                                               (view["up"][e], raw["up"][1], F, None)], H),
                                   FloatOne(view["down"][e], raw["down"][1], H, F)) for e in range(E)]
                elif g.info(names[0]).qtype == T.F32 or g.info(names[1]).qtype == T.F32:
                    gate, up = (ld.floats(n, shapes[p]) for n, p in zip(names[:2], PROJS[:2]))
                    gate_up = [Separate([FloatLinear(gate[e]), FloatLinear(up[e])]) for e in range(E)]
                else:
                    gu = np.empty((E, 2 * F, H), np.float32)
                    gu[:, :F] = ld.floats(names[0], shapes["gate"])
                    gu[:, F:] = ld.floats(names[1], shapes["up"])
                    gate_up = [Fused(FloatLinear(gu[e]), [F, F]) for e in range(E)]
                if not experts:
                    down = ld.floats(names[2], shapes["down"])
                    experts = [FFN(gate_up[e], FloatLinear(down[e])) for e in range(E)]
        if i in c.shared_layers:
            F = g.shape(b + "ffn_gate_shexp.weight")[0]
            shared = FFN(ld.stacked([b + "ffn_gate_shexp.weight", b + "ffn_up_shexp.weight"], [(F, H), (F, H)],
                                    [None, None]),
                         ld.linear(b + "ffn_down_shexp.weight", (H, F)), scale=c.shared_scale)
        return MoE(router, experts if isinstance(experts, TernaryExperts) else ExpertList(experts), c.top_k, shared)

    # ---- forward -----------------------------------------------------------------------------------------------

    def embed(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.c.vocab):
            raise MoteExportError(f"token id {int(ids.max() if ids.max() >= self.c.vocab else ids.min())} is outside "
                                  f"the vocabulary of {self.c.vocab}")
        return decode_float_rows(self.embd_raw, self.embd_type, self.c.hidden, ids)

    def new_cache(self, n_ctx: int) -> "KVCache":
        return KVCache(self.c.layers, n_ctx, self.c.kv_heads, self.c.head_dim)

    def rope_angles(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [T, 1, head_dim / 2] at positions pos [T]: made once per forward, used by every layer."""
        f = pos.astype(np.float32)[:, None] * self.inv_freq[None, :]
        return np.cos(f)[:, None, :], np.sin(f)[:, None, :]

    @staticmethod
    def _rope(x: np.ndarray, angles: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """NEOX rotation (HF rotate_half) of x [T, heads, head_dim] by rope_angles' cos and sin."""
        cos, sin = angles
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def _attention(self, i: int, layer: Layer, x: np.ndarray, cache: "KVCache", pos0: int, angles) -> np.ndarray:
        c, T_ = self.c, x.shape[0]
        nh, nkv, hd = c.heads, c.kv_heads, c.head_dim
        g = nh // nkv
        pos = np.arange(pos0, pos0 + T_)
        q, k, v = layer.qkv(x)
        q = self._rope(q.reshape(T_, nh, hd), angles)
        cache.k[i, :, :, pos0:pos0 + T_] = self._rope(k.reshape(T_, nkv, hd), angles).transpose(1, 2, 0)
        cache.v[i, :, pos0:pos0 + T_] = v.reshape(T_, nkv, hd).transpose(1, 0, 2)
        S = pos0 + T_
        K = cache.k[i, :, :, :S]  # [nkv, hd, S]: strided views the matmuls read without a copy
        V = cache.v[i, :, :S]  # [nkv, S, hd]
        qh = q.reshape(T_, nkv, g, hd).transpose(1, 2, 0, 3).reshape(nkv, g * T_, hd)
        scores = (qh @ K) * np.float32(1.0 / np.sqrt(hd))  # [nkv, g*T, S]
        scores = scores.reshape(nkv, g, T_, S)
        if T_ > 1:  # causal: query t (position pos0 + t) sees keys 0..pos0 + t
            scores = np.where(np.arange(S)[None, :] <= pos[:, None], scores, np.float32(-np.inf))
        probs = softmax(scores).reshape(nkv, g * T_, S)
        out = (probs @ V).reshape(nkv, g, T_, hd).transpose(2, 0, 1, 3).reshape(T_, nh * hd)
        return layer.o(out)

    def forward(self, h: np.ndarray, cache: "KVCache", pos0: int, logits: str = "last") -> np.ndarray:
        """Hidden states h [T, H] (embeddings) at positions pos0.. -> logits of the last position [V]
        (logits="last"), of every position [T, V] ("all"), or the final hidden states ("none")."""
        c = self.c
        if pos0 + h.shape[0] > cache.n_ctx:
            raise MoteExportError(f"{pos0 + h.shape[0]} tokens do not fit the context of {cache.n_ctx} (--n-ctx)")
        outs = []
        for start in range(0, h.shape[0], PREFILL_CHUNK):
            x = np.ascontiguousarray(h[start:start + PREFILL_CHUNK], np.float32)
            p = pos0 + start
            angles = self.rope_angles(np.arange(p, p + x.shape[0]))
            for i, layer in enumerate(self.layers):
                x = x + self._attention(i, layer, rms_norm(x, layer.attn_norm, c.rms_eps), cache, p, angles)
                x = x + layer.ffn(rms_norm(x, layer.ffn_norm, c.rms_eps))
            outs.append(x)
        cache.n = pos0 + h.shape[0]
        x = np.concatenate(outs) if len(outs) > 1 else outs[0]
        if logits == "none":
            return x
        if logits == "last":
            x = x[-1:]
        y = self.output(rms_norm(x, self.norm, c.rms_eps))
        return y[0] if logits == "last" else y


class KVCache:
    """float32 keys [layers, kv_heads, head_dim, n_ctx] and values [layers, kv_heads, n_ctx, head_dim]: the
    layouts q @ K and p @ V read as they are (a decode step then copies nothing); n = positions filled."""

    def __init__(self, layers: int, n_ctx: int, kv_heads: int, head_dim: int):
        self.n_ctx, self.n = n_ctx, 0
        self.k = np.zeros((layers, kv_heads, head_dim, n_ctx), np.float32)
        self.v = np.zeros((layers, kv_heads, n_ctx, head_dim), np.float32)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

"""The GPU engine (`mote-run model.gguf --engine cuda`): the two GGUF files mote-export writes (the same
files every other engine reads), run on a torch device with the W2A8 kernels for the ternary experts.

    m = CudaModel("model.gguf")                         # CUDA (sm_80+), bf16 float weights, Triton kernels
    m = CudaModel("model.gguf", device="cpu", kernel="torch")   # CPU, fp32: the tests' mode
    m.answer("cat.png", "What colour is the square?") / m.ask(...) / m.stream(...)   (as MoteModel)
    m.logits(ids) -> [T, vocab] teacher-forced (text only); m.image_embeddings(image) -> [n, hidden]

What runs where (the model semantics of runtime_cpu/llm.py and vision.py, which mirror mote_edge):
  weights   read tensor by tensor from the mapping (runtime_cpu.gguf_model, quants' decoders) and placed once:
            float matrices in the compute dtype, the router / norms / biases in fp32; each routed expert matrix
            checked exactly as runtime_cpu.quants.decode_ternary checks it and repacked once with
            w2a8.pack_gguf_ternary into 2-bit words (16 codes an int32, 2.0 bpw). token_embd stays on the host:
            a token's row is decoded from the mapping and copied up (no GPU bytes for a 150k-row table).
            engine_memory.py plans exactly these bytes from the headers.
  compute   residual stream, RMSNorm, RoPE (NEOX, the file's rope.freq_base), softmax and the router in fp32;
            q/k/v, attention output, shared expert, dense FFN, float experts and the head as torch matmuls in
            the compute dtype with fp32 results; attention with torch SDPA (GQA, causal) over a preallocated
            KV cache [layers, kv_heads, n_ctx, head_dim] in the compute dtype; routed experts as MoTE computes
            them: per-token int8 activations x ternary codes in int32, scaled by amax / 127 and the matrix
            scale (w2a8), gate and up on one quantisation, silu(g) * u quantised again for down.
  routing   softmax over all experts, top-k by a stable sort (ties: lower index), no renormalisation, on the
            device. Decode (one token): the chosen expert ids are read once per MoE layer (one small
            device-to-host copy; every launch after it needs them) and each chosen expert runs the W2A8
            linear (GEMV for M <= 4); prefill: tokens sorted by expert, every expert of a layer in one
            grouped launch per projection (w2a8_grouped, offsets on the device), summed back in expert order.
  dtype     bf16 on CUDA (half the bytes of fp32; a decode reads every float weight once per token), fp32 on
            CPU. Parity cost, measured on the embedded tiny MoTE (tests/test_cuda_engine.py, 45 teacher-forced
            positions, mean |logit| 2.8): fp32 is within 1.2e-3 (mean 2e-5) of the mote CPU engine and of
            PyTorch; bf16 within 0.071 (mean 0.009: f16 file values rounded to bf16, bf16 inputs to each
            matmul), the same top-1 at every position and the same greedy answers.
  kernels   "triton" (w2a8's kernels; the CUDA default, and on CPU under TRITON_INTERPRET=1 at tiny shapes)
            or "torch" (w2a8's integer references: the same arithmetic in torch ops, the CPU default).

Bad input is one `error:` line: no torch / triton, no GPU or one below sm_80, a model that does not fit GPU
memory (planned from the headers, checked against --memory-limit by mote-run and against
torch.cuda.mem_get_info here, both before the first allocation).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from ..exporters.errors import MoteExportError
from ..exporters.gguf_file import mmproj_path
from ..exporters.units import human
from ..runtime_cpu.gguf_model import GGUFModel
from ..runtime_cpu.images import load_rgb
from ..runtime_cpu.llm import PROJS, LLMConfig, _ternary_scales, read_config
from ..runtime_cpu.quants import decode_float, decode_float_rows
from ..runtime_cpu.records import IMAGE_PLACEHOLDER
from ..runtime_cpu.sampling import sample
from ..runtime_cpu.generate import Answering, generate
from ..runtime_cpu.tokenize import GGUFTokenizer
from .engine_memory import PREFILL_CHUNK, format_plan, plan_gpu

DEVICES = ("auto", "cuda", "cpu")
KERNELS = ("auto", "triton", "torch")
MOE_DECODE = ("gemv", "grouped")  # how a decode token reaches its experts (MoE.__call__)
DTYPES = ("bfloat16", "float32")
GPU_EXTRA = "pip install 'mote-edge[gpu]'"

# torch and the W2A8 module are imported on first use (_torch, _w2a8), so that a machine without them
# gets one error line from mote-run --engine cuda, and the other engines never import them
torch = F = W = None


def _torch():
    global torch, F
    if torch is None:
        try:
            import torch as _t
            import torch.nn.functional as _f
        except ImportError:
            raise MoteExportError(f"--engine cuda needs torch and triton (the gpu extra): {GPU_EXTRA}") from None
        torch, F = _t, _f
    return torch


def _w2a8():
    global W
    if W is None:
        _torch()
        try:
            import triton  # noqa: F401
        except ImportError:
            raise MoteExportError("--engine cuda needs triton (3.6 or 3.7: the W2A8 kernels and their 2-bit packing): "
                                  f"{GPU_EXTRA}") from None
        from . import w2a8 as _w

        W = _w
    return W


def resolve_device(device: str = "auto"):
    """The torch device to run on: CUDA (sm_80 or newer) for "auto" / "cuda", the CPU for "cpu"."""
    t = _torch()
    if device not in DEVICES:
        raise MoteExportError(f"device {device!r} for --engine cuda; accepted: {', '.join(DEVICES)}")
    if device == "cpu":
        return t.device("cpu")
    if not t.cuda.is_available():
        raise MoteExportError(f"--engine cuda needs a CUDA GPU (sm_80 or newer) and torch {t.__version__} sees none "
                              f"(CUDA build: {t.version.cuda}); --engine mote runs the same files on the CPU")
    dev = t.device("cuda", t.cuda.current_device())
    cap = t.cuda.get_device_capability(dev)
    if cap < (8, 0):
        raise MoteExportError(f"--engine cuda needs sm_80 or newer (int8 tensor cores, bf16: the W2A8 kernels' "
                              f"targets); {t.cuda.get_device_name(dev)} is sm_{cap[0]}{cap[1]}")
    return dev


def resolve_kernel(kernel: str, dev) -> str:
    """triton on CUDA and torch on the CPU for "auto"; Triton on the CPU only under its interpreter."""
    if kernel not in KERNELS:
        raise MoteExportError(f"--kernel {kernel!r} for --engine cuda; accepted: {', '.join(KERNELS)}")
    if kernel == "auto":
        return "triton" if dev.type == "cuda" else "torch"
    if kernel == "triton" and dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise MoteExportError("--kernel triton on the CPU runs only under Triton's interpreter: set TRITON_INTERPRET=1 "
                              "before the run (or use --kernel torch)")
    return kernel


# ---- the W2A8 arithmetic: Triton kernels, or w2a8's torch integer references ------------------------------------

class TritonW2A8:
    """w2a8's kernels: per-token int8 quantisation, W2A8 linear (GEMV / GEMM by M), grouped experts."""
    name = "triton"

    def quantize(self, x):
        return W.quantize_act(x)

    def linear(self, a, w):
        return W.w2a8_linear(a, w, out_dtype=torch.float32)

    def grouped(self, a, w, offs):
        return W.w2a8_grouped(a, w, offs, out_dtype=torch.float32)


class TorchW2A8:
    """The same arithmetic in torch ops (w2a8's references: exact int32 dot, the kernels' fp32 epilogue
    order), read from the same packed words: the engine's loading, routing, cache and sampling are tested on
    CPU with it, and the Triton kernels against it."""
    name = "torch"

    def quantize(self, x):
        return W.QuantizedAct(*W.ref_quantize_act(x))

    def linear(self, a, w):
        return W.ref_epilogue(W.ref_int_dot(a.xq, W.unpack_w2(w.words, w.k)), a.xs, w.scales)

    def grouped(self, a, w, offs):
        out = torch.empty((a.xq.shape[0], w.n), dtype=torch.float32, device=a.xq.device)
        bounds = offs.tolist()
        for e in range(w.words.shape[0]):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                out[lo:hi] = W.ref_epilogue(W.ref_int_dot(a.xq[lo:hi], W.unpack_w2(w.words[e], w.k)), a.xs[lo:hi],
                                            w.scales[e])
        return out


def expert_view(w, e: int):
    """Matrix e of stacked PackedTernary words [E, N, KW] (views: no copy)."""
    return W.PackedTernary(w.words[e], w.scales[e:e + 1], w.k)


# ---- where weights come from: a GGUF file, or random values at a shape (device_check) -------------------------

class GGUFWeights:
    """Tensors of a GGUF file decoded on the host one at a time and placed on the device; counts what it places."""

    def __init__(self, g: GGUFModel, dev, dtype):
        self.g, self.dev, self.dtype = g, dev, dtype
        self.placed = {}  # kind -> bytes on the device

    def __contains__(self, name: str) -> bool:
        return name in self.g

    def shape(self, name: str) -> tuple[int, ...]:
        return self.g.shape(name)

    def _new(self, kind: str, shape, dtype):
        t = torch.empty(shape, dtype=dtype, device=self.dev)
        self.placed[kind] = self.placed.get(kind, 0) + t.numel() * t.element_size()
        return t

    def _host(self, name: str, shape) -> "torch.Tensor":
        t = self.g.require(name, shape)
        arr = decode_float(self.g.raw(name), t.qtype, tuple(shape), name)
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy())

    def matrices(self, names: list[str], shapes: list[tuple[int, int]], kind: str = "float matrices"):
        """Matrices on the same input (q/k/v, gate/up) stacked by rows into one, in the compute dtype."""
        out = self._new(kind, (sum(s[0] for s in shapes), shapes[0][1]), self.dtype)
        row = 0
        for n, s in zip(names, shapes):
            out[row:row + s[0]].copy_(self._host(n, s).to(self.dtype))  # converted on the host: no fp32 on the device
            row += s[0]
        return out

    def vectors(self, names: list[str], shapes: list[tuple[int, ...]], kind: str = "fp32 vectors"):
        """Norm weights, biases, the router (stacked like matrices), in fp32."""
        out = self._new(kind, (sum(s[0] for s in shapes), *shapes[0][1:]), torch.float32)
        row = 0
        for n, s in zip(names, shapes):
            out[row:row + s[0]].copy_(self._host(n, s))
            row += s[0]
        return out

    def ternary(self, name: str, shape: tuple[int, int, int], scales: np.ndarray):
        """Stacked ternary matrices [E, N, K] -> PackedTernary words [E, N, ceil(K / 16)] + fp32 scales [E]:
        each matrix checked (quants.decode_ternary, inside pack_gguf_ternary) and packed on the host, one at a
        time, then copied up."""
        t = self.g.require(name, shape)
        E, N, K = shape
        raw = self.g.raw(name).reshape(E, -1)
        words = self._new("ternary 2-bit words", (E, N, -(-K // W.CODES_PER_WORD)), torch.int32)
        for e in range(E):
            words[e].copy_(W.pack_gguf_ternary(raw[e], t.qtype, (N, K), scales[e:e + 1], name).words)
        s = self._new("ternary 2-bit words", (E,), torch.float32)
        s.copy_(torch.from_numpy(np.asarray(scales, np.float32)))
        self.g.release(name)
        return W.PackedTernary(words, s, K)

    def float_experts(self, names: list[str], shapes: list[tuple[int, int, int]]):
        """MoE-LLaVA's full-precision experts [E, N, K] (gate and up stacked along N) in the compute dtype."""
        E, _, K = shapes[0]
        out = self._new("float experts", (E, sum(s[1] for s in shapes), K), self.dtype)
        row = 0
        for n, s in zip(names, shapes):
            out[:, row:row + s[1]].copy_(self._host(n, s).to(self.dtype))
            row += s[1]
        return out

    def embed_rows(self, ids: np.ndarray) -> np.ndarray:
        t = self.g.info("token_embd.weight")
        return decode_float_rows(self.g.raw("token_embd.weight"), t.qtype, t.dims[0], ids)


class RandomWeights:
    """Random tensors at a model's shapes, made on the device (device_check times decode at real shapes without
    writing files): N(0, 0.02) matrices, unit norms, zero biases, uniform ternary codes with scale 0.02."""

    def __init__(self, c: LLMConfig, ffn: int, dev, dtype, seed: int = 0):
        self.c, self.ffn, self.dev, self.dtype = c, ffn, dev, dtype
        self.gen = torch.Generator(device=dev).manual_seed(seed)
        self.placed = {}

    def __contains__(self, name: str) -> bool:
        return name != "output.weight"  # tied: the head is token_embd's matrix, as Qwen2.5 ties it

    def shape(self, name: str) -> tuple[int, ...]:
        c, F_ = self.c, self.ffn
        if "_exps." in name:
            return (c.experts, c.hidden, F_) if "down" in name else (c.experts, F_, c.hidden)
        if "_shexp." in name:
            return (c.hidden, F_) if "down" in name else (F_, c.hidden)
        raise KeyError(name)

    def _count(self, kind: str, t):
        self.placed[kind] = self.placed.get(kind, 0) + t.numel() * t.element_size()
        return t

    def matrices(self, names, shapes, kind: str = "float matrices"):
        shape = (sum(s[0] for s in shapes), shapes[0][1])
        t = torch.randn(shape, generator=self.gen, device=self.dev, dtype=torch.float32).mul_(0.02).to(self.dtype)
        return self._count(kind, t)

    def vectors(self, names, shapes, kind: str = "fp32 vectors"):
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        if len(shape) > 1:  # the router
            t = torch.randn(shape, generator=self.gen, device=self.dev, dtype=torch.float32)
        else:
            t = torch.ones(shape, device=self.dev) if "norm" in names[0] else torch.zeros(shape, device=self.dev)
        return self._count(kind, t)

    def ternary(self, name, shape, scales):
        codes = torch.randint(-1, 2, shape, generator=self.gen, device=self.dev, dtype=torch.int8)
        p = W.PackedTernary.from_codes(codes, torch.full(shape[:1], 0.02))
        self._count("ternary 2-bit words", p.words)
        self._count("ternary 2-bit words", p.scales)
        return p

    def float_experts(self, names, shapes):
        raise MoteExportError("RandomWeights makes MoTE models only")

    def embed_rows(self, ids: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(ids.tolist())
        return rng.normal(0, 1, size=(len(ids), self.c.hidden)).astype(np.float32)


# ---- the language model ---------------------------------------------------------------------------------------

class Linear:
    """y = x @ w.T (+ b): w in the compute dtype, x cast to it, the result and bias in fp32."""

    def __init__(self, w, b=None):
        self.w, self.b = w, b

    def __call__(self, x):
        y = F.linear(x.to(self.w.dtype), self.w).float()
        return y + self.b if self.b is not None else y


class GLU:
    """SwiGLU down(silu(gate(x)) * up(x)) of float matrices (gate and up stacked), times `scale` (a power of two)."""

    def __init__(self, gate_up: Linear, down: Linear, scale: float = 1.0):
        self.gate_up, self.down, self.scale = gate_up, down, float(scale)

    def __call__(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        y = self.down(F.silu(g) * u)
        return y * self.scale if self.scale != 1 else y


class TernaryExperts:
    """A layer's routed experts as PackedTernary gate / up / down [E, ...] and the W2A8 arithmetic."""

    def __init__(self, gate, up, down, kernels):
        self.all = (gate, up, down)
        self.views = [tuple(expert_view(w, e) for w in self.all) for e in range(gate.words.shape[0])]
        self.k = kernels

    def decode(self, x, probs, chosen: list[int]):
        """One token: each chosen expert (index order) on the one quantisation of x, weighted by its prob."""
        K = self.k
        a = K.quantize(x)
        out = torch.zeros_like(x)
        for e in chosen:
            gate, up, down = self.views[e]
            h = F.silu(K.linear(a, gate)) * K.linear(a, up)
            out += K.linear(K.quantize(h), down) * probs[0, e]
        return out

    def prefill(self, x, probs, top):
        """Many tokens: the (token, expert) slots sorted by expert, each projection one grouped launch."""
        K = self.k
        E = len(self.views)
        flat = top.reshape(-1)
        order = torch.sort(flat, stable=True).indices  # by expert, tokens in order within each
        tok, exp = order // top.shape[1], flat[order]
        # expert e's rows start where the sorted ids reach e: no host read (bincount's size would need one)
        offs = torch.searchsorted(exp, torch.arange(E + 1, device=x.device, dtype=exp.dtype)).to(torch.int32)
        gate, up, down = self.all
        a = K.quantize(x[tok])
        h = F.silu(K.grouped(a, gate, offs)) * K.grouped(a, up, offs)
        y = K.grouped(K.quantize(h), down, offs)
        # index_add_ in slot order adds each token's experts in index order (as the mote engine sums them)
        return torch.zeros_like(x).index_add_(0, tok, y * probs[tok, exp][:, None])


class FloatExperts:
    """MoE-LLaVA's full-precision experts: a GLU per expert on views of the stacked matrices."""

    def __init__(self, gate_up, down):
        self.glus = [GLU(Linear(gate_up[e]), Linear(down[e])) for e in range(gate_up.shape[0])]

    def decode(self, x, probs, chosen: list[int]):
        out = torch.zeros_like(x)
        for e in chosen:
            out += self.glus[e](x) * probs[0, e]
        return out

    def prefill(self, x, probs, top):
        out = torch.zeros_like(x)
        for e, glu in enumerate(self.glus):
            tok = (top == e).any(dim=-1).nonzero()[:, 0]
            if tok.numel():
                out.index_add_(0, tok, glu(x[tok]) * probs[tok, e][:, None])
        return out


class MoE:
    """Router + routed experts (+ shared expert): p = softmax(router(x)), top-k of p, no renormalisation.

    A decode token reaches its experts one of two ways (`decode`, mote-run --moe-decode): "gemv" reads
    the chosen ids back to the host (one small copy and a stream sync per MoE layer) and launches the
    GEMV kernels per expert; "grouped" runs the prefill path on one token, the grouped kernels on offsets
    computed on the device, so a decode step never waits for the host (ternary experts; the float experts
    of MoE-LLaVA pick their tokens with nonzero, which syncs). Same sums in the same order: bit-identical."""

    def __init__(self, router, experts, top_k: int, shared: GLU | None, decode: str = "gemv"):
        self.router, self.experts, self.top_k, self.shared, self.decode = router, experts, top_k, shared, decode

    def __call__(self, x):
        out = None
        if self.router is not None:
            probs = torch.softmax(x @ self.router.T, dim=-1)
            top = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :self.top_k]
            if x.shape[0] == 1 and self.decode == "gemv":  # the launches need the chosen ids on the host
                out = self.experts.decode(x, probs, sorted(top[0].tolist()))
            else:
                out = self.experts.prefill(x, probs, top)
        if self.shared is not None:
            out = self.shared(x) if out is None else out + self.shared(x)
        return torch.zeros_like(x) if out is None else out


class Layer:
    def __init__(self, attn_norm, qkv: Linear, o: Linear, ffn_norm, ffn):
        self.attn_norm, self.qkv, self.o, self.ffn_norm, self.ffn = attn_norm, qkv, o, ffn_norm, ffn


def rms_norm(x, w, eps: float):
    """Qwen2RMSNorm in fp32, the mote engine's op order: w * (x / sqrt(mean(x^2) + eps))."""
    return w * (x / torch.sqrt(x.square().mean(dim=-1, keepdim=True) + eps))


class CudaLLM:
    """The language model on the device, with its KV cache (n_ctx positions) and RoPE tables."""

    def __init__(self, c: LLMConfig, src, dev, dtype, kernels, n_ctx: int, scales: dict | None = None,
                 progress: bool = False, moe_decode: str = "gemv"):
        from tqdm import tqdm

        self.c, self.src, self.dev, self.dtype, self.n_ctx = c, src, dev, dtype, n_ctx
        self.moe_decode = moe_decode
        H, kv = c.hidden, c.kv_heads * c.head_dim
        self.layers = []
        for i in tqdm(range(c.layers), desc="cuda engine: placing layers", unit="layer", disable=not progress,
                      file=sys.stderr):
            b = f"blk.{i}."
            qkv_shapes = [(H, H), (kv, H), (kv, H)]
            biases = [f"{b}attn_{p}.bias" for p in "qkv"]
            if any(n in src for n in biases) and not all(n in src for n in biases):
                raise MoteExportError(f"blk.{i}: some of attn_q/k/v.bias are missing; Qwen2 has all three or none")
            qkv = Linear(src.matrices([f"{b}attn_{p}.weight" for p in "qkv"], qkv_shapes),
                         src.vectors(biases, [s[:1] for s in qkv_shapes]) if biases[0] in src else None)
            o = Linear(src.matrices([b + "attn_output.weight"], [(H, H)]),
                       src.vectors([b + "attn_output.bias"], [(H,)]) if b + "attn_output.bias" in src else None)
            ffn = self._dense(b, H) if c.variant == "dense" else self._moe(i, b, H, kernels, scales or {})
            self.layers.append(Layer(src.vectors([b + "attn_norm.weight"], [(H,)]), qkv, o,
                                     src.vectors([b + "ffn_norm.weight"], [(H,)]), ffn))
        self.norm = src.vectors(["output_norm.weight"], [(H,)])
        head = "output.weight" if "output.weight" in src else "token_embd.weight"
        self.output = Linear(src.matrices([head], [(c.vocab, H)], kind="output head"))
        # NEOX RoPE tables, computed as the mote engine computes its angles (fp32 numpy), then placed
        inv = (np.float32(1.0) / np.float32(c.rope_base) ** (
            np.arange(0, c.head_dim, 2, dtype=np.float32) / np.float32(c.head_dim))).astype(np.float32)
        f = np.arange(n_ctx, dtype=np.float32)[:, None] * inv[None, :]
        self.cos = torch.from_numpy(np.cos(f)).to(dev)
        self.sin = torch.from_numpy(np.sin(f)).to(dev)
        shape = (c.layers, c.kv_heads, n_ctx, c.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=dev)
        self.v = torch.zeros(shape, dtype=dtype, device=dev)

    def _dense(self, b: str, H: int) -> GLU:
        F_ = self.src.shape(b + "ffn_gate.weight")[0]
        src = self.src
        return GLU(Linear(src.matrices([b + "ffn_gate.weight", b + "ffn_up.weight"], [(F_, H), (F_, H)])),
                   Linear(src.matrices([b + "ffn_down.weight"], [(H, F_)])))

    def _moe(self, i: int, b: str, H: int, kernels, scales: dict) -> MoE:
        c, src = self.c, self.src
        router = experts = shared = None
        if i in c.moe_layers:
            E = c.experts
            router = src.vectors([b + "ffn_gate_inp.weight"], [(E, H)], kind="routers (fp32)")
            F_ = src.shape(b + "ffn_gate_exps.weight")[1]
            shapes = {"gate": (E, F_, H), "up": (E, F_, H), "down": (E, H, F_)}
            names = {p: f"{b}ffn_{p}_exps.weight" for p in PROJS}
            if c.variant == "mote":
                experts = TernaryExperts(*(src.ternary(names[p], shapes[p], scales.get((i, p))) for p in PROJS),
                                         kernels)
            else:
                gu = src.float_experts([names["gate"], names["up"]], [shapes["gate"], shapes["up"]])
                experts = FloatExperts(gu, src.float_experts([names["down"]], [shapes["down"]]))
        if i in c.shared_layers:
            F_ = src.shape(b + "ffn_gate_shexp.weight")[0]
            shared = GLU(Linear(src.matrices([b + "ffn_gate_shexp.weight", b + "ffn_up_shexp.weight"],
                                             [(F_, H), (F_, H)], kind="shared experts")),
                         Linear(src.matrices([b + "ffn_down_shexp.weight"], [(H, F_)], kind="shared experts")),
                         scale=c.shared_scale)
        return MoE(router, experts, c.top_k, shared, decode=self.moe_decode)

    # ---- forward ------------------------------------------------------------------------------------------------

    def embed(self, ids):
        """Token embeddings (rows decoded on the host from the mapping) as fp32 on the device."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.c.vocab):
            raise MoteExportError(f"token id {int(ids.max() if ids.max() >= self.c.vocab else ids.min())} is outside "
                                  f"the vocabulary of {self.c.vocab}")
        return torch.from_numpy(self.src.embed_rows(ids)).to(self.dev)

    def _rope(self, x, pos0: int):
        """NEOX rotation (HF rotate_half) of x [T, heads, head_dim] at positions pos0.."""
        T_ = x.shape[0]
        cos, sin = self.cos[pos0:pos0 + T_, None, :], self.sin[pos0:pos0 + T_, None, :]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def _attention(self, i: int, layer: Layer, x, pos0: int):
        c, T_ = self.c, x.shape[0]
        nh, nkv, hd = c.heads, c.kv_heads, c.head_dim
        q, k, v = layer.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = self._rope(q.reshape(T_, nh, hd), pos0)
        self.k[i, :, pos0:pos0 + T_] = self._rope(k.reshape(T_, nkv, hd), pos0).transpose(0, 1).to(self.dtype)
        self.v[i, :, pos0:pos0 + T_] = v.reshape(T_, nkv, hd).transpose(0, 1).to(self.dtype)
        S = pos0 + T_
        mask, causal = None, False
        if T_ > 1 and pos0 == 0:
            causal = True
        elif T_ > 1:  # a later chunk: query t (position pos0 + t) sees keys 0..pos0 + t
            pos = torch.arange(pos0, S, device=self.dev)
            mask = torch.arange(S, device=self.dev)[None, :] <= pos[:, None]
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None].to(self.dtype), self.k[i, :, :S][None],
                                             self.v[i, :, :S][None], attn_mask=mask, is_causal=causal,
                                             enable_gqa=nh != nkv)
        return layer.o(out[0].transpose(0, 1).reshape(T_, nh * hd))

    def forward(self, h, pos0: int, logits: str = "last"):
        """Hidden states h [T, H] (fp32, on the device) at positions pos0.. -> logits of the last position [V]
        ("last"), of every position [T, V] ("all"), or the final hidden states ("none")."""
        c = self.c
        if pos0 + h.shape[0] > self.n_ctx:
            raise MoteExportError(f"{pos0 + h.shape[0]} tokens do not fit the context of {self.n_ctx} (--n-ctx)")
        outs = []
        for start in range(0, h.shape[0], PREFILL_CHUNK):
            x = h[start:start + PREFILL_CHUNK].float()
            p = pos0 + start
            for i, layer in enumerate(self.layers):
                x = x + self._attention(i, layer, rms_norm(x, layer.attn_norm, c.rms_eps), p)
                x = x + layer.ffn(rms_norm(x, layer.ffn_norm, c.rms_eps))
            outs.append(x)
        x = torch.cat(outs) if len(outs) > 1 else outs[0]
        if logits == "none":
            return x
        if logits == "last":
            x = x[-1:]
        y = self.output(rms_norm(x, self.norm, c.rms_eps))
        return y[0] if logits == "last" else y

    @property
    def kv_cache_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


# ---- the vision tower and connector ---------------------------------------------------------------------------

class CudaVision:
    """The mmproj's SigLIP tower and GELU connector, read and checked by runtime_cpu.vision.Vision (the mote
    engine's reader), then placed on the device: matrices in the compute dtype, norms and biases in fp32."""

    def __init__(self, v, dev, dtype):
        from ..runtime_cpu.kernels import gelu_tanh

        self.dev, self.placed = dev, 0
        self.size, self.patch, self.n_side, self.d = v.size, v.patch, v.n_side, v.d
        self.heads, self.eps = v.heads, v.eps
        self.mean, self.std, self.layers, self.n_tokens, self.out_dim = v.mean, v.std, v.layers, v.n_tokens, v.out_dim
        self.tanh = v.act is gelu_tanh
        put = lambda a: self._put(a, dtype if a.ndim >= 2 else torch.float32)  # noqa: E731
        lin = lambda fl: Linear(put(fl.w), None if fl.b is None else put(fl.b))  # noqa: E731
        self.patch_embd = Linear(put(v.patch_w), None if v.patch_b is None else put(v.patch_b))
        self.pos = put(v.pos)
        self.blocks = [{"ln1": tuple(put(a) for a in blk["ln1"]), "ln2": tuple(put(a) for a in blk["ln2"]),
                        **{k: lin(blk[k]) for k in ("q", "k", "v", "o", "up", "down")}} for blk in v.blocks]
        self.mm0, self.mm2 = lin(v.mm0), lin(v.mm2)

    def _put(self, a: np.ndarray, dtype):
        t = torch.from_numpy(np.array(a, np.float32)).to(dtype).to(self.dev)  # a copy: F32 arrays view the mapping
        self.placed += t.numel() * t.element_size()
        return t

    def pixels(self, image) -> np.ndarray:
        """Normalised float32 [3, size, size], as runtime_cpu.vision.Vision.pixels (the HF processor's)."""
        u8 = load_rgb(image, self.size)
        x = (u8.astype(np.float64) / 255.0 - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)

    def _act(self, x):
        return F.gelu(x, approximate="tanh") if self.tanh else x * torch.sigmoid(1.702 * x)

    def encode(self, image):
        """image -> embeddings [n_tokens, LLM width], fp32 on the device."""
        p, s, d = self.patch, self.n_side, self.d
        px = torch.from_numpy(self.pixels(image)).to(self.dev)
        patches = px[:, :s * p, :s * p].reshape(3, s, p, s, p).permute(1, 3, 0, 2, 4).reshape(s * s, 3 * p * p)
        x = self.patch_embd(patches) + self.pos.float()
        hidden = [x]
        n, hd = x.shape[0], d // self.heads
        for blk in self.blocks:
            y = F.layer_norm(x, (d,), *blk["ln1"], eps=self.eps)
            q, k, v = (blk[w](y).reshape(n, self.heads, hd).transpose(0, 1)[None].to(self.pos.dtype) for w in "qkv")
            att = F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1).reshape(n, d)
            x = x + blk["o"](att)
            x = x + blk["down"](self._act(blk["up"](F.layer_norm(x, (d,), *blk["ln2"], eps=self.eps))))
            hidden.append(x)
        feats = torch.cat([hidden[k] for k in self.layers], dim=-1)
        return self.mm2(F.gelu(self.mm0(feats)))  # HF LLaVA's connector GELU: erf


# ---- the model pair -------------------------------------------------------------------------------------------

def check_device_memory(plan: dict, dev) -> None:
    """Refuse, before the first allocation, a model whose planned device bytes exceed what the GPU has free."""
    if dev.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(dev)
    if plan["device_bytes"] > free:
        raise MoteExportError(f"the model needs {human(plan['device_bytes'])} of GPU memory as planned "
                              f"({format_plan(plan)}) but {torch.cuda.get_device_name(dev)} has {human(free)} free of "
                              f"{human(total)}; lower --n-ctx or export smaller types (mote-export --memory-budget)")


class CudaModel(Answering):
    """An LLM GGUF + its mmproj on a torch device; answers many questions (the MoteModel API)."""

    def __init__(self, model: str | Path, mmproj: str | Path | None = None, n_ctx: int | None = None,
                 device: str = "auto", kernel: str = "auto", dtype: str | None = None, vision: bool = True,
                 threads: int | None = None, progress: bool = False, moe_decode: str = "gemv"):
        for value, accepted, what in ((kernel, KERNELS, "--kernel"), (device, DEVICES, "device"),
                                      (moe_decode, MOE_DECODE, "--moe-decode")):
            if value not in accepted:  # before torch: a wrong name is the one error whatever the machine
                raise MoteExportError(f"{what} {value!r} for --engine cuda; accepted: {', '.join(accepted)}")
        t = _torch()
        _w2a8()
        self.device = resolve_device(device)
        self.kernel = resolve_kernel(kernel, self.device)
        dtype = dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        if dtype not in DTYPES:
            raise MoteExportError(f"dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
        self.dtype = getattr(t, dtype)
        if threads and self.device.type == "cpu":
            t.set_num_threads(threads)
        model = Path(model)
        if model.is_dir():
            raise MoteExportError(f"model {str(model)!r} is a folder; the cuda engine takes a model file")
        proj = Path(mmproj) if mmproj else mmproj_path(model)
        for path, what in ((model, "model"), *(((proj, "mmproj"),) if vision else ())):
            if not path.is_file():
                hint = (" (pass --mmproj, or export with mote-export, which writes <stem>-mmproj.gguf)"
                        if what == "mmproj" else "")
                raise MoteExportError(f"{what} file {str(path)!r} does not exist{hint}")
        self.gguf = GGUFModel(model)
        c = self.c = read_config(self.gguf)
        if c.variant == "mote" and np.float32(c.act_eps) != np.float32(W.EPS):
            raise MoteExportError(f"{model}: mote.activation_eps {c.act_eps}; the W2A8 kernels quantise with {W.EPS}")
        self.plan = plan_gpu(model, proj if vision else None, n_ctx, dtype)
        self.n_ctx = self.plan["n_ctx"]
        check_device_memory(self.plan, self.device)
        self.tokenizer = GGUFTokenizer(self.gguf)
        kernels = TritonW2A8() if self.kernel == "triton" else TorchW2A8()
        src = GGUFWeights(self.gguf, self.device, self.dtype)
        try:
            scales = _ternary_scales(self.gguf, c) if c.variant == "mote" else {}
            self.llm = CudaLLM(c, src, self.device, self.dtype, kernels, self.n_ctx, scales, progress, moe_decode)
            self.vision = None
            if vision:
                from ..runtime_cpu.vision import Vision

                self.vision = CudaVision(Vision(GGUFModel(proj)), self.device, self.dtype)
        except (MemoryError, t.cuda.OutOfMemoryError):
            raise MoteExportError(f"out of memory placing {model} (n_ctx {self.n_ctx}) on {self.device}; planned "
                                  f"{format_plan(self.plan)}; lower --n-ctx or export smaller types") from None
        if self.vision is not None and self.vision.out_dim != c.hidden:
            raise MoteExportError(f"{proj}: the projector gives {self.vision.out_dim}-wide embeddings; the LLM is "
                                  f"{c.hidden} wide (not this model's mmproj)")
        name = t.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.report = {"device": name, "kernel": self.kernel, "dtype": dtype, "variant": c.variant, "moe_decode": moe_decode,
                       "placed_by": dict(src.placed), "vision_bytes": self.vision.placed if self.vision else 0,
                       "llm_weights_bytes": sum(src.placed.values()), "kv_cache_bytes": self.llm.kv_cache_bytes,
                       "rope_bytes": 2 * self.llm.cos.numel() * 4, "planned_device_bytes": self.plan["device_bytes"]}

    def format_report(self) -> str:
        r = self.report
        parts = ", ".join(f"{k} {human(v)}" for k, v in sorted(r["placed_by"].items()))
        return (f"cuda engine: {r['variant']} on {r['device']} ({r['dtype']} float weights, {r['kernel']} W2A8 "
                f"kernels, {r['moe_decode']} MoE decode); "
                f"placed LLM {human(r['llm_weights_bytes'])} ({parts}), vision {human(r['vision_bytes'])}, KV cache "
                f"{human(r['kv_cache_bytes'])}; planned device memory {human(r['planned_device_bytes'])}")

    # ---- the API (MoteModel's) --------------------------------------------------------------------------------

    def _image(self, image):
        if self.vision is None:
            raise MoteExportError("this model was loaded without its mmproj (vision=False)")
        return self.vision.encode(image)

    def image_embeddings(self, image) -> np.ndarray:
        return self._image(image).cpu().numpy()

    def logits(self, ids) -> np.ndarray:
        """Teacher-forced logits [T, vocab] of token ids from position 0 (text only; T <= n_ctx)."""
        return self.llm.forward(self.llm.embed(ids), 0, logits="all").cpu().numpy()

    def prompt(self, question: str) -> str:
        """The chat template's text for one user turn with an image before the question (MoteModel.prompt)."""
        question = question.removeprefix(IMAGE_PLACEHOLDER).lstrip("\n")
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.tokenizer.render(msgs, add_generation_prompt=True)

    def prompt_embeddings(self, image, question: str):
        """Embeddings of the rendered prompt with the image's where the template put its placeholder
        (MoteModel.prompt_embeddings, on the device)."""
        text = self.prompt(question)
        pieces = text.split(IMAGE_PLACEHOLDER)
        if image is None:
            if len(pieces) != 1:
                text = text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
            return self.llm.embed(self.tokenizer.encode(text))
        if len(pieces) != 2:
            raise MoteExportError(f"the GGUF's chat template placed {len(pieces) - 1} '{IMAGE_PLACEHOLDER}' for one "
                                  "image; expected a LLaVA template that prints it for the image part")
        img = self._image(image)
        before, after = (self.llm.embed(self.tokenizer.encode(p)) for p in pieces)
        return torch.cat([before, img, after])

    def _sample(self, logits, temperature: float, top_k: int, top_p: float, rng) -> int:
        if temperature <= 0:
            return int(torch.argmax(logits))  # the first maximum, as np.argmax
        return sample(logits.cpu().numpy(), temperature, top_k, top_p, rng)

    def stream(self, image, question: str, max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0):
        """Yields (text piece, None) per generated token, then ("", "stop" | "length")."""
        rng = np.random.default_rng(seed)
        h = self.prompt_embeddings(image, question)
        if len(h) >= self.n_ctx:
            raise MoteExportError(f"the prompt ({len(h)} tokens with the image) does not fit n_ctx {self.n_ctx}")
        yield from generate(self.llm.forward(h, 0), lambda tok, pos: self.llm.forward(self.llm.embed([tok]), pos),
                            lambda lg: self._sample(lg, temperature, top_k, top_p, rng), self.tokenizer, len(h),
                            self.n_ctx, max_tokens)


# ---- decode speed at a shape (device_check) --------------------------------------------------------------------

def random_llm(layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int, n_ctx: int, device="auto",
               kernel: str = "auto", experts: int = 4, top_k: int = 1, dtype: str | None = None) -> CudaLLM:
    """A MoTE LLM (every layer MoE + shared expert) with random weights made on the device."""
    t = _torch()
    _w2a8()
    dev = resolve_device(device)
    dt = getattr(t, dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    c = LLMConfig(arch="qwen2moe", variant="mote", layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                  vocab=vocab, ctx=n_ctx, rope_base=1e6, rms_eps=1e-6, experts=experts, top_k=top_k,
                  moe_layers=tuple(range(layers)), shared_layers=tuple(range(layers)), shared_scale=1.0)
    kernels = TritonW2A8() if resolve_kernel(kernel, dev) == "triton" else TorchW2A8()
    return CudaLLM(c, RandomWeights(c, ffn, dev, dt), dev, dt, kernels, n_ctx)


def time_decode(llm: CudaLLM, prompt: int, tokens: int, warmup: int = 2) -> dict:
    """Greedy decode after a prompt of `prompt` random embeddings: tokens / s over `tokens` steps (each step:
    host embedding row, forward, argmax read back, as stream() does), and the bytes each step reads."""
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = llm.forward(torch.randn((prompt, llm.c.hidden), generator=g).to(llm.dev), 0)
    pos = prompt
    for _ in range(warmup):  # Triton compiles each decode shape on first use
        logits = llm.forward(llm.embed([int(torch.argmax(logits)) % llm.c.vocab]), pos)
        pos += 1
    if llm.dev.type == "cuda":
        torch.cuda.synchronize(llm.dev)
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = llm.forward(llm.embed([int(torch.argmax(logits)) % llm.c.vocab]), pos)
        pos += 1
    dt = time.perf_counter() - t0
    placed = llm.src.placed
    ternary = placed.get("ternary 2-bit words", 0)
    c = llm.c
    # a decode step reads every float weight, top_k / E of the routed experts and the filled KV cache
    step = sum(placed.values()) - ternary + ternary * c.top_k // max(c.experts, 1)
    step += llm.kv_cache_bytes // llm.n_ctx * (pos - tokens // 2)  # the cache filled to the middle step
    return {"tokens": tokens, "prompt": prompt, "s": dt, "tokens_per_s": tokens / dt, "bytes_per_token": step}


# ---- the engine interface of the mote-run front ------------------------------------------------------------------

NAME = "cuda"
OPTIONS = ("kernel", "device", "moe_decode")  # engine-only flags mote-run passes when given


def plan_memory(model: Path, mmproj: Path, n_ctx: int | None, kernel: str = "auto", device: str = "auto",
                moe_decode: str = "gemv") -> dict:
    """The engine's GPU memory plan from the two headers (engine_memory.plan_gpu); nothing is read or allocated."""
    if kernel not in KERNELS:
        raise MoteExportError(f"--kernel {kernel!r} for --engine cuda; accepted: {', '.join(KERNELS)}")
    if device not in DEVICES:
        raise MoteExportError(f"device {device!r} for --engine cuda; accepted: {', '.join(DEVICES)}")
    if moe_decode not in MOE_DECODE:  # (argparse checks mote-run's; this is the library call's)
        raise MoteExportError(f"--moe-decode {moe_decode!r}; accepted: {', '.join(MOE_DECODE)}")
    return plan_gpu(model, mmproj, n_ctx, "float32" if device == "cpu" else "bfloat16")


format_memory = format_plan


class Engine:
    """mote-run's view: one loaded model pair on the device, answering a question about an image, streamed."""

    def __init__(self, model: Path, mmproj: Path, n_ctx: int | None = None, threads: int | None = None, seed: int = 0,
                 kernel: str = "auto", device: str = "auto", moe_decode: str = "gemv"):
        self.model = CudaModel(model, mmproj, n_ctx=n_ctx, device=device, kernel=kernel, threads=threads,
                               progress=True, moe_decode=moe_decode)

    def stream(self, image: Path, prompt: str, max_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0):
        """The model's stream; the load report goes to stderr once the image and prompt were accepted, the
        GPU's peak allocation (against the plan) at the end."""
        m = self.model
        tokens = m.stream(image, prompt, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        first = next(tokens)
        print(m.format_report(), file=sys.stderr)
        yield first
        yield from tokens
        if m.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(m.device)
            print(f"peak GPU memory allocated: {human(peak)} (planned device memory {human(m.plan['device_bytes'])})",
                  file=sys.stderr)

"""What the GPU engine (`mote-run --engine cuda`) places in GPU memory, planned from the two GGUF headers
before anything is read or allocated; `--memory-limit` checks the total, and the engine checks the
device part against torch.cuda.mem_get_info before its first allocation. The same rules as the loader
(engine.py; tested equal to what it placed, byte for byte):

  weights    LLM: every matrix in the compute dtype (bf16 on CUDA, fp32 on CPU): q/k/v, attention output,
             shared expert, dense FFN, MoE-LLaVA's float experts, the output head; the router, norms and
             biases in fp32; ternary routed experts as 2-bit words, ceil(K / 16) int32 per row, + one fp32
             scale per matrix. token_embd stays on the host (rows decoded from the mapping per token) unless
             it is also the head (no output.weight). Zero padding the engine never reads (routers / experts
             of non-MoE layers, MoE-LLaVA's zero shared experts, ffn_gate_inp_shexp): nothing.
             mmproj: the tower blocks up to the last feature layer and the connector, matrices (patch and
             position embeddings included) in the compute dtype, norms and biases in fp32
  kv cache   keys and values in the compute dtype: 2 x layers x n_ctx x kv_heads x head_dim
  rope       cos / sin tables, fp32: n_ctx x head_dim
  workspace  one prefill chunk of u = min(n_ctx, PREFILL_CHUNK) tokens: 4 bytes x u x (3 x heads x n_ctx  scores,
             probabilities and mask if SDPA takes its math path + 16 x hidden + top_k x 7 x routed FFN
             + 5 x shared FFN) + the W2A8 split-K partials (GEMV_MAX_M x widest N, int32) + logits, and the
             vision tower: 4 x patches x (3 x patches x heads + 12 x width + 3 x ffn + 3 x connector width);
             the sum times COMPUTE_MARGIN (the caching allocator rounds and fragments)
  runtime    the CUDA context, cuBLAS and Triton workspaces: CUDA_RUNTIME (counted in the --memory-limit
             total; already taken when mem_get_info is read, so not in the device check)
Host memory (the mapped files, one tensor's decode at a time) is not GPU memory and is not counted.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..exporters.errors import MoteExportError
from ..exporters.gguf_header import read_gguf_header
from ..exporters.units import MIB, human
from ..runtime_cpu.llama_memory import default_n_ctx
from ..runtime_cpu.mote_memory import tensor_roles

PREFILL_CHUNK = 512  # tokens per forward pass of a long prompt (as the mote engine): bounds the workspace
CODES_PER_WORD = 16  # w2a8.CODES_PER_WORD (not imported: the plan must not need triton)
GEMV_MAX_M = 4  # w2a8.GEMV_MAX_M: the split-K partials of a decode GEMV are at most this many rows
CUDA_RUNTIME = 512 * MIB
COMPUTE_MARGIN = 1.5
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_ARRAYS = ("mote.moe_layers", "mote.layer_has_shared_expert")


def placed_bytes(name: str, dims: tuple[int, ...], dtype_bytes: int) -> int:
    """GPU bytes of one float tensor as the loader places it: matrices (2+ dims, the router excepted) in the
    compute dtype, the router and vectors in fp32."""
    numel = math.prod(dims)
    if len(dims) >= 2 and ".ffn_gate_inp." not in name:
        return numel * dtype_bytes
    return numel * 4


def ternary_bytes(dims: tuple[int, ...]) -> int:
    """Packed words + scales of stacked ternary matrices (ggml dims: K, N, E)."""
    k, n = dims[0], dims[1]
    mats = math.prod(dims[2:])
    return mats * n * -(-k // CODES_PER_WORD) * 4 + mats * 4


def plan_gpu(model_path: str | Path, mmproj_path: str | Path | None, n_ctx: int | None = None,
             dtype: str = "bfloat16") -> dict:
    """The GPU engine's device memory (bytes, by part) for these files, from headers only."""
    if dtype not in DTYPE_BYTES:
        raise MoteExportError(f"dtype {dtype!r}; accepted: {', '.join(DTYPE_BYTES)}")
    dt = DTYPE_BYTES[dtype]
    h = read_gguf_header(model_path, arrays=_ARRAYS)
    f = h.fields

    def key(name, default=None):
        v = h.arch_key(name, default)
        if v is None:
            raise MoteExportError(f"{model_path}: no {f.get('general.architecture')}.{name}; not a model file the "
                                  "cuda engine runs")
        return int(v)

    n_ctx = int(n_ctx or default_n_ctx(h))
    tensors = {t.name: t for t in h.tensors}
    roles = tensor_roles(f, tensors)
    weights = 0
    widest_n = routed_ffn = shared_ffn = 0
    for name, t in tensors.items():
        role = roles[name]
        if role == "unused":
            continue
        if role == "embedding":
            if "output.weight" not in tensors:  # tied and written once: the head is on the device
                weights += placed_bytes("output.weight", t.dims, dt)
            continue
        if len(t.dims) >= 2:
            widest_n = max(widest_n, t.dims[1])
        if "_exps." in name:
            routed_ffn = max(routed_ffn, t.dims[1] if "down" not in name else t.dims[0])
        elif "_shexp." in name or name.endswith(("ffn_gate.weight", "ffn_up.weight")):
            shared_ffn = max(shared_ffn, t.dims[1] if "down" not in name else t.dims[0])
        weights += ternary_bytes(t.dims) if role == "ternary" else placed_bytes(name, t.dims, dt)
    hidden, heads, layers = key("embedding_length"), key("attention.head_count"), key("block_count")
    kv_heads = key("attention.head_count_kv", heads)
    hd = hidden // heads
    top_k = int(f.get("mote.top_k") or 0)
    vocab = tensors["token_embd.weight"].dims[1] if "token_embd.weight" in tensors else 0
    kv = 2 * layers * n_ctx * kv_heads * hd * dt
    rope = n_ctx * hd * 4
    u = min(n_ctx, PREFILL_CHUNK)
    work = 4 * u * (3 * heads * n_ctx + 16 * hidden + max(top_k, 1) * 7 * routed_ffn + 5 * shared_ffn)
    work += 4 * GEMV_MAX_M * widest_n + 4 * vocab
    vision = 0
    if mmproj_path is not None:
        m = read_gguf_header(mmproj_path, arrays=("clip.vision.feature_layer",))
        mf = m.fields
        try:
            n = (int(mf["clip.vision.image_size"]) // int(mf["clip.vision.patch_size"])) ** 2
            width, vheads = int(mf["clip.vision.embedding_length"]), int(mf["clip.vision.attention.head_count"])
            vffn = int(mf["clip.vision.feed_forward_length"])
            last = max(int(i) for i in mf["clip.vision.feature_layer"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MoteExportError(f"{mmproj_path}: no usable {exc.args[0] if exc.args else 'clip.vision'} key; "
                                  "not an mmproj file") from None
        conn = max((t.dims[1] for t in m.tensors if t.name == "mm.0.weight"), default=hidden)
        work += 4 * n * (3 * n * vheads + 12 * width + 3 * vffn + 3 * conn + hidden)
        for t in m.tensors:
            if t.name.startswith("v.blk.") and int(t.name.split(".")[2]) >= last:
                continue  # blocks past the last feature layer are never run
            vision += placed_bytes(t.name, t.dims, dt)
    work = int(work * COMPUTE_MARGIN)
    device = weights + vision + kv + rope + work
    return {"n_ctx": n_ctx, "dtype": dtype, "llm_weights_bytes": weights, "vision_weights_bytes": vision,
            "weights_bytes": weights + vision, "kv_cache_bytes": kv, "rope_bytes": rope, "workspace_bytes": work,
            "device_bytes": device, "runtime_bytes": CUDA_RUNTIME, "total_bytes": device + CUDA_RUNTIME}


def format_plan(e: dict) -> str:
    return (f"{human(e['total_bytes'])} of GPU memory = weights {human(e['llm_weights_bytes'])} (LLM) + "
            f"{human(e['vision_weights_bytes'])} (vision) + KV cache {human(e['kv_cache_bytes'])} (n_ctx {e['n_ctx']}, "
            f"{e['dtype']}) + workspace {human(e['workspace_bytes'] + e['rope_bytes'])} + CUDA runtime "
            f"{human(e['runtime_bytes'])}")

"""What a llama.cpp run keeps resident (mote-run --engine llama.cpp --memory-limit, mote-plan's
resident line): planned from GGUF headers, or from an export plan, before anything is loaded.

The engine owns this estimate: only it knows what it maps, repacks and allocates. The exporters'
planner (exporters/plan.py) owns the file bytes it starts from.
"""
from __future__ import annotations

import re
from pathlib import Path

from gguf import GGMLQuantizationType as T

from ..exporters.errors import MoteExportError
from ..exporters.gguf_header import read_gguf_header
from ..exporters.plan import Plan, plan_tensors
from ..exporters.units import MIB, human

MAX_DEFAULT_CTX = 2048  # a laptop-sized KV cache


def default_n_ctx(header) -> int:
    """The context mote-run uses without --n-ctx: the model's trained one (its GGUFHeader's
    `<arch>.context_length`), at most MAX_DEFAULT_CTX. Shared by load(), --memory-limit and mote-bench."""
    return min(MAX_DEFAULT_CTX, int(header.arch_key("context_length") or MAX_DEFAULT_CTX))


# Types llama.cpp's CPU backend may repack into an interleaved copy at load (CPU_REPACK buffer): the
# copy is anonymous memory while the mapped file pages it was read from were touched too, so they count
# twice. Which types depends on the CPU (ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type, in the
# llama.cpp of llama-cpp-python 0.3.36): on x86, AVX2 repacks q4_0, q4_K, iq4_nl, mxfp4 and AVX512 also
# q2_K (measured here: Q4_K experts add their size to RssAnon, Q8_0 and BF16 do not); ARM NEON with
# dotprod / i8mm also repacks q5_K, q6_K and q8_0. REPACKABLE is the union, for a device not known.
REPACKABLE = {T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q2_K, T.IQ4_NL, T.MXFP4}
_X86_REPACK = {"AVX2": {T.Q4_0, T.Q4_K, T.IQ4_NL, T.MXFP4}, "AVX512": {T.Q2_K}}
# Only matrix-multiply weights go to the repack buffer; token_embd is read by GET_ROWS and stays as stored.
_NOT_REPACKED = ("token_embd.weight",)


def amx_in_build(system_info: str) -> bool:
    """Whether this llama.cpp build runs its AMX backend; llama_engine then loads without extra
    buffer types (it segfaults on Q4_K), so nothing is repacked."""
    return dict(re.findall(r"(\w+) = (\d+)", system_info or "")).get("AMX_INT8") == "1"


def repackable_types(system_info: str | None = None) -> set:
    """The types repacked on the CPU that `system_info` (llama_cpp.llama_print_system_info()) describes:
    exact on x86 (by its AVX2 / AVX512 flags; none where AMX is built in, see amx_in_build),
    REPACKABLE elsewhere or when unknown."""
    flags = dict(re.findall(r"(\w+) = (\d+)", system_info or ""))
    if amx_in_build(system_info or ""):
        return set()
    if "AVX" not in flags and "SSE3" not in flags:  # not an x86 build (or no information): the union
        return set(REPACKABLE)
    return set().union(*(types for flag, types in _X86_REPACK.items() if flags.get(flag) == "1"))


RUNTIME_OVERHEAD = 128 * MIB  # measured 62 MiB on the tiny model (Python 3.11 + numpy + llama_cpp + PIL
# imports 47 MiB, llama.cpp / mtmd contexts 15 MiB, Linux x86-64); doubled for other platforms/builds
COMPUTE_MARGIN = 1.25


def resident_estimate(*, weights_bytes: int, repack_bytes: int, layers: int, heads: int, kv_heads: int,
                      head_dim: int, hidden: int, ffn_active: int, vocab: int, n_ctx: int,
                      vision: dict | None = None, kv_bytes_per_value: int = 2) -> dict:
    """Planned peak resident memory of `mote-run` (llama-cpp-python, CPU) in bytes, by part.

    weights   GGUF tensor bytes of both files (the LLM is memory-mapped and every page gets touched; the
              projector is read into memory), plus a second copy of the repacked ones (repackable_types).
    kv        2 (K and V) x layers x n_ctx x kv_heads x head_dim x 2 bytes (f16 cache, llama-cpp-python's
              default), n_ctx rounded up to 256 cells.
    compute   llama.cpp's graph buffer, for a micro-batch of u = min(n_ctx, 512) tokens (llama-cpp-python's
              n_batch / n_ubatch): 4 bytes x u x (n_ctx x (heads + 1)   attention scores f32 + mask
                                                  + vocab                logits
                                                  + 6 x hidden           residual, norms, q/k/v/o
                                                  + 3 x ffn_active)      SwiGLU gate/up/product of the
              shared expert + top-k routed experts; plus the logits output buffer (vocab x 4) and the
              vision graph: 4 bytes x patches x (2 x patches x vision heads + 8 x width + 2 x vision ffn
              + 2 x hidden); the sum times COMPUTE_MARGIN (1.25). A sum where llama.cpp reuses memory
              between graph nodes (it allocates the peak of live tensors), so it over-counts: llama.cpp's
              own "compute buffer size" was 8.03 MiB (tiny, n_ctx 512), 43.03 MiB (tiny, 4096) and
              305.5 MiB (Qwen2.5-0.5B shapes, 2048) where the LLM terms give 14.7, 49.7 and 424.8 MiB.
    runtime   RUNTIME_OVERHEAD: interpreter, libraries, contexts, threads (measured 62 MiB, counted 128).

    Checked end to end: mote-run's peak RSS was 71 MiB for the tiny model (planned 155 MiB at n_ctx 512)
    and 3.12 GiB for a Qwen2.5-0.5B-shaped MoTE pair with zero weights (2.46 GiB of tensors, 449 MiB of
    them Q4_0 and repacked; planned 3.71 GiB at n_ctx 2048)."""
    n_kv = -(-n_ctx // 256) * 256
    kv = 2 * layers * n_kv * kv_heads * head_dim * kv_bytes_per_value
    u = min(n_ctx, 512)
    compute = 4 * u * (n_kv * (heads + 1) + vocab + 6 * hidden + 3 * ffn_active) + 4 * vocab
    if vision:
        n = (vision["image_size"] // vision["patch_size"]) ** 2
        compute += 4 * n * (2 * n * vision["heads"] + 8 * vision["width"] + 2 * vision["ffn"] + 2 * hidden)
    compute = int(compute * COMPUTE_MARGIN)
    weights = weights_bytes + repack_bytes
    total = weights + kv + compute + RUNTIME_OVERHEAD
    return {"n_ctx": n_ctx, "weights_bytes": weights, "file_tensor_bytes": weights_bytes, "repack_bytes": repack_bytes,
            "kv_cache_bytes": kv, "compute_bytes": compute, "runtime_bytes": RUNTIME_OVERHEAD, "total_bytes": total}


def plan_resident(plan: Plan, n_ctx: int) -> dict:
    """resident_estimate of a plan (mote-plan), with the shapes of its config."""
    t = plan.cfg["text_config"]
    hidden, heads = int(t["hidden_size"]), int(t["num_attention_heads"])
    ffn = int(t["intermediate_size"])
    ffn_active = ffn if plan.variant == "dense" else (1 + plan.top_k) * ffn  # MoE-LLaVA's 32-wide zero shared counted as ffn
    repack = _plan_repack_bytes(plan)
    v = plan.cfg["vision_config"]
    vision = dict(image_size=int(v["image_size"]), patch_size=int(v["patch_size"]), heads=int(v["num_attention_heads"]),
                  width=int(v["hidden_size"]), ffn=int(v["intermediate_size"])) if plan.mmproj else None
    return resident_estimate(weights_bytes=plan.total_bytes, repack_bytes=repack, layers=int(t["num_hidden_layers"]),
                             heads=heads, kv_heads=int(t.get("num_key_value_heads") or heads), head_dim=hidden // heads,
                             hidden=hidden, ffn_active=ffn_active, vocab=int(t["vocab_size"]), n_ctx=n_ctx,
                             vision=vision)


def _plan_repack_bytes(plan: Plan) -> int:
    planned = plan_tensors(plan)
    return sum(p.nbytes for p in planned if p.qtype in REPACKABLE and p.name not in _NOT_REPACKED)


def gguf_resident(model_path: str | Path, mmproj_path: str | Path | None, n_ctx: int | None = None,
                  system_info: str | None = None) -> dict:
    """resident_estimate of exported files, from their GGUF headers only (nothing is loaded). n_ctx None:
    what mote-run's load() chooses, the trained context capped at 2048. system_info: the llama.cpp
    build's CPU flags, which decide what is repacked (repackable_types)."""
    h = read_gguf_header(model_path)

    def key(name, default=None):
        v = h.arch_key(name, default)
        if v is None:
            raise MoteExportError(f"{model_path}: no {h.fields.get('general.architecture')}.{name}; "
                                  "not a llama.cpp model file")
        return int(v)

    if n_ctx is None:
        n_ctx = default_n_ctx(h)
    weights = sum(t.nbytes for t in h.tensors)
    repacked = repackable_types(system_info)
    repack = sum(t.nbytes for t in h.tensors if t.qtype in repacked and t.name not in _NOT_REPACKED)
    vocab = next((t.dims[1] for t in h.tensors if t.name == "token_embd.weight"), 0)
    hidden, heads = key("embedding_length"), key("attention.head_count")
    ffn = key("feed_forward_length", 0)
    if h.arch_key("expert_count"):
        ffn = key("expert_shared_feed_forward_length", 0) + key("expert_used_count") * key("expert_feed_forward_length")
    vision = None
    if mmproj_path is not None:
        m = read_gguf_header(mmproj_path)
        mf = m.fields
        weights += sum(t.nbytes for t in m.tensors)
        try:
            vision = dict(image_size=int(mf["clip.vision.image_size"]), patch_size=int(mf["clip.vision.patch_size"]),
                          heads=int(mf["clip.vision.attention.head_count"]),
                          width=int(mf["clip.vision.embedding_length"]), ffn=int(mf["clip.vision.feed_forward_length"]))
        except KeyError as exc:
            raise MoteExportError(f"{mmproj_path}: no {exc.args[0]}; not an mmproj file") from None
    return resident_estimate(weights_bytes=weights, repack_bytes=repack, layers=key("block_count"), heads=heads,
                             kv_heads=key("attention.head_count_kv", heads), head_dim=hidden // heads, hidden=hidden,
                             ffn_active=ffn, vocab=vocab, n_ctx=n_ctx, vision=vision)


def format_resident(e: dict) -> str:
    return (f"{human(e['total_bytes'])} = weights {human(e['weights_bytes'])}"
            + (f" (incl. {human(e['repack_bytes'])} repacked copy)" if e["repack_bytes"] else "")
            + f" + KV cache {human(e['kv_cache_bytes'])} (n_ctx {e['n_ctx']}, f16) + compute {human(e['compute_bytes'])}"
            f" + runtime {human(e['runtime_bytes'])}")

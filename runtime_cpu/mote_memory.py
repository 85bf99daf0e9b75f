"""What the mote engine keeps resident (mote-run --engine mote --memory-limit), planned from the two GGUF
headers before anything is mapped. The same rules as the loader (llm.Loader, tested equal to what it did):

  mapped     tensors used in place from the mapping: F32 tensors, and token_embd (rows read on demand)
  repacked   copies made at load: ternary routed experts with the C kernels: TQ2_0 used in place (mapped),
             other ternary types -> 2-bit codes (K padded to 256); with the numpy kernels -> int8 codes (1 byte a
             weight; 4 with codes="f32"); float matrices: read in place by the C kernels (F16, BF16, Q8_0, Q4_0;
             F32 by BLAS), other types and every tensor with the numpy kernels -> float32 copies;
             every other non-F32 float tensor -> float32 (4 bytes a weight); their mapped pages are dropped
             after decoding (madvise), so the packed bytes are not held twice
  untouched  zero padding the qwen2moe layout needs and this engine never reads (routers/experts of non-MoE
             layers, MoE-LLaVA's zero shared experts, ffn_gate_inp_shexp): 0
  transient  the largest tensor being decoded: its mapped bytes + its decoded temporary (float32, or int8
             codes + their copy into the stacked gate/up matrix + three one-matrix temporaries)
  kv cache   float32 keys and values: 2 x layers x n_ctx x kv_heads x head_dim x 4
  compute    one prefill chunk of u = min(n_ctx, 512) tokens: 4 bytes x u x (4 x heads x n_ctx  attention
             scores, mask, probabilities + 12 x hidden + 8 x widest FFN + widest K) + logits + the per-call
             float32 code chunk (kernels.CAST_BYTES), and the vision tower: 4 x patches x (3 x patches x heads
             + 12 x width + 3 x ffn + 3 x connector width); the sum times COMPUTE_MARGIN
  runtime    interpreter, numpy, tokenizers, PIL, jinja2 (measured 45 MiB; counted RUNTIME_OVERHEAD)
"""
from __future__ import annotations

import math
from pathlib import Path

from gguf import GGMLQuantizationType as T

from ..exporters.errors import MoteExportError
from ..exporters.gguf_header import read_gguf_header
from ..exporters.units import MIB, human
from .kernels import CAST_BYTES
from .float_kernels import TYPES as C_FLOAT_TYPES
from .llm import PREFILL_CHUNK, resolve_kernel, ternary_family
from .lut_kernels import packed_bytes as lut_packed_bytes
from .ternary_kernels import padded
from .llama_memory import default_n_ctx

RUNTIME_OVERHEAD = 128 * MIB
COMPUTE_MARGIN = 1.5
_ARRAYS = ("mote.moe_layers", "mote.layer_has_shared_expert")


def tensor_roles(fields: dict, names) -> dict:
    """LLM tensor name -> "ternary" | "float" | "embedding" | "unused", as the loader treats it."""
    variant = fields.get("mote.variant", "dense")
    moe = {int(i) for i in fields.get("mote.moe_layers") or []}
    shared = {i for i, has in enumerate(fields.get("mote.layer_has_shared_expert") or []) if has}
    roles = {}
    for name in names:
        role = "float"
        if name == "token_embd.weight":
            role = "embedding"
        elif name.startswith("blk.") and ("_exps." in name or "_shexp." in name or ".ffn_gate_inp." in name):
            try:
                layer = int(name.split(".")[1])
            except (IndexError, ValueError):
                raise MoteExportError(f"tensor name {name!r} is not blk.<layer>.<name>; a corrupt GGUF file") from None
            if "ffn_gate_inp_shexp" in name:
                role = "unused"
            elif "_shexp." in name:
                role = "float" if layer in shared else "unused"
            elif layer not in moe:
                role = "unused"
            elif "_exps." in name and variant == "mote":
                role = "ternary"
        roles[name] = role
    return roles


def plan_resident(model_path: str | Path, mmproj_path: str | Path | None, n_ctx: int | None = None,
                  codes_form: str = "int8", kernel: str = "auto") -> dict:
    """The resident estimate (bytes, by part) of the mote engine for these files, from headers only."""
    kernel = resolve_kernel(kernel)
    h = read_gguf_header(model_path, arrays=_ARRAYS)
    f = h.fields
    arch = f.get("general.architecture")

    def key(name):
        v = h.arch_key(name)
        full = f"{arch}.{name}" if isinstance(arch, str) and arch.isprintable() else f"{arch!r}.{name}"  # (a file's bytes)
        if v is None:
            raise MoteExportError(f"{model_path}: no {full}; not a model file the mote engine runs")
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise MoteExportError(f"{model_path}: {full} is {v!r}; a positive integer is needed")
        return int(v)

    if n_ctx is None:
        n_ctx = default_n_ctx(h)
    tensors = {t.name: t for t in h.tensors}
    roles = tensor_roles(f, tensors)
    if "output.weight" not in tensors and "token_embd.weight" in tensors:
        roles["token_embd.weight"] = "embedding+output"
    mapped = repacked = transient = 0
    widest_k = widest_ffn = 0
    for name, t in tensors.items():
        role, numel = roles[name], math.prod(t.dims)
        if role == "unused":
            continue
        if not t.dims or 0 in t.dims:  # the sizes below divide by them
            raise MoteExportError(f"{model_path}: {name!r} has shape {list(t.dims)}; a tensor the model uses needs "
                                  "every dimension at least 1")
        # matrices the C float kernels read in place (the loader's Loader.in_place); the router stays numpy
        c_float = (kernel != "numpy" and t.qtype in C_FLOAT_TYPES and t.qtype != T.F32 and len(t.dims) >= 2
                   and ".ffn_gate_inp." not in name)
        if role in ("embedding", "embedding+output"):
            mapped += t.nbytes
            if role == "embedding+output" and t.qtype != T.F32 and not c_float:
                repacked += 4 * numel
            continue
        if len(t.dims) >= 2:
            widest_k = max(widest_k, t.dims[0])
            if "ffn" in name:
                widest_ffn = max(widest_ffn, t.dims[0], t.dims[1])
        if role == "ternary" and len(t.dims) != 3:
            raise MoteExportError(f"{name}: {len(t.dims)} dimensions {list(t.dims)}; routed experts are "
                                  "[K, rows, experts] (3 dimensions)")
        matrix = t.dims[0] * (t.dims[1] if len(t.dims) > 1 else 1)
        if role == "ternary" and kernel != "numpy":  # C kernels: TQ2_0 in place, others as 2-bit codes
            rows, k = numel // t.dims[0], t.dims[0]
            if ternary_family(kernel, t.dims[1], k) == "lut":  # the LUT kernels' row tiles, per matrix
                repacked += numel // matrix * lut_packed_bytes(t.dims[1], padded(k))
            elif t.qtype == T.TQ2_0:
                mapped += t.nbytes
            else:
                repacked += rows * padded(k) // 4
            transient = max(transient, t.nbytes + numel + 4 * matrix)  # checked codes + one matrix's packing
        elif role == "ternary":  # decoded codes + their copy into the stacked gate/up + one matrix's temporaries
            repacked += numel * (4 if codes_form == "f32" else 1)
            transient = max(transient, t.nbytes + 2 * numel + 3 * matrix)
        elif t.qtype == T.F32 or c_float:
            mapped += t.nbytes
        else:  # the decoded float32 temporary before it lands in its stacked (q/k/v, gate/up) array
            repacked += 4 * numel
            transient = max(transient, t.nbytes + 4 * numel)
    hidden, heads, layers = key("embedding_length"), key("attention.head_count"), key("block_count")
    kv_heads = int(h.arch_key("attention.head_count_kv") or heads)
    vocab = tensors["token_embd.weight"].dims[1] if "token_embd.weight" in tensors else 0
    kv = 2 * layers * n_ctx * kv_heads * (hidden // heads) * 4
    u = min(n_ctx, PREFILL_CHUNK)
    compute = 4 * u * (4 * heads * n_ctx + 12 * hidden + 8 * widest_ffn + widest_k) + 4 * vocab + CAST_BYTES
    if mmproj_path is not None:
        m = read_gguf_header(mmproj_path)
        mf = m.fields
        try:
            n = (int(mf["clip.vision.image_size"]) // int(mf["clip.vision.patch_size"])) ** 2
            width, vheads = int(mf["clip.vision.embedding_length"]), int(mf["clip.vision.attention.head_count"])
            vffn = int(mf["clip.vision.feed_forward_length"])
        except KeyError as exc:
            raise MoteExportError(f"{mmproj_path}: no {exc.args[0]}; not an mmproj file") from None
        except (ValueError, TypeError, ZeroDivisionError):
            raise MoteExportError(f"{mmproj_path}: clip.vision sizes are not positive integers; a corrupt mmproj") from None
        conn = max((t.dims[1] for t in m.tensors if t.name == "mm.0.weight"), default=hidden)
        compute += 4 * n * (3 * n * vheads + 12 * width + 3 * vffn + 3 * conn + hidden)
        for t in m.tensors:
            numel = math.prod(t.dims)
            # the tower's and connector's linears (vision.Vision's Loader.linear) are read in place by the
            # C float kernels; patch and position embeddings are decoded to float32
            linear = len(t.dims) == 2 and (".attn_" in t.name or ".ffn_" in t.name or t.name.startswith("mm."))
            if t.qtype == T.F32 or (linear and kernel != "numpy" and t.qtype in C_FLOAT_TYPES):
                mapped += t.nbytes
            else:
                repacked += 4 * numel
                transient = max(transient, t.nbytes + 3 * numel)
    compute = int(compute * COMPUTE_MARGIN)
    total = mapped + repacked + transient + kv + compute + RUNTIME_OVERHEAD
    return {"n_ctx": n_ctx, "weights_bytes": mapped + repacked, "mapped_bytes": mapped, "repack_bytes": repacked,
            "transient_bytes": transient, "kv_cache_bytes": kv, "compute_bytes": compute,
            "runtime_bytes": RUNTIME_OVERHEAD, "total_bytes": total}


def format_resident(e: dict) -> str:
    return (f"{human(e['total_bytes'])} = mapped weights {human(e['mapped_bytes'])} + repacked copies "
            f"{human(e['repack_bytes'])} + load transient {human(e['transient_bytes'])} + KV cache "
            f"{human(e['kv_cache_bytes'])} (n_ctx {e['n_ctx']}, f32) + compute {human(e['compute_bytes'])} "
            f"+ runtime {human(e['runtime_bytes'])}")

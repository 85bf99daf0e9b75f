"""mote-bench for the onnxruntime engine (runtime_cpu/onnx_engine.py): the bytes an ONNX export folder holds
and reads per decoded token (onnx_costs, as bench_measure.gguf_costs for a GGUF), the model child, and the
summary of onnxruntime's profile of decoded tokens. No torch.

The child (`python -m mote_edge.benchmarks.bench_measure_onnx ARGS.json OUT.json`, bench_measure's protocol
and result keys) loads the folder as `mote-run --engine onnxruntime` does (onnx_engine.Session), warms up as
the other children do, and times, per round: one image question up to its first token (time to first token =
rendering + tokenizing the prompt, vision.onnx, embedding.onnx, one decoder.onnx prefill over text and image
positions, the greedy first token), with the vision encode timed inside it, then `n_gen` greedy tokens one
decoder call at a time, end of sequence ignored (random-weight models stop at arbitrary points). The
embedding puts the image features straight into the prefill: `image_decode_s` is None. Alone in its
process, its peak RSS (VmHWM) is this model's. With `ort_profile` > 0 it then loads a second session whose
decoder runs under onnxruntime's profiler (SessionOptions.enable_profiling), prefills the same question and
decodes that many tokens: `ort_profile` in the result is the time per decoded token by op type and by part
of the model (read after the peak RSS, so neither the profiler nor the second session counts in it).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from ..exporters.errors import MoteExportError

# ---- bytes in an ONNX export folder ----------------------------------------------------------------------


def _group(name: str) -> str:
    """Which part of the model a decoder.onnx initializer belongs to (exporters/onnx_llm.py's names; the
    groups of bench_measure._group)."""
    if name.startswith("embed_tokens."):
        return "token_embd"
    if name.startswith("lm_head."):
        return "output"
    for part, group in ((".mlp.router.", "router"), (".mlp.experts.", "routed"), (".mlp.shared_expert.", "shared"),
                        (".mlp.", "ffn"), (".self_attn.", "attention")):
        if part in name:
            return group
    return "norm"  # norms and the graph's small constants


# The custom ternary ops -> the label of their codes (bench_models.TERNARY_LABEL)
_TERNARY_OPS = {"TernaryMatMul": "TERNARY-I8", "TernaryMatMulNBits": "TERNARY-2BIT"}


def _consumers(graph, out: dict) -> dict:
    """initializer / value name -> the nodes reading it, subgraphs (the If of the embedding) included."""
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _consumers(g, out)
    return out


def _label(tensor, readers: list) -> str:
    """What a weight is stored as: the ternary ops' codes, a block-quantized op's blocks (MatMulNBits,
    GatherBlockQuantized: Q8_0 / Q4_0 for 8 / 4 bits in blocks of 32, GGUF's numbers), else its element type."""
    from onnx import helper

    for node in readers:
        if node.op_type in _TERNARY_OPS:
            return _TERNARY_OPS[node.op_type]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if "bits" in attrs:
            bits, block = int(attrs["bits"]), int(attrs.get("block_size", 0))
            return f"Q{bits}_0" if block == 32 and bits in (4, 8) else f"{bits}-BIT/{block}"
    return {1: "F32", 10: "F16", 16: "BF16", 3: "I8", 2: "U8"}.get(tensor.data_type, f"type{tensor.data_type}")


def _nbytes(t, data_size: int, where: Path) -> int:
    from onnx import TensorProto, helper

    if t.data_location == TensorProto.EXTERNAL:
        ext = {e.key: e.value for e in t.external_data}
        offset, length = int(ext.get("offset", 0)), int(ext.get("length", -1))
        if length < 0 or offset + length > data_size:
            raise MoteExportError(f"{where}: tensor {t.name} lies beyond the end of its weights file (a partial "
                                  "export); export the folder again")
        return length
    return int(np.prod(t.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def folder_bytes(folder: Path) -> int:
    """Bytes on disk of an export folder: every file in it."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def onnx_costs(folder: str | Path) -> dict:
    """Tensor bytes of decoder.onnx by part, expert memory, and the bytes of weights one decoded token reads,
    with the keys of bench_measure.gguf_costs (file_bytes: the whole folder).

    Per token the decoder reads all of attention, norms, routers, the shared expert (or a dense FFN) and the
    head, top_k / n_expert of every routed-expert tensor, and one embedding row (Gather); a tied model's head
    is the embedding itself (Gemm on it), which then covers that row. A weight the graph casts to fp32 (an f16
    one) counts at fp32 width there: onnxruntime folds the Cast into an fp32 copy at load (`widened_bytes`:
    those copies, resident beside the stored tensors); group_bytes are the stored bytes. group_types: what the
    weights of each group are stored as (_label; 1-D tensors - norms, biases, block scales - left out).
    Raises MoteExportError for a folder that is not a complete export."""
    import onnx
    from onnx import TensorProto

    from ..exporters.onnx_files import DEFAULT_FILES, folder_config
    from ..runtime_cpu.onnx_engine import MODELS, resolve_inputs

    folder = Path(folder)
    resolve_inputs(folder, None)  # every file there
    cfg = folder_config(folder)
    info = cfg["mote_onnx"]
    files = DEFAULT_FILES | (info.get("files") or {})
    data_size = (folder / files["data"]).stat().st_size
    models = {}
    for key in MODELS:  # every model's tensors inside the weights file: a complete export
        path = folder / files[key]
        try:
            models[key] = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: a damaged file
            raise MoteExportError(f"{path} is not a readable ONNX model ({type(exc).__name__}); export the folder "
                                  "again") from None
        sizes = [_nbytes(t, data_size, path) for t in models[key].graph.initializer]
        if not sizes:
            raise MoteExportError(f"{path} holds no weights; export the folder again")
    decoder, model = folder / files["decoder"], models["decoder"]
    readers = _consumers(model.graph, {})
    groups, run, types = {}, {}, {}
    embd_rows, widened = 1, 0
    for t in model.graph.initializer:
        g, n = _group(t.name), _nbytes(t, data_size, decoder)
        groups[g] = groups.get(g, 0) + n
        if any(r.op_type == "Cast" and _cast_to(r) == TensorProto.FLOAT for r in readers.get(t.name, [])):
            # a weight stored narrow and cast to fp32 in the graph (f16): onnxruntime folds the Cast at load into
            # an fp32 copy, and that copy is what the MatMul / Gemm reads
            n = int(np.prod(t.dims, dtype=np.int64)) * 4
            widened += n
        run[g] = run.get(g, 0) + n
        if len(t.dims) >= 2:
            types.setdefault(g, set()).add(_label(t, readers.get(t.name, [])))
        if g == "token_embd":
            embd_rows = max(int(t.dims[0]), 1)
    mote = cfg.get("mote") or {}
    experts, top_k = int(mote.get("num_experts") or 0), int(mote.get("top_k") or 0)
    head = run.get("output", 0) or run.get("token_embd", 0)
    embd_row = groups.get("token_embd", 0) // embd_rows if groups.get("output") else 0  # Gather: the stored rows
    per_token = (run.get("attention", 0) + run.get("norm", 0) + run.get("router", 0) + run.get("shared", 0)
                 + run.get("ffn", 0) + head + embd_row + (run.get("routed", 0) * top_k // experts if experts else 0))
    return {"arch": f"onnx {info.get('kernels')}", "kernels": info.get("kernels"), "variant": info.get("variant"),
            "file_bytes": folder_bytes(folder), "group_bytes": groups,
            "group_types": {g: sorted(v) for g, v in types.items()}, "experts": experts, "top_k": top_k,
            "expert_bytes": groups.get("routed", 0) + groups.get("shared", 0) + groups.get("ffn", 0),
            "bytes_per_token": per_token, "widened_bytes": widened}


def _cast_to(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


# ---- onnxruntime's profile ---------------------------------------------------------------------------------

# A profiled node's part of the model, from the scope of its name (exporters/onnx_llm.py's node hints)
_PARTS = ((re.compile(r"layers\.\d+/attn/"), "attention"), (re.compile(r"layers\.\d+/moe/expert\d+"), "routed experts"),
          (re.compile(r"layers\.\d+/(moe/shared|mlp/)"), "shared expert / FFN"),
          (re.compile(r"layers\.\d+/moe/"), "router + dispatch"),
          (re.compile(r"(head|final_norm|keep|logits)[./]"), "head"))


def _part(name: str) -> str | None:
    """The part of a node whose name carries a scope; None for the nodes onnxruntime names itself (the
    ternary ops' function bodies, inlined, and its own layout transposes)."""
    if "/" not in name:
        return None
    for pattern, part in _PARTS:
        if pattern.match(name):
            return part
    return "norms, residuals, rope, mask"


def summarize_profile(events: list[dict], skip_runs: int) -> dict:
    """Per decoded token, from onnxruntime's profile (chrome-trace events) of a decoder session whose first
    `skip_runs` runs were not decode steps: milliseconds of the whole run (`run_ms`), of all its nodes
    (`nodes_ms`), and by op type and by part. A node onnxruntime named itself (inlined function bodies: the
    ternary experts; layout transposes) counts in the part of the named node before it in execution order."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[skip_runs:]
    if not runs:
        raise MoteExportError("onnxruntime's profile holds no decode run")
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    ops, parts, total = {}, {}, 0.0
    for run in runs:
        end, part = run["ts"] + run["dur"], "norms, residuals, rope, mask"
        for e in nodes:
            if not run["ts"] <= e["ts"] <= end:
                continue
            part = _part(e["name"]) or part
            op = e.get("args", {}).get("op_name", "?")
            ops[op] = ops.get(op, 0.0) + e["dur"]
            parts[part] = parts.get(part, 0.0) + e["dur"]
            total += e["dur"]
    n = len(runs)

    def per_token(d: dict) -> dict:
        return {k: v / 1e3 / n for k, v in sorted(d.items(), key=lambda kv: -kv[1])}
    return {"tokens": n, "run_ms": sum(r["dur"] for r in runs) / 1e3 / n, "nodes_ms": total / 1e3 / n,
            "op_ms": per_token(ops), "part_ms": per_token(parts)}


# ---- the model child ---------------------------------------------------------------------------------------

def _proc_status() -> dict:
    from ..runtime_cpu.memory import process_memory

    return process_memory()


def _round(s, image: str, prompt: str, n_gen: int) -> dict:
    """One image question: time to first token (with its vision-encode split), then n_gen greedy decode
    steps continuing the same sequence (the KV cache holds the image)."""
    t0 = time.perf_counter()
    ids = s.prompt_ids(prompt)
    if len(ids) + n_gen > s.n_ctx:
        raise MoteExportError(f"the prompt ({len(ids)} tokens with the image) and {n_gen} decoded tokens do not fit "
                              f"n_ctx {s.n_ctx}")
    t_enc = time.perf_counter()
    feats = s.image_features(image)
    encode_s = time.perf_counter() - t_enc
    logits, past = s.prefill(ids, feats)
    token = int(np.argmax(logits[0, -1]))  # the first token
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(n_gen):
        logits, past = s.step(past, len(ids) + i, token)
        token = int(np.argmax(logits[0, -1]))
    decode_s = time.perf_counter() - t1
    return {"ttft_s": ttft, "encode_s": encode_s, "image_decode_s": None, "image_tokens": int(len(feats)),
            "prompt_tokens": len(ids), "prefill_tok_s": len(ids) / (ttft - encode_s), "decode_s": decode_s,
            "decode_tok_s": n_gen / decode_s}


def _warm_up(s, image: str, n_prefill: int = 64, n_decode: int = 4) -> None:
    """As the other children's: one vision encode, a 64-token text prefill (practically every routed expert of
    every layer, so the whole model is paged in) and a few single-token decode steps, untimed."""
    feats = s.image_features(image)
    ids = s.tokenizer.encode(" the picture shows" * n_prefill, add_special_tokens=False).ids[:n_prefill]
    logits, past = s.prefill(ids, feats[:0])
    for i in range(n_decode):
        logits, past = s.step(past, len(ids) + i, int(np.argmax(logits[0, -1])))


def _profile(a: dict) -> dict:
    """A fresh session with the decoder under onnxruntime's profiler: the round's prefill, then
    a.ort_profile greedy decode steps; their per-token summary."""
    from ..runtime_cpu.onnx_engine import Session

    prefix = str(Path(a["profile_dir"]) / f"ort-{os.getpid()}")
    s = Session(a["model"], threads=a["threads"], profile_prefix=prefix)
    ids = s.prompt_ids(a["prompt"])
    logits, past = s.prefill(ids, s.image_features(a["image"]))
    for i in range(a["ort_profile"]):
        logits, past = s.step(past, len(ids) + i, int(np.argmax(logits[0, -1])))
    path = Path(s.sessions["decoder"].end_profiling())
    try:
        return summarize_profile(json.loads(path.read_text()), skip_runs=1) | {"threads": a["threads"]}
    finally:
        path.unlink(missing_ok=True)  # tens of MB at real shapes; the summary is what the report keeps


def measure_model(a: dict) -> dict:
    """(child) Load, run a.warmup untimed warm-up passes and a.repeats timed rounds; peak RSS after load and at
    the end; then the profile when asked. Decoding is greedy: a.seed changes nothing."""
    from ..runtime_cpu.onnx_engine import Session

    load_average_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    s = Session(a["model"], threads=a["threads"])
    load_s = time.perf_counter() - t0
    at_load = _proc_status()
    for _ in range(a["warmup"]):
        _warm_up(s, a["image"])
    rounds = [_round(s, a["image"], a["prompt"], a["n_gen"]) for _ in range(a["repeats"])]
    at_end = _proc_status()
    result = {"load_s": load_s, "rss_load": at_load.get("VmHWM"), "rss_peak": at_end.get("VmHWM"),
              "rss_anon_end": at_end.get("RssAnon"), "rss_file_end": at_end.get("RssFile"), "n_ctx": s.n_ctx,
              "rounds": rounds, "load_average_at_start": load_average_at_start,
              "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if a.get("ort_profile"):
        del s  # the profiled session replaces it
        result["ort_profile"] = _profile(a)
    return result


if __name__ == "__main__":
    from mote_edge.benchmarks.bench_measure import child_main

    child_main(measure_model, sys.argv[1:])

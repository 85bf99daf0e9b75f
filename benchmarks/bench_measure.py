"""What mote-bench measures: one model in its own process, the machine's memory bandwidth, the
machine itself, and the bytes a GGUF file holds and reads per decoded token. No torch.

The model child (`python -m mote_edge.benchmarks.bench_measure ARGS.json OUT.json`) loads a GGUF +
mmproj through llama-cpp-python exactly as mote-run does, warms up (`_warm_up`), and times, per
round: one image question through the chat handler (time to first token = vision encode + prefill
+ first sample), with the vision encode and the image-embedding decode timed inside it, then
`n_gen` greedy tokens one llama.cpp eval at a time (random-weight models would stop or loop at
arbitrary points, so the decode is driven directly rather than through the chat API). It runs
alone in its process, so its peak RSS (VmHWM) is this model's: read after load and after the last round.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

GIB, MIB = 2 ** 30, 2 ** 20


# ---- bytes in a GGUF file --------------------------------------------------------------------------------

def _group(name: str) -> str:
    """Which part of the model a GGUF tensor belongs to (llama.cpp qwen2 / qwen2moe names)."""
    if name.startswith(("token_embd", "output.")):
        return name.split(".")[0]
    if "ffn_gate_inp" in name:  # the router, and qwen2moe's shared-expert gate vector
        return "router"
    if "_exps." in name:
        return "routed"
    if "_shexp." in name:
        return "shared"
    if any(f"ffn_{p}." in name for p in ("gate", "up", "down")):
        return "ffn"  # a dense model's FFN
    return "attention" if "attn_" in name and "norm" not in name else "norm"


def _all_zero(path: Path, data_start: int, t) -> bool:
    """Whether a GGUF tensor holds exact zeros: its first row decides unless that row is zero too."""
    from gguf.quants import dequantize

    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start + t.offset, shape=(t.nbytes,))
    rows = raw.reshape(t.rows, -1)
    if len(rows) > 1 and np.any(dequantize(rows[:1], t.qtype)):
        return False
    return not np.any(dequantize(rows, t.qtype))


def gguf_costs(path: str | Path) -> dict:
    """Tensor bytes by part, expert memory, and the bytes of weights one decoded token reads.

    Per token llama.cpp reads all of attention, norms, routers, the shared expert (or a dense FFN,
    or MoE-LLaVA's zero "padding" shared expert) and the output head, top_k / n_expert of every
    routed-expert tensor, and one embedding row. A qwen2 file with tied embeddings has no `output`
    tensor: the head is token_embd itself."""
    from ..exporters.gguf_header import read_gguf_header

    path = Path(path)
    h = read_gguf_header(path)
    arch = h.fields.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError("no general.architecture")
    groups, types, rows = {}, {}, {}
    for t in h.tensors:
        g = _group(t.name)
        if g == "shared" and _all_zero(path, h.data_start, t):
            g = "padding"  # MoE-LLaVA has no shared expert; qwen2moe needs one, so mote-export writes zeros
        groups[g] = groups.get(g, 0) + t.nbytes
        types.setdefault(g, set()).add(t.qtype.name)
        rows[t.name] = t.rows
    experts, top_k = int(h.arch_key("expert_count") or 0), int(h.arch_key("expert_used_count") or 0)
    head = groups.get("output", 0) or groups.get("token_embd", 0)
    # the input embedding row; when token_embd is also the head, that read covers it
    embd_row = groups.get("token_embd", 0) // max(rows.get("token_embd.weight", 1), 1) if groups.get("output") else 0
    per_token = (groups.get("attention", 0) + groups.get("norm", 0) + groups.get("router", 0)
                 + groups.get("shared", 0) + groups.get("padding", 0) + groups.get("ffn", 0) + head + embd_row
                 + (groups.get("routed", 0) * top_k // experts if experts else 0))
    return {"arch": arch, "file_bytes": path.stat().st_size, "group_bytes": groups,
            "group_types": {g: sorted(v) for g, v in types.items()}, "experts": experts,
            "top_k": top_k, "expert_bytes": groups.get("routed", 0) + groups.get("shared", 0) + groups.get("ffn", 0),
            "bytes_per_token": per_token}


# ---- the machine -----------------------------------------------------------------------------------------

def machine_facts(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    import llama_cpp

    try:
        gguf_version = version("gguf")
    except PackageNotFoundError:
        gguf_version = "?"
    try:  # the onnxruntime engine's (an optional extra)
        ort_version = version("onnxruntime")
    except PackageNotFoundError:
        ort_version = None
    l3 = None
    try:  # the last-level cache: a model whose per-token weights fit in it is not bound by DRAM bandwidth
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        l3 = int(size.rstrip("KMG")) * {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(size[-1], 1)
    except (OSError, ValueError):
        pass

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {"cpu": cpu, "arch": platform.machine(), "cores": os.cpu_count(), "cores_usable": affinity,
            "memory_bytes": mem, "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "l3_cache_bytes": l3, "numpy": np.__version__, "gguf": gguf_version,
            "llama_cpp_python": llama_cpp.__version__, "onnxruntime": ort_version,
            "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
            "threads": threads, "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _bandwidth_worker(kind: str, nbytes: int, rounds: int, barrier, out) -> None:
    a = np.ones(nbytes // 8, dtype=np.int64)  # written once: the pages exist before timing
    b = np.empty_like(a) if kind == "copy" else None
    times = []
    for _ in range(rounds):
        barrier.wait()  # all processes start each round together, so their traffic overlaps
        t0 = time.perf_counter()
        if b is None:
            a.max()  # a streaming read; integer max keeps the core far ahead of memory
        else:
            np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    out.put(times)


def memory_bandwidth(procs: int, nbytes: int = 512 * MIB, rounds: int = 6) -> dict:
    """Stream-style bandwidth with `procs` processes (as many as the runtime's threads), each over
    its own `nbytes` array (far beyond the caches). read: bytes read / time; copy: STREAM's
    convention, 2 x bytes copied / time. Best round (STREAM reports the best), per round the
    slowest process."""
    ctx = mp.get_context("spawn")
    result = {}
    for kind, size in (("read", nbytes), ("copy", nbytes // 2)):
        barrier, out = ctx.Barrier(procs), ctx.Queue()
        ps = [ctx.Process(target=_bandwidth_worker, args=(kind, size, rounds, barrier, out)) for _ in range(procs)]
        for p in ps:
            p.start()
        per_proc = [out.get() for _ in ps]
        for p in ps:
            p.join()
        moved = procs * size * (2 if kind == "copy" else 1)
        result[f"{kind}_gbs"] = max(moved / max(t) for t in zip(*per_proc)) / 1e9
    return result | {"processes": procs, "bytes_per_process": nbytes}


# ---- the model child -------------------------------------------------------------------------------------

def _proc_status() -> dict:
    from ..runtime_cpu.memory import process_memory

    return process_memory()


class _TimedMtmd:
    """The chat handler's mtmd module, with `mtmd_helper_eval_chunk_single` for an image chunk done as
    its two documented steps (mtmd_encode_chunk, then mtmd_helper_decode_image_chunk on the output
    embeddings: what the helper itself does) so each is timed. Everything else passes through.
    (`mtmd_helper_post_decode_callback()` is the NULL callback: no post-processing of the batches.)"""

    def __init__(self, mtmd):
        self._m = mtmd
        self.encode_s = self.image_decode_s = 0.0
        self.image_tokens = 0

    def __getattr__(self, name):
        return getattr(self._m, name)

    def mtmd_helper_eval_chunk_single(self, ctx, lctx, chunk, n_past, seq_id, n_batch, logits_last, new_n_past):
        m = self._m
        if m.mtmd_input_chunk_get_type(chunk) != m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            return m.mtmd_helper_eval_chunk_single(ctx, lctx, chunk, n_past, seq_id, n_batch, logits_last, new_n_past)
        t0 = time.perf_counter()
        rc = m.mtmd_encode_chunk(ctx, chunk)
        t1 = time.perf_counter()
        if rc == 0:
            rc = m.mtmd_helper_decode_image_chunk(ctx, lctx, chunk, m.mtmd_get_output_embd(ctx), n_past, seq_id,
                                                  n_batch, new_n_past, m.mtmd_helper_post_decode_callback(), None)
        self.encode_s += t1 - t0
        self.image_decode_s += time.perf_counter() - t1
        self.image_tokens += m.mtmd_input_chunk_get_n_tokens(chunk)
        return rc


def _argmax_logits(llm) -> int:
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))


def _round(llm, messages, timer: _TimedMtmd, n_gen: int, seed: int) -> dict:
    """One image question: time to first token (with its encode / image-decode split), then n_gen
    greedy decode steps continuing the same sequence (the KV cache holds the image)."""
    from ..runtime_cpu.llama_engine import GREEDY

    timer.encode_s = timer.image_decode_s = 0.0
    timer.image_tokens = 0
    t0 = time.perf_counter()
    llm.create_chat_completion(messages=messages, max_tokens=1, seed=seed, **GREEDY)
    ttft = time.perf_counter() - t0
    n_prompt = llm.n_tokens  # text + image positions now in the KV cache
    token = _argmax_logits(llm)  # the first token: still the logits of the last prompt position
    t1 = time.perf_counter()
    for _ in range(n_gen):
        llm.eval([token])
        token = _argmax_logits(llm)
    decode_s = time.perf_counter() - t1
    return {"ttft_s": ttft, "encode_s": timer.encode_s, "image_decode_s": timer.image_decode_s,
            "image_tokens": timer.image_tokens, "prompt_tokens": n_prompt,
            "prefill_tok_s": n_prompt / (ttft - timer.encode_s), "decode_s": decode_s,
            "decode_tok_s": n_gen / decode_s}


def _warm_up(llm, image: str, n_prefill: int = 64, n_decode: int = 4) -> None:
    """Every weight and code path once, untimed, at a fraction of a round's cost: one vision encode
    (mtmd's context, the tower), a batched text prefill (64 tokens reach practically every routed
    expert of every layer, so the whole model is paged in) and a few single-token decode steps."""
    from ..runtime_cpu.llama_engine import image_embeddings

    image_embeddings(llm, image)
    ids = llm.tokenize(b" the picture shows" * n_prefill, add_bos=False)[:n_prefill]
    llm.reset()
    llm.eval(ids)
    for _ in range(n_decode):
        llm.eval([_argmax_logits(llm)])


def measure_model(a: dict) -> dict:
    """(child) Load, run a.warmup untimed warm-up passes and a.repeats timed rounds; peak RSS after
    load and at the end."""
    from ..runtime_cpu.llama_engine import load, messages_for

    load_average_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    llm = load(a["model"], a["mmproj"], n_threads=a["threads"], seed=a["seed"])
    load_s = time.perf_counter() - t0
    at_load = _proc_status()
    messages = messages_for(llm, a["image"], a["prompt"])
    handler = llm.chat_handler
    timer = handler._mtmd_cpp = _TimedMtmd(handler._mtmd_cpp)
    for _ in range(a["warmup"]):
        _warm_up(llm, a["image"])
    rounds = [_round(llm, messages, timer, a["n_gen"], a["seed"]) for _ in range(a["repeats"])]
    at_end = _proc_status()
    return {"load_s": load_s, "rss_load": at_load.get("VmHWM"), "rss_peak": at_end.get("VmHWM"),
            "rss_anon_end": at_end.get("RssAnon"), "rss_file_end": at_end.get("RssFile"), "n_ctx": llm.n_ctx(),
            "rounds": rounds, "load_average_at_start": load_average_at_start, "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None}


def child_main(measure, argv: list[str]) -> None:
    """A model child of mote-bench: `python -m MODULE ARGS.json OUT.json` runs measure(args) into OUT.json."""
    args_path, out_path = argv
    result = measure(json.loads(Path(args_path).read_text()))
    Path(out_path).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    child_main(measure_model, sys.argv[1:])

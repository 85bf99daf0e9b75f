"""mote-bench's model child for the mote engine (runtime_cpu/mote_engine.py, numpy): the same protocol
and result keys as bench_measure's llama.cpp child, so the two are measured side by side on one file.

`python -m mote_edge.benchmarks.bench_measure_mote ARGS.json OUT.json` loads a GGUF + mmproj as
`mote-run --engine mote` does (MoteModel), warms up (`_warm_up`, as the llama.cpp child's), and times,
per round: one image question up to its first token (time to first token = vision encode + embedding
the rendered prompt + one prefill forward over text and image positions + the greedy first token),
with the vision encode timed inside it, then `n_gen` greedy tokens one forward at a time, end of
sequence ignored (as the llama.cpp child: random-weight models stop at arbitrary points). The mote
engine feeds the image embeddings straight into the prefill, so there is no separate image-embedding
decode step: `image_decode_s` is None. Alone in its process, its peak RSS (VmHWM) is this model's.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np


def _proc_status() -> dict:
    from ..runtime_cpu.memory import process_memory

    return process_memory()


def _round(m, image: str, prompt: str, n_gen: int) -> dict:
    """One image question: time to first token (with its vision-encode split), then n_gen greedy decode
    steps continuing the same sequence (the KV cache holds the image)."""
    from ..exporters.errors import MoteExportError
    from ..runtime_cpu.mote_engine import IMAGE_PLACEHOLDER

    t0 = time.perf_counter()
    pieces = m.prompt(prompt).split(IMAGE_PLACEHOLDER)
    if len(pieces) != 2:
        raise MoteExportError(f"the GGUF's chat template placed {len(pieces) - 1} '{IMAGE_PLACEHOLDER}' for one image")
    before, after = (m.tokenizer.encode(p) for p in pieces)
    t_enc = time.perf_counter()
    img = m.image_embeddings(image)
    encode_s = time.perf_counter() - t_enc
    h = np.concatenate([m.llm.embed(before), img, m.llm.embed(after)])
    n_prompt = len(h)
    if n_prompt + n_gen > m.n_ctx:
        raise MoteExportError(f"the prompt ({n_prompt} tokens with the image) and {n_gen} decoded tokens do not fit "
                              f"n_ctx {m.n_ctx}")
    token = int(np.argmax(m.llm.forward(h, m.cache, 0)))  # the first token
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(n_gen):
        token = int(np.argmax(m.llm.forward(m.llm.embed([token]), m.cache, n_prompt + i)))
    decode_s = time.perf_counter() - t1
    return {"ttft_s": ttft, "encode_s": encode_s, "image_decode_s": None, "image_tokens": int(len(img)),
            "prompt_tokens": n_prompt, "prefill_tok_s": n_prompt / (ttft - encode_s), "decode_s": decode_s,
            "decode_tok_s": n_gen / decode_s}


def _warm_up(m, image: str, n_prefill: int = 64, n_decode: int = 4) -> None:
    """As the llama.cpp child's: one vision encode, a 64-token text prefill (practically every routed
    expert of every layer, so the whole model is paged in) and a few single-token decode steps, untimed."""
    m.image_embeddings(image)
    ids = m.tokenizer.encode(" the picture shows" * n_prefill)[:n_prefill]
    logits = m.llm.forward(m.llm.embed(ids), m.cache, 0)
    for i in range(n_decode):
        logits = m.llm.forward(m.llm.embed([int(np.argmax(logits))]), m.cache, len(ids) + i)


def measure_model(a: dict) -> dict:
    """(child) Load, run a.warmup untimed warm-up passes and a.repeats timed rounds; peak RSS after
    load and at the end. Decoding is greedy: a.seed changes nothing."""
    from ..runtime_cpu.mote_engine import MoteModel

    load_average_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    m = MoteModel(a["model"], a["mmproj"], threads=a["threads"])
    load_s = time.perf_counter() - t0
    at_load = _proc_status()
    for _ in range(a["warmup"]):
        _warm_up(m, a["image"])
    rounds = [_round(m, a["image"], a["prompt"], a["n_gen"]) for _ in range(a["repeats"])]
    at_end = _proc_status()
    return {"load_s": load_s, "rss_load": at_load.get("VmHWM"), "rss_peak": at_end.get("VmHWM"),
            "rss_anon_end": at_end.get("RssAnon"), "rss_file_end": at_end.get("RssFile"), "n_ctx": m.n_ctx,
            "rounds": rounds, "load_average_at_start": load_average_at_start,
            "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "engine_report": m.report}


if __name__ == "__main__":
    from mote_edge.benchmarks.bench_measure import child_main

    child_main(measure_model, sys.argv[1:])

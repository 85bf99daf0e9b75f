"""Held-out accuracy of a checkpoint on LLaVA-format questions: greedy answers, exact match.

    mote-eval CKPT_DIR --data test.json --images DIR [--limit N] [--json]
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from .data import load_records, to_messages
from .errors import MoteError, cli_entry
from .tokenizer import normalize_answer
from .exporters.errors import ArgumentParser


def split_record(record: dict) -> tuple[list[dict], str]:
    """(messages up to the last user turn, expected final answer)."""
    msgs = to_messages(record["conversations"])
    if msgs[-1]["role"] != "assistant":
        raise MoteError(f"record {record.get('id', '?')} does not end with an answer")
    return msgs[:-1], msgs[-1]["content"]


@torch.no_grad()
def generate_answers(model, processor, records: list[dict], images_dir: str | Path, batch_size: int = 32,
                     max_new_tokens: int = 8, progress: bool = True) -> list[str]:
    tok = processor.tokenizer
    tok.padding_side = "left"  # generation continues from the right edge of every row
    out: list[str] = []
    for i in tqdm(range(0, len(records), batch_size), desc="answering", disable=not progress):
        chunk = records[i:i + batch_size]
        prompts = [tok.apply_chat_template(split_record(r)[0], add_generation_prompt=True, tokenize=False)
                   for r in chunk]
        images = [Image.open(Path(images_dir) / r["image"]).convert("RGB") for r in chunk]
        enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def accuracy(records: list[dict], answers: list[str]) -> dict:
    """Overall and per-question-type exact-match accuracy (in %)."""
    hits, counts = defaultdict(int), defaultdict(int)
    for r, a in zip(records, answers):
        t = r.get("question_type", "all")
        ok = normalize_answer(a) == normalize_answer(split_record(r)[1])
        for key in {t, "overall"}:
            hits[key] += ok
            counts[key] += 1
    return {k: 100.0 * hits[k] / counts[k] for k in counts} | {"n": counts["overall"]}


def evaluate(ckpt_dir: str | Path, data: str | Path, images: str | Path, limit: int | None = None,
             progress: bool = True) -> dict:
    from transformers import AutoProcessor

    from .checkpoint import load_model

    records = load_records(data)[:limit]
    model = load_model(ckpt_dir)
    processor = AutoProcessor.from_pretrained(str(ckpt_dir))
    answers = generate_answers(model, processor, records, images, progress=progress)
    return accuracy(records, answers) | {"answers": answers}


def format_accuracy(name: str, acc: dict) -> str:
    types = sorted(k for k in acc if k not in ("overall", "n", "answers"))
    parts = " ".join(f"{t}={acc[t]:.1f}" for t in types)
    return f"{name}: accuracy {acc['overall']:.1f}% on {acc['n']} questions ({parts})"


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="mote-eval", description="Exact-match accuracy on held-out questions.")
    p.add_argument("ckpt_dir")
    p.add_argument("--data", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    acc = evaluate(a.ckpt_dir, a.data, a.images, a.limit)
    print(json.dumps({k: v for k, v in acc.items() if k != "answers"}) if a.json else format_accuracy(a.ckpt_dir, acc))

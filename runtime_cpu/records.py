"""Held-out LLaVA records (the tiny task's test.json and any like it) asked of an engine, and their
exact-match score: the same for every engine, and the same scoring as mote_edge.evaluate.accuracy."""
from __future__ import annotations

import json
import string
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable

from ..exporters.errors import MoteExportError

IMAGE_PLACEHOLDER = "<image>"  # what LLaVA chat templates (ours included) emit for an image part
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def normalize_answer(text: str) -> str:
    """Exact-match canonical form; the same as mote_edge.tokenizer.normalize_answer (which imports torch)."""
    return " ".join(text.strip().lower().split()).rstrip(string.punctuation).rstrip()


def question_and_answer(record: dict) -> tuple[str, str]:
    """(question, expected answer) of a single-turn LLaVA record: the human turn minus "<image>\\n"."""
    try:
        turns = [(ROLES[t["from"]], t["value"]) for t in record["conversations"]]
    except (KeyError, TypeError):
        raise MoteExportError(f"record {record.get('id', '?')}: conversations must be "
                              "[{'from': 'human'|'gpt', 'value': ...}] (LLaVA format)") from None
    users = [v for r, v in turns if r == "user"]
    if not turns or turns[-1][0] != "assistant" or not users:
        raise MoteExportError(f"record {record.get('id', '?')} does not end with an answer to a question")
    return users[-1].removeprefix(IMAGE_PLACEHOLDER).lstrip("\n"), turns[-1][1]


def read_records(data_json: str | Path, limit: int | None = None) -> list[dict]:
    data = Path(data_json)
    try:
        return json.loads(data.read_text())[:limit]
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise MoteExportError(f"cannot read LLaVA records from {str(data)!r} ({exc})") from None


def evaluate_records(answer: Callable[[Path, str], str], records: list[dict], images_dir: str | Path,
                     progress: bool = False) -> dict:
    """Held-out exact-match accuracy (%), overall and per question_type, with the answers, of
    `answer(image_path, question)` on LLaVA records."""
    images = Path(images_dir)
    hits, counts, answers = defaultdict(int), defaultdict(int), []
    for i, r in enumerate(records):
        question, expected = question_and_answer(r)
        if not r.get("image"):
            raise MoteExportError(f"record {r.get('id', '?')} names no image; accepted: image question records")
        got = answer(images / r["image"], question)
        answers.append(got)
        ok = normalize_answer(got) == normalize_answer(expected)
        for key in {r.get("question_type", "all"), "overall"}:
            hits[key] += ok
            counts[key] += 1
        if progress and (i + 1) % 50 == 0:
            print(f"{i + 1}/{len(records)}", file=sys.stderr)
    return {k: 100.0 * hits[k] / counts[k] for k in counts} | {"n": counts["overall"], "answers": answers}

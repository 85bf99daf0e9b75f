"""LLaVA conversation data: `{"image": ..., "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": ...}]}` records with an image folder, encoded with the checkpoint's processor.
Only assistant turns (and their end-of-turn token) are labelled.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from .errors import MoteError
from .losses import IGNORE
from .runtime_cpu.images import load_rgb

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def load_records(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise MoteError(f"data file {str(p)!r} does not exist; expected LLaVA conversation JSON")
    try:
        recs = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise MoteError(f"{p} is not valid JSON ({exc})") from None
    if not isinstance(recs, list) or not all(isinstance(r, dict) and "conversations" in r for r in recs):
        raise MoteError(f"{p}: expected a list of records with 'conversations' (LLaVA format)")
    return recs


def to_messages(conversations: list[dict]) -> list[dict]:
    try:
        return [{"role": ROLES[t["from"]], "content": t["value"]} for t in conversations]
    except KeyError as exc:
        raise MoteError(f"conversation turn with unknown or missing field {exc}; accepted roles: human, gpt") from None


class ConversationDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[dict], images_dir: str | Path, processor):
        self.records, self.images_dir, self.processor = records, Path(images_dir), processor
        if not self.images_dir.is_dir():
            raise MoteError(f"image folder {str(self.images_dir)!r} does not exist")

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return encode_example(self.processor, self.records[i], self.images_dir)


def encode_example(processor, record: dict, images_dir: Path) -> dict:
    tok = processor.tokenizer
    msgs = to_messages(record["conversations"])
    image = None
    if record.get("image"):
        path = images_dir / record["image"]
        if not path.is_file():
            raise MoteError(f"image {str(path)!r} named by record {record.get('id', '?')} does not exist")
        image = Image.fromarray(load_rgb(path, None))  # as the engines read it; a broken file is one error
    ids: list[int] = []
    labels: list[int] = []
    pixel_values = None
    rendered = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = tok.apply_chat_template(msgs[:i], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
        answer = m["content"] + tok.eos_token  # the model learns to end its turn
        assert full.startswith(prefix + answer), "chat template must render the answer right after the prompt"
        prompt_part = prefix[len(rendered):]
        if image is not None and pixel_values is None and processor.image_token in prompt_part:
            enc = processor(images=image, text=prompt_part, return_tensors="pt")  # expands <image>
            pixel_values = enc["pixel_values"][0]
            p_ids = enc["input_ids"][0].tolist()
        else:
            p_ids = tok(prompt_part, add_special_tokens=False)["input_ids"]
        a_ids = tok(answer, add_special_tokens=False)["input_ids"]
        ids += p_ids + a_ids
        labels += [IGNORE] * len(p_ids) + a_ids
        rendered = prefix + answer
    if not labels or all(x == IGNORE for x in labels):
        raise MoteError(f"record {record.get('id', '?')} has no assistant answer to learn from")
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixel_values}


def collate(batch: list[dict], pad_id: int) -> dict:
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for r, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[r, :k], labels[r, :k], mask[r, :k] = b["input_ids"], b["labels"], 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    pix = [b["pixel_values"] for b in batch if b["pixel_values"] is not None]
    if pix:
        out["pixel_values"] = torch.stack(pix)
    return out

"""The Qwen2 byte-level BPE tokenizer of a checkpoint -> GGUF `tokenizer.ggml.*` keys.

llama.cpp's "gpt2" tokenizer model with pre-tokenizer "qwen2" reproduces the Hugging Face
tokenizer when the vocabulary, the merges and the split regex are the same; the regex is checked
here, because a different one would tokenize silently differently.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
from gguf import GGUFWriter, TokenType

from .errors import MoteExportError

# The split regex of Qwen2's tokenizer.json, which llama.cpp's "qwen2" pre-tokenizer implements.
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_regexes(node) -> list[str]:
    """Every Split pattern in a (possibly nested) pre_tokenizer description."""
    if isinstance(node, dict):
        pattern = node.get("pattern") if node.get("type") == "Split" else None
        found = [pattern.get("Regex")] if isinstance(pattern, dict) else []
        return found + [r for v in node.values() for r in _split_regexes(v)]
    if isinstance(node, list):
        return [r for v in node for r in _split_regexes(v)]
    return []


def add_vocab(writer: GGUFWriter, ckpt_dir: Path, n_vocab: int) -> dict:
    """Write tokens, token types, merges, special ids and the chat template; returns a small report."""
    path = Path(ckpt_dir) / "tokenizer.json"
    if not path.is_file():
        raise MoteExportError(f"{ckpt_dir} has no tokenizer.json; accepted: a Hugging Face fast (BPE) tokenizer")
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        model = tok["model"]
        vocab, added = model["vocab"], tok.get("added_tokens") or []
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise MoteExportError(f"{path} is not a readable tokenizer.json ({exc})") from None
    if model.get("type") != "BPE":
        raise MoteExportError(f"{path}: tokenizer model {model.get('type')!r}; accepted: Qwen2's byte-level BPE")
    if QWEN2_SPLIT_REGEX not in _split_regexes(tok.get("pre_tokenizer")):
        raise MoteExportError(f"{path}: the pre-tokenizer is not Qwen2's split regex, so llama.cpp's 'qwen2' "
                              "pre-tokenizer would split text differently; accepted: Qwen2-style tokenizers")

    by_id = {int(i): t for t, i in vocab.items()}
    special = {int(a["id"]): bool(a.get("special")) for a in added}
    by_id.update({int(a["id"]): a["content"] for a in added})
    if max(by_id, default=-1) >= n_vocab:
        raise MoteExportError(f"{path}: token id {max(by_id)} does not fit the model's {n_vocab} embedding rows")
    tokens, types = [], []
    for i in range(n_vocab):  # ids the tokenizer never produces pad the table, as llama.cpp's converter does
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL if i not in special else
                         TokenType.CONTROL if special[i] else TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    sv = gguf.SpecialVocab(ckpt_dir, load_merges=True, n_vocab=n_vocab)
    if not sv.merges:
        raise MoteExportError(f"{path} has no BPE merges")
    sv.add_to_gguf(writer, quiet=True)
    if "bos" not in sv.special_token_ids and "<|endoftext|>" in by_id.values():
        # Qwen2 names <|endoftext|> its bos_token_id (never added); llama.cpp would default to id 11
        writer.add_bos_token_id(next(i for i, t in by_id.items() if t == "<|endoftext|>"))
    if "bos" not in sv.add_special_token:  # Qwen2 adds no BOS; llama.cpp's BPE default would
        writer.add_add_bos_token(False)
    return {"tokens": n_vocab, "merges": len(sv.merges), "special_ids": dict(sv.special_token_ids),
            "chat_template": sv.chat_template is not None}

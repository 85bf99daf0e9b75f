"""The tokenizer and chat template of a GGUF file, rebuilt without the checkpoint.

tokenizer.ggml.model "gpt2" + pre "qwen2": a byte-level BPE (`tokenizers`) from tokenizer.ggml.tokens and
tokenizer.ggml.merges, Qwen2's split regex then ByteLevel (no prefix space, no regex), tokens typed CONTROL
as special added tokens and USER_DEFINED as plain added tokens: the ids equal the HF tokenizer's (tested).
No normaliser: the file does not record one and llama.cpp applies none (Qwen2's own tokenizer.json has
NFC, which changes only text that is not NFC already).
The chat template (tokenizer.chat_template) is rendered with jinja2 as transformers does (sandboxed,
trim_blocks, lstrip_blocks).
"""
from __future__ import annotations

from gguf import TokenType

from ..exporters.errors import MoteExportError
from ..exporters.gguf_vocab import QWEN2_SPLIT_REGEX
from .chat_template import render_chat
from .gguf_model import GGUFModel

# control tokens that end a turn, as llama.cpp's end-of-generation set adds them by their text
EOG_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class GGUFTokenizer:
    def __init__(self, g: GGUFModel):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        model, pre = g.fields.get("tokenizer.ggml.model"), g.fields.get("tokenizer.ggml.pre")
        if model != "gpt2" or pre != "qwen2":
            raise MoteExportError(f"{g.path}: tokenizer {model!r} with pre-tokenizer {pre!r}; accepted: gpt2 / qwen2 "
                                  "(the byte-level BPE mote-export writes)")
        tokens = g.key("tokenizer.ggml.tokens")
        merges = g.key("tokenizer.ggml.merges")
        types = g.fields.get("tokenizer.ggml.token_type") or [int(TokenType.NORMAL)] * len(tokens)
        if len(types) != len(tokens) or len(set(tokens)) != len(tokens):
            raise MoteExportError(f"{g.path}: tokenizer.ggml.tokens / token_type are inconsistent "
                                  "(lengths differ or tokens repeat)")
        try:
            pairs = [tuple(m.split(" ", 1)) for m in merges]
            bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs, fuse_unk=False)
        except Exception as exc:  # tokenizers raises its own exception types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # tokenizers' messages run long
            raise MoteExportError(f"{g.path}: tokenizer.ggml.merges do not make a BPE ({first})") from None
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        control = [i for i, t in enumerate(types) if t == TokenType.CONTROL]
        user = [i for i, t in enumerate(types) if t == TokenType.USER_DEFINED]
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
        tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
        self.tok, self.tokens = tok, tokens
        self.special = set(control)
        for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                    "tokenizer.ggml.eom_token_id"):
            v = g.fields.get(key)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(tokens)):
                raise MoteExportError(f"{g.path}: {key} is {v!r}; expected a token id below the vocabulary's "
                                      f"{len(tokens)}")
        self.eos = g.fields.get("tokenizer.ggml.eos_token_id")
        eog = {g.fields.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                         "tokenizer.ggml.eom_token_id")}
        eog |= {i for i in control if tokens[i] in EOG_TEXTS}
        self.eog = {int(i) for i in eog if i is not None}
        self.template = g.fields.get("tokenizer.chat_template")
        self.bos_text = tokens[g.fields["tokenizer.ggml.bos_token_id"]] if "tokenizer.ggml.bos_token_id" in g.fields else ""
        self.eos_text = tokens[self.eos] if self.eos is not None else ""

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special tokens written in the text are recognised (HF's encode(text,
        add_special_tokens=False), llama.cpp's tokenize(special=True))."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.template:
            raise MoteExportError("the GGUF has no tokenizer.chat_template; re-export it with mote-export")
        return render_chat(self.template, messages, add_generation_prompt, bos_token=self.bos_text,
                           eos_token=self.eos_text)


class StreamDecoder:
    """Text pieces of a growing token list, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer: GGUFTokenizer):
        self.t, self.ids, self.sent = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.t.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def flush(self) -> str:
        text = self.t.decode(self.ids)
        piece, self.sent = text[len(self.sent):], text
        return piece

"""The generation loop of the engines that run their own forward pass (mote, cuda), and the answering
API built on it: one place for the stop rules, so every engine ends an answer the same way."""
from __future__ import annotations

from .tokenize import StreamDecoder


def generate(logits, feed, pick, tokenizer, pos: int, n_ctx: int, max_tokens: int):
    """Yields (text piece, None) per generated token, then ("", "stop" | "length").

    logits: the prompt's last logits; feed(token, pos) -> the next logits (the token evaluated at pos);
    pick(logits) -> a token id (greedy or sampled). A token of the end-of-generation set stops ("stop");
    max_tokens or a full context stop with "length" (the last token is then not evaluated)."""
    out = StreamDecoder(tokenizer)
    for n in range(max_tokens):
        tok = pick(logits)
        if tok in tokenizer.eog:
            yield out.flush(), "stop"
            return
        yield out.add(tok), None
        if n + 1 == max_tokens or pos >= n_ctx:  # the context is full: no room to feed it back
            break
        logits = feed(tok, pos)
        pos += 1
    yield out.flush(), "length"


class Answering:
    """ask() and answer() over an engine's stream(image, question, **kw)."""

    def ask(self, image, question: str, **kw):
        """The answer's text pieces as they are generated."""
        for piece, _ in self.stream(image, question, **kw):
            if piece:
                yield piece

    def answer(self, image, question: str, max_tokens: int = 8, **kw) -> str:
        return "".join(self.ask(image, question, max_tokens=max_tokens, **kw))

"""Tiny byte-level BPE tokenizer (Qwen2-style) and the LLaVA processor.

The prompt format lives here (``CHAT_TEMPLATE``, ``prompt_for``) so training
and evaluation cannot drift apart.
"""

from __future__ import annotations

import re
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlavaProcessor, PreTrainedTokenizerFast, SiglipImageProcessorPil
from transformers.utils.chat_template_utils import render_jinja_template

# Order fixes the ids 0..3; downstream configs rely on them.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
PAD_TOKEN, IM_START, EOS_TOKEN, IMAGE_TOKEN = SPECIAL_TOKENS

QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML. Newlines sit inside expressions because transformers compiles
# templates with trim_blocks/lstrip_blocks, which would eat literal ones.
# Image parts are emitted before the text, whatever their order in the list.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _messages(question: str, answer: str | None = None) -> list[dict]:
    # Dataset records carry "<image>\n" in the question; the template adds it.
    question = question.removeprefix(IMAGE_TOKEN).lstrip("\n")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def _render(messages: list[dict], add_generation_prompt: bool) -> str:
    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=CHAT_TEMPLATE,
        add_generation_prompt=add_generation_prompt,
    )
    return rendered[0]


def prompt_for(question: str) -> str:
    """Generation prompt for one user turn with an image (leading "<image>\\n" optional)."""
    return _render(_messages(question), add_generation_prompt=True)


def conversation_for(question: str, answer: str) -> str:
    """Full training text; always ``prompt_for(question)`` + answer + "<|im_end|>\\n"."""
    return _render(_messages(question, answer), add_generation_prompt=False)


def normalize_answer(text: str) -> str:
    """Canonical form for exact-match scoring."""
    text = " ".join(text.strip().lower().split())
    return text.rstrip(string.punctuation).rstrip()


def train_tokenizer(texts, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` wrapped in ChatML framing.

    Each text is also fed as a rendered conversation so pieces such as
    "user", "assistant" and the newlines around the special tokens get merged.
    The vocabulary may end up smaller than ``vocab_size`` on a tiny corpus.
    """
    texts = list(texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes, so any string is encodable without an unk token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The trainer does not split on special tokens, so cut them out of the
    # framing; otherwise merges like "<|" and "_start" waste the vocabulary.
    special = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    framed = [
        piece
        for t in texts
        for piece in special.split(_render(_messages(t, t), add_generation_prompt=False))
        if piece
    ]
    tok.train_from_iterator(texts + framed, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        extra_special_tokens=[IM_START, IMAGE_TOKEN],
        # Named so LlavaProcessor picks it up as tokenizer.image_token.
        image_token=IMAGE_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer, image_size: int = 48, patch_size: int = 8) -> LlavaProcessor:
    """LLaVA processor: expands each "<image>" into (image_size/patch_size)^2 tokens."""
    # The PIL backend: the default (fast) SigLIP processor needs torchvision.
    image_processor = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        # SigLIP has no CLS token, so every patch is an image token.
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )

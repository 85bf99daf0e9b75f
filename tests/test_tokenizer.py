import pytest
import torch
import transformers
from PIL import Image

from mote_edge import synthetic as S
from mote_edge import tokenizer as T

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]


@pytest.fixture(scope="module")
def tok():
    return T.train_tokenizer(S.corpus_texts())


@pytest.fixture(scope="module")
def processor(tok):
    return T.build_processor(tok, image_size=48, patch_size=8)


@pytest.fixture
def image():
    return Image.new("RGB", (48, 48), (235, 235, 235))


def test_roundtrip_corpus_and_arbitrary_text(tok):
    extra = ["", " ", "  two  spaces\n\n\ttab", "héllo wörld — 世界 🙂", "It's 42!", "\r\n"]
    for s in S.corpus_texts() + extra + [T.prompt_for(q) for q in S.all_questions()]:
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s, repr(s)
    assert tok.unk_token_id is None


def test_special_tokens_fixed_ids(tok):
    assert tok.convert_tokens_to_ids(SPECIALS) == [0, 1, 2, 3]
    for i, t in enumerate(SPECIALS):
        assert tok.encode(t, add_special_tokens=False) == [i]
        # Special tokens are atomic even glued to text.
        assert tok.encode(f"ab{t}cd", add_special_tokens=False).count(i) == 1
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    assert tok.bos_token is None
    assert tok.encode("red", add_special_tokens=True) == tok.encode("red", add_special_tokens=False)
    assert set(tok.all_special_ids) == {0, 1, 2, 3}


def test_bpe_learned_merges(tok):
    assert 260 < len(tok) <= 512
    # Frequent words and ChatML role names collapse into few tokens.
    for word in ["user", "assistant", "What", "square", "yellow"]:
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
    # The special-token spellings must not have leaked into merges.
    assert "<|" not in tok.get_vocab() and "<image" not in tok.get_vocab()


def test_chat_template(tok):
    expected = "<|im_start|>user\n<image>\nWhat shape is the red object?<|im_end|>\n<|im_start|>assistant\n"
    assert T.prompt_for("What shape is the red object?") == expected
    assert T.prompt_for("<image>\nWhat shape is the red object?") == expected
    # Image part goes first even if listed after the text.
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What shape is the red object?"},
                                         {"type": "image"}]}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == expected
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one"}]
    assert tok.apply_chat_template(plain, tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\none<|im_end|>\n"
    )
    full = T.conversation_for("How many shapes are there?", "two")
    assert full == T.prompt_for("How many shapes are there?") + "two<|im_end|>\n"


def test_normalize_answer():
    assert T.normalize_answer("  Top  Left.\n") == "top left"
    assert T.normalize_answer("Red!") == "red"
    assert T.normalize_answer("blue") == "blue"


def test_processor_expands_image_tokens(processor, image):
    out = processor(images=image, text=T.prompt_for("What colour is the circle?"), return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert ids.count(3) == 36
    first = ids.index(3)
    assert ids[first:first + 36] == [3] * 36, "image tokens are not contiguous"
    assert out["pixel_values"].shape == (1, 3, 48, 48)
    # Background 235 -> (235/255 - 0.5) / 0.5.
    assert torch.allclose(out["pixel_values"], torch.full((1, 3, 48, 48), 235 / 127.5 - 1), atol=1e-4)


def test_processor_save_load_roundtrip(processor, image, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = transformers.AutoProcessor.from_pretrained(tmp_path)
    prompt = T.prompt_for("Where is the blue square?")
    a = processor(images=image, text=prompt, return_tensors="pt")
    b = loaded(images=image, text=prompt, return_tensors="pt")
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert loaded.chat_template == T.CHAT_TEMPLATE
    assert loaded.tokenizer.chat_template == T.CHAT_TEMPLATE
    assert loaded.tokenizer.convert_tokens_to_ids(SPECIALS) == [0, 1, 2, 3]
    assert loaded.tokenizer.eos_token_id == 2 and loaded.tokenizer.pad_token_id == 0
    tok_only = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for s in S.corpus_texts():
        assert tok_only.encode(s, add_special_tokens=False) == processor.tokenizer.encode(s, add_special_tokens=False)

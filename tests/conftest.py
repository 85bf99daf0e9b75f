"""Shared tiny fixtures: a tokenizer, a tiny synthetic data set, and tiny dense / MoTE checkpoints
built with the project's own code (nothing is downloaded)."""
from __future__ import annotations

import os

# Triton's interpreter must be chosen before triton's first import (torch imports it): the suite runs the
# GPU kernels on CPU tensors (DESIGN.md section 6). Compile gates and GPU-less error paths run in
# subprocesses that set or clear it themselves.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mote_edge.checkpoint import save_model  # noqa: E402
from mote_edge.synthetic import corpus_texts, make_dataset  # noqa: E402
from mote_edge.tokenizer import build_processor, train_tokenizer  # noqa: E402
from mote_edge.upcycle import upcycle

# Test-sized model: small, fast, but every part present (SigLIP tower, GELU MLP, Qwen2 with GQA).
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=48, patch_size=16, vision_use_head=False)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def processor():
    tok = train_tokenizer(corpus_texts())
    return build_processor(tok, image_size=VISION["image_size"], patch_size=VISION["patch_size"])


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    make_dataset(d, n_train=48, n_val=8, n_test=24, seed=1)
    return d


def build_dense_ckpt(out: Path, processor, seed: int = 0) -> Path:
    from mote_edge.tiny import build_dense

    model = build_dense(processor.tokenizer, seed=seed, vision=VISION, text=TEXT)
    save_model(model, out)
    processor.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def dense_ckpt(tmp_path_factory, processor) -> Path:
    return build_dense_ckpt(tmp_path_factory.mktemp("ckpt") / "dense", processor)


@pytest.fixture(scope="session")
def mote_ckpt(tmp_path_factory, dense_ckpt) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "mote"
    upcycle(dense_ckpt, out, experts=4, top_k=1, layers="all", init="ffn")
    return out


@pytest.fixture()
def batch(processor, data_dir):
    """One collated training batch of 4 records."""
    from mote_edge.data import collate, encode_example, load_records

    recs = load_records(data_dir / "train.json")[:4]
    return collate([encode_example(processor, r, data_dir / "images") for r in recs],
                   processor.tokenizer.pad_token_id)


def perturb_experts(model) -> None:
    """Move latent expert weights away from the FFN copy so ternary codes differ per expert."""
    from mote_edge.moe import moe_blocks

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for b in moe_blocks(model):
            b.router.weight.normal_(0, 0.5, generator=g)
            for p in b.experts.parameters():
                p.add_(torch.randn(p.shape, generator=g) * p.abs().mean())


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)

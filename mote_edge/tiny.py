"""The tiny multimodal recipe: synthetic shapes task -> BPE tokenizer -> tiny dense SigLIP + MLP +
Qwen2 model trained from scratch (dense stage) -> up-cycled to MoTE (4 ternary experts, top-1,
init from the FFN) -> moe stage -> held-out accuracy of both. About 20 minutes on 2 CPU cores.

    mote-make-tiny WORK_DIR [--install]     (--install copies the results into the package assets)
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from .checkpoint import save_model
from .errors import MoteError, cli_entry
from .evaluate import evaluate, format_accuracy
from .synthetic import CHANCE_ACCURACY, corpus_texts, make_dataset
from .tokenizer import IMAGE_TOKEN, build_processor, train_tokenizer
from .train import TrainConfig, train
from .upcycle import upcycle

ASSETS = Path(__file__).parent / "assets" / "tiny"

# LLM widths are multiples of 256 so the GGUF ternary block types (256 weights a block) apply.
VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              image_size=48, patch_size=8, vision_use_head=False)
TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True)


def dense_config(vision: dict, text: dict, vocab_size: int, image_token_index: int,
                 eos_token_id: int | None = None, pad_token_id: int | None = None):
    """LlavaConfig for SigLIP + 2-layer GELU MLP + Qwen2, from the two sub-config dicts."""
    from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig

    v = SiglipVisionConfig(**vision)
    t = Qwen2Config(vocab_size=vocab_size, bos_token_id=None, eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id, **text)
    return LlavaConfig(vision_config=v, text_config=t, projector_hidden_act="gelu",
                       image_token_index=image_token_index,
                       image_seq_length=(v.image_size // v.patch_size) ** 2,
                       vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
                       vision_feature_layer=-1, tie_word_embeddings=t.tie_word_embeddings)


def build_dense(tokenizer, seed: int = 0, vision: dict | None = None, text: dict | None = None):
    """A randomly initialised LLaVA (SigLIP + 2-layer GELU MLP + Qwen2) sized for the tokenizer."""
    from transformers import LlavaForConditionalGeneration

    cfg = dense_config(vision or VISION, text or TEXT, len(tokenizer),
                       tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_tiny(work: Path, n_train: int = 6000, dense_epochs: float = 3.0, moe_epochs: float = 1.0,
              dense_lr: float = 1e-3, moe_lr: float = 1e-3, batch_size: int = 32, seed: int = 0) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = work / "data"
    if not (data / "test.json").is_file():
        make_dataset(data, n_train=n_train, n_val=300, n_test=300, seed=seed)
    tokenizer = train_tokenizer(corpus_texts())
    processor = build_processor(tokenizer, image_size=VISION["image_size"], patch_size=VISION["patch_size"])

    init = work / "dense-init"
    shutil.rmtree(init, ignore_errors=True)
    save_model(build_dense(tokenizer, seed), init)
    processor.save_pretrained(str(init))

    common = dict(data=data / "train.json", images=data / "images", processor=processor)
    dense_cfg = TrainConfig(stage="dense", epochs=dense_epochs, batch_size=batch_size, lr=dense_lr,
                            weight_decay=0.0, train_vision=True, seed=seed)
    shutil.rmtree(work / "dense", ignore_errors=True)
    train(init, out_dir=work / "dense", cfg=dense_cfg, **common)

    upcycle(work / "dense", work / "mote-init", experts=4, top_k=1, layers="all", init="ffn",
            variant="mote", seed=seed, overwrite=True)
    moe_cfg = TrainConfig(stage="moe", epochs=moe_epochs, batch_size=batch_size, lr=moe_lr,
                          weight_decay=0.1, seed=seed)
    shutil.rmtree(work / "mote", ignore_errors=True)
    train(work / "mote-init", out_dir=work / "mote", cfg=moe_cfg, **common)

    results = {"minutes": round((time.perf_counter() - t0) / 60, 1), "chance": CHANCE_ACCURACY}
    for name in ("dense", "mote"):
        acc = evaluate(work / name, data / "test.json", data / "images")
        print(format_accuracy(name, acc))
        results[name] = {k: v for k, v in acc.items() if k != "answers"}
    (work / "results.json").write_text(json.dumps(results, indent=1))
    return results


def install_assets(work: Path, dest: Path = ASSETS) -> dict:
    """Copy the two checkpoints (stored in bf16 to keep the package small) and the held-out test
    split into the package as the embedded default, then re-measure accuracy on exactly the
    stored files: those are the figures results.json and the README report."""
    from .checkpoint import load_model

    if dest.exists():
        shutil.rmtree(dest)
    (dest / "data" / "images").mkdir(parents=True)
    test = json.loads((work / "data" / "test.json").read_text())
    shutil.copy2(work / "data" / "test.json", dest / "data" / "test.json")
    for r in test:
        shutil.copy2(work / "data" / "images" / r["image"], dest / "data" / "images" / r["image"])
    results = json.loads((work / "results.json").read_text())
    for name in ("dense", "mote"):
        save_model(load_model(work / name), dest / name, side_files_from=work / name, dtype=torch.bfloat16)
        acc = evaluate(dest / name, dest / "data" / "test.json", dest / "data" / "images")
        print(format_accuracy(f"{name} (stored bf16)", acc))
        results[f"{name}_fp32"] = results[name]
        results[name] = {k: v for k, v in acc.items() if k != "answers"}
    (dest / "results.json").write_text(json.dumps(results, indent=1))
    return results


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(prog="mote-make-tiny", description="Build the tiny dense and MoTE checkpoints.")
    p.add_argument("work_dir")
    p.add_argument("--train", type=int, default=6000, help="training questions")
    p.add_argument("--dense-epochs", type=float, default=3.0)
    p.add_argument("--moe-epochs", type=float, default=1.0)
    p.add_argument("--dense-lr", type=float, default=1e-3)
    p.add_argument("--moe-lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--install", action="store_true", help=f"copy the results into {ASSETS}")
    a = p.parse_args(argv)
    work = Path(a.work_dir)
    if not work.parent.exists():
        raise MoteError(f"parent of {str(work)!r} does not exist")
    r = make_tiny(work, a.train, a.dense_epochs, a.moe_epochs, a.dense_lr, a.moe_lr, a.batch_size, a.seed)
    print(json.dumps(r, indent=1))
    if a.install:
        install_assets(work)
        print(f"installed into {ASSETS}")

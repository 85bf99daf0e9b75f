"""The tiny multimodal recipe: synthetic shapes task -> BPE tokenizer -> tiny dense SigLIP + MLP +
Qwen2 model trained from scratch (dense stage) -> up-cycled to MoTE (4 ternary experts, top-1,
init from the FFN) -> moe stage -> held-out accuracy; beside MoTE, from the same dense checkpoint,
data and moe-stage recipe, the MoE-LLaVA baseline (4 full-precision experts, top-2, no shared expert).

    mote-make-tiny WORK_DIR [--install [--force]]   (--install copies the results into the package assets)
    mote-make-tiny WORK_DIR --baseline-only [--dense DIR] [--install]   (only the MoE-LLaVA baseline,
                                           from the embedded dense checkpoint unless --dense is given)

The recipe (data sizes, epochs, learning rates, weight decay, batch, seed) is recipe.json beside the
embedded checkpoints: it is the one source of the command's defaults, and --install writes the recipe
actually used there together with the checkpoints, so it always describes what is embedded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
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
from .exporters.errors import ArgumentParser

ASSETS = Path(__file__).parent / "assets" / "tiny"
RECIPE_FILE = "recipe.json"
BASELINE = "moe-llava"  # folder and results.json key of the MoE-LLaVA baseline


def load_recipe(path: Path = ASSETS / RECIPE_FILE) -> dict:
    """The recipe recorded beside a set of tiny checkpoints (the embedded ones by default)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MoteError(f"{str(path)!r} does not exist: no recipe recorded there") from None


RECIPE = load_recipe()

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


def resolve_recipe(**overrides) -> dict:
    """The embedded recipe with some of its entries replaced; unknown names are an error."""
    unknown = sorted(set(overrides) - set(RECIPE))
    if unknown:
        raise MoteError(f"unknown recipe entries {unknown}; the recipe has {sorted(RECIPE)}")
    return {k: type(v)(overrides[k]) if k in overrides and overrides[k] is not None else v
            for k, v in RECIPE.items()}


def _dataset(data: Path, recipe: dict) -> None:
    """Generate the splits, unless data/ already holds exactly the recipe's (same sizes and seed)."""
    want = {k: recipe[k] for k in ("n_train", "n_val", "n_test", "seed")}
    meta = data / "dataset.json"
    if (data / "test.json").is_file() and meta.is_file() and json.loads(meta.read_text()) == want:
        return
    shutil.rmtree(data, ignore_errors=True)
    make_dataset(data, n_train=want["n_train"], n_val=want["n_val"], n_test=want["n_test"], seed=want["seed"])
    meta.write_text(json.dumps(want, indent=1))


def moe_stage(recipe: dict) -> TrainConfig:
    """The recipe's moe stage, shared by MoTE and the MoE-LLaVA baseline (same steps, LR, decay, batch)."""
    return TrainConfig(stage="moe", epochs=recipe["moe_epochs"], batch_size=recipe["batch_size"],
                       lr=recipe["moe_lr"], weight_decay=recipe["moe_weight_decay"], seed=recipe["seed"])


def train_moe_llava(dense: Path, work: Path, recipe: dict, processor=None) -> Path:
    """MoE-LLaVA baseline (paper's comparison): every layer up-cycled to 4 full-precision experts
    initialised from the FFN, top-2, no shared expert; then the same moe stage on the same data as
    MoTE (only routers + experts train). Writes work/moe-llava and returns it."""
    data = work / "data"
    upcycle(dense, work / f"{BASELINE}-init", experts=4, top_k=2, layers="all", init="ffn",
            variant="moe-llava", seed=recipe["seed"], overwrite=True)
    shutil.rmtree(work / BASELINE, ignore_errors=True)
    train(work / f"{BASELINE}-init", data=data / "train.json", images=data / "images", out_dir=work / BASELINE,
          cfg=moe_stage(recipe), processor=processor)
    return work / BASELINE


def make_baseline(work: Path, dense: Path = ASSETS / "dense", **overrides) -> dict:
    """Only the MoE-LLaVA baseline, from an existing dense checkpoint (the embedded one by default)
    with the recipe's data and moe stage; writes work/moe-llava, work/recipe.json and
    work/results.json (fp32 held-out accuracy)."""
    recipe = resolve_recipe(**overrides)
    work, dense = Path(work), Path(dense)
    if not (dense / "config.json").is_file():
        raise MoteError(f"{str(dense)!r} is not a checkpoint folder (no config.json)")
    work.mkdir(parents=True, exist_ok=True)
    (work / RECIPE_FILE).unlink(missing_ok=True)
    t0 = time.perf_counter()
    _dataset(work / "data", recipe)
    train_moe_llava(dense, work, recipe)
    acc = evaluate(work / BASELINE, work / "data" / "test.json", work / "data" / "images")
    print(format_accuracy(BASELINE, acc))
    results = {"minutes": round((time.perf_counter() - t0) / 60, 1), "chance": CHANCE_ACCURACY,
               "dense_start": str(dense), BASELINE: {k: v for k, v in acc.items() if k != "answers"}}
    (work / "results.json").write_text(json.dumps(results, indent=1))
    (work / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
    return results


def make_tiny(work: Path, **overrides) -> dict:
    """Run the recipe (recipe.json's entries, any of them replaced by keyword) in `work`; writes the
    checkpoints, work/recipe.json (the recipe used) and work/results.json (fp32 held-out accuracy)."""
    recipe = resolve_recipe(**overrides)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / RECIPE_FILE).unlink(missing_ok=True)  # written again once the run finishes
    t0 = time.perf_counter()
    seed, batch_size = recipe["seed"], recipe["batch_size"]
    data = work / "data"
    _dataset(data, recipe)
    tokenizer = train_tokenizer(corpus_texts())
    processor = build_processor(tokenizer, image_size=VISION["image_size"], patch_size=VISION["patch_size"])

    init = work / "dense-init"
    shutil.rmtree(init, ignore_errors=True)
    save_model(build_dense(tokenizer, seed), init)
    processor.save_pretrained(str(init))

    common = dict(data=data / "train.json", images=data / "images", processor=processor)
    dense_cfg = TrainConfig(stage="dense", epochs=recipe["dense_epochs"], batch_size=batch_size, lr=recipe["dense_lr"],
                            weight_decay=recipe["dense_weight_decay"], train_vision=recipe["dense_train_vision"],
                            seed=seed)
    shutil.rmtree(work / "dense", ignore_errors=True)
    train(init, out_dir=work / "dense", cfg=dense_cfg, **common)

    upcycle(work / "dense", work / "mote-init", experts=4, top_k=1, layers="all", init="ffn",
            variant="mote", seed=seed, overwrite=True)
    shutil.rmtree(work / "mote", ignore_errors=True)
    train(work / "mote-init", out_dir=work / "mote", cfg=moe_stage(recipe), **common)
    train_moe_llava(work / "dense", work, recipe, processor=processor)

    results = {"minutes": round((time.perf_counter() - t0) / 60, 1), "chance": CHANCE_ACCURACY}
    for name in ("dense", "mote", BASELINE):
        acc = evaluate(work / name, data / "test.json", data / "images")
        print(format_accuracy(name, acc))
        results[name] = {k: v for k, v in acc.items() if k != "answers"}
    (work / "results.json").write_text(json.dumps(results, indent=1))
    (work / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
    return results


def _lower_than_embedded(new: dict, old: dict) -> str | None:
    """One line naming both scores if dense or MoTE scores lower than before, else None."""
    names = {"dense": "dense", "mote": "MoTE"}
    if all(new[k]["overall"] >= old[k]["overall"] for k in names):
        return None
    scores = ", ".join(f"{label} {new[k]['overall']:.1f}% vs {old[k]['overall']:.1f}%" for k, label in names.items())
    n = new["mote"]["n"], old["mote"]["n"]
    on = f"the {n[0]}" if n[0] == n[1] else f"{n[0]} vs {n[1]}"
    return f"the new checkpoints score lower than the embedded ones ({scores} on {on} held-out questions, as stored in bf16)"


def install_assets(work: Path, dest: Path = ASSETS, force: bool = False) -> dict:
    """Copy the two checkpoints (stored in bf16 to keep the package small), the held-out test split
    and the recipe used into `dest` as the embedded default, re-measuring accuracy on exactly the
    stored files: those are the figures results.json and the README report.

    Everything is built in a temporary sibling of `dest` and renamed into place at the end. If dest
    already holds checkpoints that score higher (dense or MoTE, on what is stored), nothing in dest
    changes and MoteError says so, unless `force`."""
    from .checkpoint import load_model

    work, dest = Path(work), Path(dest)
    names = ("dense", "mote") + ((BASELINE,) if (work / BASELINE).is_dir() else ())  # runs before the baseline lack it
    for need in ("dense", "mote", "data/test.json", "results.json", RECIPE_FILE):
        if not (work / need).exists():
            raise MoteError(f"{str(work / need)!r} does not exist: build {str(work)!r} with mote-make-tiny first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage, old = (dest.with_name(f".{dest.name}.{kind}-{os.getpid()}") for kind in ("new", "old"))
    shutil.rmtree(stage, ignore_errors=True)
    try:
        (stage / "data" / "images").mkdir(parents=True)
        test = json.loads((work / "data" / "test.json").read_text())
        shutil.copy2(work / "data" / "test.json", stage / "data" / "test.json")
        for r in test:
            shutil.copy2(work / "data" / "images" / r["image"], stage / "data" / "images" / r["image"])
        shutil.copy2(work / RECIPE_FILE, stage / RECIPE_FILE)
        results = json.loads((work / "results.json").read_text())
        for name in names:
            save_model(load_model(work / name), stage / name, side_files_from=work / name, dtype=torch.bfloat16)
            acc = evaluate(stage / name, stage / "data" / "test.json", stage / "data" / "images", progress=False)
            print(format_accuracy(f"{name} (stored bf16)", acc))
            results[f"{name}_fp32"] = results[name]
            results[name] = {k: v for k, v in acc.items() if k != "answers"}
        (stage / "results.json").write_text(json.dumps(results, indent=1))
        if (dest / "results.json").is_file():
            lower = _lower_than_embedded(results, json.loads((dest / "results.json").read_text()))
            if lower and not force:
                raise MoteError(f"{lower}; {str(dest)!r} left unchanged, --force replaces them anyway")
            if lower:
                print(f"warning: {lower}; replacing them (--force)", file=sys.stderr)
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            try:
                stage.rename(dest)
            except BaseException:
                old.rename(dest)
                raise
            shutil.rmtree(old)
        else:
            stage.rename(dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone already once renamed into place
    return results


def install_baseline(work: Path, dest: Path = ASSETS) -> dict:
    """Put the MoE-LLaVA baseline of a `make_baseline` run beside the embedded checkpoints: stored in
    bf16 like them, its accuracy re-measured on the stored file and the embedded 300-question test
    split, and added to dest/results.json (BASELINE: stored bf16, BASELINE_fp32: as trained). The
    baseline must have been trained with dest's recipe. dest/moe-llava is replaced by a rename."""
    from .checkpoint import load_model

    work, dest = Path(work), Path(dest)
    for need in (BASELINE, "results.json", RECIPE_FILE):
        if not (work / need).exists():
            raise MoteError(f"{str(work / need)!r} does not exist: build {str(work)!r} with "
                            "mote-make-tiny --baseline-only first")
    for need in ("results.json", RECIPE_FILE, "data/test.json"):
        if not (dest / need).is_file():
            raise MoteError(f"{str(dest / need)!r} does not exist: no embedded checkpoints to put the baseline beside")
    used, embedded = (json.loads((d / RECIPE_FILE).read_text()) for d in (work, dest))
    if used != embedded:
        diff = sorted(k for k in embedded if used.get(k) != embedded[k])
        raise MoteError(f"the baseline in {str(work)!r} was trained with another recipe than the embedded "
                        f"checkpoints (differs in {diff}); {str(dest)!r} left unchanged")
    stage, old = (dest / f".{BASELINE}.{kind}-{os.getpid()}" for kind in ("new", "old"))
    shutil.rmtree(stage, ignore_errors=True)
    try:
        save_model(load_model(work / BASELINE), stage, side_files_from=work / BASELINE, dtype=torch.bfloat16)
        acc = evaluate(stage, dest / "data" / "test.json", dest / "data" / "images", progress=False)
        print(format_accuracy(f"{BASELINE} (stored bf16)", acc))
        results = json.loads((dest / "results.json").read_text())
        results[BASELINE] = {k: v for k, v in acc.items() if k != "answers"}
        results[f"{BASELINE}_fp32"] = json.loads((work / "results.json").read_text())[BASELINE]
        final = dest / BASELINE
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        stage.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        tmp = dest / f".results.json.{os.getpid()}"
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, dest / "results.json")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return results


# command-line option -> recipe entry; the defaults are the embedded recipe's values
OPTIONS = {"--train": "n_train", "--val": "n_val", "--test": "n_test",
           "--dense-epochs": "dense_epochs", "--dense-lr": "dense_lr", "--dense-weight-decay": "dense_weight_decay",
           "--dense-train-vision": "dense_train_vision",
           "--moe-epochs": "moe_epochs", "--moe-lr": "moe_lr", "--moe-weight-decay": "moe_weight_decay",
           "--batch-size": "batch_size", "--seed": "seed"}


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mote-make-tiny", description="Build the tiny dense and MoTE checkpoints. "
                                f"Defaults: the recipe of the embedded ones ({ASSETS / RECIPE_FILE}).")
    p.add_argument("work_dir")
    for flag, key in OPTIONS.items():
        default = RECIPE[key]
        if isinstance(default, bool):
            p.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=default)
        else:
            p.add_argument(flag, dest=key, type=type(default), default=default, help=f"default {default}")
    p.add_argument("--install", action="store_true", help=f"copy the results into {ASSETS}")
    p.add_argument("--force", action="store_true",
                   help="with --install: replace the embedded checkpoints even if the new ones score lower")
    p.add_argument("--baseline-only", action="store_true",
                   help=f"only the MoE-LLaVA baseline (4 full-precision experts, top-2, no shared expert, from the "
                        "FFN), trained from --dense with the recipe's data and moe stage; with --install it goes to "
                        f"{ASSETS / BASELINE} and its accuracy into results.json")
    p.add_argument("--dense", default=None,
                   help=f"with --baseline-only: the dense checkpoint to start from (default {ASSETS / 'dense'})")
    return p


@cli_entry
def main(argv=None):
    a = parser().parse_args(argv)
    work = Path(a.work_dir)
    if not work.parent.exists():
        raise MoteError(f"parent of {str(work)!r} does not exist")
    if a.force and not a.install:
        raise MoteError("--force only applies with --install")
    if a.dense is not None and not a.baseline_only:
        raise MoteError("--dense only applies with --baseline-only (the full recipe trains its own dense model)")
    recipe = {key: getattr(a, key) for key in OPTIONS.values()}
    if a.baseline_only:
        if a.force:
            raise MoteError("--force does not apply with --baseline-only (a baseline is installed whatever it scores)")
        r = make_baseline(work, Path(a.dense) if a.dense else ASSETS / "dense", **recipe)
        print(json.dumps(r, indent=1))
        if a.install:
            install_baseline(work, ASSETS)
            print(f"installed {BASELINE} into {ASSETS}")
        return
    r = make_tiny(work, **recipe)
    print(json.dumps(r, indent=1))
    if a.install:
        install_assets(work, ASSETS, force=a.force)
        print(f"installed into {ASSETS}")

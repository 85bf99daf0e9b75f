"""Checkpoint folders: validation of LLaVA-style inputs, loading, and atomic saving.

A checkpoint is a Hugging Face folder: config.json (LlavaConfig + optional "mote") +
model.safetensors + tokenizer/processor files. Weights are only ever read from safetensors.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import MoteError
from .exporters.ckpt import check_llava_qwen2  # the one architecture check, torch-free (re-exported)

WEIGHT_FILES = ("model.safetensors",)
# Files that belong to the weights/config and are rewritten, never copied, when deriving a checkpoint.
_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json"}


def read_config(ckpt_dir: str | os.PathLike) -> dict:
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise MoteError(f"checkpoint folder {str(d)!r} does not exist; expected a folder with config.json and model.safetensors")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise MoteError(f"{str(d)!r} has no config.json; expected a Hugging Face checkpoint folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoteError(f"{cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise MoteError(f"{cfg_path} holds a JSON {type(cfg).__name__}; expected an object (a Hugging Face config)")
    return cfg


def check_weights(ckpt_dir: Path) -> Path:
    path = ckpt_dir / "model.safetensors"
    if not path.is_file():
        raise MoteError(f"{str(ckpt_dir)!r} has no model.safetensors (sharded and .bin checkpoints are not accepted)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # touching every tensor finds truncated files, not just bad headers
                f.get_slice(k).get_shape()
        size = path.stat().st_size
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise ValueError(f"file is truncated ({size} bytes, header says {8 + header_len + end})")
    except Exception as exc:  # safetensors raises several types; all mean the same thing to a user
        raise MoteError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    return path


def load_model(ckpt_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load a dense or MoTE LLaVA checkpoint; every tensor must match the structure exactly."""
    from transformers.utils import logging as hf_logging

    from .model import MoTEForConditionalGeneration

    d = Path(ckpt_dir)
    cfg = read_config(d)
    check_llava_qwen2(cfg, str(d))
    check_weights(d)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # we report missing/unexpected keys ourselves, as one line
    try:  # mismatched sizes are reported in `info` (transformers would raise a RuntimeError pointing at a log)
        model, info = MoTEForConditionalGeneration.from_pretrained(
            str(d), dtype=dtype, output_loading_info=True, local_files_only=True, ignore_mismatched_sizes=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        def show(key):  # mismatched entries are (name, shape in the file, shape config.json asks for)
            if not isinstance(key, tuple):
                return key
            return f"{key[0]} {list(key[1])} in the file, {list(key[2])} by config.json"
        summary = "; ".join(f"{k}: {[show(x) for x in sorted(v)[:3]]}{' ...' if len(v) > 3 else ''}"
                            for k, v in problems.items())
        raise MoteError(f"{d}: weights do not match config.json ({summary})")
    model.eval()
    return model


def check_output_folder(out: Path, nonempty_ok: bool = False) -> None:
    """An output folder's path, checked before any work: its parent a folder, itself a folder (empty unless
    nonempty_ok) or nothing yet. A path below a regular file is refused here, not when the first write fails."""
    if not out.parent.is_dir():
        what = "is a file, not a folder" if out.parent.exists() else "does not exist"
        raise MoteError(f"output folder's parent {str(out.parent)!r} {what}")
    if out.exists() and not out.is_dir():
        raise MoteError(f"output {str(out)!r} is a file, not a folder; choose a new path")
    if out.exists() and any(out.iterdir()) and not nonempty_ok:
        raise MoteError(f"output folder {str(out)!r} exists and is not empty; choose a new path or pass --overwrite")


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling folder; rename it to `out_dir` only if the block succeeds.

    The temporary is named as the exporters name theirs (host and pid, exporters/gguf_file.py), so the
    next writer of the same folder removes one a killed writer (SIGKILL, OOM kill) left behind; a killed
    writer never leaves anything at `out_dir` itself."""
    from safetensors import SafetensorError

    from .exporters.gguf_file import remove_stale_temporaries, temporary_prefix, write_failed

    out = Path(out_dir)
    check_output_folder(out, nonempty_ok=overwrite)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(out), suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):  # a full disk, a file-size limit: one error line
            raise write_failed(out, exc) from None
        raise


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy tokenizer/processor files (everything but weights and config) from one checkpoint to another."""
    for p in Path(src).iterdir():
        if p.is_file() and p.name not in _MODEL_FILES and not p.name.endswith((".bin", ".safetensors", ".pt")):
            shutil.copy2(p, dst / p.name)


def save_model(model, out_dir: Path, side_files_from: Path | None = None, dtype: torch.dtype | None = None) -> None:
    """Write config.json + model.safetensors (+ side files) into out_dir.

    Tensors are stored under the model's own module names (`model.language_model.layers.N...`):
    transformers 5's save_pretrained renames keys through its legacy-conversion tables, and does so
    differently for subclasses, so exporters could not rely on its names. from_pretrained reads
    these names as they are. A tied lm_head is stored once (as the embedding).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous().clone()
             for k, v in state.items()}
    if dtype is not None:
        model.config.dtype = str(dtype).removeprefix("torch.")
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(out_dir))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out_dir))
    if side_files_from is not None:
        copy_side_files(side_files_from, out_dir)

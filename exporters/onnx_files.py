"""Reading back an ONNX export folder's JSON files (written by onnx_folder.py), checked, so every reader
(mote-run's onnxruntime engine, the onnxruntime-genai files, mote-bench) gets one error line for a corrupt
value instead of a KeyError or TypeError later: config.json with its "mote_onnx" entry, and the image
processor settings."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import MoteExportError

DEFAULT_FILES = {"vision": "vision.onnx", "embedding": "embedding.onnx", "decoder": "decoder.onnx",
                 "data": "model.onnx.data"}


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoteExportError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MoteExportError(f"{path} does not hold a JSON object")
    return data


_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
_OPTIONAL_SIZES = ("num_key_value_heads", "max_position_embeddings")


SIZE_MAX = 2 ** 31 - 1  # a width, count or token id past int32 is a corrupt value, not a model
IMAGE_SIZE_MAX = 8192  # pixels a side (SigLIP is 224-512): a larger one is a resize to gigabytes
NAME_MAX = 255  # bytes of a file name (Linux, macOS, Windows); a longer one fails in stat as ENAMETOOLONG


def count(v, least: int = 1, most: int = SIZE_MAX) -> bool:
    """v is an int (not a bool) in [least, most]."""
    return isinstance(v, int) and not isinstance(v, bool) and least <= v <= most


def _file_name(v) -> bool:
    return (isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\0" not in v
            and len(v.encode("utf-8", "surrogatepass")) <= NAME_MAX)


def folder_config(folder: Path) -> dict:
    """config.json of an export folder, with its "mote_onnx" entry and the sizes the readers use checked
    (a corrupt value is one error line here, not a KeyError or TypeError later)."""
    cfg = read_json(folder / "config.json")
    info = cfg.get("mote_onnx")
    if not isinstance(info, dict) or cfg.get("model_type") != "qwen2":
        raise MoteExportError(f"{folder}/config.json is not an ONNX export's (no 'mote_onnx' entry); "
                              "expected a folder written by mote-export --format onnx")
    bad = [k for k in _SIZES if not count(cfg.get(k))]
    bad += [k for k in _OPTIONAL_SIZES if cfg.get(k) is not None and not count(cfg[k])]
    bad += [] if count(info.get("image_size"), 1, IMAGE_SIZE_MAX) else ["mote_onnx.image_size"]
    bad += [] if count(info.get("image_seq_length")) else ["mote_onnx.image_seq_length"]
    vocab = cfg.get("vocab_size") if count(cfg.get("vocab_size")) else 1
    bad += [] if count(info.get("image_token_index"), 0, vocab - 1) else ["mote_onnx.image_token_index"]
    files = info.get("files") or {}
    if not isinstance(files, dict) or not all(_file_name(v) for v in files.values()):
        bad.append(f"mote_onnx.files (file names in the folder, at most {NAME_MAX} bytes)")
    mote = cfg.get("mote") or {}
    if not isinstance(mote, dict) or not (mote.get("num_experts") is None or count(mote["num_experts"])):
        bad.append("mote (a dict; num_experts a positive integer)")
    if bad:
        raise MoteExportError(f"{folder}/config.json: {', '.join(bad)} missing or of the wrong type (sizes are "
                              f"integers 1 to {SIZE_MAX}, image_size at most {IMAGE_SIZE_MAX}, the image token "
                              "below vocab_size); export the folder again with mote-export --format onnx")
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    if cfg["hidden_size"] % heads or heads % kv_heads:
        raise MoteExportError(f"{folder}/config.json: hidden_size {cfg['hidden_size']}, num_attention_heads {heads} "
                              f"and num_key_value_heads {kv_heads} do not divide (Qwen2 needs heads | hidden and "
                              "kv_heads | heads); export the folder again with mote-export --format onnx")
    return cfg


def image_processor(folder: Path) -> dict:
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        if (folder / name).is_file():
            data = read_json(folder / name)
            proc = data.get(key) if key else data
            if isinstance(proc, dict):
                proc = proc | ({"image_token": data["image_token"]} if key and "image_token" in data else {})
                _check_processor(proc, folder / name)
                return proc
    raise MoteExportError(f"{folder} has no image processor settings (processor_config.json or "
                          "preprocessor_config.json)")


_F32_MAX = float(np.finfo(np.float32).max)


def _number(v) -> bool:
    """A JSON number pixel_values can take as float32 (an int of any size, a float, not a bool, NaN or inf)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= _F32_MAX  # NaN, inf: False


def _check_processor(proc: dict, where: Path) -> None:
    """The settings pixel_values reads have the types the HF processor writes."""
    bad = [k for k in ("resample",) if k in proc and not (count(proc[k], 0) and proc[k] <= 5)]
    bad += [k for k in ("rescale_factor",) if k in proc and not _number(proc[k])]
    for k in ("image_mean", "image_std"):  # one number or one per channel; a std of 0 divides by zero
        v = proc.get(k, [1.0])
        v = v if isinstance(v, list) and len(v) in (1, 3) else [v]
        if not all(_number(x) and (k == "image_mean" or x != 0) for x in v):
            bad.append(k)
    bad += [k for k in ("image_token",) if k in proc and not (isinstance(proc[k], str) and proc[k])]
    if bad:
        raise MoteExportError(f"{where}: {', '.join(bad)} of the wrong type or value (resample 0-5, numbers, "
                              "3 means / non-zero stds, a token string); export the folder again")

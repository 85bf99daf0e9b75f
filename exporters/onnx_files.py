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
_INFO_SIZES = ("image_size", "image_seq_length")


def count(v, least: int = 1) -> bool:
    """v is an int (not a bool) >= least."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


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
    bad += [f"mote_onnx.{k}" for k in _INFO_SIZES if not count(info.get(k))]
    bad += [] if count(info.get("image_token_index"), 0) else ["mote_onnx.image_token_index"]
    files = info.get("files") or {}
    if not isinstance(files, dict) or not all(isinstance(v, str) and v and "/" not in v and v not in (".", "..")
                                              for v in files.values()):
        bad.append("mote_onnx.files (file names in the folder)")
    if not isinstance(cfg.get("mote") or {}, dict):
        bad.append("mote")
    if bad:
        raise MoteExportError(f"{folder}/config.json: {', '.join(bad)} missing or of the wrong type (sizes are "
                              "positive integers); export the folder again with mote-export --format onnx")
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


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


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

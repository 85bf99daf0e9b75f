"""Checkpoint folders read without torch: config.json validation and tensor-name resolution.

The tensors are stored under transformers 5 module names (`model.language_model.*`, `lm_head`);
folders written by transformers' own save_pretrained may carry the legacy names
(`language_model.model.*`, `language_model.lm_head`). Both are accepted.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import MoteExportError
from .quantize import all_finite
from .safetensors_np import SafetensorsFile

_ACCEPTED = "accepted: model_type 'llava' with a 'siglip_vision_model' tower and a 'qwen2' language model"
_LM_PREFIXES = ("model.language_model.", "language_model.model.")
_LM_HEADS = ("lm_head.weight", "language_model.lm_head.weight")


def check_llava_qwen2(cfg, where: str) -> None:
    """Accept only the shape MoTE supports: LLaVA with a SigLIP tower, GELU MLP connector, Qwen2 LLM
    (also the torch side's check: mote_edge.checkpoint imports it)."""
    if not isinstance(cfg, dict) or cfg.get("model_type") != "llava":
        got = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise MoteExportError(f"{where}: unsupported architecture model_type={got!r}; {_ACCEPTED}")
    vision = (cfg.get("vision_config") or {}).get("model_type")
    text = (cfg.get("text_config") or {}).get("model_type")
    if vision not in ("siglip_vision_model", "siglip"):
        raise MoteExportError(f"{where}: unsupported vision tower {vision!r}; {_ACCEPTED}")
    if text != "qwen2":
        raise MoteExportError(f"{where}: unsupported language model {text!r}; {_ACCEPTED}")
    if cfg.get("projector_hidden_act", "gelu") != "gelu":
        raise MoteExportError(f"{where}: unsupported connector activation {cfg.get('projector_hidden_act')!r}; "
                              "accepted: a 2-layer GELU MLP")


def read_config(ckpt_dir: str | Path) -> dict:
    """config.json of a LLaVA (SigLIP + GELU MLP + Qwen2) checkpoint folder, validated."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise MoteExportError(f"checkpoint folder {str(d)!r} does not exist; expected a folder with "
                              "config.json and model.safetensors")
    path = d / "config.json"
    if not path.is_file():
        raise MoteExportError(f"{str(d)!r} has no config.json; expected a Hugging Face checkpoint folder")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoteExportError(f"{path} is not valid JSON ({exc})") from None
    check_llava_qwen2(cfg, str(d))
    return cfg


FLOAT_DTYPES = ("F32", "F16", "BF16")


class Weights(SafetensorsFile):
    """model.safetensors of a checkpoint, addressed by names inside the language model."""

    def __init__(self, ckpt_dir: str | Path):
        path = Path(ckpt_dir) / "model.safetensors"
        if not path.is_file():
            raise MoteExportError(f"{str(ckpt_dir)!r} has no model.safetensors "
                                  "(sharded and .bin checkpoints are not accepted)")
        super().__init__(path)
        # Pick the naming scheme once, from the embedding every LLaVA has.
        self._prefix = next((p for p in _LM_PREFIXES if p + "embed_tokens.weight" in self), None)
        if self._prefix is None:
            raise MoteExportError(f"{path}: no language-model embedding "
                                  f"({' or '.join(p + 'embed_tokens.weight' for p in _LM_PREFIXES)})")

    def get(self, name: str) -> np.ndarray:
        """A weight of the checkpoint: float tensors only (an integer tensor here is a corrupt or foreign file)."""
        dtype = self._entries[name]["dtype"] if name in self._entries else None
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise MoteExportError(f"{self.path}: tensor {name!r} is {dtype}; accepted: {', '.join(FLOAT_DTYPES)}")
        return super().get(name)

    def lm_name(self, suffix: str) -> str:
        """Full name of `suffix` (e.g. 'layers.0.mlp.router.weight') inside the language model."""
        return self._prefix + suffix

    def has_lm(self, suffix: str) -> bool:
        return self.lm_name(suffix) in self

    def lm(self, suffix: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor as float32 (exact from fp16/bf16), its shape checked against `shape`."""
        name = self.lm_name(suffix)
        if name not in self:
            raise MoteExportError(f"{self.path}: tensor {name!r} is missing")
        self.check_shape(name, shape)
        a = np.asarray(self.get(name), dtype=np.float32)
        if not all_finite(a):
            raise MoteExportError(f"{self.path}: tensor {name!r} contains NaN or inf")
        return a

    def check_shape(self, name: str, shape: tuple[int, ...] | None) -> None:
        if shape is not None and self.shape(name) != tuple(shape):
            raise MoteExportError(f"{self.path}: {name!r} has shape {list(self.shape(name))}, "
                                  f"config.json implies {list(shape)}")

    def lm_head_name(self) -> str | None:
        return next((n for n in _LM_HEADS if n in self), None)

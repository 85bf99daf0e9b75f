"""MoTE on top of transformers' LLaVA: `apply_mote_(model, cfg)` swaps dense Qwen2 MLPs for MoTE
blocks in place (torchao's `quantize_` style), and `MoTEForConditionalGeneration` is the LLaVA class
that rebuilds that structure from config.json's "mote" key so `from_pretrained` loads it back.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import LlavaForConditionalGeneration

from .config import MoTEConfig
from .moe import MoTEBlock


def decoder_layers(model: LlavaForConditionalGeneration) -> nn.ModuleList:
    return model.model.language_model.layers


@torch.no_grad()
def apply_mote_(model: LlavaForConditionalGeneration, cfg: MoTEConfig, init: str | None = "ffn",
                seed: int = 0) -> LlavaForConditionalGeneration:
    """Replace the MLP of each layer in `cfg.layers` by a MoTE block.

    init="ffn": routed experts start as copies of the dense FFN; "random": normal(0, initializer_range);
    None: structure only (weights come from a checkpoint). The dense FFN itself becomes the frozen
    shared expert (MoTE) or is dropped (MoE-LLaVA).
    """
    text = model.config.text_config
    layers = decoder_layers(model)
    cfg.validate(len(layers))
    gen = torch.Generator().manual_seed(seed)
    for i in cfg.layers:
        dense = layers[i].mlp
        if isinstance(dense, MoTEBlock):
            raise ValueError(f"layer {i} is already a MoE block")
        ref = dense.gate_proj.weight
        shared = dense if cfg.shared_expert else None
        block = MoTEBlock(text.hidden_size, text.intermediate_size, cfg, shared).to(ref.device, ref.dtype)
        if init is not None:
            std = text.initializer_range
            block.router.weight.normal_(0.0, std, generator=gen)
            for expert in block.experts:
                for name in ("gate_proj", "up_proj", "down_proj"):
                    w = getattr(expert, name).weight
                    if init == "ffn":
                        w.copy_(getattr(dense, name).weight)
                    else:
                        w.copy_(torch.randn(w.shape, generator=gen) * std)
        layers[i].mlp = block
    model.config.mote = cfg.to_dict()
    return model


def mote_config(model) -> MoTEConfig | None:
    d = getattr(model.config, "mote", None)
    return MoTEConfig.from_dict(d) if d else None


class MoTEForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA whose config may carry a "mote" entry; the MoE structure is rebuilt before loading."""

    @classmethod
    def _register_key_renames(cls) -> None:
        """transformers 5 looks up its legacy key renames (`language_model.lm_head` -> `lm_head`, ...)
        by class name first; a subclass is not found under "llava", so register llava's for it."""
        from transformers import conversion_mapping as cm

        if cls.__name__ not in cm.USER_REGISTERED_MAPPINGS:
            cm.register_checkpoint_conversion_mapping(cls.__name__, cm.get_checkpoint_conversion_mapping("llava"),
                                                      overwrite=True)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        cls._register_key_renames()
        return super().from_pretrained(*args, **kwargs)

    def __init__(self, config):
        super().__init__(config)
        d = getattr(config, "mote", None)
        if d:
            apply_mote_(self, MoTEConfig.from_dict(d), init=None)

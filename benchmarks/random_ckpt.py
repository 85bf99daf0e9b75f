"""Random-weight checkpoint folders at real model shapes, written without torch.

A benchmark of file sizes and CPU speed needs models of the real shapes, not trained ones, and
building them through torch would need the whole model in memory (Qwen2.5-1.5B MoTE: 6.2e9
parameters). This writer streams a safetensors file tensor by tensor with exactly the names,
shapes and config.json layout that mote_edge's `save_model` writes for the same model
(tests/test_bench.py builds the same shape through mote_edge and compares), so every exporter
reads it as it would read a trained checkpoint, and `mote_edge.checkpoint.load_model` loads it.

Values: norm weights 1, biases 0, every other tensor a window of one shared pool of N(0, 0.02)
bf16 values, starting at an offset hashed from the tensor name. Speed and size do not depend on
the values, and copying windows keeps the writer disk-bound (drawing 6e9 normals would take
minutes). Tensors larger than the pool (embeddings) repeat it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import mote_edge  # its __init__ is empty: no torch; only used to find the embedded tiny checkpoint

from ..exporters.errors import MoteExportError

TINY_CKPT = Path(mote_edge.__file__).parent / "assets" / "tiny" / "mote"
VARIANTS = ("dense", "mote", "moe-llava")
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
POOL = (1 << 24) + 4099  # not a multiple of any row width: rows of a repeated pool do not line up
STD = 0.02  # Qwen2's initializer_range

# SigLIP so400m-patch14-384 (the tower of LLaVA-style Qwen2.5 models): 729 image tokens.
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     image_size=384, patch_size=14, vision_use_head=False)
_QWEN25 = dict(num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True)
QWEN25_TEXT = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16),
}
QWEN25_VOCAB = 151936
PRESETS = ("tiny", *QWEN25_TEXT)


@dataclass(frozen=True)
class Preset:
    """A model shape: SiglipVisionConfig and Qwen2Config keyword arguments (mote_edge.tiny's form)."""
    name: str
    vision: dict
    text: dict
    vocab: int


def _tiny_config() -> dict:
    return json.loads((TINY_CKPT / "config.json").read_text())


def preset(name: str, vision_layers: int | None = None) -> Preset:
    """The shape preset `name`; `vision_layers` truncates the SigLIP tower (benchmark time limits)."""
    key = str(name).strip().lower()
    if key not in PRESETS:
        raise MoteExportError(f"unknown preset {name!r}; accepted: {', '.join(PRESETS)}")
    if key == "tiny":  # the embedded checkpoint's own shapes
        cfg = _tiny_config()
        t, v = cfg["text_config"], cfg["vision_config"]
        text = {k: t[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings")}
        text["rope_theta"] = t["rope_parameters"]["rope_theta"]
        vision = {k: v[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                    "image_size", "patch_size", "vision_use_head")}
        p = Preset(key, vision, text, t["vocab_size"])
    else:
        p = Preset(key, dict(SIGLIP_SO400M), _QWEN25 | QWEN25_TEXT[key], QWEN25_VOCAB)
    if vision_layers is not None:
        if not 1 <= vision_layers <= p.vision["num_hidden_layers"]:
            raise MoteExportError(f"--vision-layers {vision_layers}: accepted 1..{p.vision['num_hidden_layers']}")
        p = Preset(p.name, p.vision | {"num_hidden_layers": vision_layers}, p.text, p.vocab)
    return p


def moe_settings(variant: str, n_layers: int, experts: int = 4, top_k: int | None = None) -> dict | None:
    """config.json's "mote" entry (MoTEConfig.to_dict()); None for dense. Paper settings: MoTE top-1,
    MoE-LLaVA top-2, every layer."""
    if variant not in VARIANTS:
        raise MoteExportError(f"unknown variant {variant!r}; accepted: {', '.join(VARIANTS)}")
    if variant == "dense":
        return None
    k = top_k if top_k is not None else (1 if variant == "mote" else min(2, experts))
    if experts < 1 or not 1 <= k <= experts:
        raise MoteExportError(f"experts {experts}, top_k {k}: need 1 <= top_k <= experts")
    return {"balance_coef": 0.01, "init": "random", "layers": list(range(n_layers)), "num_experts": experts,
            "top_k": k, "variant": variant}


def config_json(p: Preset, mote: dict | None) -> dict:
    """config.json as LlavaConfig.save_pretrained writes it for mote_edge.tiny.dense_config (diff against
    the defaults, sorted keys), plus the "mote" entry and the bf16 dtype save_model records."""
    tiny = _tiny_config()
    t, v = p.text, p.vision
    text = {
        "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": tiny["text_config"]["eos_token_id"],
        "hidden_act": "silu", "hidden_size": t["hidden_size"], "initializer_range": STD,
        "intermediate_size": t["intermediate_size"], "layer_types": ["full_attention"] * t["num_hidden_layers"],
        "max_position_embeddings": t["max_position_embeddings"], "max_window_layers": 28, "model_type": "qwen2",
        "num_attention_heads": t["num_attention_heads"], "num_hidden_layers": t["num_hidden_layers"],
        "num_key_value_heads": t["num_key_value_heads"], "pad_token_id": tiny["text_config"]["pad_token_id"],
        "rms_norm_eps": 1e-06, "rope_parameters": {"rope_theta": float(t["rope_theta"]), "rope_type": "default"},
        "sliding_window": None, "tie_word_embeddings": t["tie_word_embeddings"], "use_cache": True,
        "use_sliding_window": False, "vocab_size": p.vocab,
    }
    vision = {"attention_dropout": 0.0, "hidden_act": "gelu_pytorch_tanh", "hidden_size": v["hidden_size"],
              "image_size": v["image_size"], "intermediate_size": v["intermediate_size"], "layer_norm_eps": 1e-06,
              "model_type": "siglip_vision_model", "num_attention_heads": v["num_attention_heads"],
              "num_channels": 3, "num_hidden_layers": v["num_hidden_layers"], "patch_size": v["patch_size"],
              "vision_use_head": v["vision_use_head"]}
    cfg = {"dtype": "bfloat16", "image_seq_length": (v["image_size"] // v["patch_size"]) ** 2,
           "image_token_index": tiny["image_token_index"], "model_type": "llava", "multimodal_projector_bias": True,
           "projector_hidden_act": "gelu", "text_config": text, "tie_word_embeddings": t["tie_word_embeddings"],
           "transformers_version": tiny["transformers_version"], "vision_config": vision,
           "vision_feature_layer": -1, "vision_feature_select_strategy": "full"}
    if mote is not None:
        cfg["mote"] = mote
    return dict(sorted(cfg.items()))


def tensor_specs(p: Preset, mote: dict | None) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, in state_dict order (a tied lm_head is not stored)."""
    v, t = p.vision, p.text
    D, VF, P = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    H, F = t["hidden_size"], t["intermediate_size"]
    kv = H // t["num_attention_heads"] * t["num_key_value_heads"]
    vt = "model.vision_tower."
    out = [(vt + "embeddings.patch_embedding.weight", (D, 3, P, P)), (vt + "embeddings.patch_embedding.bias", (D,)),
           (vt + "embeddings.position_embedding.weight", ((v["image_size"] // P) ** 2, D))]
    for i in range(v["num_hidden_layers"]):
        L = f"{vt}encoder.layers.{i}."
        out += [(L + "layer_norm1.weight", (D,)), (L + "layer_norm1.bias", (D,))]
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            out += [(f"{L}self_attn.{proj}.weight", (D, D)), (f"{L}self_attn.{proj}.bias", (D,))]
        out += [(L + "layer_norm2.weight", (D,)), (L + "layer_norm2.bias", (D,)),
                (L + "mlp.fc1.weight", (VF, D)), (L + "mlp.fc1.bias", (VF,)),
                (L + "mlp.fc2.weight", (D, VF)), (L + "mlp.fc2.bias", (D,))]
    out += [(vt + "post_layernorm.weight", (D,)), (vt + "post_layernorm.bias", (D,)),
            ("model.multi_modal_projector.linear_1.weight", (H, D)), ("model.multi_modal_projector.linear_1.bias", (H,)),
            ("model.multi_modal_projector.linear_2.weight", (H, H)), ("model.multi_modal_projector.linear_2.bias", (H,)),
            ("model.language_model.embed_tokens.weight", (p.vocab, H))]
    moe_layers = set(mote["layers"]) if mote else set()
    ffn = lambda prefix: [(f"{prefix}gate_proj.weight", (F, H)), (f"{prefix}up_proj.weight", (F, H)),
                          (f"{prefix}down_proj.weight", (H, F))]
    for i in range(t["num_hidden_layers"]):
        L = f"model.language_model.layers.{i}."
        out += [(L + "self_attn.q_proj.weight", (H, H)), (L + "self_attn.q_proj.bias", (H,)),
                (L + "self_attn.k_proj.weight", (kv, H)), (L + "self_attn.k_proj.bias", (kv,)),
                (L + "self_attn.v_proj.weight", (kv, H)), (L + "self_attn.v_proj.bias", (kv,)),
                (L + "self_attn.o_proj.weight", (H, H))]
        if i not in moe_layers:
            out += ffn(L + "mlp.")
        else:  # MoTEBlock's attribute order: shared expert, router, experts
            out += ffn(L + "mlp.shared_expert.") if mote["variant"] == "mote" else []
            out.append((L + "mlp.router.weight", (mote["num_experts"], H)))
            for e in range(mote["num_experts"]):
                out += ffn(f"{L}mlp.experts.{e}.")
        out += [(L + "input_layernorm.weight", (H,)), (L + "post_attention_layernorm.weight", (H,))]
    out.append(("model.language_model.norm.weight", (H,)))
    if not t["tie_word_embeddings"]:
        out.append(("lm_head.weight", (p.vocab, H)))
    return out


def _bf16_pool(seed: int) -> np.ndarray:
    """POOL normal(0, STD) values as bf16 bit patterns (round to nearest even)."""
    x = np.random.default_rng(seed).standard_normal(POOL, dtype=np.float32) * np.float32(STD)
    u = x.view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def _value_kind(name: str) -> str:
    if name.endswith(".bias"):
        return "zeros"
    if "norm" in name and name.endswith(".weight") and "embed" not in name:
        return "ones"  # layer_norm1/2, post_layernorm, input_/post_attention_layernorm, norm
    return "random"


def _write_tensor(f, name: str, n: int, pool: np.ndarray, seed: int) -> None:
    kind = _value_kind(name)
    if kind != "random":
        f.write(np.full(n, 0x3F80 if kind == "ones" else 0, np.uint16).tobytes())  # bf16 1.0 is 0x3F80
        return
    start = zlib.crc32(f"{seed}:{name}".encode()) % POOL
    while n:
        k = min(n, POOL - start)
        f.write(memoryview(pool[start:start + k]))
        n, start = n - k, 0


def write_checkpoint(out_dir: str | Path, p: Preset, variant: str, experts: int = 4, top_k: int | None = None,
                     seed: int = 0, progress: bool = True) -> dict:
    """Write a random-weight bf16 checkpoint folder of shape `p` and `variant` (dense / mote / moe-llava).

    Written into a temporary sibling folder and renamed when complete; an existing `out_dir` is an
    error. Returns {"path", "params", "bytes"}."""
    out = Path(out_dir)
    mote = moe_settings(variant, p.text["num_hidden_layers"], experts, top_k)
    if not out.parent.is_dir():
        raise MoteExportError(f"output folder {str(out.parent)!r} does not exist")
    if out.exists():
        raise MoteExportError(f"{str(out)!r} already exists; choose a new folder")
    specs = tensor_specs(p, mote)
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        n = int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + 2 * n]}
        off += 2 * n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as the reference writer does
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pool = _bf16_pool(seed)
        with open(tmp / "model.safetensors", "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for name, shape in _progress(specs, f"random {p.name} {variant}", progress):
                _write_tensor(f, name, int(np.prod(shape, dtype=np.int64)), pool, seed)
        _write_side_files(tmp, p, mote)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the folder private; a checkpoint is not
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(out), "params": off // 2, "bytes": (out / "model.safetensors").stat().st_size}


def _progress(items: list, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="tensor")


def _write_side_files(d: Path, p: Preset, mote: dict | None) -> None:
    """config.json, generation_config.json (as save_model writes them) and the tiny checkpoint's
    tokenizer and processor, the processor resized to the preset's image (the exporters pad the
    vocabulary to the embedding rows)."""
    cfg = config_json(p, mote)
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {"_from_model_config": True, "eos_token_id": cfg["text_config"]["eos_token_id"],
           "output_attentions": False, "output_hidden_states": False,
           "pad_token_id": cfg["text_config"]["pad_token_id"], "transformers_version": cfg["transformers_version"],
           "use_cache": True}
    (d / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    for name in SIDE_FILES:
        shutil.copy2(TINY_CKPT / name, d / name)
    proc = json.loads((TINY_CKPT / "processor_config.json").read_text())
    size = p.vision["image_size"]
    proc["image_processor"]["size"] = {"height": size, "width": size}
    proc["patch_size"] = p.vision["patch_size"]
    (d / "processor_config.json").write_text(json.dumps(proc, indent=2) + "\n")

"""mote-export --format onnx: a LLaVA (SigLIP + MLP + Qwen2) checkpoint, MoTE / MoE-LLaVA / dense, -> a folder
that stock onnxruntime runs. No torch: graphs are built from the safetensors with onnx.helper.

    DIR/vision.onnx          pixel_values -> image_features            (exporters/onnx_vision.py)
    DIR/embedding.onnx       input_ids + image_features -> inputs_embeds (exporters/onnx_llm.py)
    DIR/decoder.onnx         inputs_embeds | input_ids, attention_mask, position_ids, past_key_values.*
                             -> logits, present.*                       (exporters/onnx_llm.py)
    DIR/model.onnx.data      every weight of the three models, once     (exporters/onnx_graph.py)
    DIR/config.json          model_type "qwen2" (the text config) + "mote_onnx": what mote-run needs
    DIR/generation_config.json, DIR/genai_config.json (onnxruntime-genai, text decoder "qwen2")
    DIR/tokenizer.json ...   tokenizer, chat template and processor files of the checkpoint

--onnx-kernels picks the body of the routed-expert ops (exporters/onnx_graph.py): exact (default;
ai.mote::TernaryMatMul, int8 codes, per-token int8 activations as MoTE trains, standard ops only) or fast
(ai.mote::TernaryMatMulNBits, 2-bit codes, com.microsoft MatMulNBits: 4x smaller experts, int8 activations
per 128-block). Everything else is fp32 in both.

The folder is written to a temporary sibling and renamed when complete: on any error nothing is left.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from .ckpt import Weights, read_config
from .errors import MoteExportError
from .gguf_file import remove_stale_temporaries, temporary_prefix
from .gguf_llm import _check_layers, llm_config
from .gguf_mmproj import image_normalization
from .onnx_graph import DATA_FILE, WeightFile, functions_used, save_model

KERNELS = ("exact", "fast")
FILES = {"vision": "vision.onnx", "embedding": "embedding.onnx", "decoder": "decoder.onnx"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "processor_config.json", "preprocessor_config.json")


def _image_token_id(cfg: dict, vocab: int, where: str) -> int:
    tid = cfg.get("image_token_index", cfg.get("image_token_id"))
    if not isinstance(tid, int) or not 0 <= tid < vocab:
        raise MoteExportError(f"{where}/config.json: image_token_index {tid!r} is not a token id of the "
                              f"{vocab}-token vocabulary")
    return tid


def _eos(ckpt: Path, cfg: dict):
    gen = ckpt / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
            if eos is not None:
                return eos
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MoteExportError(f"{gen} is not valid JSON ({exc})") from None
    return cfg["text_config"].get("eos_token_id")


def _configs(cfg: dict, c, spec, kernels: str, image_token: int, eos, ckpt: Path) -> tuple[dict, dict, dict]:
    t = dict(cfg["text_config"])
    text = t | {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": c.tied,
                "rope_theta": c.rope_theta, "use_cache": True}
    text["mote_onnx"] = {
        "format_version": 1, "kernels": kernels, "variant": c.variant, "files": dict(FILES, data=DATA_FILE),
        "image_token_index": image_token, "image_seq_length": spec.n_patches, "image_size": spec.image,
        "num_channels": spec.channels, "vision_feature_layer": spec.layers, "source": ckpt.resolve().name,
    }
    if cfg.get("mote"):
        text["mote"] = cfg["mote"]
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    pad = t.get("pad_token_id")
    gen = {"eos_token_id": eos, "pad_token_id": pad, "do_sample": False}
    first_eos = eos_ids[0] if eos_ids else 0
    head = c.hidden // c.heads
    genai = {
        "model": {
            "bos_token_id": t.get("bos_token_id") if t.get("bos_token_id") is not None else first_eos,
            "context_length": c.ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": FILES["decoder"], "head_size": head, "hidden_size": c.hidden,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": c.heads, "num_hidden_layers": c.layers, "num_key_value_heads": c.kv_heads,
            },
            "eos_token_id": eos_ids if len(eos_ids) > 1 else first_eos,
            "pad_token_id": pad if pad is not None else first_eos,
            "type": "qwen2", "vocab_size": c.vocab,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": min(c.ctx, 2048), "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
    return text, gen, genai


def check_onnx_output(out: Path) -> None:
    if out.exists():
        raise MoteExportError(f"output {str(out)!r} already exists; --format onnx writes a new folder: remove it "
                              "or choose another name")
    if not out.parent.is_dir():
        raise MoteExportError(f"output folder {str(out.parent)!r} does not exist")


def write_onnx_folder(ckpt_dir: str | Path, out_dir: str | Path, kernels: str = "exact",
                      progress: bool = True) -> dict:
    """Write the ONNX export folder (see the module docstring); returns a summary (format_summary)."""
    from .onnx_llm import build_decoder, build_embedding
    from .onnx_vision import VisionSpec, build_vision

    ckpt, out = Path(ckpt_dir), Path(out_dir)
    kernels = str(kernels).strip().lower()
    if kernels not in KERNELS:
        raise MoteExportError(f"--onnx-kernels {kernels!r}; accepted: {', '.join(KERNELS)}")
    cfg = read_config(ckpt)
    c = llm_config(cfg, str(ckpt))
    spec = VisionSpec(cfg, str(ckpt))
    image_token = _image_token_id(cfg, c.vocab, str(ckpt))
    if not (ckpt / "tokenizer.json").is_file():
        raise MoteExportError(f"{ckpt} has no tokenizer.json; accepted: a Hugging Face fast (BPE) tokenizer")
    image_normalization(ckpt)  # the processor settings mote-run needs
    eos = _eos(ckpt, cfg)
    check_onnx_output(out)
    t0 = time.perf_counter()
    remove_stale_temporaries(out)  # a killed export's hidden folder
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(out), suffix=".tmp", dir=out.parent))
    try:
        sizes = {}
        with Weights(ckpt) as w, WeightFile(tmp / DATA_FILE) as wf:
            w.check_shape(w.lm_name("embed_tokens.weight"), (c.vocab, c.hidden))
            _check_layers(w, c)
            steps = (("vision", lambda: build_vision(w, cfg, wf, spec)),
                     ("embedding", lambda: build_embedding(w, c, wf, image_token)),
                     ("decoder", lambda: build_decoder(w, c, wf, kernels)))
            info = None
            for key, build in steps:
                if progress:
                    print(f"onnx: building {FILES[key]} ...", flush=True)
                made = build()
                model, info = made if isinstance(made, tuple) else (made, info)
                missing = functions_used(model) - {(f.domain, f.name) for f in model.functions}
                if missing:  # every custom node must ship its definition (the model would not load)
                    raise RuntimeError(f"{FILES[key]}: no function for {sorted(missing)}")
                sizes[FILES[key]] = save_model(model, tmp / FILES[key])
            sizes[DATA_FILE] = wf.nbytes
            n_tensors = wf.tensors
        text, gen, genai = _configs(cfg, c, spec, kernels, image_token, eos, ckpt)
        for name, obj in (("config.json", text), ("generation_config.json", gen), ("genai_config.json", genai)):
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        copied = []
        for name in TOKENIZER_FILES:
            if (ckpt / name).is_file():
                shutil.copy2(ckpt / name, tmp / name)
                copied.append(name)
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes the folder private; an export is not
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(out), "kernels": kernels, "variant": c.variant, "experts": c.experts, "top_k": c.top_k,
            "moe_layers": c.moe_layers, "files": sizes, "tensors": n_tensors, "ternary_nodes": info.ternary_nodes,
            "routed_bytes": info.routed_bytes, "copied": copied, "seconds": time.perf_counter() - t0}


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def format_summary(s: dict) -> str:
    mib = 2 ** 20
    head = f"{s['path']}: ONNX ({s['kernels']} ternary body), {s['variant']}"
    if s["variant"] != "dense":
        head += f", {s['experts']} experts top-{s['top_k']}, MoE layers {s['moe_layers']}"
    lines = [head]
    lines += [f"  {name:<22} {size / mib:>10.2f} MiB" for name, size in s["files"].items()]
    lines.append(f"  {s['tensors']} weight tensors in {DATA_FILE}")
    if s["ternary_nodes"]:
        form = ("ai.mote::TernaryMatMulNBits nodes (2-bit codes, fp32 block scales: MatMulNBits)"
                if s["kernels"] == "fast" else "ai.mote::TernaryMatMul nodes (int8 codes + fp32 scale: MatMulInteger)")
        lines.append(f"  routed experts: {s['ternary_nodes']} {form}, {s['routed_bytes'] / mib:.2f} MiB")
    lines.append(f"  copied: {', '.join(s['copied'])}")
    lines.append(f"  total {sum(s['files'].values()) / mib:.2f} MiB in {s['seconds']:.1f} s")
    return "\n".join(lines)

"""mote-export --format onnx: a LLaVA (SigLIP + MLP + Qwen2) checkpoint, MoTE / MoE-LLaVA / dense, -> a folder
that stock onnxruntime runs. No torch: graphs are built from the safetensors with onnx.helper.

    DIR/vision.onnx          pixel_values -> image_features            (exporters/onnx_vision.py)
    DIR/embedding.onnx       input_ids + image_features -> inputs_embeds (exporters/onnx_llm.py)
    DIR/decoder.onnx         inputs_embeds | input_ids, attention_mask, position_ids, past_key_values.*
                             -> logits, present.*                       (exporters/onnx_llm.py)
    DIR/model.onnx.data      every weight of the three models, once     (exporters/onnx_graph.py)
    DIR/config.json          model_type "qwen2" (the text config) + "mote_onnx": what mote-run needs
    DIR/generation_config.json
    DIR/genai_config.json, genai_processor_config.json, decoder_genai.onnx
                             onnxruntime-genai runs the folder as a VLM   (exporters/onnx_genai.py)
    DIR/tokenizer.json ...   tokenizer, chat template and processor files of the checkpoint

--onnx-kernels picks the body of the routed-expert ops (exporters/onnx_graph.py): exact (default;
ai.mote::TernaryMatMul, int8 codes, per-token int8 activations as MoTE trains, standard ops only) or fast
(ai.mote::TernaryMatMulNBits, 2-bit codes, com.microsoft MatMulNBits: 4x smaller experts, int8 activations
per 128-block). --shared-type / --other-type / --expert-type (f32 default | f16 | q8_0 | q4_0) set the
other weights' types, group by group (exporters/onnx_llm.py): q8_0 / q4_0 are GGUF's Q8_0 / Q4_0 numbers as
com.microsoft MatMulNBits (and GatherBlockQuantized for the embedding), f16 is widened to fp32 on load.
QMoE (com.microsoft) is not used: measured, it is neither exact nor faster than the per-expert nodes
(README). Routers, norms, biases and the vision tower stay fp32.

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
from .gguf_file import remove_stale_temporaries, temporary_prefix, write_failed
from .gguf_llm import _check_layers, llm_config
from .gguf_mmproj import image_normalization
from .onnx_genai import write_genai_files
from .onnx_graph import DATA_FILE, WeightFile, functions_used, loaded_bytes, save_model
from .onnx_llm import WeightTypes

KERNELS = ("exact", "fast")
WEIGHT_TYPES = ("f32", "f16", "q8_0", "q4_0")  # --shared-type / --other-type / --expert-type for --format onnx
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


def _configs(cfg: dict, c, spec, kernels: str, image_token: int, eos, ckpt: Path, groups: dict,
             loaded: dict) -> tuple[dict, dict]:
    t = dict(cfg["text_config"])
    text = t | {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": c.tied,
                "rope_theta": c.rope_theta, "use_cache": True}
    text["mote_onnx"] = {
        "format_version": 1, "kernels": kernels, "variant": c.variant, "files": dict(FILES, data=DATA_FILE),
        "image_token_index": image_token, "image_seq_length": spec.n_patches, "image_size": spec.image,
        "num_channels": spec.channels, "vision_feature_layer": spec.layers, "source": ckpt.resolve().name,
        "weight_groups": groups, "loaded_bytes": loaded,
    }
    if cfg.get("mote"):
        text["mote"] = cfg["mote"]
    pad = t.get("pad_token_id")
    gen = {"eos_token_id": eos, "pad_token_id": pad, "do_sample": False}
    return text, gen


def check_onnx_output(out: Path) -> None:
    if out.exists():
        raise MoteExportError(f"output {str(out)!r} already exists; --format onnx writes a new folder: remove it "
                              "or choose another name")
    if not out.parent.is_dir():
        raise MoteExportError(f"output folder {str(out.parent)!r} does not exist")


def weight_type(flag: str, value) -> str:
    """A --shared-type / --other-type / --expert-type value for --format onnx, checked."""
    t = str(value).strip().lower()
    if t not in WEIGHT_TYPES:
        raise MoteExportError(f"{flag} {value!r} for --format onnx; accepted: {', '.join(WEIGHT_TYPES)}")
    return t


def write_onnx_folder(ckpt_dir: str | Path, out_dir: str | Path, kernels: str = "exact", shared_type: str = "f32",
                      other_type: str = "f32", expert_type: str = "f32", progress: bool = True) -> dict:
    """Write the ONNX export folder (see the module docstring); returns a summary (format_summary)."""
    from .onnx_llm import build_decoder, build_embedding
    from .onnx_vision import VisionSpec, build_vision

    ckpt, out = Path(ckpt_dir), Path(out_dir)
    kernels = str(kernels).strip().lower()
    if kernels not in KERNELS:
        raise MoteExportError(f"--onnx-kernels {kernels!r}; accepted: {', '.join(KERNELS)}")
    types = WeightTypes(shared=weight_type("--shared-type", shared_type), other=weight_type("--other-type", other_type),
                        expert=weight_type("--expert-type", expert_type))
    cfg = read_config(ckpt)
    c = llm_config(cfg, str(ckpt))
    if c.variant != "moe-llava" and types.expert != "f32":  # as the GGUF export
        raise MoteExportError("--expert-type is for MoE-LLaVA checkpoints (full-precision experts); this "
                              f"{c.variant} checkpoint has none" + (": its routed experts are ternary (--onnx-kernels "
                                                                    "picks their form)" if c.variant == "mote" else ""))
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
        sizes, loaded = {}, {}
        with Weights(ckpt) as w, WeightFile(tmp / DATA_FILE) as wf:
            w.check_shape(w.lm_name("embed_tokens.weight"), (c.vocab, c.hidden))
            _check_layers(w, c)
            steps = (("vision", lambda: build_vision(w, cfg, wf, spec)),
                     ("embedding", lambda: build_embedding(w, c, wf, image_token, types)),
                     ("decoder", lambda: build_decoder(w, c, wf, kernels, types)))
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
                loaded[FILES[key]] = loaded_bytes(model)
            sizes[DATA_FILE] = wf.nbytes
            n_tensors = wf.tensors
        groups = {k: vars(v) for k, v in types.groups.items()}
        text, gen = _configs(cfg, c, spec, kernels, image_token, eos, ckpt, groups, loaded)
        for name, obj in (("config.json", text), ("generation_config.json", gen)):
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        copied = []
        for name in TOKENIZER_FILES:
            if (ckpt / name).is_file():
                shutil.copy2(ckpt / name, tmp / name)
                copied.append(name)
        genai = write_genai_files(tmp)  # reads the configs, processor files and decoder.onnx written above
        sizes |= genai["files"]
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes the folder private; an export is not
        tmp.rename(out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk, a file-size limit: one error line (the folder is gone)
            raise write_failed(out, exc) from None
        raise
    return {"path": str(out), "kernels": kernels, "variant": c.variant, "experts": c.experts, "top_k": c.top_k,
            "moe_layers": c.moe_layers, "files": sizes, "tensors": n_tensors, "ternary_nodes": info.ternary_nodes,
            "routed_bytes": info.routed_bytes, "groups": groups, "loaded_bytes": loaded, "copied": copied,
            "genai": genai["mode"],
            "seconds": time.perf_counter() - t0}


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


GROUP_NAMES = {"shared": "shared expert / dense FFN", "expert": "MoE-LLaVA experts", "attention": "attention q/k/v/o",
               "embedding": "token embedding", "head": "output head", "router": "routers"}  # summary order
TYPE_FORMS = {"f32": "fp32 MatMul", "f16": "fp16, widened to fp32 when loaded",
              "q8_0": "GGUF Q8_0 numbers: MatMulNBits 8-bit, block 32",
              "q4_0": "GGUF Q4_0 numbers: MatMulNBits 4-bit, block 32"}


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
    groups = s.get("groups", {})
    for group in sorted(groups, key=list(GROUP_NAMES).index):
        g = groups[group]
        form = TYPE_FORMS[g["type"]]
        if group == "embedding":  # a lookup, not a product (and the tied head, when there is no own head)
            form = {"f16": "fp16 rows, cast to fp32"}.get(g["type"], form)
            form = form.replace("MatMulNBits", "GatherBlockQuantized").replace("MatMul", "Gather")
            form += "" if "head" in groups else ("; the tied output head reads it too" + (
                ", widened to fp32 when loaded" if g["type"] == "f16" else ""))
        if g["f16_fallback"]:
            form += f"; {g['f16_fallback']} in f16 (width not a multiple of 32)"
        n = g["tensors"]
        lines.append(f"  {GROUP_NAMES[group]}: {g['type']} ({form}), {n} tensor{'s' * (n != 1)}, "
                     f"{g['bytes'] / mib:.2f} MiB")
    lines.append(f"  copied: {', '.join(s['copied'])}")
    lines.append(f"  onnxruntime-genai: {s['genai']}")
    lines.append(f"  total {sum(s['files'].values()) / mib:.2f} MiB in {s['seconds']:.1f} s")
    return "\n".join(lines)

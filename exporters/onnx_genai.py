"""The onnxruntime-genai files of an ONNX export folder: genai loads the folder as a vision-language model.

    DIR/genai_config.json            type "gemma3": vision.onnx -> embedding.onnx -> decoder_genai.onnx
    DIR/genai_processor_config.json  the image preprocessing as onnxruntime-extensions transforms
    DIR/decoder_genai.onnx           decoder.onnx with inputs_embeds as a required input (weights shared:
                                     it points into the same model.onnx.data)

Why "gemma3" (onnxruntime-genai 0.18, measured on the tiny export): it is the one multimodal type whose
pipeline is our split (vision.onnx pixel_values [1, 3, S, S] -> image_features [n, H]; embedding.onnx
input_ids + image_features -> inputs_embeds, empty features on decode steps; a decoder on inputs_embeds
with 2-D position_ids) and whose processor is a plain transform list, so the SigLIP preprocessing (PIL
bicubic stretch to the tower's size, rescale, normalise) is reproduced: onnxruntime-extensions' Resize is
PIL's resampling code. The others do not fit: phi3v's processor must end in Phi3ImageTransform (HD
crops, image_sizes, its own token count); qwen2_5_vl / qwen3_vl flatten pixel_values into patches, need
image_grid_thw and 3-D mRoPE position ids; lfm2_vl's vision model must take an image_attention_mask.

What gemma3's processor cannot do is LLaVA's prompt: it expands "<start_of_image>" to 256
"<image_soft_token>"s, both hard-coded. Our model wants its own image token repeated image_seq_length
times (config.json's mote_onnx), so a caller builds input_ids itself (chat template, "<image>" x N,
genai's Tokenizer) and takes only pixel_values from genai's processor (`genai_inputs` in the tests):

    proc = model.create_multimodal_processor()
    pix = proc("<start_of_image>", images=og.Images.open(path))["pixel_values"]
    inputs = og.NamedTensors(); inputs["input_ids"] = ids (int32 [1, T]); inputs["pixel_values"] = pix
    inputs["num_image_tokens"] = np.array([N], np.int64); generator.set_inputs(inputs)

Text-only prompts work through the same folder (generator.append_tokens). genai allocates logits for
every prompt position itself, so decoder_genai.onnx keeps logits_to_keep at 0. A checkpoint whose image
processor genai cannot reproduce (a resample mode other than PIL's LANCZOS / BILINEAR / BICUBIC) gets the
text-only form (type qwen2 on decoder.onnx) and the reason, rather than pixels it was not trained on.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import MoteExportError

GENAI_TYPE = "gemma3"
CONFIG_FILE = "genai_config.json"
PROCESSOR_FILE = "genai_processor_config.json"
DECODER_FILE = "decoder_genai.onnx"
# PIL resample codes (the HF processors' "resample") -> onnxruntime-extensions Resize interpolation, the
# ones its copy of PIL's ImagingResample runs (measured: NEAREST fails in it, HAMMING is refused, BOX unnamed)
INTERPOLATION = {1: "LANCZOS", 2: "LINEAR", 3: "CUBIC"}


def _three(v, what: str) -> list[float]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    v = v * 3 if len(v) == 1 else v
    if len(v) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise MoteExportError(f"image processor {what} {v!r}; accepted: one number or one per RGB channel")
    return [float(x) for x in v]


def processor_config(proc: dict, image_size: int) -> dict:
    """onnxruntime-extensions transforms equal to the HF SigLIP image processor `proc` (its settings as in
    processor_config.json's "image_processor"): decode to RGB, stretch to image_size x image_size (no
    aspect ratio kept, as SiglipImageProcessor), rescale, normalise, HWC -> CHW."""
    ops = [("decode_image", "DecodeImage", {"color_space": "RGB"})]
    if proc.get("do_resize", True):
        resample = proc.get("resample", 3)
        if resample not in INTERPOLATION:
            raise MoteExportError(f"image processor resample {resample!r} has no onnxruntime-extensions Resize; "
                                  f"accepted: {', '.join(map(str, INTERPOLATION))} (PIL codes)")
        ops.append(("resize", "Resize", {"interpolation": INTERPOLATION[resample], "width": image_size,
                                         "height": image_size, "keep_aspect_ratio": 0}))
    if proc.get("do_rescale", True):
        ops.append(("rescale", "Rescale", {"rescale_factor": float(proc.get("rescale_factor", 1 / 255))}))
    if proc.get("do_normalize", True):
        ops.append(("normalize", "Normalize", {"mean": _three(proc.get("image_mean", 0.5), "image_mean"),
                                               "std": _three(proc.get("image_std", 0.5), "image_std")}))
    ops.append(("to_channel_first", "Permute3D", {"dims": [2, 0, 1]}))
    return {"processor": {"name": "mote_siglip_image_processing",
                          "transforms": [{"operation": {"name": n, "type": t, "attrs": a}} for n, t, a in ops]}}


def genai_config(cfg: dict, eos, files: dict, vision: bool = True) -> dict:
    """genai_config.json from the folder's config.json (the text config written by the folder writer) and
    the end-of-sequence id(s) of its generation_config.json; vision False: the text-only form (type qwen2,
    decoder.onnx on input_ids)."""
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    first_eos = eos_ids[0] if eos_ids else 0
    ctx = int(cfg.get("max_position_embeddings") or 2048)
    session = {"log_id": "onnxruntime-genai", "provider_options": []}
    tokens = {"inputs_embeds": "inputs_embeds"} if vision else {"input_ids": "input_ids"}
    model = {
        "bos_token_id": cfg["bos_token_id"] if cfg.get("bos_token_id") is not None else first_eos,
        "context_length": ctx,
        "decoder": {
            "session_options": session, "filename": DECODER_FILE if vision else files["decoder"],
            "head_size": hidden // heads, "hidden_size": hidden,
            "inputs": tokens | {"attention_mask": "attention_mask", "position_ids": "position_ids",
                                "past_key_names": "past_key_values.%d.key",
                                "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"},
            "num_attention_heads": heads, "num_hidden_layers": cfg["num_hidden_layers"],
            "num_key_value_heads": cfg.get("num_key_value_heads") or heads,
        },
        "eos_token_id": eos_ids if len(eos_ids) > 1 else first_eos,
        "pad_token_id": cfg["pad_token_id"] if cfg.get("pad_token_id") is not None else first_eos,
        "type": GENAI_TYPE if vision else "qwen2", "vocab_size": cfg["vocab_size"],
    }
    if vision:
        model["embedding"] = {"filename": files["embedding"],
                              "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                              "outputs": {"inputs_embeds": "inputs_embeds"}}
        model["vision"] = {"filename": files["vision"], "config_filename": PROCESSOR_FILE,
                           "inputs": {"pixel_values": "pixel_values"}, "outputs": {"image_features": "image_features"}}
    return {
        "model": model,
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": min(ctx, 2048), "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def genai_decoder(decoder):
    """decoder.onnx (a ModelProto, weights external) as genai's VLM pipeline runs it: genai looks up its
    decoder inputs among the session's inputs, where an overridable initializer (our inputs_embeds,
    default [1, 0, H]) is not listed; so inputs_embeds becomes a required input and input_ids a constant
    empty [1, 0] (its Gather branch is never taken). Nothing else changes; the weights stay where they are."""
    import onnx
    from onnx import numpy_helper

    g = onnx.ModelProto()
    g.CopyFrom(decoder)
    graph = g.graph
    inits = [t.name for t in graph.initializer]
    if "inputs_embeds" not in inits or "input_ids" not in [i.name for i in graph.input]:
        raise MoteExportError("decoder.onnx has no overridable inputs_embeds and input_ids input; export the folder "
                              "again with mote-export --format onnx")
    del graph.initializer[inits.index("inputs_embeds")]
    ids = [i.name for i in graph.input].index("input_ids")
    del graph.input[ids]
    graph.initializer.append(numpy_helper.from_array(np.zeros((1, 0), np.int64), "input_ids"))
    g.doc_string = (decoder.doc_string + " | onnxruntime-genai form: inputs_embeds required").strip(" |")
    return g


def write_genai_files(folder: str | Path) -> dict:
    """Write (or rewrite) the genai files into an export folder that already holds config.json,
    generation_config.json, decoder.onnx and the processor files. Returns {"files": {name: bytes written},
    "mode": what genai runs}: the vision-language form, or (when genai's image preprocessing cannot be the
    checkpoint's, e.g. a resample mode its Resize lacks) the text-only form, with the reason."""
    import onnx

    # the engine's readers: the same checks of the folder's config and processor settings
    from .onnx_files import DEFAULT_FILES, folder_config, image_processor, read_json
    from .onnx_graph import save_model

    folder = Path(folder)
    cfg = folder_config(folder)
    info = cfg["mote_onnx"]
    files = DEFAULT_FILES | (info.get("files") or {})
    gen = folder / "generation_config.json"
    eos = (read_json(gen) if gen.is_file() else {}).get("eos_token_id", cfg.get("eos_token_id"))
    try:
        proc, mode = processor_config(image_processor(folder), int(info["image_size"])), f"vision-language ({GENAI_TYPE})"
    except MoteExportError as exc:  # genai would feed the tower other pixels than the checkpoint was trained on
        proc, mode = None, f"text only ({exc})"
    sizes = {}
    if proc is not None:
        try:
            decoder = onnx.load(str(folder / files["decoder"]), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and OSError: a broken file either way
            raise MoteExportError(f"{folder / files['decoder']} is not a readable ONNX model ({exc})") from None
        sizes[DECODER_FILE] = save_model(genai_decoder(decoder), folder / DECODER_FILE)
    else:
        for name in (DECODER_FILE, PROCESSOR_FILE):  # of an earlier vision-language form
            (folder / name).unlink(missing_ok=True)
    for name, obj in ((PROCESSOR_FILE, proc), (CONFIG_FILE, genai_config(cfg, eos, files, vision=proc is not None))):
        if obj is not None:
            text = json.dumps(obj, indent=2) + "\n"
            (folder / name).write_text(text)
            sizes[name] = len(text.encode())
    return {"files": sizes, "mode": mode}

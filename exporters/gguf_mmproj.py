"""Vision half of the GGUF export: the SigLIP tower + 2-layer GELU MLP connector of a LLaVA checkpoint
as a llama.cpp multimodal projector file (architecture "clip", projector type "mlp") for mtmd.

What the bundled llama.cpp (tools/mtmd/clip.cpp, `clip_graph_llava`) does with this file, and so
why the file looks the way it does:
  * `clip.vision.feature_layer` [k]: the encoder runs k blocks and the projector gets their output,
    i.e. HF's `hidden_states[k]` (index 0 = the patch + position embeddings). Without the key the
    graph runs n_layer - 1 blocks (LLaVA-1.5's "-2" default). HF's negative indices become
    n_layer + 1 + v; a list of layers is concatenated on the channel axis, in ascending order only.
    Blocks deeper than the deepest feature layer are never run, so they are not written.
  * `v.post_ln` would be applied to whatever the projector receives. LLaVA never applies SigLIP's
    post_layernorm (its hidden_states are taken before it), so it is not written.
  * ffn up/down: for projector "mlp" clip.cpp swaps ffn_up and ffn_down whenever ffn_down's input
    width equals the embedding width (a fix for old files). When intermediate == hidden that test
    misfires on correct names, so there the legacy swapped names are written and it swaps them back.
  * images: clip.cpp computes (u8 / 255 - mean) / std per channel, so the processor's
    rescale_factor (and do_rescale / do_normalize) is folded into the written mean and std.
  * activations: ggml_gelu is the tanh approximation (SigLIP's gelu_pytorch_tanh exactly; the
    connector's erf "gelu" to ~1e-3), read through an fp16 lookup table on CPU.
"""
from __future__ import annotations

import functools

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFWriter

from .ckpt import Weights, read_config
from .gguf_file import check_output, gguf_writer, write_tensors
from .errors import MoteExportError
from .quantize import fitting_type, nbytes, parse_type, quantize_tensor

TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.vision_model.", "model.vision_tower.vision_model.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
# HF hidden_act of the tower -> clip.use_gelu (tanh GELU) or, when false, clip.cpp's quick GELU.
TOWER_ACTS = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu": True, "quick_gelu": False}
BLOCK_TENSORS = {  # HF module inside encoder.layers.N -> GGUF tensor inside v.blk.N
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}


def _prefix(w: Weights, candidates: tuple[str, ...], probe: str, what: str) -> str:
    found = next((p for p in candidates if p + probe in w), None)
    if found is None:
        raise MoteExportError(f"{w.path}: no {what} tensors (looked for "
                              f"{' or '.join(repr(p + probe) for p in candidates)})")
    return found


def feature_layers(cfg: dict, n_layer: int) -> list[int]:
    """LLaVA's vision_feature_layer as clip.cpp's non-negative, ascending hidden-state indices."""
    raw = cfg.get("vision_feature_layer", -2)
    layers = [raw] if isinstance(raw, int) else list(raw) if isinstance(raw, list) else None
    def ok(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and -(n_layer + 1) <= v <= n_layer

    if not layers or not all(ok(v) for v in layers):
        raise MoteExportError(f"vision_feature_layer {raw!r} is not a layer index of a {n_layer}-layer "
                              f"tower; accepted: an int or list of ints in [-{n_layer + 1}, {n_layer}]")
    layers = [v if v >= 0 else n_layer + 1 + v for v in layers]
    if layers != sorted(set(layers)):
        raise MoteExportError(f"vision_feature_layer {raw!r}: llama.cpp concatenates feature layers "
                              "shallowest first; accepted: distinct layers in ascending order")
    return layers


def image_normalization(ckpt: Path) -> tuple[list[float], list[float]]:
    """(mean, std) for clip.cpp's (u8/255 - mean)/std that reproduce the checkpoint's image processor."""
    proc = None
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        path = ckpt / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise MoteExportError(f"{path} is not valid JSON ({exc})") from None
            proc = data.get(key) if key else data
            if isinstance(proc, dict):
                break
            proc = None
    if proc is None:
        raise MoteExportError(f"{str(ckpt)!r} has no image processor settings (processor_config.json with "
                              "'image_processor', or preprocessor_config.json); save the LlavaProcessor with it")
    rescale = float(proc.get("rescale_factor", 1 / 255)) if proc.get("do_rescale", True) else 1.0
    mean = proc.get("image_mean", [0.5] * 3) if proc.get("do_normalize", True) else [0.0] * 3
    std = proc.get("image_std", [0.5] * 3) if proc.get("do_normalize", True) else [1.0] * 3
    mean, std = ([v] * 3 if isinstance(v, (int, float)) else list(v) for v in (mean, std))
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std) or rescale <= 0:
        raise MoteExportError(f"{ckpt}: unusable image normalisation mean={mean} std={std} "
                              f"rescale_factor={rescale}; accepted: 3 means, 3 positive stds")
    # x * rescale = (x / 255) * (255 * rescale): divide mean and std by that factor.
    k = 255.0 * rescale
    return [float(m) / k for m in mean], [float(s) / k for s in std]


class _Plan:
    """The tensors of the mmproj file: (GGUF name, numpy shape, type, loader), checked before writing."""

    def __init__(self, w: Weights, cfg: dict, qtype: T):
        v = cfg.get("vision_config") or {}
        try:
            self.d, self.ff = int(v["hidden_size"]), int(v["intermediate_size"])
            self.n_layer, self.heads = int(v["num_hidden_layers"]), int(v["num_attention_heads"])
            self.image, self.patch = int(v["image_size"]), int(v["patch_size"])
            self.text_d = int(cfg["text_config"]["hidden_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MoteExportError(f"{w.path.parent}/config.json: vision_config or text_config lacks {exc}") from None
        self.eps = float(v.get("layer_norm_eps", 1e-6))
        act = v.get("hidden_act", "gelu_pytorch_tanh")
        if act not in TOWER_ACTS:
            raise MoteExportError(f"vision tower activation {act!r} is not in llama.cpp's clip graph; "
                                  f"accepted: {', '.join(TOWER_ACTS)}")
        self.use_gelu = TOWER_ACTS[act]
        # The image need not be a multiple of the patch: SigLIP so400m-patch14-384 has 27 x 27 patches
        # and drops the last 6 pixels, in HF's stride-14 conv and in clip.cpp's alike.
        if self.d % self.heads or self.image < self.patch:
            raise MoteExportError(f"vision tower: hidden {self.d} not divisible by heads {self.heads}, or image "
                                  f"{self.image} smaller than patch {self.patch}")
        if cfg.get("vision_feature_select_strategy", "full") != "full":
            raise MoteExportError("vision_feature_select_strategy 'default' drops a CLS token SigLIP does not "
                                  "have; accepted: 'full'")
        self.layers = feature_layers(cfg, self.n_layer)
        self.w, self.qtype, self.cfg = w, qtype, cfg
        self.tower = _prefix(w, TOWER_PREFIXES, "embeddings.patch_embedding.weight", "SigLIP vision tower")
        self.proj = _prefix(w, PROJECTOR_PREFIXES, "linear_1.weight", "multi_modal_projector")
        self.items: list[tuple[str, tuple[int, ...], T, str | None]] = []
        self._plan()

    def _add(self, gguf_name: str, hf_name: str | None, shape: tuple[int, ...], qtype: T = T.F32) -> None:
        """hf_name None: a zero tensor (a bias the checkpoint does not have; clip.cpp adds mm biases
        unconditionally)."""
        if hf_name is not None:
            if hf_name not in self.w:
                raise MoteExportError(f"{self.w.path}: tensor {hf_name!r} is missing")
            self.w.check_shape(hf_name, shape)
        self.items.append((gguf_name, shape, qtype, hf_name))

    def _matrix(self, gguf_name: str, hf_name: str, shape: tuple[int, ...]) -> None:
        self._add(gguf_name, hf_name, shape, fitting_type(self.qtype, shape[-1]))

    def _plan(self) -> None:
        t, d, ff, n_pos = self.tower, self.d, self.ff, (self.image // self.patch) ** 2
        # The patch kernel feeds ggml_im2col, which takes a float kernel only.
        self._add("v.patch_embd.weight", t + "embeddings.patch_embedding.weight", (d, 3, self.patch, self.patch),
                  T.F32 if self.qtype == T.F32 else T.F16)
        self._add("v.patch_embd.bias", t + "embeddings.patch_embedding.bias", (d,))
        self._add("v.position_embd.weight", t + "embeddings.position_embedding.weight", (n_pos, d))
        # With ff == d, correct names look like old swapped ones to clip.cpp (see the module docstring).
        ffn = {"mlp.fc1": "ffn_down", "mlp.fc2": "ffn_up"} if ff == d else {}
        shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d),
                  "self_attn.out_proj": (d, d), "mlp.fc1": (ff, d), "mlp.fc2": (d, ff)}
        for i in range(max(self.layers)):
            for hf, gg in BLOCK_TENSORS.items():
                src, dst = f"{t}encoder.layers.{i}.{hf}", f"v.blk.{i}.{ffn.get(hf, gg)}"
                if hf.startswith("layer_norm"):
                    self._add(dst + ".weight", src + ".weight", (d,))
                else:
                    self._matrix(dst + ".weight", src + ".weight", shapes[hf])
                self._add(dst + ".bias", src + ".bias", shapes.get(hf, (d,))[:1])
        hidden = self.w.shape(self.proj + "linear_1.weight")[0]
        # multimodal_projector_bias false: no biases in the checkpoint, zeros in the file
        bias = self.cfg.get("multimodal_projector_bias", True)
        self._matrix("mm.0.weight", self.proj + "linear_1.weight", (hidden, d * len(self.layers)))
        self._add("mm.0.bias", self.proj + "linear_1.bias" if bias else None, (hidden,))
        self._matrix("mm.2.weight", self.proj + "linear_2.weight", (self.text_d, hidden))
        self._add("mm.2.bias", self.proj + "linear_2.bias" if bias else None, (self.text_d,))

    def data(self, shape: tuple[int, ...], qtype: T, hf_name: str | None, gguf_name: str) -> np.ndarray:
        arr = np.zeros(shape, np.float32) if hf_name is None else np.asarray(self.w.get(hf_name), np.float32)
        return np.ascontiguousarray(quantize_tensor(arr, qtype, gguf_name))


def _write_kv(wr: GGUFWriter, p: _Plan, mean: list[float], std: list[float], name: str) -> None:
    wr.add_name(name)
    wr.add_description("SigLIP vision tower + 2-layer GELU MLP connector (LLaVA), exported by mote-export")
    wr.add_clip_has_vision_encoder(True)
    wr.add_clip_projector_type("mlp")
    wr.add_vision_use_gelu(p.use_gelu)
    wr.add_vision_image_size(p.image)
    wr.add_vision_patch_size(p.patch)
    wr.add_vision_embedding_length(p.d)
    wr.add_vision_feed_forward_length(p.ff)
    wr.add_vision_block_count(max(p.layers))
    wr.add_vision_head_count(p.heads)
    wr.add_vision_attention_layernorm_eps(p.eps)
    wr.add_vision_projection_dim(p.text_d)
    wr.add_vision_image_mean(mean)
    wr.add_vision_image_std(std)
    wr.add_array("clip.vision.feature_layer", p.layers)  # python ints -> INT32, as clip.cpp requires


def write_mmproj(ckpt_dir: Path, out_path: Path, ftype: str = "f16") -> dict:
    """Write the mmproj GGUF of a LLaVA (SigLIP + GELU MLP) checkpoint folder.

    `ftype` is the type of the weight matrices (f32, f16, bf16, q8_0, ...; rows a block does not
    divide fall back to f16); norms, biases and position embeddings stay f32. Written to a
    temporary name beside `out_path` and renamed when complete. Returns path, tensors, bytes."""
    ckpt, out = Path(ckpt_dir), Path(out_path)
    cfg = read_config(ckpt)
    qtype = parse_type(ftype, "--mmproj-type")
    mean, std = image_normalization(ckpt)
    check_output(out, "model-mmproj.gguf")
    with Weights(ckpt) as w:
        plan = _Plan(w, cfg, qtype)
        with gguf_writer(out, "clip") as wr:
            _write_kv(wr, plan, mean, std, ckpt.name)
            write_tensors(wr, [(name, shape, qt, nbytes(shape, qt)) for name, shape, qt, _ in plan.items],
                          [functools.partial(plan.data, shape, qt, src, name) for name, shape, qt, src in plan.items])
    types = sorted({qt.name for _, _, qt, _ in plan.items})
    return {"path": str(out), "tensors": len(plan.items), "bytes": out.stat().st_size, "types": types,
            "feature_layers": plan.layers, "blocks": max(plan.layers)}

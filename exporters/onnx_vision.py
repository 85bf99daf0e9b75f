"""The vision half of the ONNX export: vision.onnx = SigLIP tower + 2-layer GELU MLP connector.

  pixel_values float [batch, 3, image_size, image_size] (the processor's output: resized, rescaled,
  normalised) -> image_features float [batch * n_patches, text hidden], ready for embedding.onnx.

As LLaVA: the connector reads the tower's hidden_states[k] for each vision_feature_layer k (0 = patch +
position embeddings, n = the last block; negative indices count from the end; several are
concatenated on the channel axis, in the configured order); SigLIP's post_layernorm is not applied
(LLaVA takes hidden states before it); blocks deeper than the deepest feature layer are not exported.
Tower activation: gelu_pytorch_tanh / gelu_new = Gelu(approximate="tanh"), gelu = erf Gelu, quick_gelu
= x * sigmoid(1.702 x); the connector's "gelu" is the erf Gelu. Weights fp32.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .ckpt import Weights
from .errors import MoteExportError
from .gguf_mmproj import PROJECTOR_PREFIXES, TOWER_PREFIXES, _prefix
from .onnx_graph import Graph, WeightFile

F32 = TensorProto.FLOAT
ACTS = ("gelu_pytorch_tanh", "gelu_new", "gelu", "quick_gelu")


def feature_layers_any_order(cfg: dict, n_layer: int) -> list[int]:
    """vision_feature_layer as non-negative hidden-state indices, in the configured order."""
    raw = cfg.get("vision_feature_layer", -2)
    layers = [raw] if isinstance(raw, int) and not isinstance(raw, bool) else raw if isinstance(raw, list) else None
    if not layers or not all(isinstance(v, int) and not isinstance(v, bool) and -(n_layer + 1) <= v <= n_layer
                             for v in layers):
        raise MoteExportError(f"vision_feature_layer {raw!r} is not a layer index of a {n_layer}-layer tower; "
                              f"accepted: an int or list of ints in [-{n_layer + 1}, {n_layer}]")
    return [v if v >= 0 else n_layer + 1 + v for v in layers]


class VisionSpec:
    """What vision.onnx needs from config.json, checked before anything is written."""

    def __init__(self, cfg: dict, where: str):
        v = cfg.get("vision_config") or {}
        try:
            self.d, self.ff = int(v["hidden_size"]), int(v["intermediate_size"])
            self.n_layer, self.heads = int(v["num_hidden_layers"]), int(v["num_attention_heads"])
            self.image, self.patch = int(v["image_size"]), int(v["patch_size"])
            self.channels = int(v.get("num_channels", 3))
            self.text_d = int(cfg["text_config"]["hidden_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MoteExportError(f"{where}/config.json: vision_config or text_config lacks {exc}") from None
        self.eps = float(v.get("layer_norm_eps", 1e-6))
        self.act = v.get("hidden_act", "gelu_pytorch_tanh")
        if self.act not in ACTS:
            raise MoteExportError(f"{where}: vision tower activation {self.act!r}; accepted: {', '.join(ACTS)}")
        if self.d % self.heads or self.image < self.patch:
            raise MoteExportError(f"{where}: vision hidden {self.d} not divisible by heads {self.heads}, or image "
                                  f"{self.image} smaller than patch {self.patch}")
        if cfg.get("vision_feature_select_strategy", "full") != "full":
            raise MoteExportError(f"{where}: vision_feature_select_strategy 'default' drops a CLS token SigLIP does "
                                  "not have; accepted: 'full'")
        self.layers = feature_layers_any_order(cfg, self.n_layer)
        self.n_patches = (self.image // self.patch) ** 2
        self.proj_bias = bool(cfg.get("multimodal_projector_bias", True))


def build_vision(w: Weights, cfg: dict, wf: WeightFile, spec: VisionSpec):
    g, s = Graph("vision", wf), spec
    t = _prefix(w, TOWER_PREFIXES, "embeddings.patch_embedding.weight", "SigLIP vision tower")
    p = _prefix(w, PROJECTOR_PREFIXES, "linear_1.weight", "multi_modal_projector")
    d, hd = s.d, s.d // s.heads

    def tensor(name: str, shape: tuple | None = None, transpose: bool = False) -> str:
        if name not in w:
            raise MoteExportError(f"{w.path}: tensor {name!r} is missing")
        w.check_shape(name, shape)

        def make():
            a = np.asarray(w.get(name), np.float32)
            return np.ascontiguousarray(a.T) if transpose else a
        return g.weight(name, make=make)

    def linear(x: str, name: str, shape: tuple, bias: bool = True, hint: str = "linear") -> str:
        wt = tensor(name + ".weight", shape, transpose=True)
        return g.linear(x, wt, tensor(name + ".bias", shape[:1]) if bias else None, hint=hint)

    def act(x: str, kind: str, hint: str) -> str:
        if kind in ("gelu_pytorch_tanh", "gelu_new"):
            return g.op("Gelu", x, approximate="tanh", hint=hint)
        if kind == "gelu":
            return g.op("Gelu", x, hint=hint)
        return g.op("Mul", x, g.op("Sigmoid", g.op("Mul", x, g.const(1.702), hint=f"{hint}.in"), hint=f"{hint}.sig"),
                    hint=hint)

    pix = g.input("pixel_values", F32, ["batch", s.channels, s.image, s.image])
    conv = g.op("Conv", pix, tensor(t + "embeddings.patch_embedding.weight", (d, s.channels, s.patch, s.patch)),
                tensor(t + "embeddings.patch_embedding.bias", (d,)), kernel_shape=[s.patch, s.patch],
                strides=[s.patch, s.patch], hint="patch_embed")
    x = g.op("Transpose", g.op("Reshape", conv, g.ints(0, d, -1), hint="patches"), perm=[0, 2, 1], hint="patches.t")
    x = g.op("Add", x, tensor(t + "embeddings.position_embedding.weight", (s.n_patches, d)), hint="hidden.0")
    hidden = [x]
    for i in range(max(s.layers)):
        L = f"{t}encoder.layers.{i}."
        g.scope = f"vision.{i}/"
        y = g.op("LayerNormalization", x, tensor(L + "layer_norm1.weight", (d,)), tensor(L + "layer_norm1.bias", (d,)),
                 axis=-1, epsilon=s.eps, hint="ln1")

        def heads(name: str) -> str:
            z = linear(y, L + f"self_attn.{name}", (d, d), hint=name)
            return g.op("Transpose", g.op("Reshape", z, g.ints(0, 0, s.heads, hd), hint=f"{name}.heads"),
                        perm=[0, 2, 1, 3], hint=f"{name}.bhsd")
        q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
        scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2], hint="k.t"), hint="qk"),
                      g.const(hd ** -0.5), hint="scores")
        ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1, hint="attn"), v, hint="ctx")
        ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3], hint="ctx.t"), g.ints(0, 0, d), hint="ctx.flat")
        x = g.op("Add", x, linear(ctx, L + "self_attn.out_proj", (d, d), hint="out_proj"), hint="attn_residual")
        y = g.op("LayerNormalization", x, tensor(L + "layer_norm2.weight", (d,)), tensor(L + "layer_norm2.bias", (d,)),
                 axis=-1, epsilon=s.eps, hint="ln2")
        y = linear(act(linear(y, L + "mlp.fc1", (s.ff, d), hint="fc1"), s.act, "act"), L + "mlp.fc2", (d, s.ff),
                   hint="fc2")
        x = g.op("Add", x, y, hint="hidden")
        hidden.append(x)
    g.scope = "connector/"
    feats = hidden[s.layers[0]] if len(s.layers) == 1 else g.op("Concat", *[hidden[k] for k in s.layers], axis=-1,
                                                                   hint="features")
    width = d * len(s.layers)
    mid = w.shape(p + "linear_1.weight")[0]
    y = linear(feats, p + "linear_1", (mid, width), bias=s.proj_bias, hint="linear_1")
    y = linear(g.op("Gelu", y, hint="gelu"), p + "linear_2", (s.text_d, mid), bias=s.proj_bias, hint="linear_2")
    g.scope = ""
    out = g.op("Reshape", y, g.ints(-1, s.text_d), hint="image_features.flat")
    g.output(out, "image_features", F32, ["num_image_tokens", s.text_d])
    return g.model(doc=f"MoTE Edge vision: SigLIP tower ({max(s.layers)} of {s.n_layer} blocks, feature layers "
                       f"{s.layers}) + GELU MLP connector; {s.n_patches} image tokens per image")

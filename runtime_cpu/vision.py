"""The mmproj file (SigLIP tower + 2-layer GELU MLP connector, llama.cpp's "clip" / projector "mlp") in
numpy, and image preprocessing like the HF SigLIP processor.

  image -> RGB, bicubic stretch to image_size (PIL, as the HF processor and the llama.cpp engine do),
           (u8 / 255 - mean) / std with the file's clip.vision.image_mean/std (the processor's rescale folded in)
  -> patch embedding (stride-patch conv; a remainder the patch does not cover is dropped) + position embedding
  -> blocks: x += attn(LN1(x)); x += fc2(gelu_tanh(fc1(LN2(x))))  (clip.use_gelu false: quick GELU)
  -> hidden_states[k] for each k in clip.vision.feature_layer (0 = the embeddings), concatenated
  -> mm.2(gelu(mm.0(.)))  with the erf GELU of HF LLaVA's connector (projector_hidden_act "gelu").
ffn_up / ffn_down names follow clip.cpp: when ffn_down's input width equals the tower width the two are
swapped (the exporter writes the legacy names exactly when intermediate == hidden).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..exporters.errors import MoteExportError
from .gguf_model import GGUFModel
from .kernels import gelu_erf, gelu_tanh, layer_norm, quick_gelu, softmax
from .images import load_rgb
from .llm import Loader

UNSUPPORTED = ("v.post_ln.weight", "v.pre_ln.weight", "v.class_embd")


class Vision:
    """The tower and connector of an mmproj file, decoded at load."""

    def __init__(self, g: GGUFModel, kernel: str = "numpy"):
        self.g = g
        if g.arch != "clip" or g.fields.get("clip.projector_type") != "mlp" or not g.fields.get("clip.has_vision_encoder"):
            raise MoteExportError(f"{g.path} is not an mmproj file with a vision encoder and an 'mlp' projector "
                                  f"(architecture {g.arch!r}, projector {g.fields.get('clip.projector_type')!r}); "
                                  "expected the <stem>-mmproj.gguf written by mote-export")
        for name in UNSUPPORTED:
            if name in g:
                raise MoteExportError(f"{g.path}: {name} is not run by this engine (mote-export never writes it)")
        k = lambda name: g.key("clip.vision." + name)  # noqa: E731
        self.size, self.patch = int(k("image_size")), int(k("patch_size"))
        self.d, self.heads, self.eps = int(k("embedding_length")), int(k("attention.head_count")), float(
            k("attention.layer_norm_epsilon"))
        self.mean, self.std = (np.asarray(k(n), np.float64) for n in ("image_mean", "image_std"))
        self.layers = [int(v) for v in k("feature_layer")]
        self.act = gelu_tanh if g.fields.get("clip.use_gelu", True) else quick_gelu
        n_blocks = int(k("block_count"))
        if (self.mean.shape != (3,) or self.std.shape != (3,) or np.any(self.std <= 0) or not self.layers
                or self.layers != sorted(set(self.layers)) or self.layers[0] < 0 or self.layers[-1] > n_blocks
                or self.heads <= 0 or self.patch <= 0 or self.d % self.heads or self.size < self.patch):
            raise MoteExportError(f"{g.path}: unusable clip.vision keys (mean/std {self.mean}/{self.std}, feature_layer "
                                  f"{self.layers}, {n_blocks} blocks, width {self.d}, {self.heads} heads)")
        d, p = self.d, self.patch
        self.n_side = self.size // p
        n = self.n_side ** 2
        ld = self.loader = Loader(g, kernel=kernel)  # with C kernels: F16/BF16/Q8_0 matrices read in place
        self.patch_w = ld.floats("v.patch_embd.weight", (d, 3, p, p)).reshape(d, 3 * p * p)
        self.patch_b = ld.floats("v.patch_embd.bias", (d,)) if "v.patch_embd.bias" in g else None
        self.pos = ld.floats("v.position_embd.weight", (n, d))
        self.blocks = []
        for i in range(self.layers[-1]):
            b = f"v.blk.{i}."
            swapped = g.shape(b + "ffn_down.weight")[-1] == d  # clip.cpp's rule (module docstring)
            up, down = ("ffn_down", "ffn_up") if swapped else ("ffn_up", "ffn_down")
            ff = g.shape(f"{b}{up}.weight")[0]
            self.blocks.append(dict(
                ln1=(ld.floats(b + "ln1.weight", (d,)), ld.floats(b + "ln1.bias", (d,))),
                ln2=(ld.floats(b + "ln2.weight", (d,)), ld.floats(b + "ln2.bias", (d,))),
                q=ld.linear(b + "attn_q.weight", (d, d), b + "attn_q.bias"),
                k=ld.linear(b + "attn_k.weight", (d, d), b + "attn_k.bias"),
                v=ld.linear(b + "attn_v.weight", (d, d), b + "attn_v.bias"),
                o=ld.linear(b + "attn_out.weight", (d, d), b + "attn_out.bias"),
                up=ld.linear(f"{b}{up}.weight", (ff, d), f"{b}{up}.bias"),
                down=ld.linear(f"{b}{down}.weight", (d, ff), f"{b}{down}.bias")))
        hidden, width = g.shape("mm.0.weight")
        if width != d * len(self.layers):
            raise MoteExportError(f"{g.path}: mm.0.weight takes {width} inputs; {len(self.layers)} feature layer(s) of "
                                  f"width {d} give {d * len(self.layers)}")
        self.mm0 = ld.linear("mm.0.weight", (hidden, width), "mm.0.bias")
        self.out_dim = g.shape("mm.2.weight")[0]
        self.mm2 = ld.linear("mm.2.weight", (self.out_dim, hidden), "mm.2.bias")
        self.n_tokens = n

    def pixels(self, image: str | Path) -> np.ndarray:
        """Normalised float32 [3, size, size], as the HF processor makes pixel_values."""
        u8 = load_rgb(image, self.size)
        x = (u8.astype(np.float64) / 255.0 - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)

    def _attention(self, blk: dict, x: np.ndarray) -> np.ndarray:
        n, hd = x.shape[0], self.d // self.heads
        q, k, v = (blk[w](x).reshape(n, self.heads, hd).transpose(1, 0, 2) for w in "qkv")
        probs = softmax((q @ k.transpose(0, 2, 1)) * np.float32(hd ** -0.5))
        return blk["o"]((probs @ v).transpose(1, 0, 2).reshape(n, self.d))

    def encode_pixels(self, px: np.ndarray) -> np.ndarray:
        """pixel_values [3, size, size] -> image embeddings [n_tokens, LLM width]."""
        p, s = self.patch, self.n_side
        patches = px[:, :s * p, :s * p].reshape(3, s, p, s, p).transpose(1, 3, 0, 2, 4).reshape(s * s, 3 * p * p)
        x = patches @ self.patch_w.T
        if self.patch_b is not None:
            x = x + self.patch_b
        x = x + self.pos
        hidden = [x]
        for blk in self.blocks:
            x = x + self._attention(blk, layer_norm(x, *blk["ln1"], self.eps))
            x = x + blk["down"](self.act(blk["up"](layer_norm(x, *blk["ln2"], self.eps))))
            hidden.append(x)
        feats = np.concatenate([hidden[k] for k in self.layers], axis=-1)
        return self.mm2(gelu_erf(self.mm0(feats)))

    def encode(self, image: str | Path) -> np.ndarray:
        return self.encode_pixels(self.pixels(image))

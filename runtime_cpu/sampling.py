"""Choosing the next token, the same for every engine that samples itself (mote, onnxruntime)."""
from __future__ import annotations

import numpy as np


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; else top-k (0 = all), then softmax(logits / temperature), then the
    smallest set of most likely tokens whose mass reaches top_p, sampled with `rng`."""
    if temperature <= 0:
        return int(np.argmax(logits))
    order = np.argsort(-logits, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    z = logits[order].astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])

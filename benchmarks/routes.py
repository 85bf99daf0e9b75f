"""mote-routes: the per-layer expert load of image vs text tokens (the paper's Figure 2) from the routes a
run recorded (`mote-run ... --engine mote --routes routes.json`).

    mote-routes routes.json -o routes.png [--table]

For every MoE layer, the share of image tokens and of text tokens that chose each expert (a token counts
once per expert among its top-k, so a layer's shares sum to top_k). The table goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from ..exporters.errors import MoteExportError, cli_entry

KINDS = ("image", "text")


def read_routes(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MoteExportError(f"routes file {str(path)!r} does not exist (write one with mote-run --engine mote --routes)")
    try:
        r = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise MoteExportError(f"{path}: not a routes JSON file ({exc})") from None
    if not isinstance(r, dict) or r.get("format") != "mote-routes/1" or not isinstance(r.get("layers"), dict):
        raise MoteExportError(f"{path}: not a mote-routes/1 file (written by mote-run --routes)")
    n, e = len(r["kinds"]), int(r["experts"])
    for layer, choices in r["layers"].items():
        c = np.asarray(choices)
        if c.shape != (n, int(r["top_k"])) or c.size and (c.min() < 0 or c.max() >= e):
            raise MoteExportError(f"{path}: layer {layer} holds choices of shape {list(c.shape)}; expected {n} tokens x "
                                  f"top-{r['top_k']} ids below {e}")
    return r


def expert_load(r: dict) -> dict:
    """{layer: {kind: share of that kind's tokens routed to each expert [E]}} (kinds with no token left out)."""
    kinds = np.asarray(r["kinds"])
    out = {}
    for layer, choices in sorted(r["layers"].items(), key=lambda kv: int(kv[0])):
        c = np.asarray(choices)
        out[int(layer)] = {k: np.bincount(c[kinds == k].reshape(-1), minlength=int(r["experts"])) / (kinds == k).sum()
                           for k in KINDS if (kinds == k).any()}
    return out


def table(load: dict) -> str:
    experts = len(next(iter(next(iter(load.values())).values())))
    head = "| layer | tokens | " + " | ".join(f"expert {e}" for e in range(experts)) + " |"
    rows = [head, "|" + "---|" * (experts + 2)]
    for layer, by_kind in load.items():
        for kind, share in by_kind.items():
            rows.append(f"| {layer} | {kind} | " + " | ".join(f"{v:.2f}" for v in share) + " |")
    return "\n".join(rows)


def plot(load: dict, r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(load)
    experts = int(r["experts"])
    fig, axes = plt.subplots(1, len(layers), figsize=(max(4.0, 2.6 * len(layers)), 3.2), sharey=True, squeeze=False)
    width = 0.4
    for ax, layer in zip(axes[0], layers):
        for i, kind in enumerate(k for k in KINDS if k in load[layer]):
            ax.bar(np.arange(experts) + (i - 0.5) * width, load[layer][kind], width, label=kind)
        ax.set_title(f"layer {layer}")
        ax.set_xticks(range(experts))
        ax.set_xlabel("expert")
    axes[0][0].set_ylabel(f"share of tokens (top-{r['top_k']})")
    axes[0][-1].legend()
    n_img = sum(k == "image" for k in r["kinds"])
    fig.suptitle(f"expert load per layer: {n_img} image / {len(r['kinds']) - n_img} text tokens ({r['variant']})")
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".part" + out.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(prog="mote-routes", description="Plot per-layer expert load of image vs text tokens "
                                                                "from mote-run --routes.")
    p.add_argument("routes", help="the JSON written by mote-run --engine mote --routes")
    p.add_argument("-o", "--output", default=None, help="the plot (PNG); default: <routes>.png")
    a = p.parse_args(argv)
    r = read_routes(a.routes)
    if not r["layers"]:
        raise MoteExportError(f"{a.routes}: no MoE layer recorded any token")
    load = expert_load(r)
    out = Path(a.output) if a.output else Path(a.routes).with_suffix(".png")
    plot(load, r, out)
    print(table(load))
    print(f"wrote {out}")

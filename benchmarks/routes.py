"""mote-routes: the per-layer expert load of image vs text tokens (the paper's Figure 2) from the routes a
run recorded (`mote-run ... --engine mote --routes routes.json`).

    mote-routes routes.json -o routes.png [--table]

For every MoE layer, the share of image tokens and of text tokens that chose each expert (a token counts
once per expert among its top-k, so a layer's shares sum to top_k). The table goes to stdout.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..exporters.errors import MoteExportError, cli_entry
from ..exporters.errors import ArgumentParser

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
    kinds, e, k = r.get("kinds"), r.get("experts"), r.get("top_k")
    if not isinstance(kinds, list) or not all(kind in KINDS for kind in kinds):
        raise MoteExportError(f"{path}: 'kinds' must be a list of {' / '.join(KINDS)}, one per token")
    if not (type(e) is int and type(k) is int and 1 <= k <= e):
        raise MoteExportError(f"{path}: 'experts' and 'top_k' must be whole numbers, 1 <= top_k <= experts "
                              f"(got experts={e!r}, top_k={k!r})")
    for layer, choices in r["layers"].items():
        try:
            c = np.asarray(choices, dtype=np.int64)
        except (ValueError, TypeError, OverflowError):  # ragged lists, words, floats too big for an id
            c = None
        if c is None or not layer.isdigit() or c.shape != (len(kinds), k):
            shape = "a ragged or non-integer list" if c is None else f"choices of shape {list(c.shape)}"
            raise MoteExportError(f"{path}: layer {layer!r} holds {shape}; expected a layer number with "
                                  f"{len(kinds)} tokens x top-{k} expert ids")
        if c.size and (c.min() < 0 or c.max() >= e):
            raise MoteExportError(f"{path}: layer {layer} chose expert {int(c.max() if c.max() >= e else c.min())}; "
                                  f"expected ids below {e} ({e} experts)")
    return r


def check_output(out: Path) -> None:
    """The plot's path, checked before anything is drawn: a file name in an existing folder."""
    if not out.parent.is_dir():
        what = "is a file, not a folder" if out.parent.exists() else "does not exist"
        raise MoteExportError(f"-o {str(out)!r}: {str(out.parent)!r} {what}")
    if out.is_dir():
        raise MoteExportError(f"-o {str(out)!r} is a folder; give a file name like routes.png")


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
    variant = r.get("variant", "variant not recorded")
    fig.suptitle(f"expert load per layer: {n_img} image / {len(r['kinds']) - n_img} text tokens ({variant})")
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".part" + out.suffix)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:  # a failed write (disk full) leaves no partial plot behind
        plt.close(fig)
        tmp.unlink(missing_ok=True)


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="mote-routes", description="Plot per-layer expert load of image vs text tokens "
                                                                "from mote-run --routes.")
    p.add_argument("routes", help="the JSON written by mote-run --engine mote --routes")
    p.add_argument("-o", "--output", default=None, help="the plot (PNG); default: <routes>.png")
    a = p.parse_args(argv)
    r = read_routes(a.routes)
    if not r["layers"]:
        raise MoteExportError(f"{a.routes}: no MoE layer recorded any token")
    load = expert_load(r)
    out = Path(a.output) if a.output else Path(a.routes).with_suffix(".png")
    check_output(out)
    plot(load, r, out)
    print(table(load))
    print(f"wrote {out}")

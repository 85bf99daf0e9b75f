"""The main job on the embedded default: load the tiny dense and MoTE checkpoints shipped with the
package, answer the held-out test questions with the PyTorch models, print accuracy.

    mote-demo [--ckpt DIR ...] [--limit N]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import MoteError, cli_entry
from .evaluate import evaluate, format_accuracy
from .synthetic import CHANCE_ACCURACY
from .tiny import ASSETS


def expert_summary(ckpt: Path) -> str:
    cfg = json.loads((ckpt / "config.json").read_text()).get("mote")
    if not cfg:
        return "dense"
    return f"{cfg['variant']}: {cfg['num_experts']} experts, top-{cfg['top_k']}, MoE layers {cfg['layers']}"


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(prog="mote-demo", description="Answer held-out image questions with the tiny models.")
    p.add_argument("--ckpt", action="append", type=Path, help="checkpoint folder(s); default: the embedded tiny dense and MoTE")
    p.add_argument("--data", type=Path, default=ASSETS / "data", help="folder with test.json and images/")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    a = p.parse_args(argv)
    ckpts = a.ckpt or [ASSETS / "dense", ASSETS / "mote"]
    if not (a.data / "test.json").is_file():
        raise MoteError(f"{a.data} has no test.json; run `mote-make-tiny WORK --install` or pass --data")
    chance = sum(CHANCE_ACCURACY.values()) / len(CHANCE_ACCURACY) * 100
    print(f"held-out questions: {a.data / 'test.json'}  (chance: {chance:.1f}%)")
    for ckpt in ckpts:
        acc = evaluate(ckpt, a.data / "test.json", a.data / "images", a.limit, progress=True)
        print(format_accuracy(f"{ckpt.name} [{expert_summary(ckpt)}]", acc))
        recs = json.loads((a.data / "test.json").read_text())[:3]
        for r, ans in zip(recs, acc["answers"]):
            q = r["conversations"][0]["value"].removeprefix("<image>\n")
            print(f"    {r['image']}: {q!r} -> {ans.strip()!r} (truth {r['conversations'][1]['value']!r})")


if __name__ == "__main__":
    main()

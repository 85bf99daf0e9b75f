"""The main job on the embedded default: answer the held-out image questions with the tiny dense
and MoTE checkpoints in PyTorch, then export MoTE to GGUF (ternary TQ2_0 experts + mmproj) and answer
the same questions on the CPU through llama-cpp-python: accuracy, agreement, file sizes, speed, memory.

    mote-demo [--limit N] [--no-gguf] [--ternary-type tq2_0|tq1_0] [--keep DIR]
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from .errors import MoteError, cli_entry
from .evaluate import evaluate, format_accuracy
from .synthetic import CHANCE_ACCURACY
from .tiny import ASSETS
from .tokenizer import normalize_answer
from .exporters.errors import ArgumentParser


def expert_summary(ckpt: Path) -> str:
    cfg = json.loads((ckpt / "config.json").read_text()).get("mote")
    if not cfg:
        return "dense"
    return f"{cfg['variant']}: {cfg['num_experts']} experts, top-{cfg['top_k']}, MoE layers {cfg['layers']}"


def run_gguf(ckpt: Path, data: Path, limit: int | None, torch_answers: list[str], ternary_type: str,
             out_dir: Path) -> None:
    """Export with the torch-free exporter and answer through llama-cpp-python."""
    try:
        from .exporters.gguf_file import mmproj_path
        from .exporters.gguf_llm import format_summary, write_llm_gguf
        from .exporters.gguf_mmproj import write_mmproj
        from .runtime_cpu.llama_engine import decode_tokens_per_s, evaluate_gguf, load
        from .runtime_cpu.memory import peak_rss_mib
    except ImportError as exc:
        raise MoteError(f"{exc.name} is not installed; pip install 'mote-edge[llama]' (or pass --no-gguf)") from None
    gguf = out_dir / f"{ckpt.name}.gguf"
    summary = write_llm_gguf(ckpt, gguf, ternary_type=ternary_type, progress=False)
    write_mmproj(ckpt, mmproj_path(gguf))
    print(format_summary(summary))
    print(f"mmproj: {mmproj_path(gguf).name} {mmproj_path(gguf).stat().st_size / 2**20:.2f} MiB")
    t0 = time.perf_counter()
    acc = evaluate_gguf(gguf, data / "test.json", data / "images", limit=limit)
    seconds = time.perf_counter() - t0
    same = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(acc["answers"], torch_answers))
    print(format_accuracy(f"{gguf.name} [llama.cpp, {ternary_type} experts]", acc))
    print(f"    answers equal to PyTorch's: {same}/{acc['n']} ({100 * same / acc['n']:.1f}%); "
          f"{acc['n'] / seconds:.1f} questions/s (image encode + prefill + answer)")
    llm = load(gguf)
    print(f"    decode: {decode_tokens_per_s(llm):.0f} tokens/s; peak RSS of this process: {peak_rss_mib():.0f} MiB")


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="mote-demo", description="Answer held-out image questions with the tiny models.")
    p.add_argument("--ckpt", action="append", type=Path, help="checkpoint folder(s); default: the embedded tiny dense and MoTE")
    p.add_argument("--data", type=Path, default=ASSETS / "data", help="folder with test.json and images/")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--no-gguf", action="store_true", help="PyTorch only: skip the GGUF export and llama.cpp run")
    p.add_argument("--ternary-type", default="tq2_0", choices=["tq2_0", "tq1_0"])
    p.add_argument("--keep", type=Path, default=None, help="write the GGUF files here (default: a temporary folder)")
    a = p.parse_args(argv)
    ckpts = a.ckpt or [ASSETS / "dense", ASSETS / "mote"]
    if not (a.data / "test.json").is_file():
        raise MoteError(f"{a.data} has no test.json; run `mote-make-tiny WORK --install` or pass --data")
    if a.keep is not None and not a.keep.is_dir():
        raise MoteError(f"--keep folder {str(a.keep)!r} does not exist")
    chance = sum(CHANCE_ACCURACY.values()) / len(CHANCE_ACCURACY) * 100
    print(f"held-out questions: {a.data / 'test.json'}  (chance: {chance:.1f}%)")
    answers = {}
    for ckpt in ckpts:
        acc = evaluate(ckpt, a.data / "test.json", a.data / "images", a.limit, progress=True)
        answers[ckpt] = acc["answers"]
        print(format_accuracy(f"{ckpt.name} [PyTorch, {expert_summary(ckpt)}]", acc))
    if a.no_gguf:
        return
    mote = [c for c in ckpts if json.loads((c / "config.json").read_text()).get("mote")]
    for ckpt in mote:
        if a.keep is not None:
            run_gguf(ckpt, a.data, a.limit, answers[ckpt], a.ternary_type, a.keep)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                run_gguf(ckpt, a.data, a.limit, answers[ckpt], a.ternary_type, Path(tmp))


if __name__ == "__main__":
    main()

"""Soak: one loaded model answers many questions; its memory and file descriptors must not grow and its
answers must not drift from what a fresh process answers.

    python -m mote_edge.benchmarks.soak [--engine mote,llama.cpp,onnxruntime] [--questions 1000]
        [--model FILE_OR_DIR] [--data test.json --images DIR] [--threads 1] [--check-every 50]
        [--max-rss-growth 1.0] [--cache DIR] -o OUT

Per engine, in its own (spawned) process: the model is loaded once through the engine interface mote-run
uses (runtime_cpu/run.py: Engine(...).stream, greedy, 8 tokens as the held-out evaluators) and answers the
held-out questions with their images (default: the tiny task's 300, cycled) one after another; after each
answer the process reads its VmRSS and RssAnon (/proc/self/status, runtime_cpu/memory.py) and counts its
open descriptors (/proc/self/fd). Then every --check-every'th question is answered again by a new
`mote-run` process (the same engine, file and threads) and the two answers must be identical.

Checks (the verdict lines, PASS/FAIL with the figures): after the warm-up (the first 10% of the questions)
RSS grows by less than --max-rss-growth % (the largest reading after the warm-up against the reading at
its end, so a leak cannot hide behind a late drop; RssAnon reported beside it), the descriptor count after the
last answer is not above its warm-up value (transients, open at one reading and closed by a later one, are
reported beside it), and every fresh-process answer equals the soaked process's.

Default model: the embedded tiny MoTE, exported once into --cache (GGUF pair for mote / llama.cpp, ONNX
folder for onnxruntime) with mote-export's own writers, keyed by the checkpoint's sha256. Written to OUT:
soak.json (every reading), soak.md (the table and verdicts) and soak.png (RSS against questions answered,
one curve per engine). Exit status 0 when every check passes, 1 when one fails, 2 on bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from ..exporters.errors import MoteExportError, cli_entry
from ..exporters.errors import ArgumentParser

ENGINES = ("mote", "llama.cpp", "onnxruntime")
ONNX_ENGINES = ("onnxruntime",)  # engines that take an ONNX export folder; the others a GGUF + mmproj pair
MAX_TOKENS = 8  # as the held-out evaluators (mote-eval, records.evaluate_records callers)
WARMUP_SHARE = 0.10
MIB = 2 ** 20
RUN = "from mote_edge.runtime_cpu.run import main; main()"  # mote-run, as its console script runs it


# ---- the default model: the embedded tiny MoTE, exported once ------------------------------------------------

def _tiny_mote() -> Path:
    from .accuracy import _assets

    return _assets() / "mote"


def tiny_exports(cache: Path, formats: set[str]) -> dict[str, Path]:
    """{"gguf": the LLM file (its -mmproj.gguf beside it), "onnx": the export folder} of the embedded tiny
    MoTE in cache/<sha256 prefix>/, written where missing (each writer renames its output into place)."""
    from .accuracy import fingerprint

    ckpt = _tiny_mote()
    if not (ckpt / "model.safetensors").is_file():
        raise MoteExportError(f"the embedded tiny MoTE ({ckpt}) has no model.safetensors; pass --model")
    folder = cache / fingerprint(ckpt)[:16]
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    if "gguf" in formats:
        from ..exporters.gguf_file import mmproj_path
        from ..exporters.gguf_llm import write_llm_gguf
        from ..exporters.gguf_mmproj import write_mmproj

        llm = folder / "tiny-mote.gguf"
        if not (llm.is_file() and mmproj_path(llm).is_file()):
            staged = folder / f".tiny-mote.{os.getpid()}.tmp"  # the LLM renamed last: present means complete
            write_llm_gguf(ckpt, staged, progress=False)
            write_mmproj(ckpt, mmproj_path(llm))
            os.replace(staged, llm)
        out["gguf"] = llm
    if "onnx" in formats:
        from ..exporters.onnx_folder import write_onnx_folder

        onnx = folder / "tiny-mote-onnx"
        if not onnx.is_dir():
            write_onnx_folder(ckpt, onnx, progress=False)  # a temporary sibling renamed when complete
        out["onnx"] = onnx
    return out


# ---- one engine's soak (runs in its own process) -------------------------------------------------------------

SAMPLE_FIELDS = ("rss", "anon", "fds")


def process_sample() -> tuple[int, int, int]:
    """VmRSS, RssAnon (bytes) and the open descriptor count of this process."""
    from ..runtime_cpu.memory import process_memory

    m = process_memory()
    return m.get("VmRSS", m["VmHWM"]), m.get("RssAnon", 0), len(os.listdir("/proc/self/fd"))


def open_engine(engine: str, model: Path, threads: int):
    """The engine's mote-run session for this model (the front's own input resolution)."""
    from ..exporters.gguf_file import mmproj_path
    from ..runtime_cpu.run import engine_module

    mod = engine_module(engine)
    if hasattr(mod, "resolve_inputs"):
        model, proj = mod.resolve_inputs(model, None)
    else:
        proj = mmproj_path(model)
        for path, what in ((model, "model"), (proj, "mmproj")):
            if not Path(path).is_file():
                raise MoteExportError(f"{what} file {str(path)!r} does not exist (--engine {engine} takes a GGUF "
                                      "written by mote-export, its -mmproj.gguf beside it)")
    return mod.Engine(Path(model), proj, n_ctx=None, threads=threads, seed=0)


def ask(session, image: Path, question: str) -> tuple[str, str]:
    """(answer, what the engine wrote to sys.stderr meanwhile): the mote engine's stream repeats its load
    report on every call, which mote-run (one question) prints once; the soak prints it once too."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        text = "".join(text for text, _ in session.stream(image, question, MAX_TOKENS))
    return text, err.getvalue()


def soak_engine(engine: str, model: str, questions: list[tuple[str, str]], threads: int, progress: bool) -> dict:
    """Load once, answer every (image, question) in order, read memory and descriptors after each answer."""
    import numpy as np
    from tqdm import tqdm

    t0 = time.perf_counter()
    session = open_engine(engine, Path(model), threads)
    load_s = time.perf_counter() - t0
    # the readings and answers go into storage allocated (and touched) before the first question: a list of
    # per-question objects would itself grow by ~0.3 KiB a question, and the soak would measure itself
    readings = np.full((len(questions) + 1, len(SAMPLE_FIELDS)), -1, np.int64)
    answers: list[str | None] = [None] * len(questions)
    readings[0] = process_sample()
    t1 = time.perf_counter()
    bar = tqdm(questions, desc=f"soak {engine}", unit="q", disable=not progress, dynamic_ncols=True)
    for i, (image, question) in enumerate(bar):
        answers[i], err = ask(session, Path(image), question)
        if i == 0 and err:
            bar.write(err.rstrip("\n"), file=sys.stderr)
        readings[i + 1] = process_sample()
    samples = [dict(zip(SAMPLE_FIELDS, map(int, row))) for row in readings]
    return {"load_s": load_s, "answer_s": time.perf_counter() - t1, "samples": samples, "answers": answers}


def fresh_answer(engine: str, model: Path, image: str, question: str, threads: int) -> str:
    """The answer of a new mote-run process (stdout is the streamed answer and one newline)."""
    r = subprocess.run([sys.executable, "-c", RUN, str(model), "--engine", engine, "--image", image, "--prompt",
                        question, "--threads", str(threads), "--max-tokens", str(MAX_TOKENS)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise MoteExportError(f"the fresh mote-run --engine {engine} failed (exit {r.returncode}): {last}")
    return r.stdout.removesuffix("\n")


# ---- the checks ---------------------------------------------------------------------------------------------

def warmup_questions(n: int, given: int | None) -> int:
    """Questions before the RSS reference reading: --warmup, else WARMUP_SHARE of them (at least 1)."""
    return max(1, min(n, given if given is not None else math.ceil(WARMUP_SHARE * n)))


def analyse(run: dict, fresh: dict[int, str], max_growth_pct: float, warmup: int | None = None) -> dict:
    """The figures and verdicts of one engine's soak. samples[i] is the reading after i answers."""
    s = run["samples"]
    n = len(s) - 1
    warm = warmup_questions(n, warmup)
    after = s[warm:]
    ref = s[warm]

    def growth(key):
        return 100.0 * (max(x[key] for x in after) - ref[key]) / ref[key] if ref[key] else 0.0

    rss_growth, anon_growth = growth("rss"), growth("anon")
    # reported beside the verdict: a leak keeps growing in the second half, a heap settling flattens out
    half = s[n // 2]
    half_growth = 100.0 * (max(x["rss"] for x in s[n // 2:]) - half["rss"]) / half["rss"] if half["rss"] else 0.0
    # a leak accumulates: the count after the last answer against the warm-up's; a descriptor open at one reading
    # and closed by a later one (seen for onnxruntime now and then) is reported as a transient, not growth
    fd_growth = s[-1]["fds"] - ref["fds"]
    fd_transient = max(x["fds"] for x in after) - ref["fds"]
    mismatches = [{"question": i, "soaked": run["answers"][i], "fresh": a} for i, a in fresh.items()
                  if run["answers"][i] != a]
    checks = {"rss": rss_growth < max_growth_pct, "fds": fd_growth <= 0, "answers": not mismatches}
    return {"questions": n, "warmup_questions": warm, "rss_at_warmup_mib": ref["rss"] / MIB,
            "rss_end_mib": s[-1]["rss"] / MIB, "rss_max_after_warmup_mib": max(x["rss"] for x in after) / MIB,
            "rss_growth_pct": rss_growth, "rss_growth_second_half_pct": half_growth, "anon_at_warmup_mib": ref["anon"] / MIB,
            "anon_growth_pct": anon_growth, "fds_at_warmup": ref["fds"], "fd_growth": fd_growth,
            "fd_transient_max": fd_transient,
            "fresh_checked": len(fresh), "mismatches": mismatches, "max_rss_growth_pct": max_growth_pct,
            "load_s": run["load_s"], "seconds_per_question": run["answer_s"] / max(n, 1), "checks": checks,
            "pass": all(checks.values())}


def verdict_lines(engine: str, a: dict) -> list[str]:
    word = {True: "PASS", False: "FAIL"}
    c = a["checks"]
    return [f"{word[c['rss']]} {engine}: RSS growth after warm-up {a['rss_growth_pct']:+.3f}% "
            f"(limit < {a['max_rss_growth_pct']}%; {a['rss_at_warmup_mib']:.1f} MiB after {a['warmup_questions']} "
            f"questions, at most {a['rss_max_after_warmup_mib']:.1f} MiB after, {a['rss_end_mib']:.1f} MiB at "
            f"{a['questions']}; RssAnon {a['anon_growth_pct']:+.3f}%; second half {a['rss_growth_second_half_pct']:+.3f}%)",
            f"{word[c['fds']]} {engine}: open descriptors {a['fds_at_warmup']} after warm-up, growth by the end "
            f"{a['fd_growth']:+d} (largest transient {a['fd_transient_max']:+d})",
            f"{word[c['answers']]} {engine}: {a['fresh_checked'] - len(a['mismatches'])}/{a['fresh_checked']} answers "
            "equal a fresh process's" + (f" (first mismatch: question {a['mismatches'][0]['question']}: "
                                         f"{a['mismatches'][0]['soaked']!r} vs {a['mismatches'][0]['fresh']!r})"
                                         if a["mismatches"] else "")]


# ---- report ------------------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    lines = [f"# Soak: {report['questions']} questions through one loaded model", "",
             f"Questions: {report['data']} (cycled), greedy, {MAX_TOKENS} tokens; {report['threads']} thread(s); "
             f"warm-up {report['warmup']} questions; fresh-process check every {report['check_every']} questions.", "",
             "| engine | model | load s | s / question | RSS after warm-up MiB | max after MiB | RSS growth % | "
             "RssAnon growth % | RSS growth, second half % | fds | fd growth | fresh answers equal | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e, r in report["engines"].items():
        a = r["analysis"]
        lines.append(f"| {e} | `{Path(r['model']).name}` | {a['load_s']:.2f} | {a['seconds_per_question']:.3f} | "
                     f"{a['rss_at_warmup_mib']:.1f} | {a['rss_max_after_warmup_mib']:.1f} | {a['rss_growth_pct']:+.3f} | "
                     f"{a['anon_growth_pct']:+.3f} | {a['rss_growth_second_half_pct']:+.3f} | {a['fds_at_warmup']} | {a['fd_growth']:+d} | "
                     f"{a['fresh_checked'] - len(a['mismatches'])}/{a['fresh_checked']} | "
                     f"{'PASS' if a['pass'] else 'FAIL'} |")
    lines += ["", "```"] + [line for e, r in report["engines"].items() for line in verdict_lines(e, r["analysis"])]
    lines += ["```", "", f"Wall time: {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.0, 4.0))
    for e, r in report["engines"].items():
        s = r["samples"]
        line, = ax.plot(range(len(s)), [x["rss"] / MIB for x in s], label=f"{e} RSS", lw=1.2)
        ax.plot(range(len(s)), [x["anon"] / MIB for x in s], ls="--", lw=0.9, color=line.get_color(),
                label=f"{e} RssAnon")
    n = report["questions"]
    ax.axvspan(0, report["warmup"], color="0.9", label="warm-up")
    ax.set_xlabel("questions answered")
    ax.set_ylabel("MiB")
    ax.set_title(f"Soak: one loaded tiny model, {n} questions per engine")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves fill the axes
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---- command ------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m mote_edge.benchmarks.soak", description=__doc__.split("\n")[0])
    p.add_argument("--engine", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)} (default all)")
    p.add_argument("--questions", type=int, default=1000, help="questions per engine (default 1000)")
    p.add_argument("--model", default=None, help="a GGUF (mote, llama.cpp; its -mmproj.gguf beside it) or an ONNX "
                   "export folder (onnxruntime); default: the embedded tiny MoTE, exported into --cache")
    p.add_argument("--data", default=None, help="LLaVA records (default: the tiny task's held-out test.json)")
    p.add_argument("--images", default=None, help="their images (default: images/ beside --data)")
    p.add_argument("--threads", type=int, default=1, help="engine threads (default 1)")
    p.add_argument("--check-every", type=int, default=50, help="every Nth question is also answered by a fresh "
                   "mote-run process (default 50)")
    p.add_argument("--warmup", type=int, default=None, help="questions answered before the RSS reference reading "
                   f"(default {int(WARMUP_SHARE * 100)}%% of --questions; one pass over the question pool lets the "
                   "allocators settle on every prompt once)")
    p.add_argument("--max-rss-growth", type=float, default=1.0, help="RSS growth after warm-up that fails, %% "
                   "(default 1.0)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "mote-edge" / "soak"),
                   help="where the default model's exports are kept (default ~/.cache/mote-edge/soak)")
    p.add_argument("-o", "--out", required=True, help="report folder (created; its parent must exist)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _questions(a) -> tuple[list[tuple[str, str]], str]:
    from ..runtime_cpu.records import question_and_answer, read_records

    if a.data:
        data = Path(a.data)
        images = Path(a.images) if a.images else data.parent / "images"
        if not data.is_file():
            raise MoteExportError(f"--data {a.data!r} does not exist")
    else:
        if a.images:
            raise MoteExportError("--images goes with --data")
        data = _tiny_mote().parent / "data" / "test.json"
        images = data.parent / "images"
    if not images.is_dir():
        raise MoteExportError(f"images folder {str(images)!r} does not exist (pass --images)")
    records = read_records(data)
    if not isinstance(records, list) or not records:
        raise MoteExportError(f"no records in {str(data)!r}")
    pool = []
    for r in records:
        if not isinstance(r, dict) or not r.get("image"):
            raise MoteExportError(f"{data}: record {r.get('id', '?') if isinstance(r, dict) else r!r} names no image")
        pool.append((str(images / r["image"]), question_and_answer(r)[0]))
    return [pool[i % len(pool)] for i in range(a.questions)], f"{data} ({len(pool)} records)"


def run(argv=None) -> dict:
    a = parser().parse_args(argv)
    engines = [e.strip() for e in a.engine.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        raise MoteExportError(f"--engine {a.engine!r}; accepted: a comma list of {', '.join(ENGINES)}")
    engines = list(dict.fromkeys(engines))
    for name in ("questions", "threads", "check_every"):
        if getattr(a, name) < 1:
            raise MoteExportError(f"--{name.replace('_', '-')} must be at least 1")
    if a.warmup is not None and not 0 < a.warmup < a.questions:
        raise MoteExportError(f"--warmup {a.warmup}: must be between 1 and --questions - 1 ({a.questions - 1})")
    if not a.max_rss_growth > 0:
        raise MoteExportError("--max-rss-growth must be a positive percentage")
    if not Path("/proc/self/status").is_file():
        raise MoteExportError("the soak reads /proc/self/status and /proc/self/fd: Linux only")
    out = Path(a.out)
    if not out.parent.is_dir():
        raise MoteExportError(f"output folder's parent {str(out.parent)!r} does not exist")
    if out.exists() and not out.is_dir():
        raise MoteExportError(f"-o {a.out!r} is a file; give a folder")
    questions, where = _questions(a)
    formats = {"onnx" if e in ONNX_ENGINES else "gguf" for e in engines}
    if a.model is not None:
        model = Path(a.model)
        if len(formats) > 1:
            raise MoteExportError("--model names one model: give engines that read one format (mote and llama.cpp "
                                  "a GGUF, onnxruntime an ONNX folder)")
        if not model.exists():
            raise MoteExportError(f"--model {a.model!r} does not exist")
        models = {f: model for f in formats}
    else:
        models = tiny_exports(Path(a.cache), formats)
    # llama.cpp's OpenMP workers otherwise spin between ops (see accuracy.run); the children inherit it
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    t0 = time.perf_counter()
    report = {"questions": a.questions, "data": where, "threads": a.threads, "check_every": a.check_every,
              "warmup": warmup_questions(a.questions, a.warmup), "engines": {}}
    for e in engines:
        model = models["onnx" if e in ONNX_ENGINES else "gguf"]
        # each engine soaks alone in a new process: its curve is its own, and this one holds no engine
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            soaked = pool.submit(soak_engine, e, str(model), questions, a.threads, not a.quiet).result()
        picks = range(0, a.questions, a.check_every)
        fresh = {i: fresh_answer(e, model, *questions[i], a.threads)
                 for i in tqdm(picks, desc=f"fresh {e}", unit="proc", disable=a.quiet, dynamic_ncols=True)}
        report["engines"][e] = {"model": str(model), "analysis": analyse(soaked, fresh, a.max_rss_growth, a.warmup),
                                "samples": soaked["samples"], "answers": soaked["answers"]}
    report["seconds"] = time.perf_counter() - t0
    report["pass"] = all(r["analysis"]["pass"] for r in report["engines"].values())
    out.mkdir(exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    (out / "soak.md").write_text(markdown(report))
    plot(report, out / "soak.png")
    return report


@cli_entry
def main(argv=None):
    report = run(argv)
    for e, r in report["engines"].items():
        for line in verdict_lines(e, r["analysis"]):
            print(line)
    print(f"wall time {report['seconds']:.0f} s; wrote soak.json, soak.md, soak.png")
    if not report["pass"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

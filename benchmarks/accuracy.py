"""mote-bench --accuracy: held-out accuracy against expert memory, MoTE vs MoE-LLaVA + post-training
quantization vs dense (the MoTE paper's Figure 1, on your task), through an engine on exported files.

    mote-bench --accuracy [--mote DIR] [--moe-llava DIR] [--dense DIR | --no-dense]
        [--ternary-types tq2_0,tq1_0,q2_0] [--shared-types bf16,q8_0,q4_k,q3_k]
        [--expert-types f16,q8_0,q4_k,q3_k,q2_k] [--dense-type bf16] [--other-type f16]
        [--data test.json --images DIR | --heldout N [--seed S]] [--limit N]
        [--engine llama.cpp|mote] [--threads N] [--cache DIR] [--out DIR]

Each checkpoint (default: the embedded tiny ones) is exported with mote-export's own writer along the
ladder (MoTE: every ternary type x every shared-expert type; MoE-LLaVA: every expert type; dense: one
file), into --cache, where a file is reused while its stamp (checkpoint fingerprint + types) matches.
Every file then answers the held-out questions greedily through the engine (the mote-run engine
interface, runtime_cpu/run.py), scored exactly as mote-eval scores (runtime_cpu/records.py). Written to
--out: accuracy.json, accuracy.md and accuracy.png, each point with a Wilson 95% binomial interval.

Expert memory: the bytes of the routed-expert tensors (ffn_{gate,up,down}_exps) and the shared-expert
tensors (ffn_{gate,up,down}_shexp) of the LLM GGUF, as its header states them (block scales included),
all layers; MoE-LLaVA's all-zero placeholder shared expert (qwen2moe requires one) and the routers are
not counted; for the dense model, its FFN tensors (what the experts replace). benchmarks/bench_measure.py
gguf_costs is the one place this is computed (mote-bench reports the same figure).

ggml's q8_0 and q*_k are round-to-nearest quantizers (per-block scales; the K-quants search each
sub-block's scale and minimum, here without an importance matrix), not GPTQ. GPTQ quantizes column by
column and spreads each column's rounding error over the columns not yet quantized, using second-order
statistics from calibration data; at 3 bits it typically recovers much of what round-to-nearest loses.
So MoE-LLaVA + RTN is a weaker baseline than the paper's MoE-LLaVA + 3-bit GPTQ, and MoTE beating it here
is a smaller claim than the paper's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..exporters.errors import MoteExportError, cli_entry
from .bench_models import ModelSpec
from ..exporters.errors import ArgumentParser

MIB = 2 ** 20
Z95 = 1.959963984540054  # two-sided 95% normal quantile

TERNARY_TYPES = ("tq2_0", "tq1_0", "q2_0")
SHARED_TYPES = ("bf16", "q8_0", "q4_k", "q3_k")
EXPERT_TYPES = ("f16", "q8_0", "q4_k", "q3_k", "q2_k")
DENSE_TYPE = "bf16"  # like MoTE's shared expert (and the checkpoints' storage): the dense reference is not PTQ'd
ENGINES = ("llama.cpp", "mote")  # mote-run engines that run a GGUF + mmproj pair
MAX_TOKENS = 8  # as mote-eval (mote_edge.evaluate.generate_answers) and the engines' evaluators
NOTE_RTN = ("MoE-LLaVA's q8_0 / q*_k experts are ggml's round-to-nearest quantizers (per-block scales; K-quants "
            "search each sub-block's scale and minimum, no importance matrix), not GPTQ. GPTQ spreads each "
            "column's rounding error over the columns not yet quantized (second-order statistics from "
            "calibration data) and typically recovers much of the accuracy RTN loses at 3 bits, so RTN is a "
            "weaker baseline than the paper's 3-bit GPTQ: a MoTE win here is a smaller claim than the paper's.")
DEFINITION = ("expert memory = bytes of the routed-expert (ffn_*_exps) and shared-expert (ffn_*_shexp) tensors "
              "in the LLM GGUF, all layers, from its header (block scales included); MoE-LLaVA's all-zero "
              "placeholder shared expert and the routers not counted; dense: its FFN tensors.")


# ---- the ladder ------------------------------------------------------------------------------------------

def ladder(ternary: list[str], shared: list[str], experts: list[str], dense: str | None) -> list[ModelSpec]:
    """MoTE: every ternary x shared type; MoE-LLaVA: every expert type; dense: one file (None: none)."""
    specs = [ModelSpec(f"mote-{t}-{s}", "mote", ternary=t, shared=s) for t in ternary for s in shared]
    specs += [ModelSpec(f"moe-llava-{e}", "moe-llava", expert=e) for e in experts]
    if dense:
        specs.append(ModelSpec(f"dense-{dense}", "dense", shared=dense))
    return specs


def parse_list(text: str, accepted, option: str) -> list[str]:
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in accepted]
    if bad:
        raise MoteExportError(f"{option}: unknown type {bad[0]!r}; accepted: {', '.join(accepted)}")
    return list(dict.fromkeys(items))


# ---- statistics ----------------------------------------------------------------------------------------

def wilson(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion, in %: (low, high)."""
    if n <= 0:
        return 0.0, 100.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def newcombe(h1: int, n1: int, h2: int, n2: int) -> tuple[float, float]:
    """95% interval of p1 - p2 (in points) from the two Wilson intervals (Newcombe's hybrid score method).
    It treats the two samples as independent; on the same questions that is conservative."""
    p1, p2 = 100 * h1 / n1, 100 * h2 / n2
    l1, u1 = wilson(h1, n1)
    l2, u2 = wilson(h2, n2)
    d = p1 - p2
    return d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


# ---- exports, cached -----------------------------------------------------------------------------------

def fingerprint(ckpt: Path) -> str:
    """sha256 of a checkpoint's config.json and model.safetensors: what an export is up to date with."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(ckpt / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _up_to_date(path: Path, want: dict, spec: ModelSpec | None) -> bool:
    try:
        if json.loads(_stamp(path).read_text()) != want or not path.is_file():
            return False
    except (OSError, json.JSONDecodeError):
        return False
    if spec is None:
        return True
    from .bench_models import stale_routed_types

    return not stale_routed_types(path, spec)  # older exporters' types or keys: rebuild


def export_all(specs: list[ModelSpec], ckpts: dict[str, Path], cache: Path, other: str,
               progress: bool = True) -> tuple[dict[str, Path], dict[str, Path], list[dict]]:
    """The LLM GGUF of every spec and one mmproj per checkpoint, written where missing or stale."""
    from tqdm import tqdm

    from ..exporters.gguf_llm import write_llm_gguf
    from ..exporters.gguf_mmproj import write_mmproj

    cache.mkdir(parents=True, exist_ok=True)
    prints = {v: fingerprint(ckpts[v]) for v in {s.variant for s in specs}}
    files, projs, jobs = {}, {}, []
    for v in prints:
        projs[v] = cache / f"mmproj-{v}.gguf"
        want = {"checkpoint": str(ckpts[v].resolve()), "sha256": prints[v], "mmproj": "f16"}
        if not _up_to_date(projs[v], want, None):
            jobs.append((f"mmproj {v}", projs[v], want, None))
    for s in specs:
        files[s.name] = cache / f"{s.name}.gguf"
        want = {"checkpoint": str(ckpts[s.variant].resolve()), "sha256": prints[s.variant], "other_type": other,
                "spec": asdict(s)}
        if not _up_to_date(files[s.name], want, s):
            jobs.append((f"export {s.name}", files[s.name], want, s))
    log = []
    for what, path, want, s in tqdm(jobs, desc="exporting", unit="file", disable=not progress or not jobs):
        t0 = time.perf_counter()
        _stamp(path).unlink(missing_ok=True)  # no stamp until the file is complete
        if s is None:
            write_mmproj(ckpts[what.split()[1]], path)
        else:
            write_llm_gguf(ckpts[s.variant], path, ternary_type=s.ternary, shared_type=s.shared, other_type=other,
                           expert_type=s.expert, progress=False)
        _stamp(path).write_text(json.dumps(want, indent=1))
        log.append({"job": what, "seconds": round(time.perf_counter() - t0, 2)})
    return files, projs, log


# ---- evaluation ----------------------------------------------------------------------------------------

def answerer(engine: str, model: Path, mmproj: Path, threads: int | None):
    """The engine's own greedy answer function for one loaded file: what its held-out evaluator uses
    (llama_engine.evaluate_gguf, mote_engine.evaluate), without the per-answer stream report."""
    if engine == "llama.cpp":
        from ..runtime_cpu import llama_engine

        llm = llama_engine.load(model, mmproj, n_threads=threads)
        return lambda image, question: llama_engine.answer(llm, image, question, MAX_TOKENS)
    from ..runtime_cpu.mote_engine import MoteModel

    m = MoteModel(model, mmproj, threads=threads)
    return lambda image, question: m.answer(image, question, MAX_TOKENS)


def evaluate_file(engine: str, model: Path, mmproj: Path, records: list[dict], images: Path,
                  threads: int | None, desc: str = "", progress: bool = True) -> dict:
    """Held-out accuracy of one exported file through an engine, scored by runtime_cpu/records.py."""
    from tqdm import tqdm

    from ..runtime_cpu.records import evaluate_records

    ask = answerer(engine, model, mmproj, threads)
    bar = tqdm(total=len(records), desc=desc, unit="q", leave=False, disable=not progress)

    def answer(image: Path, question: str) -> str:
        text = ask(image, question)
        bar.update()
        return text

    t0 = time.perf_counter()
    try:
        acc = evaluate_records(answer, records, images)
    finally:
        bar.close()
        del ask  # the engine's model is freed before the next file loads
    return acc | {"seconds": time.perf_counter() - t0}


def evaluate_all(specs, files: dict, projs: dict, records: list[dict], images: Path, a, progress: bool) -> dict:
    """{file name: evaluate_file's result}, --jobs files at a time, each in a fresh (spawned) process: the
    files are independent, and a fresh process loads llama.cpp with OMP_WAIT_POLICY=passive in effect."""
    from tqdm import tqdm

    bar = tqdm(total=len(specs), desc=f"evaluating ({a.engine})", unit="file", disable=not progress)
    out = {}
    try:
        if a.jobs == 1 or len(specs) == 1:
            for s in specs:
                out[s.name] = evaluate_file(a.engine, files[s.name], projs[s.variant], records, images, a.threads,
                                            s.name, progress)
                bar.update()
            return out
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(min(a.jobs, len(specs)), mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(evaluate_file, a.engine, files[s.name], projs[s.variant], records, images,
                                   a.threads, s.name, False): s.name for s in specs}
            for f in as_completed(futures):
                out[futures[f]] = f.result()
                bar.set_postfix_str(futures[f])
                bar.update()
        return out
    finally:
        bar.close()


# ---- inputs --------------------------------------------------------------------------------------------

def _assets() -> Path:
    import mote_edge

    return Path(mote_edge.__file__).parent / "assets" / "tiny"


def _check_ckpt(path: Path, variant: str, option: str) -> Path:
    from ..exporters.ckpt import read_config

    cfg = read_config(path)  # one error line when missing or unreadable
    got = (cfg.get("mote") or {}).get("variant", "dense")
    if got != variant:
        raise MoteExportError(f"{option} {str(path)!r} is a {got} checkpoint; give a {variant} one")
    if not (path / "model.safetensors").is_file():
        raise MoteExportError(f"{option} {str(path)!r} has no model.safetensors")
    return path


def held_out(a, cache: Path) -> tuple[list[dict], Path, str]:
    """(records, images folder, description) of the held-out questions the ladder is scored on."""
    from ..runtime_cpu.records import read_records

    if a.data:
        data = Path(a.data)
        images = Path(a.images) if a.images else data.parent / "images"
        if not data.is_file():
            raise MoteExportError(f"--data {a.data!r} does not exist")
        if not images.is_dir():
            raise MoteExportError(f"images folder {str(images)!r} does not exist (pass --images)")
        where = str(data)
    else:
        from mote_edge.synthetic import HELDOUT_SPLIT, make_heldout

        folder = cache / f"heldout-{a.heldout}-seed{a.seed}"
        data, images = folder / f"{HELDOUT_SPLIT}.json", folder / "images"
        if not data.is_file():  # the generator is seeded: the same questions every time
            make_heldout(folder, a.heldout, a.seed)
        where = f"the tiny task's {HELDOUT_SPLIT} split, {a.heldout} questions, seed {a.seed} (mote_edge/synthetic.py)"
    records = read_records(data, a.limit)
    if not records:
        raise MoteExportError(f"no held-out records in {str(data)!r}")
    return records, images, where + (f", first {len(records)}" if a.limit else "")


# ---- report --------------------------------------------------------------------------------------------

def label(spec: dict) -> str:
    return ModelSpec(**{k: spec[k] for k in ("name", "variant", "ternary", "shared", "expert")}).label


def comparisons(points: list[dict]) -> list[dict]:
    """For each MoE-LLaVA file, the most accurate MoTE file with no more expert memory, and the difference."""
    mote = [p for p in points if p["spec"]["variant"] == "mote"]
    out = []
    for m in (p for p in points if p["spec"]["variant"] == "moe-llava"):
        fits = [p for p in mote if p["expert_bytes"] <= m["expert_bytes"]]
        if not fits:
            out.append({"moe_llava": m["name"], "mote": None})
            continue
        best = max(fits, key=lambda p: (p["hits"], -p["expert_bytes"]))
        lo, hi = newcombe(best["hits"], best["n"], m["hits"], m["n"])
        out.append({"moe_llava": m["name"], "moe_llava_mib": m["expert_bytes"] / MIB, "mote": best["name"],
                    "mote_mib": best["expert_bytes"] / MIB, "diff_points": best["accuracy"] - m["accuracy"],
                    "diff_ci95": [lo, hi]})
    return out


def markdown(report: dict) -> str:
    pts = sorted(report["points"], key=lambda p: -p["expert_bytes"])
    n = pts[0]["n"]
    types = sorted({k for p in pts for k in p["by_type"]})
    lines = [f"# Accuracy against expert memory ({report['engine']})", "",
             f"Held-out: {report['held_out']} ({n} questions); greedy answers, exact match; 95% Wilson interval.",
             f"Checkpoints: MoTE `{report['checkpoints'].get('mote')}`, MoE-LLaVA `{report['checkpoints'].get('moe-llava')}`"
             + (f", dense `{report['checkpoints']['dense']}`" if "dense" in report["checkpoints"] else "")
             + f"; attention / embeddings / output {report['other_type']}, mmproj f16.", "",
             "| model | expert memory MiB | file MiB | accuracy % | 95% interval | "
             + " | ".join(types) + " |",
             "|---|---|---|---|---|" + "---|" * len(types)]
    for p in pts:
        lo, hi = p["ci95"]
        lines.append(f"| {p['label']} | {p['expert_bytes'] / MIB:.3f} | {p['file_bytes'] / MIB:.2f} | "
                     f"**{p['accuracy']:.1f}** | {lo:.1f}-{hi:.1f} | "
                     + " | ".join(f"{p['by_type'].get(t, float('nan')):.1f}" for t in types) + " |")
    comp = report["comparisons"]
    if comp:
        lines += ["", "At equal or less expert memory: the best MoTE file against each MoE-LLaVA file "
                  "(difference of accuracies, 95% interval by Newcombe's method, conservative on the same questions):", "",
                  "| MoE-LLaVA | MiB | best MoTE within it | MiB | MoTE - MoE-LLaVA, points | 95% interval |",
                  "|---|---|---|---|---|---|"]
        for c in comp:
            if c["mote"] is None:
                lines.append(f"| {c['moe_llava']} | | no MoTE file this small | | | |")
            else:
                lo, hi = c["diff_ci95"]
                lines.append(f"| {c['moe_llava']} | {c['moe_llava_mib']:.3f} | {c['mote']} | {c['mote_mib']:.3f} | "
                             f"{c['diff_points']:+.1f} | {lo:+.1f} to {hi:+.1f} |")
    lines += ["", f"Definition: {DEFINITION}", "", f"Note: {NOTE_RTN}", "",
              f"Command: `{' '.join(report['command'])}` ({report['wall_s'] / 60:.1f} min, "
              f"exports {report['export_s']:.0f} s of it)"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2))
    pts = report["points"]
    series = {}
    for p in pts:
        s = p["spec"]
        key = (f"MoTE, {s['ternary'].upper()} experts" if s["variant"] == "mote" else
               "MoE-LLaVA + RTN PTQ" if s["variant"] == "moe-llava" else "dense")
        series.setdefault(key, []).append(p)
    styles = {"MoE-LLaVA + RTN PTQ": ("tab:red", "s"), "dense": ("black", "*")}
    mote_colours = iter(("tab:blue", "tab:cyan", "tab:purple", "tab:green"))
    for key, ps in series.items():
        ps.sort(key=lambda p: p["expert_bytes"])
        colour, marker = styles.get(key) or (next(mote_colours), "o")
        x = [p["expert_bytes"] / MIB for p in ps]
        y = [p["accuracy"] for p in ps]
        err = [[p["accuracy"] - p["ci95"][0] for p in ps], [p["ci95"][1] - p["accuracy"] for p in ps]]
        ax.errorbar(x, y, yerr=err, color=colour, marker=marker, capsize=3, label=key,
                    linestyle="-" if len(ps) > 1 else "none", markersize=9 if marker == "*" else 6)
        for p, xi, yi in zip(ps, x, y):
            tag = (p["spec"]["shared"] if p["spec"]["variant"] == "mote" else
                   p["spec"]["expert"] if p["spec"]["variant"] == "moe-llava" else p["spec"]["shared"])
            ax.annotate(tag, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
    if report.get("chance") is not None:
        ax.axhline(report["chance"], color="grey", linestyle=":", linewidth=1, label=f"chance {report['chance']:.1f}%")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # MiB figures on the log axis, not powers of ten
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("expert memory, MiB (routed + shared expert tensors in the GGUF; log scale)")
    ax.set_ylabel(f"held-out accuracy, % (n = {pts[0]['n']}, 95% Wilson)")
    ax.set_title(f"Accuracy vs expert memory ({report['engine']}); MoTE labels: shared-expert type")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(report: dict, out: Path, png: Path | None = None) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "accuracy.json", "md": out / "accuracy.md", "png": png or out / "accuracy.png"}
    paths["json"].write_text(json.dumps(report, indent=1) + "\n")
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths


def _chance(records: list[dict]) -> float | None:
    """Chance accuracy of these records when they are the tiny task's (per-type chance, weighted)."""
    from mote_edge.synthetic import CHANCE_ACCURACY

    types = [r.get("question_type") for r in records]
    if not all(t in CHANCE_ACCURACY for t in types):
        return None
    return 100 * sum(CHANCE_ACCURACY[t] for t in types) / len(types)


# ---- command -------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    tiny = _assets()
    p = ArgumentParser(prog="mote-bench --accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--mote", default=str(tiny / "mote"), help="MoTE checkpoint (default: the embedded tiny one)")
    p.add_argument("--moe-llava", default=str(tiny / "moe-llava"),
                   help="MoE-LLaVA checkpoint from the same dense model and data (default: the embedded tiny one)")
    p.add_argument("--dense", default=str(tiny / "dense"), help="dense reference checkpoint (default: the embedded one)")
    p.add_argument("--no-dense", action="store_true", help="no dense reference point")
    p.add_argument("--ternary-types", default=",".join(TERNARY_TYPES), help=f"MoTE routed experts (default {','.join(TERNARY_TYPES)})")
    p.add_argument("--shared-types", default=",".join(SHARED_TYPES), help=f"MoTE shared expert (default {','.join(SHARED_TYPES)})")
    p.add_argument("--expert-types", default=",".join(EXPERT_TYPES), help=f"MoE-LLaVA experts (default {','.join(EXPERT_TYPES)})")
    p.add_argument("--dense-type", default=DENSE_TYPE, help=f"the dense model's FFN (default {DENSE_TYPE})")
    p.add_argument("--other-type", default="f16", help="attention, embeddings and output of every file (default f16)")
    p.add_argument("--data", help="held-out LLaVA records (default: the tiny task's large held-out split, generated)")
    p.add_argument("--images", help="their images (default: images/ beside --data)")
    p.add_argument("--heldout", type=int, default=2000, help="size of the generated held-out split (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated held-out split (default 0)")
    p.add_argument("--limit", type=int, help="only the first N held-out questions")
    p.add_argument("--engine", default="llama.cpp", help=f"{' | '.join(ENGINES)} (mote-run's engines; default llama.cpp)")
    p.add_argument("--threads", type=int, default=1, help="engine threads (default 1: the tiny model is too small "
                   "for more to pay, measured)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "mote-edge" / "accuracy"),
                   help="exports and the generated held-out split, reused while up to date "
                        "(default ~/.cache/mote-edge/accuracy)")
    p.add_argument("--out", default="mote-accuracy-out", help="report folder (created; its parent must exist)")
    p.add_argument("--plot", help="write the plot here instead of OUT/accuracy.png")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="files evaluated at once, each in its own process with --threads threads (default: one "
                        "per CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(argv=None) -> dict:
    a = parser().parse_args(argv)
    # llama.cpp's CPU backend (built with OpenMP) otherwise spins waiting for work between ops: measured on
    # the tiny model (1 thread, the 2-core machine shared with other jobs), 2- to 21-token prefills took
    # 44-351 ms of CPU with the default policy and 1.2-3.4 ms with this one, the same answers. libgomp
    # reads it once, when it loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    from ..exporters.quantize import FLOAT_TYPES, parse_type

    if a.engine not in ENGINES:
        raise MoteExportError(f"--engine {a.engine!r}; accepted: {', '.join(ENGINES)}")
    for name in ("heldout", "limit", "threads", "jobs"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise MoteExportError(f"--{name} must be at least 1")
    if a.images and not a.data:
        raise MoteExportError("--images goes with --data")
    out = Path(a.out)
    if not out.parent.is_dir():
        raise MoteExportError(f"output folder's parent {str(out.parent)!r} does not exist")
    if out.exists() and not out.is_dir():
        raise MoteExportError(f"--out {a.out!r} is a file; give a folder")
    if a.plot and not Path(a.plot).parent.is_dir():
        raise MoteExportError(f"--plot: folder {str(Path(a.plot).parent)!r} does not exist")
    parse_type(a.other_type, "--other-type")
    dense_type = None if a.no_dense else parse_list(a.dense_type, FLOAT_TYPES, "--dense-type")[0]
    specs = ladder(parse_list(a.ternary_types, TERNARY_TYPES, "--ternary-types"),
                   parse_list(a.shared_types, FLOAT_TYPES, "--shared-types"),
                   parse_list(a.expert_types, FLOAT_TYPES, "--expert-types"), dense_type)
    if not specs:
        raise MoteExportError("the ladder is empty: give at least one type")
    wanted = {s.variant for s in specs}
    ckpts = {v: _check_ckpt(Path(getattr(a, v.replace("-", "_"))), v, f"--{v}") for v in wanted}
    cache = Path(a.cache)
    t0 = time.perf_counter()
    records, images, where = held_out(a, cache)
    progress = not a.quiet
    files, projs, build = export_all(specs, ckpts, cache, a.other_type.lower(), progress)
    export_s = time.perf_counter() - t0

    from .bench_measure import gguf_costs

    accs = evaluate_all(specs, files, projs, records, images, a, progress)
    points = []
    for s in specs:
        cost = gguf_costs(files[s.name])
        acc = accs[s.name]
        hits = round(acc["overall"] * acc["n"] / 100)
        points.append({"name": s.name, "label": s.label, "spec": asdict(s), "path": str(files[s.name]),
                       "mmproj": str(projs[s.variant]), "expert_bytes": cost["expert_bytes"],
                       "file_bytes": cost["file_bytes"], "group_bytes": cost["group_bytes"],
                       "group_types": cost["group_types"], "n": acc["n"], "hits": hits,
                       "accuracy": acc["overall"], "ci95": list(wilson(hits, acc["n"])),
                       "by_type": {k: v for k, v in acc.items() if k not in ("overall", "n", "answers", "seconds")},
                       "eval_s": round(acc["seconds"], 1), "answers": acc["answers"]})
    report = {"command": ["mote-bench", "--accuracy", *(sys.argv[1:] if argv is None else argv)],
              "engine": a.engine, "held_out": where, "checkpoints": {v: str(p) for v, p in ckpts.items()},
              "other_type": a.other_type.lower(), "definition": DEFINITION, "note": NOTE_RTN,
              "chance": _chance(records), "points": points, "comparisons": comparisons(points),
              "build": build, "export_s": round(export_s, 1), "wall_s": round(time.perf_counter() - t0, 1)}
    paths = write_report(report, out, Path(a.plot) if a.plot else None)
    print(markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return report


@cli_entry
def main(argv=None) -> None:
    run(argv)


if __name__ == "__main__":
    main()

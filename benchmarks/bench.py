"""mote-bench: MoTE against MoE-LLaVA and the dense model on this machine's CPU, side by side, through
one or more engines on the same files (`--engines llama.cpp,mote`: llama.cpp and our numpy engine).

    mote-bench --preset tiny|qwen2.5-0.5b|qwen2.5-1.5b|qwen2.5-3b [--models LIST] [--out DIR]
    mote-bench MODEL.gguf [MODEL.gguf ...] [--mmproj PATH] [--out DIR]
        [--threads N] [--repeats N] [--warmup N] [--n-gen N] [--seed S] [--image PNG] [--prompt TEXT]
        [--cache DIR] [--jobs N] [--vision-layers N] [--other-type T] [--keep-checkpoints]
        [--engines llama.cpp,mote]
    mote-bench --accuracy ...   accuracy against expert memory, MoTE vs MoE-LLaVA + PTQ (benchmarks/accuracy.py)

With a preset, random-weight checkpoints of that shape are written (benchmarks/random_ckpt.py) and
exported with mote-export's own writer into one GGUF per model, cached in --cache and reused;
each checkpoint is deleted once its GGUFs exist (they are cheap to rewrite and large). Every
model is then measured with each engine in its own process (benchmarks/bench_measure.py for
llama.cpp, benchmarks/bench_measure_mote.py for the mote engine), with the machine's memory
bandwidth measured in the same run for the roofline; results go to DIR/bench.json, DIR/bench.md
and two PNG plots (benchmarks/bench_report.py).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

from ..exporters.errors import MoteExportError, cli_entry
from .bench_models import ModelSpec, stale_routed_types

GIB = 2 ** 30
_MMPROJ_ROOM = 2 * GIB  # the projector (0.8 GB for SigLIP so400m) and headroom


MODELS = {m.name: m for m in (
    *(ModelSpec(f"mote-{t}-{s}", "mote", ternary=t, shared=s) for t in ("tq2_0", "tq1_0") for s in ("bf16", "q8_0", "q4_k")),
    # MoE-LLaVA + PTQ: q4_k / q3_k experts land near MoTE's expert memory (DESIGN.md 1, "at equal memory")
    *(ModelSpec(f"moe-llava-{t}", "moe-llava", expert=t) for t in ("f16", "q4_k", "q3_k")),
    # bf16, like MoTE's shared expert: MoTE-bf16 minus dense is exactly its router + routed experts
    ModelSpec("dense-bf16", "dense", shared="bf16"),
)}
GROUPS = {"all": list(MODELS), **{v: [n for n, m in MODELS.items() if m.variant == v] for v in ("mote", "moe-llava", "dense")}}
# Rough export cost, ns per weight on one core (measured on the 2-core dev machine): only orders jobs.
_NS = {"tq2_0": 5, "tq1_0": 6, "f16": 4, "bf16": 6, "q8_0": 7, "q4_k": 52, "q3_k": 12}


def parse_models(text: str) -> list[ModelSpec]:
    names: list[str] = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part not in MODELS and part not in GROUPS:
            raise MoteExportError(f"--models: unknown model {part!r}; accepted: {', '.join(MODELS)} "
                                  f"or the groups {', '.join(GROUPS)}")
        names += [n for n in GROUPS.get(part, [part]) if n not in names]
    if not names:
        raise MoteExportError("--models is empty; accepted: a comma-separated list of models or groups")
    return [MODELS[n] for n in names]


# ---- building a preset's files -------------------------------------------------------------------------

def _ffn_weights(p) -> int:
    t = p.text
    return t["num_hidden_layers"] * 3 * t["hidden_size"] * t["intermediate_size"]


def export_cost(p, spec: ModelSpec, experts: int = 4) -> float:
    """Estimated single-core seconds of one export (for scheduling the longest jobs first)."""
    ffn = _ffn_weights(p)
    routed = experts * ffn * _NS[spec.ternary or spec.expert] if spec.variant != "dense" else 0
    shared = ffn * _NS[spec.shared] if spec.variant != "moe-llava" else 0
    return (routed + shared + 2 * p.vocab * p.text["hidden_size"] * _NS["f16"]) * 1e-9


def ckpt_bytes(p, variant: str) -> int:
    from .random_ckpt import moe_settings, tensor_specs

    mote = moe_settings(variant, p.text["num_hidden_layers"])
    return sum(2 * _prod(s) for _, s in tensor_specs(p, mote))


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def gguf_name(spec: ModelSpec, other: str) -> str:
    return f"{spec.name}.gguf" if other == "f16" else f"{spec.name}.other-{other}.gguf"


def _job_ckpt(folder: str, preset_args: tuple, variant: str) -> dict:
    from .random_ckpt import preset, write_checkpoint

    t0 = time.perf_counter()
    r = write_checkpoint(Path(folder) / f"ckpt-{variant}", preset(*preset_args), variant, progress=False)
    return r | {"seconds": time.perf_counter() - t0}


def _job_export(ckpt: str, out: str, spec: dict, other: str) -> dict:
    from ..exporters.gguf_llm import write_llm_gguf

    t0 = time.perf_counter()
    s = write_llm_gguf(ckpt, out, ternary_type=spec["ternary"], shared_type=spec["shared"], other_type=other,
                       expert_type=spec["expert"], progress=False)
    return {"path": out, "file_bytes": s["file_bytes"], "fallbacks": s["fallbacks"], "seconds": time.perf_counter() - t0}


def _job_mmproj(ckpt: str, out: str) -> dict:
    from ..exporters.gguf_mmproj import write_mmproj

    t0 = time.perf_counter()
    return write_mmproj(Path(ckpt), Path(out)) | {"seconds": time.perf_counter() - t0}


class _Builder:
    """Runs checkpoint writes and exports on `jobs` worker processes (an export is mostly single-threaded
    numpy). One stage per checkpoint variant, the stage holding the longest export first and the
    longest exports first; a second stage overlaps the first (both workers stay busy) only while the
    disk has room for both (1.5B checkpoints are 10-12 GB), never more than two; a checkpoint is
    deleted as soon as the last export reading it is done, unless kept."""

    def __init__(self, folder: Path, p, preset_args: tuple, other: str, jobs: int, keep: bool, sizes: dict):
        self.folder, self.p, self.preset_args, self.other, self.jobs = folder, p, preset_args, other, jobs
        self.keep, self.sizes = keep, sizes

    def _stage_jobs(self, todo: list[ModelSpec], need_mmproj: bool) -> dict[str, list]:
        stages: dict[str, list] = {v: [] for v in stage_order(self.p, todo)}
        for s in sorted(todo, key=lambda s: -export_cost(self.p, s)):
            ckpt, out = str(self.folder / f"ckpt-{s.variant}"), str(self.folder / gguf_name(s, self.other))
            stages[s.variant].append((f"export {s.name}", _job_export, (ckpt, out, asdict(s), self.other)))
        if need_mmproj:  # from the first stage's checkpoint (every variant has the same vision weights)
            v = next(iter(stages), "dense")
            ckpt = str(self.folder / f"ckpt-{v}")
            stages.setdefault(v, []).append(("mmproj", _job_mmproj, (ckpt, str(self.folder / "mmproj.gguf"))))
        return stages

    def _room(self, variant: str, stages: dict, started: list, unfinished: set) -> bool:
        """Whether the disk holds stage `variant` (checkpoint + GGUFs) beside what the started stages
        still have to write (conservative: an unfinished checkpoint counts whole)."""
        def names(v):
            return [f"ckpt-{v}"] + [what.split()[-1] for what, _, _ in stages[v]]
        need = sum(self.sizes.get(n, 0) for n in names(variant))
        pending = sum(self.sizes.get(n, 0) for v in started for n in names(v) if n in unfinished)
        return need + pending + _MMPROJ_ROOM <= shutil.disk_usage(self.folder).free

    def run(self, todo: list[ModelSpec], need_mmproj: bool) -> list[dict]:
        stages = self._stage_jobs(todo, need_mmproj)
        waiting, started, unfinished = list(stages), [], set()
        remaining = {v: len(j) for v, j in stages.items()}
        total = sum(remaining.values()) + sum(not (self.folder / f"ckpt-{v}" / "model.safetensors").is_file()
                                              for v in stages)
        ready, running, log = [], {}, []
        # spawn: fresh interpreters, nothing of this process copied into the workers
        with ProcessPoolExecutor(max_workers=self.jobs, mp_context=mp.get_context("spawn")) as pool:
            while True:
                while len(running) < self.jobs:
                    active = [v for v in started if remaining[v] > 0]
                    if ready:
                        variant, (what, fn, args) = ready.pop(0)
                    elif waiting and (not active or len(active) < 2 and self._room(waiting[0], stages, active,
                                                                                    unfinished)):
                        variant = waiting.pop(0)
                        started.append(variant)
                        unfinished |= {what.split()[-1] for what, _, _ in stages[variant]}
                        ckpt = self.folder / f"ckpt-{variant}"
                        if (ckpt / "model.safetensors").is_file():  # kept by an earlier --keep-checkpoints run
                            ready += [(variant, j) for j in stages[variant]]
                            continue
                        unfinished.add(f"ckpt-{variant}")
                        what, fn, args = f"checkpoint {variant}", _job_ckpt, (str(self.folder), self.preset_args, variant)
                    else:
                        break
                    running[pool.submit(fn, *args)] = (what, variant, time.perf_counter())
                if not running:
                    return log
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    what, variant, t0 = running.pop(f)
                    result = f.result()  # an error in a worker ends the build here
                    log.append({"job": what} | result)
                    print(f"[build {len(log)}/{total}] {what}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
                    if what.startswith("checkpoint"):
                        unfinished.discard(f"ckpt-{variant}")
                        ready += [(variant, j) for j in stages[variant]]
                        ready.sort(key=lambda vj: -self._cost(vj[1]))
                        continue
                    unfinished.discard(what.split()[-1])
                    remaining[variant] -= 1
                    if remaining[variant] == 0 and not self.keep:
                        shutil.rmtree(self.folder / f"ckpt-{variant}", ignore_errors=True)

    def _cost(self, job) -> float:
        what = job[0]
        return export_cost(self.p, MODELS[what.split()[1]]) if what.startswith("export") else 0.0


def build_preset(p, preset_args: tuple, specs: list[ModelSpec], cache: Path, other: str, jobs: int,
                 keep: bool) -> tuple[dict[str, Path], Path, list[dict]]:
    """The GGUF of every spec and the shared mmproj for preset `p`, built where missing."""
    vl = p.vision["num_hidden_layers"]
    folder = cache / (p.name if preset_args[1] is None else f"{p.name}-vision{vl}")
    paths = {s.name: folder / gguf_name(s, other) for s in specs}
    mmproj = folder / "mmproj.gguf"
    todo = [s for s in specs if not paths[s.name].is_file() or stale_routed_types(paths[s.name], s)]
    if not todo and mmproj.is_file():
        return paths, mmproj, []
    folder.mkdir(parents=True, exist_ok=True)
    ckpts = {v: ckpt_bytes(p, v) for v in {s.variant for s in todo} or {"dense"}}
    order = stage_order(p, todo) or ["dense"]
    ggufs = {v: sum(estimate_gguf(p, s, other) for s in todo if s.variant == v) for v in order}
    # One stage at a time needs its checkpoint and the GGUFs so far; the builder overlaps a second
    # stage only while the disk has room for it (_Builder._room).
    one = max(ckpts[v] + sum(ggufs[u] for u in order[:i + 1]) for i, v in enumerate(order)) + _MMPROJ_ROOM
    free = shutil.disk_usage(folder).free
    if one > free:
        raise MoteExportError(f"building {len(todo)} {p.name} models needs about {one / GIB:.0f} GiB free in "
                              f"{folder} (a checkpoint + the GGUFs); {free / GIB:.0f} GiB is free. Pick fewer "
                              "--models or another --cache")
    print(f"building {len(todo)} model file(s) in {folder} ({sum(ggufs.values()) / GIB:.1f} GiB of GGUFs, "
          f"{jobs} worker(s))", file=sys.stderr)
    sizes = {s.name: estimate_gguf(p, s, other) for s in todo} | {f"ckpt-{v}": b for v, b in ckpts.items()}
    return paths, mmproj, _Builder(folder, p, preset_args, other, jobs, keep, sizes).run(todo, not mmproj.is_file())


def stage_order(p, todo: list[ModelSpec]) -> list[str]:
    """Checkpoint variants in build order: the one holding the longest export first."""
    order: list[str] = []
    for s in sorted(todo, key=lambda s: -export_cost(p, s)):
        order += [] if s.variant in order else [s.variant]
    return order


def estimate_gguf(p, spec: ModelSpec, other: str = "f16") -> int:
    """The LLM file's tensor bytes, with the exporter's own type choices (ternary -> Q2_0 / Q4_0 and
    K-quant -> F16 fallbacks included), for the disk check."""
    from ..exporters.quantize import FLOAT_TYPES, fitting_type, nbytes
    from ..exporters.ternary import TERNARY_TYPES, ternary_gguf_type

    t = p.text
    H, F, L = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    kv = H // t["num_attention_heads"] * t["num_key_value_heads"]

    def ffn(type_name: str, copies: int) -> int:  # gate, up [F, H] and down [H, F] of every layer
        def q(ne0):
            if type_name in TERNARY_TYPES:
                return ternary_gguf_type(TERNARY_TYPES[type_name], ne0)
            return fitting_type(FLOAT_TYPES[type_name], ne0)
        return L * copies * (2 * nbytes((F, H), q(H)) + nbytes((H, F), q(F)))

    o = fitting_type(FLOAT_TYPES[other], H)
    # qwen2moe needs `output` even when tied (written twice); a dense qwen2 file reuses token_embd
    embeddings = 1 if spec.variant == "dense" and t["tie_word_embeddings"] else 2
    body = embeddings * nbytes((p.vocab, H), o) + L * (2 * nbytes((H, H), o) + 2 * nbytes((kv, H), o))
    if spec.variant == "mote":
        return body + ffn(spec.shared, 1) + ffn(spec.ternary, 4)
    if spec.variant == "moe-llava":
        return body + ffn(spec.expert, 4)
    return body + ffn(spec.shared, 1)


# ---- measuring -----------------------------------------------------------------------------------------

def _default_image() -> tuple[Path, str]:
    """The first held-out picture and question of the embedded tiny task (any image works: it is
    resized to the tower's input, and the answer of a random-weight model means nothing)."""
    import mote_edge

    data = Path(mote_edge.__file__).parent / "assets" / "tiny" / "data"
    record = json.loads((data / "test.json").read_text())[0]
    question = next(t["value"] for t in record["conversations"] if t["from"] == "human")
    return data / "images" / record["image"], question.replace("<image>", "").strip()


# engine name (mote-run --engine) -> the module measuring one model with it, run as a child process:
# `python -m MODULE ARGS.json OUT.json` (bench_measure's protocol)
ENGINE_CHILDREN = {"llama.cpp": "mote_edge.benchmarks.bench_measure",
                   "mote": "mote_edge.benchmarks.bench_measure_mote"}


def parse_engines(text: str) -> list[str]:
    engines = [e.strip().lower() for e in text.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINE_CHILDREN]
    if bad or not engines:
        raise MoteExportError(f"--engines {text!r}; accepted: a comma-separated list of {', '.join(ENGINE_CHILDREN)}")
    return list(dict.fromkeys(engines))


def measure(name: str, model: Path, mmproj: Path, a, image: Path, prompt: str, tmp: Path,
            engine: str = "llama.cpp") -> dict:
    """One model with one engine in a child process of its own (its peak RSS is this model's alone)."""
    tag = f"{name}.{engine}"
    args, out = tmp / f"{tag}.args.json", tmp / f"{tag}.out.json"
    args.write_text(json.dumps({"model": str(model), "mmproj": str(mmproj), "threads": a.threads, "seed": a.seed,
                                "image": str(image), "prompt": prompt, "n_gen": a.n_gen, "warmup": a.warmup,
                                "repeats": a.repeats}))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", ENGINE_CHILDREN[engine], str(args), str(out)],
                       stderr=subprocess.PIPE, text=True, check=False)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise MoteExportError(f"measuring {name} ({model}) with {engine} failed: {last}")
    return json.loads(out.read_text()) | {"wall_s": time.perf_counter() - t0}


def _check_args(a) -> None:
    for name, low in (("threads", 1), ("repeats", 1), ("warmup", 0), ("n_gen", 1), ("jobs", 1)):
        if getattr(a, name) < low:
            raise MoteExportError(f"--{name.replace('_', '-')} must be at least {low}")
    if bool(a.preset) == bool(a.gguf):
        raise MoteExportError("give either --preset NAME or GGUF files (not both, not neither)")
    if a.gguf and (a.models or a.vision_layers is not None):
        raise MoteExportError("--models and --vision-layers pick and build a preset's models; with GGUF files, "
                              "list the files instead")
    if a.mmproj and not a.gguf:
        raise MoteExportError("--mmproj is for GGUF files; a preset builds its own projector")
    out = Path(a.out)
    if not out.parent.is_dir():
        raise MoteExportError(f"output folder's parent {str(out.parent)!r} does not exist")
    if out.exists() and not out.is_dir():
        raise MoteExportError(f"--out {a.out!r} is a file; give a folder")
    if a.image and not Path(a.image).is_file():
        raise MoteExportError(f"image {a.image!r} does not exist")


def _gguf_inputs(a) -> list[tuple[str, Path, Path, None]]:
    from ..exporters.gguf_file import mmproj_path

    if a.mmproj and len(a.gguf) > 1:
        raise MoteExportError("--mmproj names one projector; with several GGUF files, keep each "
                              "<stem>-mmproj.gguf beside its model")
    models, seen = [], set()
    for g in map(Path, a.gguf):
        proj = Path(a.mmproj) if a.mmproj else mmproj_path(g)
        for f, what in ((g, "model"), (proj, "mmproj")):
            if not f.is_file():
                raise MoteExportError(f"{what} file {str(f)!r} does not exist"
                                      + (" (pass --mmproj, or keep <stem>-mmproj.gguf beside it)" if f is proj else ""))
        name = g.stem if g.stem not in seen else str(g)
        seen.add(name)
        models.append((name, g, proj, None))
    return models


@cli_entry
def main(argv=None):
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["--accuracy"]:  # accuracy against expert memory: its own program (benchmarks/accuracy.py)
        from .accuracy import run

        run(args[1:])
        return None
    p = argparse.ArgumentParser(prog="mote-bench", description=__doc__.split("\n")[0])
    p.add_argument("gguf", nargs="*", help="exported LLM GGUF files (each with its <stem>-mmproj.gguf)")
    p.add_argument("--preset", help="build random-weight models of a shape: tiny, qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-3b")
    p.add_argument("--models", help=f"comma-separated, of: {', '.join(MODELS)}; or the groups {', '.join(GROUPS)} "
                   "(default all)")
    p.add_argument("--out", default="mote-bench-out", help="report folder (created; its parent must exist)")
    p.add_argument("--mmproj", help="projector for a single GGUF file (default <stem>-mmproj.gguf)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count(), help="engine threads (llama.cpp's; the mote engine's kernel pool and BLAS) and bandwidth processes "
                   "(default: all cores)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per model (min / median / max; default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up passes per model first, each one image "
                   "encode, a 64-token prefill and 4 decode steps: the whole model paged in (default 1)")
    p.add_argument("--n-gen", type=int, default=16, help="greedy tokens decoded per round (default 16)")
    p.add_argument("--seed", type=int, default=0, help="llama.cpp seed (decoding is greedy; preset weights use a fixed seed)")
    p.add_argument("--image", help="image for the question (default: the tiny task's first test image)")
    p.add_argument("--prompt", help="the question (default: the tiny task's first test question)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "mote-edge" / "bench"),
                   help="where preset checkpoints and GGUFs are built and reused (default ~/.cache/mote-edge/bench)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel exports when building (default: cores)")
    p.add_argument("--vision-layers", type=int, help="truncate the preset's SigLIP tower to N layers (default: all)")
    p.add_argument("--other-type", default="f16", help="preset models' attention, embeddings and output (default f16)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the random checkpoints in --cache")
    p.add_argument("--engines", default="llama.cpp", help=f"comma-separated engines measured on the same files, of: "
                   f"{', '.join(ENGINE_CHILDREN)} (default llama.cpp)")
    a = p.parse_args(argv)
    _check_args(a)
    engines = parse_engines(a.engines)
    t_start = time.perf_counter()
    from ..exporters.quantize import parse_type
    from .random_ckpt import preset as get_preset

    build_log, notes = [], []
    if a.preset:
        parse_type(a.other_type, "--other-type")
        pr = get_preset(a.preset, a.vision_layers)
        specs = parse_models(a.models or "all")
        paths, mmproj, build_log = build_preset(pr, (a.preset, a.vision_layers), specs, Path(a.cache),
                                                a.other_type.lower(), a.jobs, a.keep_checkpoints)
        models = [(s.name, paths[s.name], mmproj, s) for s in specs]
        if a.vision_layers is not None:
            notes.append(f"SigLIP tower truncated to {a.vision_layers} of the shape's "
                         f"{get_preset(a.preset).vision['num_hidden_layers']} layers (--vision-layers): "
                         "vision encode time is not the full tower's")
    else:
        models = _gguf_inputs(a)
    image, prompt = _default_image()
    image, prompt = Path(a.image or image), a.prompt or prompt
    from .bench_measure import gguf_costs, machine_facts, memory_bandwidth
    from .bench_report import write_report

    costs = {}
    for name, path, _, _ in models:
        try:
            costs[name] = gguf_costs(path)
        except (OSError, ValueError, KeyError) as exc:
            raise MoteExportError(f"{path} is not a readable GGUF model file ({exc})") from None
    facts = machine_facts(a.threads)
    print(f"memory bandwidth ({a.threads} processes) ...", file=sys.stderr)
    bandwidth = [memory_bandwidth(a.threads)]
    results = []
    with tempfile.TemporaryDirectory(prefix="mote-bench-") as tmp:
        runs = [(m, e) for m in models for e in engines]  # engines side by side, model by model
        for i, ((name, path, proj, spec), engine) in enumerate(runs):
            shown = name if len(engines) == 1 else f"{name} [{engine}]"
            print(f"[measure {i + 1}/{len(runs)}] {shown} ...", file=sys.stderr)
            m = measure(name, path, proj, a, image, prompt, Path(tmp), engine)
            results.append({"name": shown, "model": name, "engine": engine, "path": str(path), "mmproj": str(proj),
                            "spec": asdict(spec) | {"label": spec.label} if spec else None} | costs[name] | m)
    bandwidth.append(memory_bandwidth(a.threads))  # again after: another job on the machine shows here
    report = {"command": ["mote-bench", *(sys.argv[1:] if argv is None else argv)], "machine": facts,
              "bandwidth": bandwidth, "preset": a.preset, "vision_layers": a.vision_layers, "notes": notes,
              "settings": {k: getattr(a, k) for k in ("threads", "repeats", "warmup", "n_gen", "seed", "other_type")}
              | {"image": str(image), "prompt": prompt, "engines": engines},
              "build": build_log, "models": results, "wall_s": time.perf_counter() - t_start}
    print(write_report(report, Path(a.out)))

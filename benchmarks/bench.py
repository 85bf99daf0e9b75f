"""mote-bench: MoTE against MoE-LLaVA and the dense model on this machine's CPU, side by side, through
one or more engines on the same checkpoints (`--engines llama.cpp,mote,onnxruntime`: llama.cpp and our
numpy engine on the GGUF, onnxruntime on an ONNX export of the same checkpoint).

    mote-bench --preset tiny|qwen2.5-0.5b|qwen2.5-1.5b|qwen2.5-3b [--models LIST] [--out DIR]
    mote-bench MODEL.gguf [MODEL.gguf ...] [--mmproj PATH] [--out DIR]
        [--threads N] [--repeats N] [--warmup N] [--n-gen N] [--seed S] [--image PNG] [--prompt TEXT]
        [--cache DIR] [--jobs N] [--vision-layers N] [--other-type T] [--keep-checkpoints]
        [--engines llama.cpp,mote,onnxruntime] [--onnx-kernels exact,fast] [--ort-profile]
    mote-bench --accuracy ...   accuracy against expert memory, MoTE vs MoE-LLaVA + PTQ (benchmarks/accuracy.py)

With a preset, random-weight checkpoints of that shape are written (benchmarks/random_ckpt.py) and
exported with mote-export's own writers into one GGUF per model and, for onnxruntime, one ONNX folder per
model and --onnx-kernels body (each weight group in the ONNX type nearest its GGUF type:
bench_models.onnx_types), cached in --cache and reused unless stale; each checkpoint is deleted once its
exports exist (they are cheap to rewrite and large). Every model is then measured with each engine in its
own process (benchmarks/bench_measure.py for llama.cpp, bench_measure_mote.py for the mote engine,
bench_measure_onnx.py for onnxruntime), with the machine's memory bandwidth measured in the same run for
the roofline; results go to DIR/bench.json, DIR/bench.md and two PNG plots (benchmarks/bench_report.py).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from ..exporters.errors import MoteExportError, cli_entry
from .bench_models import ModelSpec, onnx_bodies, onnx_label, onnx_types, stale_onnx_folder, stale_routed_types
from ..exporters.errors import ArgumentParser

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


def onnx_name(spec: ModelSpec, other: str, body: str) -> str:
    """The cached ONNX export folder of `spec` with --onnx-kernels `body`, beside its GGUF."""
    return gguf_name(spec, other).removesuffix(".gguf") + f".onnx-{body}"


def _job_onnx(ckpt: str, out: str, body: str, types: dict) -> dict:
    from ..exporters.onnx_folder import write_onnx_folder
    from .bench_measure_onnx import folder_bytes

    t0 = time.perf_counter()
    if Path(out).exists():  # a stale or partial folder (build_preset decided to rebuild it); the writer makes a new one
        shutil.rmtree(out)
    s = write_onnx_folder(ckpt, out, kernels=body, progress=False, **types)
    return {"path": out, "file_bytes": folder_bytes(Path(out)), "files": s["files"], "kernels": s["kernels"],
            "types": types, "seconds": time.perf_counter() - t0}


def _job_mmproj(ckpt: str, out: str) -> dict:
    from ..exporters.gguf_mmproj import write_mmproj

    t0 = time.perf_counter()
    return write_mmproj(Path(ckpt), Path(out)) | {"seconds": time.perf_counter() - t0}


@dataclass(frozen=True)
class Target:
    """One export to build from a checkpoint: a GGUF file (body None) or an ONNX folder (mote-export --format
    onnx with --onnx-kernels `body` and write_onnx_folder's `types`)."""
    spec: ModelSpec
    path: Path
    body: str | None = None
    types: tuple = ()  # ((keyword, type), ...): hashable

    @property
    def what(self) -> str:
        """Its name in the build log; the last word names the file (the builder's disk accounting)."""
        return f"export {self.spec.name}" if self.body is None else f"onnx {self.path.name}"


class _Builder:
    """Runs checkpoint writes and exports (GGUF files and ONNX folders) on `jobs` worker processes (an export
    is mostly single-threaded numpy). One stage per checkpoint variant, the stage holding the longest export
    first and the longest exports first; a second stage overlaps the first (both workers stay busy) only while
    the disk has room for both (1.5B checkpoints are 10-12 GB), never more than two; a checkpoint is
    deleted as soon as the last export reading it is done, unless kept."""

    def __init__(self, folder: Path, p, preset_args: tuple, other: str, jobs: int, keep: bool, sizes: dict):
        self.folder, self.p, self.preset_args, self.other, self.jobs = folder, p, preset_args, other, jobs
        self.keep, self.sizes = keep, sizes
        self.costs: dict[str, float] = {}

    def _stage_jobs(self, todo: list[Target], need_mmproj: bool) -> dict[str, list]:
        stages: dict[str, list] = {v: [] for v in stage_order(self.p, [t.spec for t in todo])}
        for t in sorted(todo, key=lambda t: -export_cost(self.p, t.spec)):
            ckpt = str(self.folder / f"ckpt-{t.spec.variant}")
            self.costs[t.what] = export_cost(self.p, t.spec)  # an ONNX export: about a GGUF's, for ordering
            if t.body is None:
                job = (_job_export, (ckpt, str(t.path), asdict(t.spec), self.other))
            else:
                job = (_job_onnx, (ckpt, str(t.path), t.body, dict(t.types)))
            stages[t.spec.variant].append((t.what, *job))
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

    def run(self, todo: list[Target], need_mmproj: bool) -> list[dict]:
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
        return self.costs.get(job[0], 0.0)


def build_preset(p, preset_args: tuple, specs: list[ModelSpec], cache: Path, other: str, jobs: int,
                 keep: bool, gguf: bool = True, bodies: tuple[str, ...] = ()) -> tuple[dict, Path | None, list[dict]]:
    """The exports of every spec for preset `p`, built where missing or stale, from one checkpoint per
    variant: with `gguf` its GGUF and the shared mmproj, and one ONNX folder per body in `bodies` (a model
    without ternary experts: one, bench_models.onnx_bodies). Returns ({(name, body or None): path},
    the mmproj or None, the build log)."""
    vl = p.vision["num_hidden_layers"]
    folder = cache / (p.name if preset_args[1] is None else f"{p.name}-vision{vl}")
    targets = [Target(s, folder / gguf_name(s, other)) for s in specs] if gguf else []
    targets += [Target(s, folder / onnx_name(s, other, b), b, tuple(onnx_types(s, other).items()))
                for s in specs for b in onnx_bodies(s, list(bodies))]
    paths = {(t.spec.name, t.body): t.path for t in targets}
    mmproj = folder / "mmproj.gguf" if gguf else None
    todo = [t for t in targets if _stale(t)]
    need_mmproj = gguf and not mmproj.is_file()
    if not todo and not need_mmproj:
        return paths, mmproj, []
    folder.mkdir(parents=True, exist_ok=True)
    variants = [t.spec.variant for t in todo]
    ckpts = {v: ckpt_bytes(p, v) for v in set(variants) or {"dense"}}
    order = stage_order(p, [t.spec for t in todo]) or ["dense"]
    sizes = {t.what.split()[-1]: _estimate(p, t, other) for t in todo}
    outputs = {v: sum(sizes[t.what.split()[-1]] for t in todo if t.spec.variant == v) for v in order}
    # One stage at a time needs its checkpoint and the exports so far; the builder overlaps a second
    # stage only while the disk has room for it (_Builder._room).
    one = max(ckpts[v] + sum(outputs[u] for u in order[:i + 1]) for i, v in enumerate(order)) + _MMPROJ_ROOM
    free = shutil.disk_usage(folder).free
    if one > free:
        raise MoteExportError(f"building {len(todo)} {p.name} exports needs about {one / GIB:.0f} GiB free in "
                              f"{folder} (a checkpoint + the exports); {free / GIB:.0f} GiB is free. Pick fewer "
                              "--models or another --cache")
    n_onnx = sum(t.body is not None for t in todo)
    print(f"building {len(todo) - n_onnx} model file(s) and {n_onnx} ONNX folder(s) in {folder} "
          f"({sum(outputs.values()) / GIB:.1f} GiB, {jobs} worker(s))", file=sys.stderr)
    sizes |= {f"ckpt-{v}": b for v, b in ckpts.items()}
    return paths, mmproj, _Builder(folder, p, preset_args, other, jobs, keep, sizes).run(todo, need_mmproj)


def _stale(t: Target) -> bool:
    if t.body is None:
        return not t.path.is_file() or stale_routed_types(t.path, t.spec)
    return stale_onnx_folder(t.path, t.spec, t.body, dict(t.types))


def _estimate(p, t: Target, other: str) -> int:
    return estimate_gguf(p, t.spec, other) if t.body is None else estimate_onnx(p, t.spec, t.body, dict(t.types))


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


# Bytes per weight of an ONNX export's weights, by type (write_onnx_folder's) or ternary body; MatMulNBits
# blocks: the codes and an fp32 scale per block (32 weights for q8_0 / q4_0, 128 for the fast ternary body)
_ONNX_BPW = {"f32": 4, "f16": 2, "q8_0": 36 / 32, "q4_0": 20 / 32, "exact": 1, "fast": 36 / 128}


def estimate_onnx(p, spec: ModelSpec, body: str, types: dict[str, str]) -> int:
    """An ONNX folder's weight bytes at shape `p` (for the disk check): vision tower and projector fp32,
    attention / head in other_type, the token embedding too but at least f16 (block-quantized only where the
    exporter has an op for it), shared expert / FFN and MoE-LLaVA experts in their types, ternary experts in
    the body's codes. Within a few % of the written folders at the tiny and 0.5B shapes."""
    from .random_ckpt import moe_settings, tensor_specs

    def bpw(name: str) -> float:
        if "language_model." not in name and "lm_head" not in name:
            return 4  # vision tower, projector
        if ".experts." in name:
            return _ONNX_BPW[body if spec.variant == "mote" else types["expert_type"]]
        if ".mlp." in name and ".router." not in name:
            return _ONNX_BPW[types["shared_type"]]
        if ".self_attn." in name or "lm_head" in name:
            return _ONNX_BPW[types["other_type"]]
        if "embed_tokens" in name:
            return max(_ONNX_BPW[types["other_type"]], 2)
        return 4

    mote = moe_settings(spec.variant, p.text["num_hidden_layers"])
    return int(sum(_prod(shape) * bpw(name) for name, shape in tensor_specs(p, mote)))


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
                   "mote": "mote_edge.benchmarks.bench_measure_mote",
                   "onnxruntime": "mote_edge.benchmarks.bench_measure_onnx"}
DEFAULT_BODIES = ("exact", "fast")
PROFILE_TOKENS = 8  # --ort-profile: decoded tokens profiled (at most --n-gen); 1.5B: ~5 MB of trace a token


def parse_engines(text: str) -> list[str]:
    engines = [e.strip().lower() for e in text.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINE_CHILDREN]
    if bad or not engines:
        raise MoteExportError(f"--engines {text!r}; accepted: a comma-separated list of {', '.join(ENGINE_CHILDREN)}")
    return list(dict.fromkeys(engines))


def parse_onnx_kernels(text: str | None, engines: list[str]) -> list[str]:
    """The --onnx-kernels bodies (default exact,fast) when onnxruntime is among the engines, else none."""
    if "onnxruntime" not in engines:
        if text is not None:
            raise MoteExportError("--onnx-kernels picks the bodies of the onnxruntime engine's exports; add "
                                  "onnxruntime to --engines")
        return []
    try:
        import onnxruntime  # noqa: F401 - the children need it; fail here, before anything is built

        from ..exporters.onnx_folder import KERNELS
    except ImportError as exc:
        raise MoteExportError(f"--engines onnxruntime needs onnx and onnxruntime ({exc}); "
                              "pip install 'mote-edge[onnx]'") from None
    bodies = [b.strip().lower() for b in (text if text is not None else ",".join(DEFAULT_BODIES)).split(",")
              if b.strip()]
    if not bodies or any(b not in KERNELS for b in bodies):
        raise MoteExportError(f"--onnx-kernels {text!r}; accepted: a comma-separated list of {', '.join(KERNELS)}")
    return list(dict.fromkeys(bodies))


def measure(name: str, model: Path, mmproj: Path | None, a, image: Path, prompt: str, tmp: Path,
            engine: str = "llama.cpp", body: str | None = None) -> dict:
    """One model with one engine (an ONNX folder: with its body) in a child process of its own (its peak RSS
    is this model's alone)."""
    tag = f"{name}.{engine}" + (f".{body}" if body else "")
    args, out = tmp / f"{tag}.args.json", tmp / f"{tag}.out.json"
    extra = {"ort_profile": min(a.n_gen, PROFILE_TOKENS) if a.ort_profile else 0, "profile_dir": str(tmp)} \
        if engine == "onnxruntime" else {}
    args.write_text(json.dumps({"model": str(model), "mmproj": str(mmproj) if mmproj else None, "threads": a.threads,
                                "seed": a.seed, "image": str(image), "prompt": prompt, "n_gen": a.n_gen,
                                "warmup": a.warmup, "repeats": a.repeats} | extra))
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
    if a.gguf and "onnxruntime" in parse_engines(a.engines):
        raise MoteExportError("--engines onnxruntime measures a preset's models (each exported to ONNX from the "
                              "checkpoint its GGUFs come from); with GGUF files, accepted: llama.cpp, mote")
    if a.ort_profile and "onnxruntime" not in parse_engines(a.engines):
        raise MoteExportError("--ort-profile profiles the onnxruntime engine; add onnxruntime to --engines")


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


def _costs(path: Path, body: str | None) -> dict:
    """The bytes a model holds and reads per token: a GGUF file's, or (body given) an ONNX folder's."""
    if body is not None:
        from .bench_measure_onnx import onnx_costs

        return onnx_costs(path)
    from .bench_measure import gguf_costs

    try:
        return gguf_costs(path)
    except (OSError, ValueError, KeyError) as exc:
        raise MoteExportError(f"{path} is not a readable GGUF model file ({exc})") from None


@cli_entry
def main(argv=None):
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["--accuracy"]:  # accuracy against expert memory: its own program (benchmarks/accuracy.py)
        from .accuracy import run

        run(args[1:])
        return None
    p = ArgumentParser(prog="mote-bench", description=__doc__.split("\n")[0])
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
                   help="where preset checkpoints, GGUFs and ONNX folders are built and reused (default "
                   "~/.cache/mote-edge/bench)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel exports when building (default: cores)")
    p.add_argument("--vision-layers", type=int, help="truncate the preset's SigLIP tower to N layers (default: all)")
    p.add_argument("--other-type", default="f16", help="preset models' attention, embeddings and output (default f16)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the random checkpoints in --cache")
    p.add_argument("--engines", default="llama.cpp", help=f"comma-separated engines measured on the same "
                   f"checkpoints, of: {', '.join(ENGINE_CHILDREN)} (default llama.cpp; onnxruntime: presets only, on "
                   "ONNX folders exported from the checkpoint the GGUFs come from)")
    p.add_argument("--onnx-kernels", help="with --engines onnxruntime: comma-separated bodies of the ternary experts, "
                   "one ONNX export of each MoTE model per body (default exact,fast)")
    p.add_argument("--ort-profile", action="store_true", help="with --engines onnxruntime: the time of a decoded "
                   f"token by op type and part of the model, from onnxruntime's profiler ({PROFILE_TOKENS} tokens)")
    a = p.parse_args(argv)
    _check_args(a)
    engines = parse_engines(a.engines)
    bodies = parse_onnx_kernels(a.onnx_kernels, engines)
    t_start = time.perf_counter()
    from ..exporters.quantize import parse_type
    from .random_ckpt import preset as get_preset

    build_log, notes = [], []
    if a.preset:
        parse_type(a.other_type, "--other-type")
        pr = get_preset(a.preset, a.vision_layers)
        specs = parse_models(a.models or "all")
        other = a.other_type.lower()
        paths, mmproj, build_log = build_preset(pr, (a.preset, a.vision_layers), specs, Path(a.cache), other,
                                                a.jobs, a.keep_checkpoints,
                                                gguf=any(e != "onnxruntime" for e in engines), bodies=tuple(bodies))
        runs = []  # (model name, spec, engine, body, path, mmproj): engines side by side, model by model
        for s in specs:
            for e in engines:
                runs += ([(s.name, s, e, b, paths[(s.name, b)], None) for b in onnx_bodies(s, bodies)]
                         if e == "onnxruntime" else [(s.name, s, e, None, paths[(s.name, None)], mmproj)])
        if a.vision_layers is not None:
            notes.append(f"SigLIP tower truncated to {a.vision_layers} of the shape's "
                         f"{get_preset(a.preset).vision['num_hidden_layers']} layers (--vision-layers): "
                         "vision encode time is not the full tower's")
    else:
        runs = [(name, None, e, None, path, proj) for name, path, proj, _ in _gguf_inputs(a) for e in engines]
    image, prompt = _default_image()
    image, prompt = Path(a.image or image), a.prompt or prompt
    from .bench_measure import machine_facts, memory_bandwidth
    from .bench_report import write_report

    costs = {path: _costs(path, body) for _, _, _, body, path, _ in runs}
    facts = machine_facts(a.threads)
    print(f"memory bandwidth ({a.threads} processes) ...", file=sys.stderr)
    bandwidth = [memory_bandwidth(a.threads)]
    results = []
    tagged = len(engines) > 1 or len(bodies) > 1  # several rows per model: each says its engine (and body)
    with tempfile.TemporaryDirectory(prefix="mote-bench-") as tmp:
        for i, (name, spec, engine, body, path, proj) in enumerate(runs):
            tag = engine + (f" {body}" if body and spec.variant == "mote" else "")
            shown = f"{name} [{tag}]" if tagged else name
            print(f"[measure {i + 1}/{len(runs)}] {shown} ...", file=sys.stderr)
            m = measure(name, path, proj, a, image, prompt, Path(tmp), engine, body)
            label = (onnx_label(spec, body, costs[path]["group_types"]) if body else spec.label) if spec else None
            results.append({"name": shown, "model": name, "engine": engine, "body": body, "path": str(path),
                            "mmproj": str(proj) if proj else None,
                            "spec": asdict(spec) | {"label": label} if spec else None} | costs[path] | m)
    bandwidth.append(memory_bandwidth(a.threads))  # again after: another job on the machine shows here
    report = {"command": ["mote-bench", *(sys.argv[1:] if argv is None else argv)], "machine": facts,
              "bandwidth": bandwidth, "preset": a.preset, "vision_layers": a.vision_layers, "notes": notes,
              "settings": {k: getattr(a, k) for k in ("threads", "repeats", "warmup", "n_gen", "seed", "other_type")}
              | {"image": str(image), "prompt": prompt, "engines": engines, "onnx_kernels": bodies,
                 "ort_profile": a.ort_profile},
              "build": build_log, "models": results, "wall_s": time.perf_counter() - t_start}
    print(write_report(report, Path(a.out)))

"""mote-run: answer a question about an image with exported files, through the engine you pick. No torch.

    mote-run model.gguf --image cat.png --prompt "What colour is the square?"
             [--engine llama.cpp] [--mmproj PATH (default <stem>-mmproj.gguf)] [--threads N]
             [--n-ctx N] [--max-tokens N] [--temperature T (0 = greedy, the default)]
             [--top-k K] [--top-p P] [--seed S]
             [--memory-limit SIZE (refuse, before loading, a run the engine plans to need more for)]
             [--kernel auto|mad|lut|numpy] [--routes routes.json]   (--engine mote)
             (--engine cuda: the GPU engine, cuda_kernels/engine.py: torch + triton, a CUDA GPU sm_80+)

The answer streams to stdout; time to first token, decode speed and peak RSS go to stderr.

This is the one front for every engine. An engine is a module in ENGINES with `NAME`,
`plan_memory(model, mmproj, n_ctx) -> dict` (its own resident estimate, "total_bytes" and "n_ctx"
among the keys), `format_memory(dict) -> str` and an `Engine(model, mmproj, n_ctx, threads, seed)`
whose `stream(image, prompt, max_tokens, temperature, top_k, top_p, seed)` yields (text, finish reason).
Optionally `resolve_inputs(model_arg, mmproj_arg) -> (model, mmproj)`: an engine whose model is not a
GGUF + <stem>-mmproj.gguf pair (the onnxruntime engine takes an export folder) checks its inputs there;
`OPTIONS`: the names of engine-only flags it takes (passed to plan_memory and Engine as keywords).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from ..exporters.errors import MoteExportError, cli_entry
from ..exporters.gguf_file import mmproj_path
from ..exporters.units import SIZE_HELP, human, parse_size
from .memory import peak_rss_mib
from ..exporters.errors import ArgumentParser

# engine name -> module (imported only when chosen, so one engine's missing library never stops another;
# the cuda engine lives with the GPU kernels and needs torch + triton, which this front never imports)
ENGINES = {"llama.cpp": "mote_edge.runtime_cpu.llama_engine", "onnxruntime": "mote_edge.runtime_cpu.onnx_engine",
           "mote": "mote_edge.runtime_cpu.mote_engine", "cuda": "mote_edge.cuda_kernels.engine"}
DEFAULT_ENGINE = "llama.cpp"


def engine_module(name: str):
    if name not in ENGINES:
        raise MoteExportError(f"--engine {name!r}; accepted: {', '.join(ENGINES)}")
    return importlib.import_module(ENGINES[name])


def check_memory(engine, model: Path, mmproj: Path, n_ctx: int | None, limit_text: str, opts: dict | None = None) -> int:
    """Refuse, before anything is loaded, a run whose planned resident memory exceeds the limit.
    Returns the n_ctx the plan was made for (what the engine will use)."""
    limit = parse_size(limit_text, "--memory-limit")
    plan = engine.plan_memory(model, mmproj, n_ctx, **(opts or {}))
    text = engine.format_memory(plan)
    if plan["total_bytes"] > limit:
        raise MoteExportError(f"planned resident memory {text} exceeds --memory-limit {human(limit)} ({limit} bytes); "
                              "lower --n-ctx or export smaller types (mote-export --memory-budget, mote-plan)")
    print(f"planned resident memory: {plan['total_bytes']} bytes ({text}), within --memory-limit {human(limit)}",
          file=sys.stderr)
    return plan["n_ctx"]


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mote-run", description="Answer a question about an image with exported "
                                "files (the LLM GGUF and its -mmproj.gguf) on this machine.")
    p.add_argument("model", help="the LLM file written by mote-export, e.g. model.gguf (--engine onnxruntime: "
                   "the folder written by mote-export --format onnx)")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--engine", default=DEFAULT_ENGINE, help=f"{' | '.join(ENGINES)} (default {DEFAULT_ENGINE})")
    p.add_argument("--mmproj", default=None, help="vision projector (default: <stem>-mmproj.gguf beside the model)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the engine's choice)")
    p.add_argument("--n-ctx", type=int, default=None, help="context length (default: trained, at most 2048)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the K most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed when --temperature > 0")
    p.add_argument("--kernel", default=None, choices=("auto", "mad", "lut", "numpy", "triton", "torch"),
                   help="--engine mote: ternary kernels, C multiply-add / C lookup-table / numpy (default auto: "
                        "measured per shape); --engine cuda: triton (default) / torch")
    p.add_argument("--device", default=None, choices=("auto", "cuda", "cpu"),
                   help="--engine cuda: the torch device (default cuda; cpu runs the same engine for testing)")
    p.add_argument("--moe-decode", default=None, choices=("gemv", "grouped"),
                   help="--engine cuda: a decode token's experts as GEMV launches after reading the chosen ids "
                        "(gemv, default) or as grouped launches on device-side offsets, with no host sync (grouped)")
    p.add_argument("--routes", default=None, metavar="JSON",
                   help="--engine mote: write which experts every image and text token chose in every MoE layer "
                        "(plot it with mote-routes)")
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="refuse, before loading anything, a run whose resident memory as the engine plans it "
                        "(weights of both files, repacked copies, KV cache for n_ctx, compute buffers, runtime) "
                        f"exceeds SIZE: {SIZE_HELP}")
    return p


def _check_args(a) -> None:
    for name in ("threads", "n_ctx", "max_tokens"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise MoteExportError(f"--{name.replace('_', '-')} must be at least 1")
    if a.temperature < 0:
        raise MoteExportError("--temperature must be >= 0 (0 = greedy)")
    if a.top_k < 0:
        raise MoteExportError("--top-k must be >= 0 (0 = all tokens)")
    if not 0 < a.top_p <= 1:
        raise MoteExportError("--top-p must be in (0, 1]")
    if not Path(a.image).is_file():
        raise MoteExportError(f"image {a.image!r} is a folder, not an image file" if Path(a.image).is_dir()
                              else f"image {a.image!r} does not exist")


@cli_entry
def main(argv=None):
    a = parser().parse_args(argv)
    _check_args(a)
    engine = engine_module(a.engine)
    if hasattr(engine, "resolve_inputs"):
        model, proj = engine.resolve_inputs(a.model, a.mmproj)
    else:
        model, proj = Path(a.model), Path(a.mmproj) if a.mmproj else mmproj_path(a.model)
        if model.is_dir():
            raise MoteExportError(f"model {str(model)!r} is a folder; --engine {a.engine} takes a model file "
                                  f"(an ONNX export folder runs with --engine onnxruntime)")
        for path, what in ((model, "model"), (proj, "mmproj")):
            if not path.is_file():
                hint = " (pass --mmproj, or export with mote-export, which writes <stem>-mmproj.gguf)" if path is proj else ""
                raise MoteExportError(f"{what} file {str(path)!r} does not exist{hint}")
    opts = {k: getattr(a, k) for k in ("kernel", "routes", "device", "moe_decode") if getattr(a, k) is not None}
    foreign = sorted(set(opts) - set(getattr(engine, "OPTIONS", ())))
    if foreign:
        raise MoteExportError(f"{', '.join('--' + k for k in foreign)}: not an option of --engine {a.engine} "
                              "(--kernel: the mote and cuda engines'; --routes: the mote engine's; --device, "
                              "--moe-decode: cuda's)")
    n_ctx = a.n_ctx
    if a.memory_limit is not None:
        n_ctx = check_memory(engine, model, proj, n_ctx, a.memory_limit, opts)
    session = engine.Engine(model, proj, n_ctx=n_ctx, threads=a.threads, seed=a.seed, **opts)
    t0 = time.perf_counter()
    times, finish = [], None
    for text, why in session.stream(Path(a.image), a.prompt, a.max_tokens, temperature=a.temperature,
                                    top_k=a.top_k, top_p=a.top_p, seed=a.seed):
        if text:
            times.append(time.perf_counter())
            sys.stdout.write(text)
            sys.stdout.flush()
        finish = why or finish
    t_end = time.perf_counter()
    sys.stdout.write("\n")
    if not times:
        print("no tokens generated", file=sys.stderr)
    else:
        # After the first token every token is evaluated once more to sample the next; a "stop"
        # (end of turn) also evaluated the last one, a "length" stop did not.
        steps = len(times) - (finish != "stop")
        speed = f"{steps / (t_end - times[0]):.1f} tokens/s" if steps and t_end > times[0] else "n/a"
        print(f"time to first token: {times[0] - t0:.3f} s (image encode + prompt)", file=sys.stderr)
        print(f"decode: {speed} ({len(times)} tokens, {finish})", file=sys.stderr)
    print(f"peak RSS: {peak_rss_mib():.0f} MiB", file=sys.stderr)

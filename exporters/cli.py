"""mote-export: a MoTE / MoE-LLaVA (or dense) checkpoint -> llama.cpp GGUF files (no torch needed).

    mote-export CKPT_DIR -o model.gguf [--format gguf] [--ternary-type tq2_0|tq1_0]
                [--shared-type f16] [--other-type f16] [--expert-type f16] [--no-mmproj]
                [--memory-budget 3.4GB [--budget-scope model|experts]]

Writes model.gguf (the LLM: qwen2moe, or qwen2 for a dense checkpoint) and model-mmproj.gguf
(the SigLIP tower and the MLP connector, for llama.cpp's mtmd).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .errors import MoteExportError, cli_entry

FORMATS = ("gguf", "onnx")


@cli_entry
def main(argv=None):
    try:  # gguf is an optional dependency of the package: say so in one line
        from .gguf_file import mmproj_path
        from .gguf_llm import format_summary, write_llm_gguf
        from .gguf_mmproj import write_mmproj
        from .quantize import FLOAT_TYPES
        from .ternary import TERNARY_TYPES
    except ImportError as exc:
        raise MoteExportError(f"{exc.name} is not installed; pip install 'mote-edge[gguf]'") from None
    types = ", ".join(FLOAT_TYPES)
    p = argparse.ArgumentParser(prog="mote-export", description=__doc__.split("\n")[0])
    p.add_argument("ckpt_dir", help="MoTE or MoE-LLaVA checkpoint folder (config.json + model.safetensors)")
    p.add_argument("-o", "--output", required=True, help="output file, e.g. model.gguf")
    p.add_argument("--format", default="gguf", help="gguf (onnx: not available yet)")
    p.add_argument("--ternary-type", default=None, help=f"MoTE routed experts: {' | '.join(TERNARY_TYPES)} "
                   "(default tq2_0; rows not a multiple of 256 fall back to an exact Q4_0 packing)")
    p.add_argument("--shared-type", default=None, help=f"shared expert, or a dense model's FFN (default f16): {types}")
    p.add_argument("--other-type", default=None, help=f"embeddings, output and attention (default f16): {types}")
    p.add_argument("--expert-type", default=None, help=f"MoE-LLaVA experts (default f16): {types}")
    p.add_argument("--mmproj-type", default="f16", help="vision tower + connector weights (default f16)")
    p.add_argument("--no-mmproj", action="store_true", help="write only the LLM file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="choose the tensor types that fit SIZE with the least precision lost and print the plan "
                        "(group, type, bytes); e.g. 3.4GB, 900MiB, 2GiB, 512M, where GB = G = GiB = 2^30 bytes (the "
                        "MoTE paper's GB are GiB). --ternary-type / --shared-type / --other-type / --expert-type "
                        "given as well are kept fixed and only the other groups are chosen. When nothing fits: "
                        "one error naming the smallest reachable size, exit 2, nothing written. Same plan as "
                        "mote-plan.")
    p.add_argument("--budget-scope", default=None, choices=("model", "experts"),
                   help="what --memory-budget covers: model = every tensor of the files written, LLM and mmproj "
                        "(default); experts = shared + routed experts only (the paper's 'expert memory')")
    a = p.parse_args(argv)
    fmt = a.format.strip().lower()
    if fmt == "onnx":
        raise MoteExportError("--format onnx is not available yet; accepted: gguf")
    if fmt not in FORMATS:
        raise MoteExportError(f"--format {a.format!r}; accepted: gguf")
    ckpt, out = Path(a.ckpt_dir), Path(a.output)
    types = dict(ternary_type=a.ternary_type, shared_type=a.shared_type or "f16", other_type=a.other_type or "f16",
                 expert_type=a.expert_type)
    if a.budget_scope is not None and a.memory_budget is None:
        raise MoteExportError("--budget-scope needs --memory-budget")
    if a.memory_budget is not None:
        from .plan import export_budget_types

        types = export_budget_types(ckpt, out, a)
    summary = write_llm_gguf(ckpt, out, progress=not a.quiet, **types)
    print(format_summary(summary))
    if not a.no_mmproj:
        try:
            write_mmproj(ckpt, mmproj_path(out), ftype=a.mmproj_type)
        except BaseException:
            out.unlink(missing_ok=True)  # all or nothing: a model without its projector is not the export asked for
            raise
        print(f"wrote {mmproj_path(out)}")

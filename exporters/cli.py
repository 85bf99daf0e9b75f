"""mote-export: a MoTE / MoE-LLaVA (or dense) checkpoint -> llama.cpp GGUF files or an ONNX folder (no torch needed).

    mote-export CKPT_DIR -o model.gguf [--format gguf] [--ternary-type tq2_0|tq1_0|q2_0]
                [--shared-type f16] [--other-type f16] [--expert-type f16] [--no-mmproj]
                [--memory-budget 3.4GB [--budget-scope model|experts]]

Writes model.gguf (the LLM: qwen2moe, or qwen2 for a dense checkpoint) and model-mmproj.gguf
(the SigLIP tower and the MLP connector, for llama.cpp's mtmd).

    mote-export CKPT_DIR --format onnx -o DIR [--onnx-kernels exact] [--shared-type f32] [--other-type f32]
                [--expert-type f32]

writes the folder DIR for onnxruntime (exporters/onnx_folder.py).
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import MoteExportError, cli_entry
from .errors import ArgumentParser

FORMATS = ("gguf", "onnx")


@cli_entry
def main(argv=None):
    try:  # gguf is in the base install; a broken environment still gets one line
        from .gguf_file import check_output, mmproj_path, remove_stale_temporaries, temporary_prefix
        from .gguf_llm import format_summary, write_llm_gguf
        from .gguf_mmproj import write_mmproj
        from .quantize import FLOAT_TYPES
        from .ternary import TERNARY_TYPES
    except ImportError as exc:
        raise MoteExportError(f"{exc.name} is not installed; it comes with the base install: pip install mote-edge") from None
    types = ", ".join(FLOAT_TYPES)
    p = ArgumentParser(prog="mote-export", description=__doc__.split("\n")[0])
    p.add_argument("ckpt_dir", help="MoTE or MoE-LLaVA checkpoint folder (config.json + model.safetensors)")
    p.add_argument("-o", "--output", required=True, help="output file, e.g. model.gguf (--format onnx: a new folder)")
    p.add_argument("--format", default="gguf", help="gguf (default: llama.cpp files) | onnx (a folder for onnxruntime: "
                   "vision.onnx, embedding.onnx, decoder.onnx, one weights file, configs, tokenizer)")
    p.add_argument("--onnx-kernels", default=None, help="--format onnx: the body of the ai.mote::TernaryMatMul "
                   "routed-expert ops: exact (default; int8 per-token activations as MoTE trains, MatMulInteger, standard ops "
                   "only) | fast (2-bit codes, com.microsoft MatMulNBits with int8 activations per 128-block: 4x smaller "
                   "experts, faster on onnxruntime, close to but not equal to exact)")
    p.add_argument("--ternary-type", default=None, help=f"MoTE routed experts: {' | '.join(TERNARY_TYPES)} "
                   "(default tq2_0: 2.0625 bpw; tq1_0: 1.6875; q2_0: 2.25, 64-weight blocks, which CUDA also runs). "
                   "All exact. Rows whose width the type's block (256 weights; q2_0: 64) does not divide fall back to "
                   "exact Q2_0 (widths a multiple of 64), else Q4_0 (of 32; 4.5 bpw), else F16; the summary reports each")
    onnx_types = "; --format onnx: f32 (default) | f16 | q8_0 | q4_0 (GGUF's Q8_0 / Q4_0 numbers as MatMulNBits)"
    p.add_argument("--shared-type", default=None, help=f"shared expert, or a dense model's FFN (default f16): {types}"
                   + onnx_types)
    p.add_argument("--other-type", default=None, help=f"embeddings, output and attention (default f16): {types}"
                   + onnx_types + " (the embedding as GatherBlockQuantized)")
    p.add_argument("--expert-type", default=None, help=f"MoE-LLaVA experts (default f16): {types}" + onnx_types)
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
    if fmt not in FORMATS:
        raise MoteExportError(f"--format {a.format!r}; accepted: {', '.join(FORMATS)}")
    if fmt == "onnx":
        return _onnx(a)
    if a.onnx_kernels is not None:
        raise MoteExportError("--onnx-kernels is for --format onnx")
    ckpt, out = Path(a.ckpt_dir), Path(a.output)
    types = dict(ternary_type=a.ternary_type, shared_type=a.shared_type or "f16", other_type=a.other_type or "f16",
                 expert_type=a.expert_type)
    if a.budget_scope is not None and a.memory_budget is None:
        raise MoteExportError("--budget-scope needs --memory-budget")
    if a.memory_budget is not None:
        from .plan import export_budget_types

        types = export_budget_types(ckpt, out, a)
    # All or nothing: the LLM is written to a staged temporary, the projector next (renamed into place as it
    # completes), the LLM renamed last, so a kill at any point never leaves a new model beside an old (or no)
    # projector; the staged file of a killed export is removed by the next one (remove_stale_temporaries).
    check_output(out, "model.gguf")
    remove_stale_temporaries(out)
    staged = out.parent / f"{temporary_prefix(out)}staged.tmp"
    try:
        summary = write_llm_gguf(ckpt, staged, progress=not a.quiet, **types)
        if not a.no_mmproj:
            write_mmproj(ckpt, mmproj_path(out), ftype=a.mmproj_type)
        os.replace(staged, out)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    summary["path"] = str(out)
    print(format_summary(summary))
    if not a.no_mmproj:
        print(f"wrote {mmproj_path(out)}")


def _onnx(a) -> None:
    """--format onnx: the export folder for onnxruntime (exporters/onnx_folder.py)."""
    given = [flag for flag, v in (("--ternary-type", a.ternary_type), ("--memory-budget", a.memory_budget),
                                  ("--budget-scope", a.budget_scope), ("--no-mmproj", a.no_mmproj or None))
             if v is not None]
    if given:
        raise MoteExportError(f"{given[0]} is for --format gguf; --format onnx takes --onnx-kernels, --shared-type, "
                              "--other-type and --expert-type")
    try:
        from .onnx_folder import format_summary, write_onnx_folder
        import onnx  # noqa: F401
    except ImportError as exc:
        raise MoteExportError(f"--format onnx needs {exc.name}, which this install lacks; "
                              "pip install 'mote-edge[onnx]'") from None
    summary = write_onnx_folder(Path(a.ckpt_dir), Path(a.output), kernels=a.onnx_kernels or "exact",
                                shared_type=a.shared_type or "f32", other_type=a.other_type or "f32",
                                expert_type=a.expert_type or "f32", progress=not a.quiet)
    print(format_summary(summary))

"""mote-plan: the exporters' memory plan of a MoTE / MoE-LLaVA / dense export from a config alone (file
bytes per tensor group, real GGUF types beside the paper's convention, the budget search), plus what
the llama.cpp engine would keep resident running it. See exporters/plan.py for the plan itself.

    mote-plan CONFIG_OR_CKPT [--experts 4] [--variant mote|moe-llava|dense] [--shared-type T] ...
    mote-plan --preset qwen2.5-3b --experts 4 --shared-type bf16 [--json] [--paper] [--n-ctx 2048]
    mote-plan --preset qwen2.5-3b --memory-budget 3.4GB --budget-scope experts

It lives beside the engines because the resident figure is the engine's estimate, not the file's.
The device is not known here, so the repacked copy counts every type llama.cpp may repack anywhere.
"""
from __future__ import annotations

import json

from ..exporters.errors import MoteExportError, cli_entry
from ..exporters.plan import format_paper_reproduction, format_plan, plan_from_args, plan_json, plan_parser
from .llama_memory import format_resident, plan_resident


@cli_entry
def main(argv=None):
    a = plan_parser().parse_args(argv)
    plan, preset, repro = plan_from_args(a)
    if a.n_ctx < 0:
        raise MoteExportError("--n-ctx must be >= 0")
    resident = plan_resident(plan, a.n_ctx) if plan and a.n_ctx else None
    if a.json:
        out = plan_json(plan, preset, resident) if plan else {}
        if repro is not None:
            out["paper_reproduction"] = repro
        print(json.dumps(out, indent=1))
        return
    if plan:
        line = (f"resident at n_ctx {a.n_ctx} (mote-run --engine llama.cpp --memory-limit estimate): "
                f"{format_resident(resident)}") if resident else None
        print(format_plan(plan, preset, line))
    if repro is not None:
        print(format_paper_reproduction(repro))

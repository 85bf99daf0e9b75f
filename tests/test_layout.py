"""The layout of DESIGN.md section 2: one folder per part, imports pointing one way, no import cycle.

Every import in every module counts, the ones inside functions too (a lazy import is still a
dependency), read from the source with ast, so nothing needs importing."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package it installs as (pyproject's package-dir)
PARTS = {"mote_edge": "mote_edge", "exporters": "mote_edge.exporters", "runtime_cpu": "mote_edge.runtime_cpu",
         "cuda_kernels": "mote_edge.cuda_kernels", "benchmarks": "mote_edge.benchmarks"}
# part -> the parts it may import from. The core trains and demos (it uses the exporters' formats and
# the runtimes, and the GPU kernels when training on CUDA); the runtimes read the exporters' files with the
# exporters' readers; the GPU path reads the same files and reuses the CPU runtime's torch-free front parts
# (tokenizer, chat template, images), never the core; the exporters import no other part; benchmarks
# measure them all.
ALLOWED = {"core": {"core", "exporters", "runtime_cpu", "cuda_kernels"}, "exporters": {"exporters"},
           "runtime_cpu": {"runtime_cpu", "exporters"}, "cuda_kernels": {"cuda_kernels", "runtime_cpu", "exporters"},
           "benchmarks": {"benchmarks", "exporters", "runtime_cpu", "cuda_kernels", "core"}}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in PARTS.items():
        for f in sorted((ROOT / folder).glob("*.py")):
            mods[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return mods


def _part(module: str) -> str | None:
    for p in ("exporters", "runtime_cpu", "cuda_kernels", "benchmarks"):
        if module == f"mote_edge.{p}" or module.startswith(f"mote_edge.{p}."):
            return p
    return "core" if module.split(".")[0] == "mote_edge" else None


def _imports(module: str, path: Path, mods: dict) -> set[str]:
    """The project modules `module` imports (resolved to module names, packages included)."""
    pkg = module if path.stem == "__init__" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in mods:  # `from pkg import name` names a module, or something inside one
                n = n.rpartition(".")[0]
            if n:
                out.add(n)
    out.discard(module)
    return out


def test_every_part_imports_only_what_it_may():
    mods = _modules()
    wrong = []
    for m, path in mods.items():
        for dep in _imports(m, path, mods):
            if dep == "mote_edge":  # the empty root package (asset paths): no code, no torch
                continue
            if _part(dep) not in ALLOWED[_part(m)]:
                wrong.append(f"{m} ({_part(m)}) imports {dep} ({_part(dep)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_imports():  # the two tests above would pass on a checker that finds nothing
    mods = _modules()
    assert "mote_edge.exporters.gguf_header" in _imports("mote_edge.runtime_cpu.llama_memory",
                                                          mods["mote_edge.runtime_cpu.llama_memory"], mods)
    assert "mote_edge.runtime_cpu.llama_engine" in _imports("mote_edge.benchmarks.bench_measure",
                                                             mods["mote_edge.benchmarks.bench_measure"], mods)
    assert {"mote_edge.exporters", "mote_edge.runtime_cpu", "mote_edge.benchmarks"} <= set(mods)


def test_one_reader_per_format():
    """GGUF headers are read by exporters/gguf_header.py, safetensors by exporters/safetensors_np.py (and
    the safetensors library on the torch side); no other module parses them itself."""
    offenders = []
    # the fuzzer maps the byte layout of the files it mutates (KV records, tensor infos, JSON header
    # lengths) to write malformed ones on purpose: it reads them as an attacker would, not as a loader
    writers_of_bad_files = {"mote_edge.benchmarks.fuzz"}
    for m, path in _modules().items():
        if m in writers_of_bad_files:
            continue
        src = path.read_text()
        if "GGUFReader(" in src and m != "mote_edge.exporters.gguf_header":
            offenders.append(f"{m} uses gguf.GGUFReader")
        if "struct.unpack" in src and "GGUF" in src and m != "mote_edge.exporters.gguf_header":
            offenders.append(f"{m} parses GGUF bytes")
        if "safetensors" in src and "json.loads" in src and "<Q" in src and m != "mote_edge.exporters.safetensors_np":
            offenders.append(f"{m} parses safetensors headers")
    assert not offenders, offenders

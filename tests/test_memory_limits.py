"""mote-run --memory-limit for every engine (issue 12, "Load"), on the embedded tiny MoTE.

Near the limit: mote-run with --memory-limit = the engine's plan + 1 MiB runs, and the process's measured
peak RSS (VmHWM, which starts afresh at exec) stays under what the plan accepted. Here for onnxruntime and
the cuda engine on the CPU (`--device cpu --kernel torch`: its plan counts the bytes it places on the
device, and on the CPU the device is host memory; its CUDA-runtime term then covers torch's own host
footprint). The mote and llama.cpp engines have theirs already (test_runtime_cpu.py
test_mote_run_engine_mote_streams_answer_and_stays_under_its_plan, test_plan.py
test_peak_rss_stays_under_the_accepted_limit).

10% below the plan, for all four engines: one `error:` line, exit 2, and nothing loaded: the engine's model
was never constructed, no file of the model is mapped (/proc/self/maps at exit; no Python mmap at all), and
the library that would read the weights (onnxruntime, torch) was never imported.

Each run goes through a small driver that observes without changing anything: an audit hook counts mmaps,
Engine.__init__ is wrapped to note that it ran, and at the end the driver writes what it saw and its VmHWM."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mote_edge.benchmarks import soak
from mote_edge.runtime_cpu import run
from mote_edge.tiny import ASSETS

MIB = 2 ** 20
DRIVER = r"""
import json, os, sys
from pathlib import Path
report, engine_name, watched, argv = sys.argv[1], sys.argv[2], sys.argv[3].split(os.pathsep), sys.argv[4:]
seen = {"mmaps": 0, "engine_constructed": False}
def hook(event, args):
    if event == "mmap.__new__":
        seen["mmaps"] += 1
sys.addaudithook(hook)

def mapped():
    return sorted({line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                   if any(line.endswith(" " + w) for w in watched)})

from mote_edge.runtime_cpu import run
engine = run.engine_module(engine_name)
init = engine.Engine.__init__
def observed_init(self, *a, **k):
    init(self, *a, **k)
    seen["engine_constructed"] = True
    seen["mapped_after_load"] = mapped()
engine.Engine.__init__ = observed_init
code = 0
try:
    run.main(argv)
except SystemExit as exc:
    code = exc.code
finally:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    seen |= {"vmhwm": int(status["VmHWM"].split()[0]) * 1024, "mapped_at_exit": mapped(),
             "modules": sorted(m for m in ("onnxruntime", "torch", "llama_cpp") if m in sys.modules)}
    Path(report).write_text(json.dumps(seen))
sys.exit(code)
"""
ENGINES = {  # engine -> (model format, extra mote-run flags, library that reads the weights at load)
    "mote": ("gguf", [], None),
    "llama.cpp": ("gguf", [], None),  # llama_cpp is imported by its plan (the build's CPU flags decide repacking)
    "onnxruntime": ("onnx", [], "onnxruntime"),
    "cuda": ("gguf", ["--device", "cpu", "--kernel", "torch"], "torch"),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    if not (ASSETS / "mote" / "model.safetensors").is_file():
        pytest.skip("embedded tiny checkpoint not built")
    return soak.tiny_exports(tmp_path_factory.mktemp("memory_limits"), {"gguf", "onnx"})


def _engine_or_skip(engine: str):
    need = {"llama.cpp": "llama_cpp", "onnxruntime": "onnxruntime", "cuda": "torch"}.get(engine)
    if need:
        pytest.importorskip(need)
    return run.engine_module(engine)


def _plan(engine: str, exports: dict) -> tuple[int, Path, list[str], list[str]]:
    """(planned total bytes, model, mote-run flags, files to watch) for this engine's tiny model."""
    fmt, extra, _ = ENGINES[engine]
    mod = _engine_or_skip(engine)
    model = exports[fmt]
    if fmt == "gguf":
        proj = model.with_name(model.stem + "-mmproj.gguf")
        opts = dict(zip([f.lstrip("-") for f in extra[::2]], extra[1::2]))
        plan = mod.plan_memory(model, proj, None, **opts)
        watched = [str(model), str(proj)]
    else:
        plan = mod.plan_memory(model, None, None)
        watched = [str(p) for p in model.iterdir() if p.suffix in (".onnx", ".data")]
    return plan["total_bytes"], model, extra, watched


def _mote_run(engine: str, model: Path, extra: list[str], watched: list[str], limit: int, work: Path):
    rec = json.loads((ASSETS / "data" / "test.json").read_text())[0]
    argv = [str(model), "--engine", engine, *extra, "--image", str(ASSETS / "data" / "images" / rec["image"]),
            "--prompt", rec["conversations"][0]["value"].removeprefix("<image>\n"), "--threads", "1",
            "--max-tokens", "8", "--memory-limit", str(limit)]
    report = work / f"seen-{engine}-{limit}.json"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", DRIVER, str(report), engine, ":".join(watched), *argv],
                       capture_output=True, text=True, timeout=300)
    return r, json.loads(report.read_text()), time.perf_counter() - t0


@pytest.mark.parametrize("engine", ["onnxruntime", "cuda"])
def test_near_the_limit_peak_rss_stays_under_the_plan(engine, exports, tmp_path):
    planned, model, extra, watched = _plan(engine, exports)
    r, seen, wall = _mote_run(engine, model, extra, watched, planned + MIB, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"planned resident memory: {planned} bytes" in r.stderr and r.stdout.strip()
    assert seen["engine_constructed"] and seen["mapped_after_load"]  # the watch sees a loaded model's mapping
    print(f"{engine}: peak RSS {seen['vmhwm'] / MIB:.1f} MiB, plan {planned / MIB:.1f} MiB "
          f"(limit {(planned + MIB) / MIB:.1f} MiB), {wall:.2f} s")
    assert 0 < seen["vmhwm"] < planned


@pytest.mark.parametrize("engine", list(ENGINES))
def test_ten_percent_below_the_plan_is_refused_before_loading(engine, exports, tmp_path):
    planned, model, extra, watched = _plan(engine, exports)
    r, seen, wall = _mote_run(engine, model, extra, watched, int(0.9 * planned), tmp_path)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stderr[-3000:]
    assert err[0].startswith("error: planned resident memory") and "exceeds --memory-limit" in err[0]
    assert not r.stdout.strip()
    assert not seen["engine_constructed"] and seen["mapped_at_exit"] == [] and seen["mmaps"] == 0, seen
    library = ENGINES[engine][2]
    assert library is None or library not in seen["modules"], seen["modules"]
    print(f"{engine}: refused in {wall:.2f} s (process), peak RSS {seen['vmhwm'] / MIB:.1f} MiB, "
          f"plan {planned / MIB:.1f} MiB")

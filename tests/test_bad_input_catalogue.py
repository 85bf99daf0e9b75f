"""The catalogue of bad input (issue 12): every case of tests/bad_inputs.py, one command each.

Each case must end with exit code 2 and exactly one line on stderr that is not a progress bar: the last,
starting with `error: ` and saying what is wrong (no traceback, no warning, no log line), and must leave
nothing written: its case folder (inputs, any pre-existing output) byte-for-byte as it was, no new
file or folder in it (the current directory is the case folder too, so default output paths land
there), and the shared fixtures untouched. Most cases run the command's `main(argv)` in this process;
the few marked `subprocess` run the installed console script, the path a user takes.
"""
from __future__ import annotations

import hashlib
import importlib
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from .bad_inputs import CASES, Fixtures, png_1x1, run_args

MAINS = {"mote-upcycle": "mote_edge.upcycle", "mote-train": "mote_edge.train", "mote-export": "mote_edge.exporters.cli",
         "mote-run": "mote_edge.runtime_cpu.run", "mote-plan": "mote_edge.runtime_cpu.plan_cli",
         "mote-bench": "mote_edge.benchmarks.bench", "mote-routes": "mote_edge.benchmarks.routes"}
# a tqdm bar, as it draws itself between carriage returns: "desc:  40%|####  | 2/5 [00:01<00:02, 1.9it/s]"
PROGRESS = re.compile(r"\d+%\|.*\||\|\s*\d+/\d+ \[|\d+(\.\d+)?(it|s)/(s|it)\]")


def _tree(folder: Path, content: bool = True) -> dict:
    """relative path -> sha256 (content) or (size, mtime) of every file, and "dir" for folders."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_dir():
            out[str(p.relative_to(folder))] = "dir"
        elif content:
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fixtures:
    from mote_edge.exporters.gguf_llm import write_llm_gguf
    from mote_edge.exporters.gguf_mmproj import write_mmproj
    from mote_edge.exporters.onnx_folder import write_onnx_folder
    from mote_edge.runtime_cpu import run
    from mote_edge.tiny import ASSETS

    if not (ASSETS / "mote" / "model.safetensors").is_file():
        pytest.skip("embedded checkpoints not built")
    root = tmp_path_factory.mktemp("catalogue-fixtures")
    gguf = root / "tiny.gguf"
    write_llm_gguf(ASSETS / "mote", gguf, progress=False)
    write_mmproj(ASSETS / "mote", root / "tiny-mmproj.gguf", ftype="f16")
    write_onnx_folder(ASSETS / "mote", root / "onnx", progress=False)
    routes = root / "routes.json"
    run.main([str(gguf), "--image", str(ASSETS / "data" / "images" / "test_00000.png"), "--prompt",
              "What colour is the square?", "--engine", "mote", "--kernel", "numpy", "--max-tokens", "2",
              "--routes", str(routes)])
    return Fixtures(dense=ASSETS / "dense", mote=ASSETS / "mote", moe_llava=ASSETS / "moe-llava",
                    data=ASSETS / "data", gguf=gguf, onnx=root / "onnx", routes=routes)


def _run_in_process(program: str, argv: list[str], capfd) -> tuple[object, str, str]:
    """(exit code, stdout, stderr) of the command's main(argv), both streams captured at the descriptors
    (llama.cpp and onnxruntime write there from C)."""
    main = importlib.import_module(MAINS[program]).main
    capfd.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - a bad input that escapes as an exception is what this test finds
        code = "an exception"
        sys.stderr.write(traceback.format_exc())
    cap = capfd.readouterr()
    return code, cap.out, cap.err


def _run_console_script(program: str, argv: list[str], cwd: Path) -> tuple[object, str]:
    exe = Path(sys.executable).parent / program
    r = subprocess.run([str(exe), *argv], capture_output=True, text=True, cwd=cwd, timeout=120)
    return r.returncode, r.stderr


def error_lines(err: str) -> list[str]:
    """stderr's lines that are not progress bars (tqdm redraws with carriage returns)."""
    return [p.strip() for p in re.split(r"[\r\n]", err) if p.strip() and not PROGRESS.search(p)]


def _marks(case) -> list:
    """A case waiting for a fix fails one of the checks (AssertionError), not while building its input."""
    return [pytest.mark.xfail(strict=True, raises=AssertionError, reason=case.xfail)] if case.xfail else []


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=_marks(c)) for c in CASES])
def test_bad_input(case, fx, tmp_path, capfd, monkeypatch):
    d = tmp_path / "case"
    d.mkdir()
    argv = case.build(fx, d)
    monkeypatch.chdir(d)  # default outputs (mote-bench-out, routes.png, ...) would land in the case folder
    before = _tree(d)
    shared = {p: _tree(p, content=False) for p in (fx.gguf.parent, fx.mote.parent)}
    if case.subprocess:
        code, err = _run_console_script(case.program, argv, d)
    else:
        code, _, err = _run_in_process(case.program, argv, capfd)
    lines = error_lines(err)
    assert code == 2, f"exit code {code}; stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line, got:\n{err[-3000:]}"
    assert case.message in lines[0], lines[0]
    assert _tree(d) == before, "the command wrote, changed or removed something in its case folder"
    assert {p: _tree(p, content=False) for p in shared} == shared, "the shared fixtures were changed"


def test_catalogue_covers_every_command():
    """The issue's list: >= 50 cases over every command and engine, the subprocess path used but few."""
    commands = {c.command for c in CASES}
    assert {"mote-upcycle", "mote-train", "mote-export gguf", "mote-export onnx", "mote-run llama.cpp", "mote-run mote",
            "mote-run onnxruntime", "mote-run cuda", "mote-plan", "mote-bench", "mote-routes"} <= commands
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)
    assert 1 <= sum(c.subprocess for c in CASES) <= 5
    assert all(c.message and c.klass and c.example for c in CASES), "every case names what its error line says"


def test_a_1x1_png_is_an_image(fx, tmp_path, capfd):
    """The edge beside the catalogue's images that are not images: one pixel is a valid image, stretched to
    the tower's size and answered (exit 0), not refused."""
    (tmp_path / "dot.png").write_bytes(png_1x1())
    code, out, err = _run_in_process("mote-run", run_args(fx.gguf, tmp_path / "dot.png", "--kernel", "numpy",
                                                          engine="mote"), capfd)
    assert code == 0 and out.strip(), err[-3000:]
    assert "error" not in err and "Traceback" not in err, err[-3000:]

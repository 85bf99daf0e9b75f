"""The base install (`pip install mote-edge`, no extras) exports and plans without torch, and every
torch-side command says in one line which extra it needs.

A real virtual environment is built from the project's lock (constraints.txt) with pip: the wheels
come from pip's cache after the first run, so this takes about half a minute.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "mote_edge" / "assets" / "tiny"
# what the source copy leaves out: environments, caches and build outputs
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "runs",
                              "bench-out", "tests")
TORCH_SIDE = {"mote-upcycle": "train", "mote-train": "train", "mote-make-tiny": "train", "mote-eval": "train",
              "mote-demo": "train"}


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    if not (TINY / "mote" / "model.safetensors").is_file():
        pytest.skip("embedded tiny checkpoint not built")
    tmp = tmp_path_factory.mktemp("base")
    src = tmp / "src"  # pip builds a local project in its folder: keep build/ and egg-info out of the repo
    shutil.copytree(ROOT, src, ignore=SKIP)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(ROOT / "constraints.txt"), str(src)],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return venv


def _run(venv: Path, *args, cwd=None) -> subprocess.CompletedProcess:
    """A command of the base venv, run away from the source tree (so `import mote_edge` is the installed one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return subprocess.run([str(venv / "bin" / args[0]), *map(str, args[1:])], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd or venv.parent)


def test_base_install_has_no_torch(base_venv):
    r = _run(base_venv, "python", "-c", "import torch")
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    r = _run(base_venv, "python", "-c", "import transformers")
    assert r.returncode != 0
    # everything the base install holds imports without them
    r = _run(base_venv, "python", "-c", "import mote_edge.exporters.cli, mote_edge.exporters.plan, "
             "mote_edge.runtime_cpu.run, mote_edge.runtime_cpu.plan_cli, mote_edge.runtime_cpu.llama_engine, "
             "mote_edge.benchmarks.bench, mote_edge.commands, mote_edge.synthetic")
    assert r.returncode == 0, r.stderr


def test_base_install_exports_and_plans(base_venv, tmp_path):
    out = tmp_path / "tiny.gguf"
    r = _run(base_venv, "mote-export", TINY / "mote", "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.stat().st_size > 1_000_000 and (tmp_path / "tiny-mmproj.gguf").stat().st_size > 100_000
    # the base install's GGUF is the very file the full install writes
    from mote_edge.exporters.gguf_llm import write_llm_gguf

    ref = tmp_path / "ref.gguf"
    write_llm_gguf(TINY / "mote", ref, progress=False)
    assert out.read_bytes() == ref.read_bytes()
    r = _run(base_venv, "mote-plan", TINY / "mote")
    assert r.returncode == 0, r.stderr
    assert "routed experts" in r.stdout and "resident at n_ctx" in r.stdout
    r = _run(base_venv, "mote-plan", "--preset", "qwen2.5-0.5b", "--json")
    assert r.returncode == 0 and '"expert_memory_bytes"' in r.stdout
    r = _run(base_venv, "mote-make-data", tmp_path / "data", "--train", "4", "--val", "2", "--test", "2")
    assert r.returncode == 0 and (tmp_path / "data" / "train.json").is_file(), r.stderr


@pytest.mark.parametrize("command", sorted(TORCH_SIDE))
def test_torch_side_commands_name_their_extra(base_venv, command, tmp_path):
    r = _run(base_venv, command, tmp_path / "x", cwd=tmp_path)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert err[0].startswith(f"error: {command} needs torch") and f"mote-edge[{TORCH_SIDE[command]}]" in err[0]


def test_base_install_runs_our_own_engine(base_venv, tmp_path):
    """mote-run --engine mote needs nothing beyond the base install: export, then answer, without torch."""
    out = tmp_path / "tiny.gguf"
    assert _run(base_venv, "mote-export", TINY / "mote", "-o", out, "--quiet").returncode == 0
    image = next((TINY / "data" / "images").iterdir())
    r = _run(base_venv, "mote-run", out, "--engine", "mote", "--image", image, "--prompt", "What colour is the square?",
             "--max-tokens", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() and "time to first token" in r.stderr and "peak RSS" in r.stderr


def test_llama_engine_without_llama_cpp_says_which_extra(base_venv, tmp_path):
    out = tmp_path / "tiny.gguf"
    assert _run(base_venv, "mote-export", TINY / "mote", "-o", out, "--quiet").returncode == 0
    image = next((TINY / "data" / "images").iterdir())
    r = _run(base_venv, "mote-run", out, "--image", image, "--prompt", "What colour is the square?")
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(err) == 1 and "mote-edge[llama]" in err[0], r.stderr
    r = _run(base_venv, "mote-export", TINY / "mote", "-o", tmp_path / "k.gguf", "--shared-type", "q4_k", "--quiet")
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(err) == 1 and "mote-edge[llama]" in err[0], r.stderr
    assert not (tmp_path / "k.gguf").exists()

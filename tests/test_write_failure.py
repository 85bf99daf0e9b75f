"""A write that the file system stops half-way, for real (no monkeypatched step): mote-export --format gguf
and --format onnx, and mote-train's final checkpoint, run in a subprocess under a file-size limit
(RLIMIT_FSIZE with SIGXFSZ ignored, so write() fails with EFBIG) or onto a small tmpfs (ENOSPC): one
`error:` line, exit 2, no traceback, nothing at the destination (an earlier model there untouched), no
temporaries left, and the same command with room succeeds."""
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mote_edge.tiny import ASSETS

TINY = ASSETS / "mote"
DATA = ASSETS / "data"
MiB = 2 ** 20
pytestmark = pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="embedded tiny checkpoint not built")


def _cli(entry: str, *args) -> list[str]:
    module, func = entry.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())", *map(str, args)]


EXPORT = "mote_edge.exporters.cli:main"
TRAIN = "mote_edge.commands:train"


def _run(cmd: list[str], fsize: int | None = None) -> subprocess.CompletedProcess:
    def limit():  # in the child only: every file it writes stops at fsize bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() returns EFBIG instead of the process dying

    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit if fsize else None)


def _assert_one_error_line(r: subprocess.CompletedProcess) -> str:
    """Exit 2 and one `error:` line, the last thing printed (mote-train's progress bars come before it)."""
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == err[-1] and "failed" in errors[0], err[-5:]
    return errors[0]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs mount (we run as root in CI) whose size a test sets with remount; skipped where mounting is
    refused."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")

    def size(nbytes: int) -> Path:
        subprocess.run(["mount", "-o", f"remount,size={nbytes}", str(mnt)], check=True)
        return mnt

    yield size
    subprocess.run(["umount", str(mnt)], check=True)


# ---- mote-export --format gguf ---------------------------------------------------------------------------------


def test_gguf_export_past_the_file_size_limit(tmp_path):
    """The LLM file hits the limit mid-tensor: an earlier model.gguf / model-mmproj.gguf pair stays as it was."""
    out = tmp_path / "models"
    out.mkdir()
    old = {"m.gguf": b"earlier model", "m-mmproj.gguf": b"earlier projector"}
    for name, data in old.items():
        (out / name).write_bytes(data)
    r = _run(_cli(EXPORT, TINY, "-o", out / "m.gguf", "--quiet"), fsize=1 * MiB)
    line = _assert_one_error_line(r)
    assert str(out) in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # no temporary, nothing replaced
    r = _run(_cli(EXPORT, TINY, "-o", out / "m.gguf", "--quiet"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["m-mmproj.gguf", "m.gguf"]
    assert (out / "m.gguf").read_bytes()[:4] == b"GGUF" and (out / "m-mmproj.gguf").read_bytes()[:4] == b"GGUF"


def test_gguf_export_on_a_full_disk_after_the_llm_is_staged(tmp_path, small_tmpfs):
    """Room for the staged LLM but not for the projector written after it: the staged LLM is removed too."""
    ref = tmp_path / "ref"
    ref.mkdir()
    assert _run(_cli(EXPORT, TINY, "-o", ref / "m.gguf", "--quiet")).returncode == 0
    llm, mmproj = (ref / "m.gguf").stat().st_size, (ref / "m-mmproj.gguf").stat().st_size
    mnt = small_tmpfs(llm + mmproj // 2)
    r = _run(_cli(EXPORT, TINY, "-o", mnt / "m.gguf", "--quiet"))
    line = _assert_one_error_line(r)
    assert "No space left on device" in line or "requested and" in line, line  # numpy's tofile: a short write
    assert list(mnt.iterdir()) == []
    small_tmpfs(llm + mmproj + 4 * MiB)
    r = _run(_cli(EXPORT, TINY, "-o", mnt / "m.gguf", "--quiet"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in mnt.iterdir()) == ["m-mmproj.gguf", "m.gguf"]
    assert (mnt / "m.gguf").read_bytes() == (ref / "m.gguf").read_bytes()


# ---- mote-export --format onnx ---------------------------------------------------------------------------------


def test_onnx_export_past_the_file_size_limit(tmp_path):
    out = tmp_path / "exports"
    out.mkdir()
    r = _run(_cli(EXPORT, TINY, "--format", "onnx", "-o", out / "tiny", "--quiet"), fsize=1 * MiB)
    assert "File too large" in _assert_one_error_line(r)
    assert list(out.iterdir()) == []
    r = _run(_cli(EXPORT, TINY, "--format", "onnx", "-o", out / "tiny", "--quiet"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in out.iterdir()] == ["tiny"] and (out / "tiny" / "decoder.onnx").is_file()


def test_onnx_export_on_a_full_disk(small_tmpfs):
    mnt = small_tmpfs(4 * MiB)  # the weights file alone is 17 MiB
    r = _run(_cli(EXPORT, TINY, "--format", "onnx", "-o", mnt / "tiny", "--quiet"))
    assert "No space left on device" in _assert_one_error_line(r)
    assert list(mnt.iterdir()) == []
    small_tmpfs(64 * MiB)
    r = _run(_cli(EXPORT, TINY, "--format", "onnx", "-o", mnt / "tiny", "--quiet"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in mnt.iterdir()] == ["tiny"]


# ---- mote-train's checkpoint -----------------------------------------------------------------------------------


def test_train_final_checkpoint_past_the_file_size_limit(tmp_path):
    """One optimizer step, then model.safetensors (18 MiB) hits the limit: nothing at -o, no temporary."""
    runs = tmp_path / "runs"
    runs.mkdir()
    args = (TINY, "--data", DATA / "test.json", "--images", DATA / "images", "-o", runs / "out", "--steps", 1,
            "--batch-size", 2)
    r = _run(_cli(TRAIN, *args), fsize=1 * MiB)
    assert "File too large" in _assert_one_error_line(r)
    assert list(runs.iterdir()) == []
    r = _run(_cli(TRAIN, *args))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (runs / "out" / "model.safetensors").is_file() and [p.name for p in runs.iterdir()] == ["out"]

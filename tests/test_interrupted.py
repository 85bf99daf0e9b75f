"""Interrupted exports lose nothing (issue 12): mote-export of the tiny checkpoint, GGUF (model + mmproj) and
ONNX folder, killed with SIGKILL at seeded random points (benchmarks/fuzz.py kill_trials: at a random time of
the run, or when a random share of the output bytes sits in the temporaries). After each kill every
destination path is absent, the complete previous export, or the complete new one (byte-identical to an
uninterrupted export), never a partial file; the re-run succeeds and leaves no stale temporary behind.

The program runs 20 trials per format: python -m mote_edge.benchmarks.fuzz --cases 0 --kill-trials 20 -o OUT."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mote_edge.benchmarks import fuzz
from mote_edge.exporters.gguf_file import remove_stale_temporaries, temporary_prefix

TRIALS = {"gguf": 3, "onnx": 2}


@pytest.mark.parametrize("fmt", fuzz.KILL_FORMATS)
def test_killed_exports_leave_no_partial_file_and_rerun(fmt, tmp_path):
    r = fuzz.kill_trials(fmt, TRIALS[fmt], seed=1, work=tmp_path)
    detail = "\n".join(str(t) for t in r["results"])
    assert r["violations"] == 0 and r["reruns_failed"] == 0, detail
    assert r["stale_left_after_rerun"] == 0, detail
    assert r["killed"] >= 1, f"no trial was killed before it finished:\n{detail}"  # the test tested something


def test_a_killed_writers_temporary_is_removed_and_a_live_ones_kept(tmp_path):
    """remove_stale_temporaries: a temporary named for a process that is gone goes, this process's stays,
    another file's stays."""
    out = tmp_path / "model.gguf"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{temporary_prefix(out).replace(str(os.getpid()), str(dead.pid))}abc.tmp"
    live = tmp_path / f"{temporary_prefix(out)}def.tmp"
    other = tmp_path / f"{temporary_prefix(tmp_path / 'other.gguf').replace(str(os.getpid()), str(dead.pid))}x.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    remove_stale_temporaries(out)
    assert not stale.exists() and live.exists() and other.exists()


def test_sigkill_while_the_llm_file_is_written_keeps_the_previous_pair(tmp_path):
    """One kill placed for certain inside the write: the LLM temporary exists and is growing when SIGKILL
    lands; the previous export's two files are untouched."""
    from mote_edge.exporters.gguf_file import mmproj_path

    ckpt = fuzz._assets() / "mote"
    dest = tmp_path / "model.gguf"
    subprocess.run(fuzz._export_args("gguf", ckpt, dest, "a"), check=True, capture_output=True)
    before = [fuzz._digest(p) for p in (dest, mmproj_path(dest))]
    proc = subprocess.Popen(fuzz._export_args("gguf", ckpt, dest, "b"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < 120:
        tmps = fuzz._temporaries(tmp_path)
        if tmps and fuzz._size(tmp_path / tmps[0]) > 0:
            break
        time.sleep(0.0005)
    assert proc.poll() is None, "the export finished before its temporary was seen"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [fuzz._digest(p) for p in (dest, mmproj_path(dest))] == before
    assert fuzz._temporaries(tmp_path), "the killed writer's temporary is where the next run will find it"

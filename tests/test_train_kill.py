"""Training killed while it writes a checkpoint loses nothing (issue 12, "Interrupted work loses nothing").

mote-train on the embedded tiny MoTE, --save-every 2 over 6 steps, is SIGKILLed in the middle of writing its
step-4 checkpoint. The kill is placed for certain: the run goes through a small driver that wraps
safetensors' save_file so that, inside step-4's temporary folder, the writer stops just before one file
(the weights, or the optimizer state after the weights are down) and says so; the test then sends SIGKILL
to the real mote-train process. Nothing of the project is patched. After the kill, step-2 is the latest
complete checkpoint and step-4 exists only as a partial temporary; `--resume` starts from step 2, removes
the temporary, and ends with the loss curve (lm and balance loss of all 6 steps, bit for bit) and the final
weights (bit for bit) of a run that was never interrupted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mote_edge.tiny import ASSETS

STEPS, SAVE_EVERY, KILLED_AT = 6, 2, "step-4"

DRIVER = r"""
import sys, time
from pathlib import Path
import safetensors.torch as st
stall_in, stall_before, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
real = st.save_file
def save_file(tensors, filename, metadata=None):
    p = Path(filename)
    if p.parent.name.startswith("." + stall_in + ".") and p.name == stall_before:
        marker.write_text(str(p.parent))  # the checkpoint's temporary, with the files before this one
        time.sleep(600)  # where SIGKILL lands: mid-checkpoint
    return real(tensors, filename, metadata=metadata)
st.save_file = save_file
from mote_edge.train import main
main(sys.argv[4:])
"""


def _args(data_dir: Path, out: Path, *extra) -> list[str]:
    return [str(ASSETS / "mote"), "--data", str(data_dir / "train.json"), "--images", str(data_dir / "images"),
            "-o", str(out), "--steps", str(STEPS), "--batch-size", "8", "--lr", "3e-3", "--warmup-ratio", "0",
            "--save-every", str(SAVE_EVERY), *extra]


ENV = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _train(args: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "mote_edge.train", *args], capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _curve(out: Path) -> list[tuple]:
    return [(h["step"], h["lm_loss"], h["balance_loss"], h["lr"])
            for h in json.loads((out / "train_log.json").read_text())["history"]]


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> Path:
    if not (ASSETS / "mote" / "model.safetensors").is_file():
        pytest.skip("embedded tiny checkpoint not built")
    out = tmp_path_factory.mktemp("train_kill") / "uninterrupted"
    _train(_args(data_dir, out))
    return out


@pytest.mark.parametrize("stall_before", ["model.safetensors", "optimizer.safetensors"])
def test_killed_while_checkpointing_resumes_to_the_same_curve(stall_before, uninterrupted, data_dir, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "stalled"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, KILLED_AT, stall_before, str(marker),
                             *_args(data_dir, out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    t0 = time.monotonic()
    while not marker.exists() and proc.poll() is None and time.monotonic() - t0 < 240:
        time.sleep(0.05)
    assert proc.poll() is None, f"mote-train ended before its {KILLED_AT} write: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    ckpts = out / "checkpoints"
    partial = Path(marker.read_text())
    assert partial.parent == ckpts and partial.is_dir()  # step-4 exists only as the killed writer's temporary
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["step-2"]
    assert (partial / "model.safetensors").is_file() == (stall_before == "optimizer.safetensors")
    assert not (partial / "trainer_state.json").exists()
    assert not (out / "model.safetensors").exists()  # no final model from a killed run

    r = _train(_args(data_dir, out, "--resume"))
    assert not partial.exists() and not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2", "step-4"]
    assert json.loads((ckpts / "step-4" / "trainer_state.json").read_text())["step"] == 4
    resumed, full = _curve(out), _curve(uninterrupted)
    assert [c[0] for c in resumed] == list(range(1, STEPS + 1))
    assert resumed == full, (resumed, full)  # bit for bit: the same batches, state and arithmetic
    a, b = load_file(uninterrupted / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "lm loss" in r.stdout

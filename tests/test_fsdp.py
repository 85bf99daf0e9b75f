"""FSDP2 (`torchrun ... mote-train --fsdp`, torch.distributed.fsdp.fully_shard) on CPU with gloo: two
sharded processes take the same steps as one process on the same global batch, as the DDP test checks."""
import json

import pytest
from safetensors.torch import load_file

from tests.test_train import _cli


def test_fsdp_two_processes_agree_with_one(mote_ckpt, data_dir, tmp_path):
    # 2 micro-batches per rank: FSDP reduce-scatters the gradients only after the last one
    common = ["--data", data_dir / "train.json", "--images", data_dir / "images", "--steps", 3,
              "--batch-size", 8, "--grad-accum", 2, "--balance-coef", 0, "--lr", 3e-3, "--warmup-ratio", 0]
    _cli(mote_ckpt, "-o", tmp_path / "one", *common)
    _cli(mote_ckpt, "-o", tmp_path / "two", *common, "--fsdp", nproc=2)
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    base = load_file(mote_ckpt / "model.safetensors")
    assert a.keys() == b.keys()
    moved = max((a[k] - base[k]).abs().max().item() for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3, "training must actually move the weights"
    assert worst < 1e-5, f"FSDP result differs from single process by {worst}"
    la = json.loads((tmp_path / "one" / "train_log.json").read_text())["history"]
    lb = json.loads((tmp_path / "two" / "train_log.json").read_text())["history"]
    assert len(la) == len(lb) == 3
    for x, y in zip(la, lb):
        assert x["lm_loss"] == pytest.approx(y["lm_loss"], rel=1e-5)


def test_fsdp_needs_torchrun(mote_ckpt, data_dir, tmp_path):
    import subprocess, sys

    r = subprocess.run([sys.executable, "-m", "mote_edge.train", str(mote_ckpt), "--data", str(data_dir / "train.json"),
                        "--images", str(data_dir / "images"), "-o", str(tmp_path / "o"), "--steps", "1", "--fsdp"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --fsdp shards over ranks: launch with torchrun --nproc_per_node N (N >= 2)"], r.stderr
    assert not (tmp_path / "o").exists()

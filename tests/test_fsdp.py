"""FSDP2 (`torchrun ... mote-train --fsdp`, torch.distributed.fsdp.fully_shard) on CPU with gloo: two
sharded processes take the same steps as one process on the same global batch, as the DDP test checks,
and their checkpoints (gathered, optimizer state by parameter name) resume with and without --fsdp."""
import json
import shutil

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


def test_fsdp_checkpoints_resume_with_and_without_fsdp(mote_ckpt, data_dir, tmp_path):
    """--save-every under --fsdp gathers the shards into an ordinary checkpoint (weights + AdamW state by
    parameter name); a run resumed from step 2 with --fsdp ends where the uninterrupted one did, bit for bit,
    and one resumed by a single process (no --fsdp) within the FSDP-vs-one tolerance."""
    common = ["--data", data_dir / "train.json", "--images", data_dir / "images", "--steps", 4,
              "--batch-size", 8, "--balance-coef", 0, "--lr", 3e-3, "--warmup-ratio", 0]
    _cli(mote_ckpt, "-o", tmp_path / "full", *common, "--save-every", 2, "--fsdp", nproc=2)
    step2 = tmp_path / "full" / "checkpoints" / "step-2"
    meta = json.loads((step2 / "trainer_state.json").read_text())
    assert meta["step"] == 2 and meta["optimizer_keys"] == "names"
    opt = load_file(step2 / "optimizer.safetensors")
    assert any(k.endswith(".exp_avg_sq") and ".experts." in k for k in opt)
    full = load_file(tmp_path / "full" / "model.safetensors")
    for name, extra, nproc, tol in (("fsdp", ["--fsdp"], 2, 0.0), ("one", [], None, 1e-5)):
        part = tmp_path / name
        (part / "checkpoints").mkdir(parents=True)
        shutil.copytree(step2, part / "checkpoints" / "step-2")
        _cli(mote_ckpt, "-o", part, *common, "--resume", *extra, nproc=nproc)
        got = load_file(part / "model.safetensors")
        worst = max((got[k] - full[k]).abs().max().item() for k in full)
        assert worst <= tol, (name, worst)
        hist = json.loads((part / "train_log.json").read_text())["history"]
        want = json.loads((tmp_path / "full" / "train_log.json").read_text())["history"]
        assert [h["step"] for h in hist] == [1, 2, 3, 4]
        for x, y in zip(hist, want):
            assert x["lm_loss"] == pytest.approx(y["lm_loss"], rel=max(tol, 1e-12) * 10), name

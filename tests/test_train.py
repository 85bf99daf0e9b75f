import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mote_edge.train import TrainConfig, train


def _train(ckpt, data_dir, out, processor, **kw):
    cfg = TrainConfig(**({"stage": "moe", "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.0} | kw))
    return train(ckpt, data_dir / "train.json", data_dir / "images", out, cfg, processor=processor, progress=False)


def _one_batch_data(data_dir, tmp_path, n=8) -> Path:
    """A copy of the data with exactly one global batch, so every step sees the same examples."""
    recs = json.loads((data_dir / "train.json").read_text())[:n]
    d = tmp_path / "one"
    d.mkdir()
    (d / "train.json").write_text(json.dumps(recs))
    os.symlink(data_dir / "images", d / "images")
    return d


@pytest.mark.parametrize("stage", ["moe", "dense"])
def test_a_few_steps_lower_the_loss(stage, mote_ckpt, dense_ckpt, data_dir, tmp_path, processor):
    ckpt = mote_ckpt if stage == "moe" else dense_ckpt
    one = _one_batch_data(data_dir, tmp_path)
    hist = _train(ckpt, one, tmp_path / "out", processor, stage=stage, steps=8, lr=1e-2)["history"]
    assert hist[-1]["lm_loss"] < 0.9 * hist[0]["lm_loss"], [h["lm_loss"] for h in hist]
    if stage == "moe":
        assert all(h["balance_loss"] >= 0.99 for h in hist)
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()


def test_moe_stage_changes_only_routers_and_experts(mote_ckpt, data_dir, tmp_path, processor):
    _train(mote_ckpt, data_dir, tmp_path / "out", processor, steps=2)
    before, after = load_file(mote_ckpt / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".router." in k or ".experts." in k for k in changed)


def test_checkpoints_of_an_older_mote_train_still_resume(mote_ckpt, data_dir, tmp_path, processor):
    """Before checkpoints named their parameters, optimizer.safetensors was keyed by optimizer index: such a
    checkpoint (rewritten here in that form) resumes to the same weights as the named one."""
    from mote_edge.checkpoint import load_model
    from mote_edge.train import load_training_state, param_groups, set_trainable

    _train(mote_ckpt, data_dir, tmp_path / "full", processor, steps=4, save_every=2)
    step2 = tmp_path / "full" / "checkpoints" / "step-2"
    meta = json.loads((step2 / "trainer_state.json").read_text())
    named_state = load_file(step2 / "optimizer.safetensors")
    cfg = TrainConfig(stage="moe")
    model = load_model(mote_ckpt)
    opt = torch.optim.AdamW(param_groups(set_trainable(model, cfg), cfg))
    index = {name: i for i, name in enumerate(n for g in meta["param_groups"] for n in g["params"])}
    old = tmp_path / "old" / "checkpoints" / "step-2"
    shutil.copytree(step2, old)
    from safetensors.torch import save_file

    save_file({f"{index[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v for k, v in named_state.items()},
              str(old / "optimizer.safetensors"))
    groups, i = [], 0
    for g in meta["param_groups"]:
        groups.append(g | {"params": list(range(i, i + len(g["params"])))})
        i += len(g["params"])
    (old / "trainer_state.json").write_text(json.dumps({"step": 2, "param_groups": groups, "history": meta["history"]}))
    assert load_training_state(model, opt, old) == 2
    got = {id(p): s for p, s in opt.state.items()}
    params = {n: p for n, p in model.named_parameters()}
    for key, v in named_state.items():
        name, k = key.rsplit(".", 1)
        assert torch.equal(got[id(params[name])][k], v), key
    _train(mote_ckpt, data_dir, tmp_path / "old", processor, steps=4, resume=True)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "old" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_exactly(mote_ckpt, data_dir, tmp_path, processor):
    _train(mote_ckpt, data_dir, tmp_path / "full", processor, steps=4, save_every=2)
    assert (tmp_path / "full" / "checkpoints" / "step-2" / "optimizer.safetensors").is_file()
    # a run that stopped after step 2: only its checkpoint exists
    (tmp_path / "part" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-2", tmp_path / "part" / "checkpoints" / "step-2")
    hist = _train(mote_ckpt, data_dir, tmp_path / "part", processor, steps=4, resume=True)["history"]
    assert [h["step"] for h in hist] == [3, 4]
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "part" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _cli(*args, nproc=None):
    env = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc else [sys.executable]) + ["-m", "mote_edge.train", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_ddp_two_processes_agree_with_one(mote_ckpt, data_dir, tmp_path):
    common = ["--data", data_dir / "train.json", "--images", data_dir / "images", "--steps", 3,
              "--batch-size", 8, "--lr", 3e-3, "--warmup-ratio", 0]
    _cli(mote_ckpt, "-o", tmp_path / "one", *common)
    _cli(mote_ckpt, "-o", tmp_path / "two", *common, nproc=2)
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    base = load_file(mote_ckpt / "model.safetensors")
    moved = max((a[k] - base[k]).abs().max().item() for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3, "training must actually move the weights"
    assert worst < 1e-5, f"DDP result differs from single process by {worst}"
    la = json.loads((tmp_path / "one" / "train_log.json").read_text())["history"]
    lb = json.loads((tmp_path / "two" / "train_log.json").read_text())["history"]
    for x, y in zip(la, lb):
        assert x["lm_loss"] == pytest.approx(y["lm_loss"], rel=1e-5)
        assert x["balance_loss"] == pytest.approx(y["balance_loss"], rel=1e-5)


def test_gradient_accumulation_matches_one_big_batch(mote_ckpt, data_dir, tmp_path, processor):
    # balance loss off: it is computed per micro-batch (non-linear in routing fractions), while the
    # LM loss is normalised by the step's total response tokens and so must match exactly
    _train(mote_ckpt, data_dir, tmp_path / "big", processor, steps=2, balance_coef=0.0)
    _train(mote_ckpt, data_dir, tmp_path / "acc", processor, steps=2, balance_coef=0.0, grad_accum=4)
    a = load_file(tmp_path / "big" / "model.safetensors")
    b = load_file(tmp_path / "acc" / "model.safetensors")
    base = load_file(mote_ckpt / "model.safetensors")
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-3
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

"""Training: stage `dense` (LLaVA-style: connector + LLM, vision tower on request) and stage `moe`
(MoTE Stage III: only routers and routed experts train; LM loss on responses + balance loss).

    mote-train CKPT_DIR --data train.json --images DIR -o OUT_DIR [--stage dense|moe] ...
    torchrun --nproc_per_node N -m mote_edge.train ...   (DDP: gloo on CPU, nccl on GPU)
    torchrun ... -m mote_edge.train ... --fsdp            (FSDP2 fully_shard: parameters, gradients and
                                                           AdamW state sharded over the ranks)

--kernels triton runs the ternary experts on the int8 Triton kernels of cuda_kernels/ (default on CUDA);
--kernels torch on fake-quantised float matmuls (default on CPU).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import atomic_dir, check_output_folder, load_model, save_model
from .cpu_alloc import keep_freed_memory
from .data import ConversationDataset, collate, load_records
from .errors import MoteError, cli_entry
from .losses import IGNORE, global_sum, lm_loss_sum, load_balance_loss
from .moe import KERNELS, moe_blocks, set_kernels
from .model import mote_config
from .exporters.errors import ArgumentParser

STAGES = ("dense", "moe")


@dataclass
class TrainConfig:
    stage: str = "moe"
    steps: int | None = None  # optimizer steps; default: `epochs` passes over the data
    epochs: float = 1.0
    batch_size: int = 16  # global batch, over all ranks and accumulation micro-steps
    grad_accum: int = 1
    lr: float = 1.5e-4
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # moe stage: ternary experts, 0.1 then 0 from half way (two-stage)
    train_vision: bool = False
    balance_coef: float | None = None  # None: the checkpoint's value
    save_every: int = 0
    resume: bool = False
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    kernels: str | None = None  # None: triton on CUDA, torch elsewhere
    fsdp: bool = False


# ---------------------------------------------------------------------------------------------
# what trains


def set_trainable(model, cfg: TrainConfig) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything, then unfreeze what the stage trains. Returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.stage == "moe":
        if not moe_blocks(model):
            raise MoteError("stage moe needs a MoE checkpoint; run mote-upcycle first (or use --stage dense)")
        for b in moe_blocks(model):
            for p in list(b.router.parameters()) + list(b.experts.parameters()):
                p.requires_grad_(True)
    else:
        inner = model.model
        for mod in (inner.multi_modal_projector, inner.language_model, model.lm_head):
            for p in mod.parameters():
                p.requires_grad_(True)
        if cfg.train_vision:
            for p in inner.vision_tower.parameters():
                p.requires_grad_(True)
        for b in moe_blocks(model):  # a dense stage on a MoTE model still keeps the shared expert frozen
            if b.shared_expert is not None:
                for p in b.shared_expert.parameters():
                    p.requires_grad_(False)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param_groups(named: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> list[dict]:
    """Expert matrices get the (two-stage) weight decay; routers, norms, biases and embeddings none."""
    decay, no_decay = [], []
    for n, p in named:
        (decay if p.ndim == 2 and "router" not in n and "embed" not in n else no_decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay, "two_stage": cfg.stage == "moe"},
            {"params": no_decay, "weight_decay": 0.0, "two_stage": False}]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup_ratio * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def apply_schedule(opt, step: int, total: int, cfg: TrainConfig) -> float:
    lr = lr_at(step, total, cfg)
    for g in opt.param_groups:
        g["lr"] = lr
        if g["two_stage"]:
            g["weight_decay"] = cfg.weight_decay if step < total // 2 else 0.0
    return lr


# ---------------------------------------------------------------------------------------------
# data order: a seeded permutation per epoch; step s takes the s-th global batch, rank r its slice


def global_batch_indices(n: int, step: int, batch: int, seed: int) -> list[int]:
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return perm[k * batch:(k + 1) * batch]


def micro_batches(idx: list[int], rank: int, world: int, accum: int) -> list[list[int]]:
    local = len(idx) // world
    mine = idx[rank * local:(rank + 1) * local]
    m = len(mine) // accum
    return [mine[i * m:(i + 1) * m] for i in range(accum)]


# ---------------------------------------------------------------------------------------------
# checkpoints (safetensors only: model, optimizer state; JSON for the rest)


def training_state(model, opt, fsdp: bool) -> tuple[dict, dict]:
    """The unsharded model and optimizer state dicts, keyed by parameter name (torch.distributed.checkpoint's
    form: the same on one process, under DDP and gathered from FSDP2's shards), on CPU. Under FSDP every rank
    must call it (a collective) and rank 0 gets the dicts ({} elsewhere); otherwise the caller's rank reads its
    own full copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=fsdp))


def save_training_state(model, opt, step: int, out: Path, side_files_from: Path, history: list, rank: int = 0,
                        fsdp: bool = False) -> None:
    """Model, optimizer state and the loss curve so far into the folder `out` (rank 0 writes), written into a
    temporary sibling renamed when complete (atomic_dir): a run killed while writing leaves the previous
    complete checkpoint as the latest, and its partial temporary is removed by the next writer (or at
    --resume). The optimizer state is keyed by parameter name, so a checkpoint written with --fsdp resumes
    without it and the other way round."""
    from safetensors.torch import save_file

    if not fsdp and rank != 0:
        return
    model_sd, optim_sd = training_state(model, opt, fsdp)
    if rank != 0:
        return
    if fsdp:  # the shards' owner is a DTensor model: write an ordinary one holding the gathered weights
        model = load_model(side_files_from)
        model.load_state_dict(model_sd)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, overwrite=True) as tmp:
        save_model(model, tmp, side_files_from=side_files_from)
        tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, st in optim_sd["state"].items()
                   for k, v in st.items()}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "optimizer_keys": "names",
                                                            "param_groups": optim_sd["param_groups"],
                                                            "history": history}))


def load_training_state(model, opt, ckpt: Path, fsdp: bool = False) -> int:
    """The checkpoint's weights into `model` and its optimizer state into `opt` (each rank reads the files
    and takes its own shards under FSDP); the step it was written at."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    meta = json.loads((ckpt / "trainer_state.json").read_text())
    flat = load_file(str(ckpt / "optimizer.safetensors"))
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, load_model(ckpt).state_dict(), options=full)
    state: dict = {}
    if meta.get("optimizer_keys") == "names":
        for key, v in flat.items():
            name, k = key.rsplit(".", 1)
            state.setdefault(name, {})[k] = v
        set_optimizer_state_dict(model, opt, {"state": state, "param_groups": meta["param_groups"]}, options=full)
    else:  # written before checkpoints named their parameters: optimizer indices, one unsharded process's
        if fsdp:
            raise MoteError(f"{ckpt} holds optimizer state by index (an older mote-train); resume it without --fsdp")
        for key, v in flat.items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"])


def checkpoint_history(ckpt: Path) -> list:
    """The loss curve up to a checkpoint's step (empty for checkpoints written before it was recorded)."""
    return list(json.loads((ckpt / "trainer_state.json").read_text()).get("history") or [])


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint: only a finished write is renamed to step-N (atomic_dir); the partial
    temporaries of a killed run (".step-N.<host>-<pid>.*.tmp") are removed here."""
    from .exporters.gguf_file import remove_stale_temporaries

    folder = out_dir / "checkpoints"
    for p in folder.glob(".step-*.tmp") if folder.is_dir() else ():
        remove_stale_temporaries(folder / p.name[1:].split(".")[0])
    ckpts = sorted((p for p in folder.glob("step-*") if p.name.split("-")[1].isdigit()),
                   key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


# ---------------------------------------------------------------------------------------------


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device): joins the torchrun process group when launched by torchrun."""
    if dist.is_available() and dist.is_initialized():
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return dist.get_rank(), dist.get_world_size(), dev
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def choose_kernels(requested: str | None, device: torch.device) -> str:
    """The expert kernels to train with, or MoteError naming what `requested` needs."""
    import importlib.util

    kernels = requested or ("triton" if device.type == "cuda" else "torch")
    if kernels not in KERNELS:
        raise MoteError(f"unknown --kernels {kernels!r}; accepted: {', '.join(KERNELS)}")
    if kernels == "torch":
        return kernels
    if importlib.util.find_spec("triton") is None:
        raise MoteError("--kernels triton needs the triton package, which this install lacks; "
                        "pip install 'mote-edge[gpu]', or use --kernels torch")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise MoteError(f"--kernels triton needs an NVIDIA GPU of compute capability 8.0 or newer (int8 tensor "
                            f"cores); {torch.cuda.get_device_name(device)} is {major}.{minor}; use --kernels torch")
    elif os.environ.get("TRITON_INTERPRET") != "1":
        raise MoteError("--kernels triton needs a CUDA GPU; on CPU it runs only under Triton's interpreter "
                        "(TRITON_INTERPRET=1, ~1000x slower: for tests); use --kernels torch")
    return kernels


def shard_fsdp(model) -> None:
    """FSDP2: every decoder layer, and the rest (root: embeddings, vision tower, connector, head), become
    fully_shard units, so a rank holds 1/N of each parameter, its gradient and its AdamW state; a unit
    is gathered for its forward and backward only. Frozen parameters are sharded too. (The vision tower
    stays in the root unit: as a unit of its own, its hidden states, which transformers captures with
    hooks for the connector, come back as None.)"""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model)


def full_state_dict(model) -> dict:
    """The unsharded state dict on rank 0 (CPU), {} elsewhere; every rank must call it (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def check_config(cfg: TrainConfig) -> None:
    """Options no run can use, refused before the model is loaded (the CLI's flags name them)."""
    if cfg.stage not in STAGES:
        raise MoteError(f"unknown stage {cfg.stage!r}; accepted: {', '.join(STAGES)}")
    for name, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("save_every", 0)):
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise MoteError(f"--{name.replace('_', '-')} must be at least {low} (got {value})")
    if cfg.steps is None and not cfg.epochs > 0:
        raise MoteError(f"--epochs must be > 0 (got {cfg.epochs})")
    if not cfg.lr > 0:
        raise MoteError(f"--lr must be > 0 (got {cfg.lr})")
    if not 0 <= cfg.warmup_ratio <= 1:
        raise MoteError(f"--warmup-ratio must be in [0, 1] (got {cfg.warmup_ratio})")
    for name in ("weight_decay", "balance_coef"):
        if getattr(cfg, name) is not None and not getattr(cfg, name) >= 0:
            raise MoteError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(cfg, name)})")


def train(ckpt_dir: str | Path, data: str | Path, images: str | Path, out_dir: str | Path,
          cfg: TrainConfig, processor=None, progress: bool = True) -> dict:
    """Train and write the final checkpoint to out_dir. Returns a summary (losses, steps, time)."""
    from transformers import AutoProcessor

    check_config(cfg)
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    check_output_folder(out_dir, nonempty_ok=True)  # --resume continues in it; the final files replace theirs
    rank, world, device = setup_distributed()
    if cfg.fsdp and world < 2:
        raise MoteError("--fsdp shards over ranks: launch with torchrun --nproc_per_node N (N >= 2)")
    kernels = choose_kernels(cfg.kernels, device)
    if device.type == "cpu":
        keep_freed_memory()  # every step frees and re-allocates the same big tensors (cpu_alloc.py)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise MoteError(f"--batch-size {cfg.batch_size} must be divisible by ranks x --grad-accum "
                        f"({world} x {cfg.grad_accum})")
    records = load_records(data)
    model = load_model(ckpt_dir)
    processor = processor or AutoProcessor.from_pretrained(str(ckpt_dir))
    dataset = ConversationDataset(records, images, processor)
    pad_id = processor.tokenizer.pad_token_id
    mcfg = mote_config(model)
    coef = cfg.balance_coef if cfg.balance_coef is not None else (mcfg.balance_coef if mcfg else 0.0)

    torch.manual_seed(cfg.seed)
    named = set_trainable(model, cfg)
    set_kernels(model, kernels)
    model.to(device).train()
    if cfg.fsdp:
        shard_fsdp(model)  # replaces the parameters by sharded ones: the optimizer takes those
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(named, cfg), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    total = cfg.steps or max(1, int(cfg.epochs * len(dataset) // cfg.batch_size))
    start, earlier = 0, []  # earlier: the loss curve of the steps before a resumed run's start
    if cfg.resume and (last := latest_checkpoint(out_dir)) is not None:
        start = load_training_state(model, opt, last, cfg.fsdp)
        earlier = [h for h in checkpoint_history(last) if h["step"] <= start]
    blocks = moe_blocks(model)
    net = model
    if world > 1 and not cfg.fsdp:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    history = []
    bar = tqdm(range(start, total), initial=start, total=total, desc=f"train[{cfg.stage}]",
               disable=not progress or rank != 0, dynamic_ncols=True)
    t0, tokens_seen = time.perf_counter(), 0
    for step in bar:
        lr = apply_schedule(opt, step, total, cfg)
        idx = global_batch_indices(len(dataset), step, cfg.batch_size, cfg.seed)
        micros = [collate([dataset[i] for i in mb], pad_id) for mb in micro_batches(idx, rank, world, cfg.grad_accum)]
        n_resp = global_sum(sum((b["labels"][:, 1:] != IGNORE).sum() for b in micros).float())
        lm_total, bal_total = torch.zeros(()), torch.zeros(())
        for j, batch in enumerate(micros):
            batch = {k: v.to(device) for k, v in batch.items()}
            sync = j == len(micros) - 1 or world == 1
            if cfg.fsdp:  # reduce-scatter the gradients only after the last micro-batch, like DDP's no_sync
                model.set_requires_gradient_sync(sync)
            ctx = net.no_sync() if (world > 1 and not sync and not cfg.fsdp) else contextlib.nullcontext()
            with ctx, autocast:
                logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=batch.get("pixel_values")).logits
                lm = lm_loss_sum(logits, batch["labels"]) / n_resp * world
                bal = load_balance_loss(blocks, batch["attention_mask"]) if blocks else torch.zeros((), device=device)
                loss = lm + coef * bal / len(micros)
            loss.backward()
            lm_total += lm.detach().cpu() / world
            bal_total += bal.detach().cpu() / len(micros)
            tokens_seen += int(batch["attention_mask"].sum()) * world
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm_val = float(global_sum(lm_total))
        bal_val = float(global_sum(bal_total)) / world
        history.append({"step": step + 1, "lm_loss": lm_val, "balance_loss": bal_val, "lr": lr})
        if rank == 0:
            bar.set_postfix(loss=f"{lm_val:.3f}", bal=f"{bal_val:.3f}",
                            tok_s=f"{tokens_seen / (time.perf_counter() - t0):.0f}", refresh=False)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:  # every rank: FSDP gathers
            save_training_state(model, opt, step + 1, out_dir / "checkpoints" / f"step-{step + 1}", ckpt_dir,
                                earlier + history, rank, cfg.fsdp)
        if world > 1:
            dist.barrier()
    elapsed = time.perf_counter() - t0
    if cfg.fsdp:  # gather the shards into an ordinary model on rank 0, which writes it
        state = full_state_dict(model)
        if rank == 0:
            model = load_model(ckpt_dir)
            model.load_state_dict(state)
    if rank == 0:
        model.eval()
        write_final(model, out_dir, ckpt_dir, earlier + history, cfg, elapsed)  # the whole curve, resumed or not
    return {"history": history, "steps": total, "seconds": elapsed}


def write_final(model, out_dir: Path, src: Path, history: list, cfg: TrainConfig, elapsed: float) -> None:
    """Final weights go to out_dir itself, replacing file by file so periodic checkpoints survive."""
    with atomic_dir(out_dir.parent / f".{out_dir.name}.final", overwrite=True) as tmp:
        save_model(model, tmp, side_files_from=src)
        (tmp / "train_log.json").write_text(json.dumps(
            {"config": cfg.__dict__, "seconds": round(elapsed, 1), "history": history}, indent=1))
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a failed write leaves no empty out_dir behind
    final = out_dir.parent / f".{out_dir.name}.final"
    for p in final.iterdir():
        os.replace(p, out_dir / p.name)
    shutil.rmtree(final)


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="mote-train", description="Train a dense LLaVA or MoTE checkpoint.")
    p.add_argument("ckpt_dir")
    p.add_argument("--data", required=True, help="LLaVA conversation JSON")
    p.add_argument("--images", required=True, help="image folder the records' 'image' paths are relative to")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--stage", choices=STAGES, default="moe")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs passes)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16, help="global batch size")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="peak LR (default 1.5e-4 moe, 1e-3 dense)")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=None, help="default 0.1 moe (two-stage), 0 dense")
    p.add_argument("--train-vision", action="store_true", help="dense stage: also train the vision tower")
    p.add_argument("--balance-coef", type=float, default=None)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps into OUT/checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints' latest")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--kernels", choices=KERNELS, default=None,
                   help="ternary expert kernels: triton (int8 tensor cores; default on CUDA) or torch (default on CPU)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and AdamW state with FSDP2 instead of DDP")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    lr = a.lr if a.lr is not None else (1.5e-4 if a.stage == "moe" else 1e-3)  # --lr 0 is refused, not defaulted
    cfg = TrainConfig(stage=a.stage, steps=a.steps, epochs=a.epochs, batch_size=a.batch_size,
                      grad_accum=a.grad_accum, lr=lr,
                      warmup_ratio=a.warmup_ratio,
                      weight_decay=a.weight_decay if a.weight_decay is not None else (0.1 if a.stage == "moe" else 0.0),
                      train_vision=a.train_vision, balance_coef=a.balance_coef, save_every=a.save_every,
                      resume=a.resume, compile=a.compile, seed=a.seed, kernels=a.kernels, fsdp=a.fsdp)
    out = Path(a.output)
    summary = train(a.ckpt_dir, a.data, a.images, out, cfg)
    if not dist.is_initialized() or dist.get_rank() == 0:
        h = summary["history"]
        print(f"wrote {out}: {summary['steps']} steps in {summary['seconds']:.0f}s, "
              f"lm loss {h[0]['lm_loss']:.3f} -> {h[-1]['lm_loss']:.3f}" if h else f"wrote {out}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

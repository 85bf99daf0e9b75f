"""Training-step time of the MoTE moe stage vs. the same model with full-precision experts (MoE-LLaVA).

    python benchmarks/train_step.py --shape all [--num-layers 4] [--threads N] [--json out.json]

Both variants are up-cycled from ONE random dense model, trained with stage "moe" (routers + routed
experts only, AdamW), and timed interleaved (A, B, A, B, ...) so machine noise hits both equally.
MoTE: 4 ternary experts, top-1, + frozen shared expert.  MoE-LLaVA: 4 fp experts, top-2, no shared.
"""
from __future__ import annotations

import copy, gc, json, os, platform, resource, statistics, time

import torch
import transformers
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration

from mote_edge.config import MoTEConfig
from mote_edge.cpu_alloc import keep_freed_memory
from mote_edge.losses import IGNORE, lm_loss_sum, load_balance_loss
from mote_edge.model import apply_mote_
from mote_edge.moe import moe_blocks
from mote_edge.tiny import TEXT, VISION, dense_config
from mote_edge.train import TrainConfig, param_groups, set_trainable
from ..exporters.errors import ArgumentParser

# Qwen2.5-0.5B text widths are real. The vision tower is a REDUCED SigLIP (so400m: width 1152, 27
# layers, 729 tokens) because it is frozen in the moe stage, identical in both variants, and would
# only dilute the ratio while eating this machine's memory: 4 layers, width 384, 112 px / 14 = 64 tokens.
QWEN05_TEXT = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                   rms_norm_eps=1e-6, tie_word_embeddings=True)
QWEN05_VISION = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
                     image_size=112, patch_size=14, vision_use_head=False)
SHAPES = {  # name: (vision, text, vocab, default batch, default repeats)
    "tiny": (VISION, TEXT, 356, 8, 10),
    "qwen2.5-0.5b": (QWEN05_VISION, QWEN05_TEXT, 151936, 2, 3),
}


def build_dense(vision: dict, text: dict, vocab: int, num_layers: int, seed: int):
    # image token = the last id; text tokens are drawn below it
    cfg = dense_config(vision, {**text, "num_hidden_layers": num_layers}, vocab, image_token_index=vocab - 1)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg)


def make_batch(cfg, batch: int, seq_len: int, seed: int) -> dict:
    """[image tokens | random text]; labels on the text only, like an instruction-tuning sample."""
    g = torch.Generator().manual_seed(seed)
    n_img, size = cfg.image_seq_length, cfg.vision_config.image_size
    text = torch.randint(0, cfg.text_config.vocab_size - 1, (batch, seq_len), generator=g)
    ids = torch.cat([torch.full((batch, n_img), cfg.image_token_index), text], dim=1)
    labels = ids.clone()
    labels[:, :n_img] = IGNORE
    return {"input_ids": ids, "labels": labels,
            "pixel_values": torch.randn(batch, 3, size, size, generator=g)}


class Variant:
    def __init__(self, name: str, model, mcfg: MoTEConfig):
        self.name, self.model = name, apply_mote_(model, mcfg, init="ffn")
        named = set_trainable(self.model, TrainConfig(stage="moe"))
        self.trainable = sum(p.numel() for _, p in named)
        self.opt = torch.optim.AdamW(param_groups(named, TrainConfig(stage="moe")), lr=1.5e-4, betas=(0.9, 0.95))
        self.blocks, self.times = moe_blocks(self.model), []
        self.model.train()

    def step(self, b: dict) -> float:
        t0 = time.perf_counter()
        logits = self.model(input_ids=b["input_ids"], pixel_values=b["pixel_values"]).logits
        n = (b["labels"][:, 1:] != IGNORE).sum()
        loss = lm_loss_sum(logits, b["labels"]) / n + 0.01 * load_balance_loss(self.blocks)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def state_mib(self) -> float:
        # Trainable weights + their grads + AdamW exp_avg/exp_avg_sq: the per-variant memory that
        # matters here (process RSS cannot be split per variant when both live in one process).
        return 4 * self.trainable * 4 / 2**20


def run_shape(shape: str, a, bar) -> dict:
    vision, text, vocab, def_batch, def_rep = SHAPES[shape]
    full = text["num_hidden_layers"]
    layers = a.num_layers or min(4, full)
    batch, repeats = a.batch_size or def_batch, a.repeats or def_rep
    dense = build_dense(vision, text, vocab, layers, a.seed)
    every = list(range(layers))
    variants = [Variant("MoTE", copy.deepcopy(dense), MoTEConfig(4, 1, every, variant="mote")),
                Variant("MoE-LLaVA", dense, MoTEConfig(4, 2, every, variant="moe-llava"))]
    b = make_batch(dense.config, batch, a.seq_len, a.seed)
    tokens = b["input_ids"].numel()  # every LLM position (image + text) runs through the experts
    bar.set_description(f"{shape} (batch {batch} x {tokens // batch} tok, {layers}/{full} layers)")
    for i in range(a.warmup + repeats):
        for v in variants:  # interleaved: A, B, A, B, ...
            t = v.step(b)
            if i >= a.warmup:
                v.times.append(t)
            bar.update()
    res = {"shape": shape, "layers": layers, "full_layers": full, "batch": batch, "tokens_per_step": tokens,
           "image_tokens": dense.config.image_seq_length, "repeats": repeats,
           "peak_rss_mib_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    for v in variants:
        med = statistics.median(v.times)
        res[v.name] = {"times_s": [round(t, 4) for t in v.times], "min_s": min(v.times), "median_s": med,
                       "max_s": max(v.times), "tokens_per_s": tokens / med,
                       "trainable_params": v.trainable, "train_state_mib": v.state_mib()}
    res["ratio_mote_over_moe_llava"] = res["MoTE"]["median_s"] / res["MoE-LLaVA"]["median_s"]
    del variants, dense
    gc.collect()
    return res


def table(r: dict) -> str:
    note = "" if r["layers"] >= r["full_layers"] else \
        f" -- DEPTH TRUNCATED to {r['layers']} of {r['full_layers']} layers (per-layer widths are real)"
    out = [f"\n### {r['shape']}: batch {r['batch']} x {r['tokens_per_step'] // r['batch']} tokens "
           f"({r['image_tokens']} image), {r['repeats']} timed steps{note}\n",
           "| variant | min s/step | median s/step | max s/step | tokens/s | trainable params | train state MiB |",
           "|---|---|---|---|---|---|---|"]
    for name in ("MoTE", "MoE-LLaVA"):
        v = r[name]
        out.append(f"| {name} | {v['min_s']:.3f} | {v['median_s']:.3f} | {v['max_s']:.3f} | {v['tokens_per_s']:.0f} "
                   f"| {v['trainable_params'] / 1e6:.1f} M | {v['train_state_mib']:.0f} |")
    out.append(f"\nratio MoTE / MoE-LLaVA (median step time): **{r['ratio_mote_over_moe_llava']:.2f}x**; "
               f"process peak RSS so far {r['peak_rss_mib_process'] / 1024:.1f} GiB")
    return "\n".join(out)


def main():
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=[*SHAPES, "all"], default="tiny")
    p.add_argument("--num-layers", type=int, default=None, help="decoder depth (default 4; 0.5B has 24)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 tiny, 2 qwen2.5-0.5b")
    p.add_argument("--seq-len", type=int, default=64, help="text tokens per sample (image tokens come on top)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 10 tiny, 3 0.5b)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the JSON result here")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="keep: glibc keeps freed memory, as mote-train does on CPU (mote_edge/cpu_alloc.py)")
    a = p.parse_args()
    if a.malloc == "keep":
        keep_freed_memory()
    if a.threads:
        torch.set_num_threads(a.threads)
    shapes = list(SHAPES) if a.shape == "all" else [a.shape]
    with open("/proc/cpuinfo") as f:
        cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())
    machine = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "malloc": a.malloc,
               "torch": torch.__version__, "transformers": transformers.__version__, "dtype": "float32"}
    print(f"machine: {machine}")
    total = sum((a.warmup + (a.repeats or SHAPES[s][4])) * 2 for s in shapes)
    with tqdm(total=total, unit="step", dynamic_ncols=True) as bar:
        results = [run_shape(s, a, bar) for s in shapes]
    for r in results:
        print(table(r))
    line = json.dumps({"machine": machine, "results": results})
    print(line)
    if a.json:
        with open(a.json, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()

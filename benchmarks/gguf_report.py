"""GGUF export report: llama.cpp vs PyTorch parity on the tiny MoTE, and export cost at real shapes.

    python benchmarks/gguf_report.py --part all|parity|shapes [--out DIR] [--cache DIR] [--threads N]

parity: the embedded tiny MoTE through mote-export: greedy answers and teacher-forced text logits vs PyTorch.
shapes: random bf16 MoTE checkpoints at Qwen2.5-0.5B / 1.5B shapes, streamed to disk without a torch model;
        mote-export and a greedy llama.cpp decode run as child processes whose peak RSS is measured.
Markdown tables to stdout; everything measured to DIR/gguf_report.json.
"""
from __future__ import annotations

import argparse, json, os, re, shutil, subprocess, sys, tempfile, time, zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

import mote_edge  # empty __init__: no torch, so the decode child stays torch-free (its RSS is llama.cpp's)
from ..exporters.errors import ArgumentParser

TINY = Path(mote_edge.__file__).parent / "assets" / "tiny"
BIN, GiB, MiB = Path(sys.executable).parent, 2 ** 30, 2 ** 20
PROMPT = "<|im_start|>user\nWhat colour is the square?<|im_end|>\n<|im_start|>assistant\n"
# A reduced SigLIP-shaped tower (as in train_step.py): the LLM is what is being measured.
VISION = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
              image_size=112, patch_size=14, vision_use_head=False)
QWEN = dict(num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
            tie_word_embeddings=True)
SHAPES = {"qwen2.5-0.5b": QWEN | dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
          "qwen2.5-1.5b": QWEN | dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12)}
# mote-export arguments, and the paper's matching setting: bits per shared weight (BF16 / INT8), 2-bit experts
VARIANTS = {"tq2_0 + f16 shared (default)": ([], 16), "tq1_0 + q8_0 shared": (["--ternary-type", "tq1_0", "--shared-type", "q8_0"], 8)}
PAPER_GB = {("qwen2.5-0.5b", 16): "0.9", ("qwen2.5-1.5b", 16): "3.2", ("qwen2.5-1.5b", 8): "2.2"}  # DESIGN.md 1
NOISE_STD = 0.002  # experts = FFN + noise (10% of the weight std): a few % of ternary codes differ per expert


def run_measured(cmd: list, stdout: Path) -> dict:
    """Run a child under GNU time for its exact peak RSS, sampling /proc 20x/s for anonymous vs file-backed
    (mmap) RSS. Not our own wait4: Linux carries the forking parent's RSS high-water mark into a child's
    ru_maxrss across exec, and this process is big; time(1) forks the command from a small process."""
    t0, peak, hwm = time.perf_counter(), {"RssAnon": 0, "RssFile": 0}, stdout.with_suffix(".maxrss")
    load = os.getloadavg()[0]  # kept in the JSON: timings on a shared machine mean little when this is >= 1
    with open(stdout, "w") as out:  # stderr passes through: the children's progress bars
        p = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", str(hwm), *map(str, cmd)], stdout=out)
        while p.poll() is None:
            try:
                kid = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()[0]
                for k, v in re.findall(r"(RssAnon|RssFile):\s+(\d+)", Path(f"/proc/{kid}/status").read_text()):
                    peak[k] = max(peak[k], 1024 * int(v))
            except (OSError, IndexError):  # not started yet, or just gone
                pass
            time.sleep(0.05)
    if p.returncode:
        raise SystemExit(f"error: {' '.join(map(str, cmd[:3]))} ... exited with {p.returncode}")
    return {"wall_s": time.perf_counter() - t0, "peak_rss": 1024 * int(hwm.read_text().split()[-1]),
            "peak_anon": peak["RssAnon"], "peak_file": peak["RssFile"], "load_1m_before": load}


def decode_child(model: str, n: int, threads: int) -> None:
    """(child) Load the LLM file text-only and time n greedy tokens (EOS ignored), 5 times: the first
    pass pays the page faults of the freshly written, memory-mapped file; the median of the other four is warm."""
    from mote_edge.runtime_cpu.llama_engine import llama

    llm = llama(model, n_ctx=256, n_threads=threads)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    speeds, ttft = [], []
    for _ in range(5):
        llm.reset()
        t0, times = time.perf_counter(), []
        for _ in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):  # never stops by itself
            times.append(time.perf_counter())
            if len(times) == n:
                break
        speeds.append((n - 1) / (times[-1] - times[0]))
        ttft.append(times[0] - t0)
    print(json.dumps({"decode_tok_s": float(np.median(speeds[1:])), "cold_tok_s": speeds[0], "warm_tok_s": speeds[1:],
                      "ttft_s": float(np.median(ttft[1:])), "cold_ttft_s": ttft[0]}))


def decode(model: Path, tmp: Path, threads: int) -> dict:
    os.sync()  # let the file just written reach the disk first: writeback would slow the timed decode
    m = run_measured([sys.executable, __file__, "--decode-child", model, "--threads", threads], tmp / "dec.json")
    return json.loads((tmp / "dec.json").read_text()) | {"decode_peak_rss": m["peak_rss"], "decode_peak_anon": m["peak_anon"], "decode_load_1m_before": m["load_1m_before"]}


def export(ckpt: Path, out: Path, args: list) -> dict:
    """mote-export in a child; the expert-memory figures are parsed from the summary it prints."""
    m = run_measured([BIN / "mote-export", ckpt, "-o", out, *args], out.with_suffix(".txt"))
    text = out.with_suffix(".txt").read_text()
    types, bpw = re.search(r"routed experts: (.+), ([\d.]+) bits per weight", text).groups()
    mem = re.search(r"expert memory \(shared \+ routed\): ([\d.]+) GiB = ([\d.]+) \+ ([\d.]+) MiB", text).groups()
    return m | {"routed_types": types, "routed_bpw": float(bpw), "expert_gib": float(mem[0]), "shared_mib": float(mem[1]),
                "routed_mib": float(mem[2]), "fallbacks": re.findall(r"fallback: (.+)", text),
                "llm_bytes": out.stat().st_size, "mmproj_bytes": out.with_name(out.stem + "-mmproj.gguf").stat().st_size}


def table(title: str, header: list, rows: list) -> None:
    print(f"\n## {title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")
    print()


# ---- part 1: parity on the embedded tiny checkpoint ----------------------------------------------------------


def part_parity(threads: int) -> dict:
    import torch
    from transformers import AutoProcessor
    from mote_edge.checkpoint import load_model
    from mote_edge.data import load_records, to_messages
    from mote_edge.evaluate import accuracy, generate_answers
    from mote_edge.runtime_cpu.llama_engine import evaluate_gguf, llama
    from mote_edge.runtime_cpu.records import normalize_answer

    ckpt, data = TINY / "mote", TINY / "data"
    records, model, proc = load_records(data / "test.json"), load_model(ckpt), AutoProcessor.from_pretrained(str(ckpt))
    ref = generate_answers(model, proc, records, data / "images")
    tok = proc.tokenizer  # whole conversation with its gold answer, "<image>\n" dropped: text only
    ids = [tok.encode(tok.apply_chat_template(to_messages(r["conversations"]), tokenize=False).replace("<image>\n", ""),
                      add_special_tokens=False) for r in records]
    with torch.no_grad():
        ref_logits = [model(input_ids=torch.tensor([i])).logits[0].numpy() for i in tqdm(ids, desc="pytorch logits")]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in {"tq2_0 (defaults)": [], "tq1_0": ["--ternary-type", "tq1_0"]}.items():
            gguf = Path(tmp) / f"tiny-{len(rows)}.gguf"
            r = export(ckpt, gguf, ["--quiet", *args])
            got = evaluate_gguf(gguf, data / "test.json", data / "images", n_threads=threads, progress=True)
            r |= {"agree": 100 * np.mean([normalize_answer(a) == normalize_answer(b) for a, b in zip(ref, got["answers"])]),
                  "pytorch_acc": accuracy(records, ref)["overall"], "llama_acc": accuracy(records, got["answers"])["overall"]}
            llm = llama(gguf, n_ctx=512, logits_all=True, type_k=0, type_v=0,  # f32 KV cache
                        n_threads=threads)
            top1, dmax, dsum, n = 0, 0.0, 0.0, 0
            for i, want in zip(tqdm(ids, desc="llama.cpp logits"), ref_logits):
                llm.reset()
                llm.eval(i)
                d = np.abs(np.array(llm.scores[:len(i)]) - want)
                top1 += int((llm.scores[:len(i)].argmax(-1) == want.argmax(-1)).sum())
                dmax, dsum, n = max(dmax, float(d.max())), dsum + float(d.sum()), n + len(i)
            scale = float(np.mean([np.abs(w).mean() for w in ref_logits]))
            rows[name] = r | {"tokens": n, "top1": 100 * top1 / n, "max_dlogit": dmax,
                              "mean_dlogit": dsum / (n * ref_logits[0].shape[-1]), "mean_abs_logit": scale} | decode(gguf, Path(tmp), threads)
            del llm
    table(f"llama.cpp (llama-cpp-python) vs PyTorch, embedded tiny MoTE, {len(records)} held-out questions",
          ["export", "LLM gguf", "mmproj", "answers agree", "PyTorch acc", "llama.cpp acc", "diff",
           "top-1 agree (text, teacher-forced)", "max abs dlogit", "mean abs dlogit", "decode tok/s", "decode peak RSS"],
          [[k, f"{r['llm_bytes'] / MiB:.2f} MiB", f"{r['mmproj_bytes'] / MiB:.2f} MiB", f"{r['agree']:.1f}%",
            f"{r['pytorch_acc']:.1f}%", f"{r['llama_acc']:.1f}%", f"{r['llama_acc'] - r['pytorch_acc']:+.1f}",
            f"{r['top1']:.2f}% of {r['tokens']}", f"{r['max_dlogit']:.3f}",
            f"{r['mean_dlogit']:.4f} (mean abs logit {r['mean_abs_logit']:.2f})", f"{r['decode_tok_s']:.0f}",
            f"{r['decode_peak_rss'] / MiB:.0f} MiB"] for k, r in rows.items()])
    return rows


# ---- part 2: real shapes, streamed random checkpoints ---------------------------------------------------------


def specs(text: dict) -> tuple[dict, list]:
    """config.json and (name, shape) of every stored tensor, from the real classes on the meta device:
    the exact names/shapes mote_edge's save_model would write, with no memory allocated."""
    import torch
    from transformers import LlavaForConditionalGeneration
    from mote_edge.config import MoTEConfig
    from mote_edge.model import apply_mote_
    from mote_edge.tiny import dense_config

    t = json.loads((TINY / "mote" / "config.json").read_text())  # the tiny tokenizer's special ids
    cfg = dense_config(VISION, text, 151936, t["image_token_index"], t["text_config"]["eos_token_id"],
                       t["text_config"]["pad_token_id"])
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
        apply_mote_(model, MoTEConfig(num_experts=4, top_k=1, layers=list(range(text["num_hidden_layers"]))), init=None)
    sd = model.state_dict()  # tied: lm_head is stored once, as the embedding (save_model does the same)
    return model.config.to_dict() | {"dtype": "bfloat16"}, [(k, tuple(v.shape)) for k, v in sd.items() if k != "lm_head.weight"]


def bf16(x: np.ndarray, bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 (upper 16 bits, round to nearest even) into reused buffers: fresh allocations of
    this size fault in their pages, ~10x slower than the arithmetic."""
    u, b, o = x.reshape(-1).view(np.uint32), bits[:x.size], out[:x.size]
    np.right_shift(u, 16, out=b)
    np.bitwise_and(b, 1, out=b)
    np.add(b, 0x7FFF, out=b)
    np.add(b, u, out=b)
    np.right_shift(b, 16, out=b)
    np.copyto(o, b, casting="unsafe")
    return o


def write_checkpoint(ckpt: Path, text: dict) -> dict:
    """A bf16 MoTE checkpoint folder, one tensor in memory at a time: header first, then each tensor's bytes."""
    cfg, tensors = specs(text)
    info = {"params": sum(int(np.prod(s)) for _, s in tensors)}
    if (ckpt / "model.safetensors").is_file():
        return info | {"cached": True}
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + 2 * int(np.prod(shape))]}
        off = header[name]["data_offsets"][1]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-aligned, as the reference writer does
    n_max = max(int(np.prod(s)) for _, s in tensors)
    work, bits, out, shared = np.empty(n_max, np.float32), np.empty(n_max, np.uint32), np.empty(n_max, np.uint16), {}
    ffn_n = text["hidden_size"] * text["intermediate_size"]
    noise = np.random.default_rng(0).standard_normal(ffn_n + 3 * 1009, dtype=np.float32) * np.float32(NOISE_STD)
    t0 = time.perf_counter()
    with open(tmp / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in tqdm(tensors, desc=f"write {ckpt.name}", unit="tensor"):
            n, a = int(np.prod(shape)), work[:int(np.prod(shape))]
            expert = re.search(r"experts\.(\d+)\.(\w+)_proj", name)
            if expert:  # state_dict order puts a layer's shared expert first; one noise block, shifted per expert
                e = int(expert.group(1)) * 1009
                np.add(shared[expert.group(2)], noise[e:e + n], out=a)
            elif re.search(r"norm\d?\.weight$", name):
                a.fill(1.0)
            elif name.endswith(".bias"):
                a.fill(0.0)
            else:
                np.random.default_rng(zlib.crc32(name.encode())).standard_normal(out=a, dtype=np.float32)
                a *= np.float32(0.02)
                if "shared_expert" in name:
                    shared[re.search(r"(\w+)_proj", name).group(1)] = a.copy()
            f.write(memoryview(bf16(a, bits, out)))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    for side in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # the tiny tokenizer: the
        shutil.copy2(TINY / "mote" / side, tmp / side)  # exporter pads ids 356..151935 as unused [PADi] tokens
    proc = json.loads((TINY / "mote" / "processor_config.json").read_text())
    proc["image_processor"]["size"], proc["patch_size"] = {"height": 112, "width": 112}, 14
    (tmp / "processor_config.json").write_text(json.dumps(proc, indent=1))
    shutil.rmtree(ckpt, ignore_errors=True)  # a folder without model.safetensors is not a cached checkpoint
    os.replace(tmp, ckpt)
    return info | {"cached": False, "write_s": time.perf_counter() - t0}


def check_bf16() -> None:
    """Our rounding equals torch's fp32 -> bf16 cast, ties included."""
    import torch

    x = np.random.default_rng(1).standard_normal(1 << 20, dtype=np.float32)
    x[:4096] = (np.arange(4096, dtype=np.uint32) << 15 | 0x3F800000).view(np.float32)  # exact ties
    got = bf16(x, np.empty(x.size, np.uint32), np.empty(x.size, np.uint16))
    assert np.array_equal(got, torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16))


def part_shapes(cache: Path, threads: int) -> dict:
    check_bf16()
    rows = {}
    for shape, text in SHAPES.items():
        ckpt = cache / shape
        info = write_checkpoint(ckpt, text)
        ffn = text["num_hidden_layers"] * 3 * text["hidden_size"] * text["intermediate_size"]  # weights per FFN copy
        rows[shape] = {"fp16_bytes": 2 * info["params"], "ckpt": info, "variants": {}}
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            for name, (args, bits) in VARIANTS.items():
                gguf = Path(tmp) / "m.gguf"
                # the paper's arithmetic: exactly `bits` per shared weight and 2 per routed weight, no block scales
                paper = {"paper_gb": PAPER_GB.get((shape, bits), "-"), "paper_shared_mib": ffn * bits / 8 / MiB,
                         "paper_routed_mib": 4 * ffn * 2 / 8 / MiB}
                rows[shape]["variants"][name] = export(ckpt, gguf, args) | decode(gguf, Path(tmp), threads) | paper
                for f in Path(tmp).glob("m*.gguf"):
                    f.unlink()  # 1.4-4.4 GiB each; the next variant reuses the name
    runs = [(shape, s, name, r) for shape, s in rows.items() for name, r in s["variants"].items()]
    table("mote-export at real Qwen2.5 shapes (random weights, 4 ternary experts top-1, all layers, bf16 checkpoint)",
          ["shape", "variant", "fp16 size", "export peak RSS (anon / file-backed, sampled 20/s)", "export s", "LLM gguf",
           "mmproj", "decode tok/s (16 tok)", "decode peak RSS (anon)"],
          [[shape, name, f"{s['fp16_bytes'] / GiB:.2f} GiB", f"{r['peak_rss'] / GiB:.2f} GiB ({r['peak_anon'] / GiB:.2f} / "
            f"{r['peak_file'] / GiB:.2f})", f"{r['wall_s']:.0f}", f"{r['llm_bytes'] / GiB:.2f} GiB",
            f"{r['mmproj_bytes'] / MiB:.1f} MiB", f"{r['decode_tok_s']:.1f}",
            f"{r['decode_peak_rss'] / GiB:.2f} GiB ({r['decode_peak_anon'] / GiB:.2f})"] for shape, s, name, r in runs])
    table("Expert memory (shared + routed experts, all layers) vs the paper (its setting: BF16 or INT8 shared, 2-bit experts)",
          ["shape", "variant", "routed types", "routed bpw", "shared + routed", "expert memory", "paper",
           "paper's arithmetic", "shared vs paper", "routed vs 2 bits"],
          [[shape, name, r["routed_types"], f"{r['routed_bpw']:.4f}", f"{r['shared_mib']:.0f} + {r['routed_mib']:.0f} MiB",
            f"{r['expert_gib']:.3f} GiB", f"{r['paper_gb']} GB", f"{(r['paper_shared_mib'] + r['paper_routed_mib']) / 1024:.3f} GiB",
            f"{r['shared_mib'] - r['paper_shared_mib']:+.0f} MiB", f"{r['routed_mib'] - r['paper_routed_mib']:+.0f} MiB"]
           for shape, s, name, r in runs])
    for shape, s, name, r in runs:  # the requirement: export memory well under the model's fp16 size
        print(f"{shape}, {name}: export peak RSS = {100 * r['peak_rss'] / s['fp16_bytes']:.0f}% of the fp16 size (anonymous "
              f"{100 * r['peak_anon'] / s['fp16_bytes']:.0f}%, file-backed/mapped {100 * r['peak_file'] / s['fp16_bytes']:.0f}%)")
    return rows


def _walk(d: dict):
    for k, v in d.items():
        yield from _walk(v) if isinstance(v, dict) else [(k, v)]


def main():
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("all", "parity", "shapes"), default="all")
    p.add_argument("--out", default="bench-out/gguf_report", help="JSON report folder")
    p.add_argument("--cache", default="bench-out/ckpt", help="generated real-shape checkpoints (reused)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.decode_child:
        return decode_child(a.decode_child, 16, a.threads)
    t0, report = time.perf_counter(), {"argv": sys.argv[1:], "machine": os.uname().machine, "cpus": os.cpu_count()}
    if a.part in ("all", "parity"):
        report["parity"] = part_parity(a.threads)
    if a.part in ("all", "shapes"):
        Path(a.cache).mkdir(parents=True, exist_ok=True)
        report["shapes"] = part_shapes(Path(a.cache), a.threads)
    report["wall_s"] = time.perf_counter() - t0
    loads = [v for k, v in _walk(report) if k.endswith("load_1m_before")]
    print(f"1-min load average before the timed children: {min(loads):.2f} to {max(loads):.2f} "
          f"(on {os.cpu_count()} cores; it counts this report's own children too, so read it only as a hint of contention)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf_report.json.tmp").write_text(json.dumps(report, indent=1, default=str))
    os.replace(out / "gguf_report.json.tmp", out / "gguf_report.json")
    print(f"\nwall time {report['wall_s']:.0f} s; JSON: {out / 'gguf_report.json'}")


if __name__ == "__main__":
    main()

"""mote-bench's report: summary statistics and the roofline, DIR/bench.json, DIR/bench.md and two plots.

Roofline: decode is memory-bound, so a model cannot decode faster than bandwidth / (bytes of weights
one token reads); the read bandwidth is the best of the runs measured before and after the models.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

MIB, GIB = 2 ** 20, 2 ** 30
TIMED = ("encode_s", "ttft_s", "prefill_tok_s", "decode_tok_s")
# DESIGN.md 1: expert memory (shared + routed, all layers, GiB), paper: MoE-LLaVA 4 x BF16 / MoTE BF16 + 2-bit
PAPER_GIB = {"qwen2.5-0.5b": (2.3, 0.9), "qwen2.5-1.5b": (8.6, 3.2), "qwen2.5-3b": (18.1, 6.8)}
COLORS = {"mote": "tab:blue", "moe-llava": "tab:orange", "dense": "tab:gray", None: "tab:green"}
# engine (an ONNX row: with its body) -> marker in the memory / decode plot
MARKERS = {"llama.cpp": "o", "mote": "s", "onnxruntime exact": "^", "onnxruntime fast": "v", "onnxruntime": "D"}
PROFILE_ROWS = 12  # op types listed in the profile table (the rest summed)


def summarize(report: dict) -> None:
    """Adds min / median / max of every timed metric and the roofline figures to each model, in place."""
    read_gbs = max(b["read_gbs"] for b in report["bandwidth"])
    report["roofline_read_gbs"] = read_gbs
    for m in report["models"]:
        m["stats"] = {k: {"min": min(v), "median": statistics.median(v), "max": max(v)}
                      for k in TIMED for v in [[r[k] for r in m["rounds"]]]}
        m["roofline_tok_s"] = read_gbs * 1e9 / m["bytes_per_token"]
        m["decode_fraction_of_bound"] = m["stats"]["decode_tok_s"]["median"] / m["roofline_tok_s"]


def _cell(stat: dict, fmt: str) -> str:
    return f"{stat['median']:{fmt}} ({stat['min']:{fmt}}-{stat['max']:{fmt}})"


def _family(m: dict) -> str | None:
    return m["spec"]["variant"] if m.get("spec") else None


def _engine(m: dict) -> str:
    """A row's engine, an onnxruntime row's with the body of its ternary experts (MoTE only: the other
    models' exports have no body)."""
    e = m.get("engine", "llama.cpp")
    return f"{e} {m['body']}" if m.get("body") and _family(m) == "mote" else e


def markdown(r: dict) -> str:
    f, s = r["machine"], r["settings"]
    first = r["models"][0]["rounds"][0]
    title = f"preset `{r['preset']}` (random weights)" if r["preset"] else "GGUF files"
    mem = f"{f['memory_bytes'] / GIB:.1f} GiB" if f.get("memory_bytes") else "memory unknown"
    bw = "; ".join(f"{'before' if i == 0 else 'after'}: read {b['read_gbs']:.1f} GB/s, copy {b['copy_gbs']:.1f} GB/s"
                   for i, b in enumerate(r["bandwidth"]))
    lines = [
        f"# mote-bench: {title}", "",
        f"Machine: {f['cpu']} ({f['arch']}), {f['cores']} cores ({f['cores_usable']} usable), {mem}, {f['os']}; "
        f"llama-cpp-python {f['llama_cpp_python']} ({f['llama_cpp_system_info']}); gguf {f['gguf']}, numpy {f['numpy']}"
        + (f", onnxruntime {f['onnxruntime']}." if "onnxruntime" in s.get("engines", []) else "."),
        f"Memory bandwidth, numpy, {r['bandwidth'][0]['processes']} processes: {bw}. "
        f"Roofline uses read {r['roofline_read_gbs']:.1f} GB/s.",
        f"Settings: {s['threads']} threads; per model, in its own process: {s['warmup']} warm-up pass(es) (image "
        f"encode, 64-token prefill, 4 decode steps) and {s['repeats']} timed round(s); {s['n_gen']} greedy tokens decoded per round; seed {s['seed']}; one image "
        f"({first['image_tokens']} image tokens, {first['prompt_tokens']} prompt tokens in all).",
        f"Timed cells: median (min-max). Command: `{' '.join(r['command'])}`; wall time {r['wall_s'] / 60:.1f} min.",
    ]
    lines += [f"Note: {n}" for n in r["notes"]]
    # our own llama.cpp threads make a load of about `threads`; well beyond that, another job was running
    busy = [m["name"] for m in r["models"] if max(m["load_average_at_end"] or [0]) > s["threads"] + 1]
    if busy:
        lines.append(f"Note: the machine was busy (1-min load average above {s['threads'] + 1} at the end) while "
                     f"measuring {', '.join(busy)}: their speeds may be low.")
    l3 = f.get("l3_cache_bytes")
    cached = [m["name"] for m in r["models"] if l3 and m["bytes_per_token"] < l3]
    if cached:
        lines.append(f"Note: {', '.join(cached)} read(s) less per token than the {l3 / MIB:.0f} MiB last-level "
                     "cache holds: the DRAM roofline does not bound them.")
    if "mote" in s.get("engines", []):
        lines.append("Note: the roofline bound of every GGUF row is the file's bytes read per token, as llama.cpp reads "
                     "them in place; the mote engine repacks some tensors at load (e.g. ternary experts into int8 "
                     "codes: `engine_report.repacked_by` in bench.json), so its per-token reads, and its true "
                     "bound, differ: its decode / bound compares it with the same file's bound.")
    if "onnxruntime" in s.get("engines", []):
        lines.append("Note: onnxruntime rows run an ONNX export folder (mote-export --format onnx) of the same "
                     "checkpoint, one per --onnx-kernels body for MoTE (exact: int8 ternary codes, MatMulInteger; "
                     "fast: 2-bit codes, MatMulNBits); the row label says the types the folder holds. Its file size "
                     "is the whole folder, vision tower included (a GGUF row's tower is the separate mmproj, not "
                     "counted); its bound counts decoder.onnx's initializers a token reads, active experts only.")
        widened = [f"{m['name']} {m['widened_bytes'] / MIB:.1f} MiB" for m in r["models"] if m.get("widened_bytes")]
        if widened:
            lines.append("Note: onnxruntime folds the graph's Cast of each f16 weight into an fp32 copy at load, so "
                         "those weights sit in memory twice and every token reads the fp32 copy (the bound counts "
                         f"it): {', '.join(widened)} of such copies.")
    lines += ["", f"## Speed ({', '.join(s.get('engines', ['llama.cpp']))}, CPU)", "",
              "| model | vision encode s | time to first token s (image) | prefill tok/s | decode tok/s "
              "| roofline bound tok/s | decode / bound |", "|---|---|---|---|---|---|---|"]
    for m in r["models"]:
        st = m["stats"]
        lines.append(f"| {m['name']} | {_cell(st['encode_s'], '.2f')} | {_cell(st['ttft_s'], '.2f')} | "
                     f"{_cell(st['prefill_tok_s'], '.1f')} | {_cell(st['decode_tok_s'], '.1f')} | "
                     f"{m['roofline_tok_s']:.1f} | {100 * m['decode_fraction_of_bound']:.0f}% |")
    lines += ["", "## Memory", "",
              "| model | what | file MiB | expert memory MiB (shared + routed) | types written (shared / routed) "
              "| weights read per token MiB | peak RSS after load MiB | peak RSS generating MiB |",
              "|---|---|---|---|---|---|---|---|"]
    mixed = []
    for m in r["models"]:
        g = m["group_bytes"]
        shared = g.get("shared", 0) + g.get("ffn", 0)
        onnx = m.get("engine") == "onnxruntime"  # its types leave out 1-D tensors already; F32 is a choice there
        types = {k: [t for t in m["group_types"].get(k, []) if onnx or t != "F32"] for k in ("shared", "ffn", "routed")}
        if any(len(v) > 1 for v in types.values()):
            mixed.append(m["name"])
        what = m["spec"]["label"] if m.get("spec") else m["arch"]
        lines.append(f"| {m['name']} | {what} | {m['file_bytes'] / MIB:.1f} | {m['expert_bytes'] / MIB:.1f} "
                     f"({shared / MIB:.1f} + {g.get('routed', 0) / MIB:.1f}) | "
                     f"{', '.join(types['shared'] + types['ffn']) or '-'} / {', '.join(types['routed']) or '-'} | "
                     f"{m['bytes_per_token'] / MIB:.1f} | {m['rss_load'] / MIB:.0f} | {m['rss_peak'] / MIB:.0f} |")
    if mixed:
        lines += ["", f"Mixed types in {', '.join(mixed)}: rows whose width a type's block does not divide are "
                  "written in a fallback type by mote-export (ternary -> exact Q2_0, or Q4_0 / F16 for narrower blocks; K-quants -> F16), e.g. "
                  "Qwen2.5-0.5B's 896-wide gate/up rows; the memory figures above are what the files hold."]
    if r["preset"] in PAPER_GIB:
        moe, mote = PAPER_GIB[r["preset"]]
        lines += ["", f"Paper (DESIGN.md 1), expert memory at this shape: MoE-LLaVA 4 x BF16 {moe} GiB, MoTE BF16 "
                  f"shared + 2-bit experts {mote} GiB (real formats add block scales; Qwen2.5-0.5B's 896-wide "
                  "gate/up experts fall back to exact Q2_0, 2.25 bpw)."]
    lines += ["", "Expert memory: routed + shared expert tensors (a dense model: its FFN). Weights read per token: "
              "attention, norms, routers, shared expert, top-k / n_expert of the routed experts, output head, one "
              "embedding row (from the GGUF tensor sizes; an onnxruntime row: decoder.onnx's initializers). "
              "Prefill tok/s: prompt tokens / (time to first token - "
              "vision encode)."]
    lines += _against_llama_cpp(r) + _profile_tables(r)
    return "\n".join(lines) + "\n"


def _against_llama_cpp(r: dict) -> list[str]:
    """Decode speed of every onnxruntime row against the llama.cpp row of the same checkpoint (the issue's
    target: the fast export decodes at least as fast as llama.cpp on the same checkpoint)."""
    llama = {m.get("model"): m for m in r["models"] if m.get("engine") == "llama.cpp"}
    pairs = [(m, llama[m.get("model")]) for m in r["models"] if m.get("engine") == "onnxruntime" and m.get("model") in llama]
    if not pairs:
        return []
    out = ["", "## onnxruntime against llama.cpp on the same checkpoint (median decode tok/s)", "",
           "| model | engine | onnxruntime tok/s | llama.cpp tok/s | onnxruntime / llama.cpp |",
           "|---|---|---|---|---|"]
    for m, ref in pairs:
        a, b = m["stats"]["decode_tok_s"]["median"], ref["stats"]["decode_tok_s"]["median"]
        out.append(f"| {m['model']} | {_engine(m)} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    return out


def _profile_tables(r: dict) -> list[str]:
    """--ort-profile: milliseconds of one decoded token by part of the model and by op type, per onnxruntime row."""
    ms = [m for m in r["models"] if m.get("ort_profile")]
    if not ms:
        return []
    n = ms[0]["ort_profile"]["tokens"]
    head = "| " + " | ".join(m["name"] for m in ms) + " |"
    rule = "|---" * (len(ms) + 1) + "|"
    out = ["", "## Where a decoded token's time goes (onnxruntime profiler, --ort-profile)", "",
           f"Milliseconds per decoded token, the mean of {n} greedy tokens after the image question, in a second "
           "session whose decoder runs under onnxruntime's profiler (SessionOptions.enable_profiling; the profiler "
           "adds some time: compare the unprofiled decode ms row). Parts from the exporter's node names; nodes "
           "onnxruntime names itself (the ternary ops' inlined function bodies, its layout transposes) count in "
           "the part of the node before them.", "", "| part " + head, rule]
    parts = sorted({k for m in ms for k in m["ort_profile"]["part_ms"]},
                   key=lambda k: -max(m["ort_profile"]["part_ms"].get(k, 0) for m in ms))
    for k in parts:
        out.append(f"| {k} | " + " | ".join(f"{m['ort_profile']['part_ms'].get(k, 0):.2f}" for m in ms) + " |")
    out.append("| all nodes | " + " | ".join(f"{m['ort_profile']['nodes_ms']:.2f}" for m in ms) + " |")
    out.append("| decoder run (profiled) | " + " | ".join(f"{m['ort_profile']['run_ms']:.2f}" for m in ms) + " |")
    out.append("| decode step, unprofiled (1 / median tok/s) | "
               + " | ".join(f"{1e3 / m['stats']['decode_tok_s']['median']:.2f}" for m in ms) + " |")
    ops = sorted({k for m in ms for k in m["ort_profile"]["op_ms"]},
                 key=lambda k: -max(m["ort_profile"]["op_ms"].get(k, 0) for m in ms))
    out += ["", "| op type " + head, rule]
    for k in ops[:PROFILE_ROWS]:
        out.append(f"| {k} | " + " | ".join(f"{m['ort_profile']['op_ms'].get(k, 0):.2f}" for m in ms) + " |")
    if len(ops) > PROFILE_ROWS:
        rest = [sum(v for k, v in m["ort_profile"]["op_ms"].items() if k not in ops[:PROFILE_ROWS]) for m in ms]
        out.append(f"| {len(ops) - PROFILE_ROWS} other op types | " + " | ".join(f"{x:.2f}" for x in rest) + " |")
    return out


def _label_offsets(ax, points: list[tuple[str, float, float]]) -> list[tuple[str, float, float, int]]:
    """Vertical offsets (points) so that labels of nearby markers do not print over each other: a
    label whose box would overlap one already placed moves down a line until it is clear."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    width_pt, height_pt = (ax.figure.get_size_inches() * 72 * [ax.get_position().width, ax.get_position().height])
    placed, out = [], []
    for name, x, y in sorted(points, key=lambda p: -p[2]):
        px, py = (x - x0) / (x1 - x0) * width_pt, (y - y0) / (y1 - y0) * height_pt
        dy, w = 4, 5 * len(name)  # ~5 pt per character at fontsize 8
        while any(abs(py + dy - qy) < 10 and px < qx + qw and qx < px + w for qx, qy, qw in placed):
            dy -= 10
        placed.append((px, py + dy, w))
        out.append((name, x, y, dy))
    return out


def plots(r: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ms = r["models"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    points = []
    for m in ms:
        d = m["stats"]["decode_tok_s"]
        x = m["rss_peak"] / GIB
        ax.errorbar(x, d["median"], yerr=[[d["median"] - d["min"]], [d["max"] - d["median"]]],
                    fmt=MARKERS.get(_engine(m), "o"),
                    color=COLORS[_family(m)], capsize=3)
        points.append((m["name"], x, d["median"]))
    for name, x, y, dy in _label_offsets(ax, points):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, dy), fontsize=8)
    for fam, color in COLORS.items():
        if any(_family(m) == fam for m in ms):
            ax.scatter([], [], color=color, label=fam or "GGUF file")
    engines = list(dict.fromkeys(_engine(m) for m in ms))
    if len(engines) > 1:
        for e in engines:
            ax.scatter([], [], color="black", marker=MARKERS.get(e, "o"), label=f"engine {e}")
    ax.set_xlabel("peak RSS while generating (GiB)")
    ax.set_ylabel("decode tokens/s (median, min-max)")
    ax.set_title(f"Memory vs decode speed ({r['preset'] or 'GGUF files'}, {r['settings']['threads']} threads)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    p1 = out / "memory_vs_decode.png"
    _save(fig, p1)

    ms = list({m["path"]: m for m in ms}.values())  # one bar per file (or ONNX folder), whatever the engines
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(ms) + 1.5))
    names = [m.get("model", m["name"]) + (f" [{_engine(m)}]" if m.get("body") else "") for m in ms][::-1]
    shared = [(m["group_bytes"].get("shared", 0) + m["group_bytes"].get("ffn", 0)) / MIB for m in ms][::-1]
    routed = [m["group_bytes"].get("routed", 0) / MIB for m in ms][::-1]
    ax.barh(names, shared, color="tab:gray", label="shared expert / dense FFN")
    ax.barh(names, routed, left=shared, color="tab:blue", label="routed experts")
    for i, (a, b) in enumerate(zip(shared, routed)):
        ax.text(a + b, i, f" {a + b:.0f}" if a + b >= 100 else f" {a + b:.1f}", va="center", fontsize=8)
    ax.set_xlabel("expert memory (MiB)")
    ax.set_title(f"Expert memory by model ({r['preset'] or 'GGUF files'})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    p2 = out / "expert_memory.png"
    _save(fig, p2)
    return [p1, p2]


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_report(report: dict, out: Path) -> str:
    """Writes bench.json, bench.md and the plots into `out` (created); returns the markdown."""
    summarize(report)
    out.mkdir(exist_ok=True)
    md = markdown(report)
    _write_text(out / "bench.json", json.dumps(report, indent=1, default=str))
    _write_text(out / "bench.md", md)
    written = plots(report, out)
    return md + "\n" + "\n".join(f"wrote {p}" for p in [out / "bench.json", out / "bench.md", *written])

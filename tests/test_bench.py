"""mote-bench and its random-weight checkpoints: the writer against mote_edge's own checkpoints, a short
tiny-preset run (report files, plausible values, the cache), GGUF byte accounting, and bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mote_edge.checkpoint import load_model, save_model
from mote_edge.config import MoTEConfig
from mote_edge.benchmarks import bench
from mote_edge.benchmarks.random_ckpt import Preset, moe_settings, preset, tensor_specs, write_checkpoint
from mote_edge.model import apply_mote_
from mote_edge.tiny import dense_config

# Non-default values everywhere the Qwen2.5 presets differ from the tiny one (RoPE base, context,
# an image that is not a multiple of the patch, like SigLIP so400m's 384 / 14), at test size.
SMALL = Preset("small", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=40, patch_size=16, vision_use_head=False),
               dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True),
               400)


def _mote_edge_ckpt(p: Preset, variant: str, out: Path) -> list[str]:
    """The same shape built the project's way: tiny.dense_config + transformers + apply_mote_ + save_model."""
    from transformers import LlavaForConditionalGeneration

    tiny = json.loads((Path(__file__).parents[1] / "mote_edge" / "assets" / "tiny" / "mote" / "config.json").read_text())
    cfg = dense_config(p.vision, p.text, p.vocab, tiny["image_token_index"], tiny["text_config"]["eos_token_id"],
                       tiny["text_config"]["pad_token_id"])
    model = LlavaForConditionalGeneration(cfg)
    mote = moe_settings(variant, p.text["num_hidden_layers"])
    if mote:
        apply_mote_(model, MoTEConfig.from_dict(mote), init="random")
    save_model(model, out, dtype=torch.bfloat16)
    return [k for k in model.state_dict() if k != "lm_head.weight"]  # tied: stored once, as the embedding


# Library metadata, not meaning: the random writer (torch-free) records the version the tiny checkpoint was
# saved with, mote_edge the installed one; a transformers release must not fail the comparison.
METADATA = {"transformers_version"}


def _semantics(cfg):
    """A config.json without library metadata, nested configs included."""
    if isinstance(cfg, dict):
        return {k: _semantics(v) for k, v in cfg.items() if k not in METADATA}
    return cfg


def _shapes(path: Path) -> dict:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118 (not iterable)


@pytest.mark.parametrize("variant", ["dense", "mote", "moe-llava"])
@pytest.mark.parametrize("shape", ["tiny", "small"])
def test_random_checkpoint_matches_mote_edge(variant, shape, tmp_path):
    p = preset("tiny") if shape == "tiny" else SMALL
    ref = tmp_path / "ref"
    order = _mote_edge_ckpt(p, variant, ref)
    got = Path(write_checkpoint(tmp_path / "rand", p, variant, progress=False)["path"])
    assert _shapes(got) == _shapes(ref)
    assert [n for n, _ in tensor_specs(p, moe_settings(variant, p.text["num_hidden_layers"]))] == order
    for name in ("config.json", "generation_config.json"):
        assert _semantics(json.loads((got / name).read_text())) == _semantics(json.loads((ref / name).read_text())), name
    model = load_model(got)  # every tensor present, nothing unexpected, shapes right
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 7]])).logits
    assert torch.isfinite(logits).all()
    proc = json.loads((got / "processor_config.json").read_text())
    assert proc["image_processor"]["size"]["height"] == p.vision["image_size"]
    assert proc["patch_size"] == p.vision["patch_size"]


def test_random_checkpoint_values_and_bad_input(tmp_path):
    p = preset("tiny")
    write_checkpoint(tmp_path / "a", p, "mote", progress=False)
    write_checkpoint(tmp_path / "b", p, "mote", progress=False)
    m = load_model(tmp_path / "a")
    sd = m.state_dict()
    w = sd["model.language_model.layers.0.mlp.experts.1.gate_proj.weight"]
    assert 0.015 < w.float().std() < 0.025 and not torch.equal(w, sd["model.language_model.layers.0.mlp.experts.2.gate_proj.weight"])
    assert torch.all(sd["model.language_model.norm.weight"] == 1)
    assert torch.all(sd["model.language_model.layers.0.self_attn.q_proj.bias"] == 0)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    from mote_edge.exporters.errors import MoteExportError

    with pytest.raises(MoteExportError, match="already exists"):
        write_checkpoint(tmp_path / "a", p, "mote", progress=False)
    with pytest.raises(MoteExportError, match="unknown variant"):
        write_checkpoint(tmp_path / "c", p, "moe", progress=False)
    with pytest.raises(MoteExportError, match="unknown preset"):
        preset("qwen2.5-7b")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a", "b"]  # nothing half-written


def test_real_presets_have_qwen25_and_so400m_shapes():
    p = preset("qwen2.5-1.5b")
    assert (p.text["hidden_size"], p.text["intermediate_size"], p.text["num_hidden_layers"],
            p.text["num_attention_heads"], p.text["num_key_value_heads"], p.vocab) == (1536, 8960, 28, 12, 2, 151936)
    assert (p.vision["hidden_size"], p.vision["intermediate_size"], p.vision["num_hidden_layers"],
            p.vision["num_attention_heads"], p.vision["image_size"], p.vision["patch_size"]) == (1152, 4304, 27, 16, 384, 14)
    assert preset("qwen2.5-0.5b", vision_layers=6).vision["num_hidden_layers"] == 6
    n = sum(int(np.prod(s)) for _, s in tensor_specs(p, moe_settings("mote", 28)))
    ffn = 28 * 3 * 1536 * 8960
    assert n == 5 * ffn + sum(int(np.prod(s)) for _, s in tensor_specs(p, None)) - ffn + 28 * 4 * 1536


def test_mmproj_for_an_image_not_a_multiple_of_the_patch(tmp_path):
    """SigLIP so400m: 384 px / 14 = 27 patches a side, the rest cropped. llama.cpp's embeddings match
    transformers' for such a tower (here 40 px / 16)."""
    pytest.importorskip("llama_cpp")
    from mote_edge.runtime_cpu.llama_engine import image_embeddings, load

    from .test_mmproj_run import _export, _torch_image_features

    ckpt = Path(write_checkpoint(tmp_path / "c", SMALL, "dense", progress=False)["path"])
    llm = load(_export(ckpt, tmp_path / "m.gguf"), n_threads=2)
    img = Path(bench._default_image()[0])
    got, want = image_embeddings(llm, img), _torch_image_features(ckpt, img)
    assert got.shape == want.shape == (4, SMALL.text["hidden_size"])
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.999


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    return exc.value.code, capsys.readouterr()


MODELS = "mote-tq2_0-bf16,mote-tq1_0-q4_k,moe-llava-f16,moe-llava-q3_k,dense"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One short mote-bench run on the tiny preset: (output folder, cache folder, what it printed)."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("matplotlib")
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("bench")
    out, cache, printed = tmp / "out", tmp / "cache", io.StringIO()
    with contextlib.redirect_stdout(printed):
        bench.main(["--preset", "tiny", "--models", MODELS, "--cache", str(cache), "--out", str(out),
                    "--repeats", "2", "--warmup", "1", "--n-gen", "8", "--threads", "2"])
    return out, cache, printed.getvalue()


def test_mote_bench_tiny_preset(tiny_run):
    out, cache, printed = tiny_run
    r = json.loads((out / "bench.json").read_text())
    md = (out / "bench.md").read_text()
    assert md in printed and "| mote-tq2_0-bf16 |" in md and "Memory bandwidth" in md
    for png in ("memory_vs_decode.png", "expert_memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    models = {m["name"]: m for m in r["models"]}
    assert list(models) == MODELS.replace("dense", "dense-bf16").split(",")
    assert {b["job"].split()[0] for b in r["build"]} == {"checkpoint", "export", "mmproj"}
    for name, m in models.items():
        path = Path(m["path"])
        assert path.is_file() and m["file_bytes"] == path.stat().st_size
        assert sum(m["group_bytes"].values()) < m["file_bytes"]  # the rest: header, vocabulary, alignment
        assert 0 < m["bytes_per_token"] <= sum(m["group_bytes"].values())
        assert len(m["rounds"]) == 2 and all(x["decode_tok_s"] > 0 and x["prefill_tok_s"] > 0 for x in m["rounds"])
        assert all(x["image_tokens"] == 36 and 0 < x["encode_s"] < x["ttft_s"] for x in m["rounds"])
        assert 0 < m["rss_load"] <= m["rss_peak"]
        assert m["roofline_tok_s"] > 0 and m["decode_fraction_of_bound"] > 0
        assert m["stats"]["decode_tok_s"]["min"] <= m["stats"]["decode_tok_s"]["median"] <= m["stats"]["decode_tok_s"]["max"]
    f16 = models["moe-llava-f16"]
    for name in ("mote-tq2_0-bf16", "mote-tq1_0-q4_k"):
        assert models[name]["file_bytes"] < f16["file_bytes"] and models[name]["expert_bytes"] < f16["expert_bytes"]
        assert models[name]["group_types"]["routed"] == [name.split("-")[1].upper()]
    assert models["mote-tq1_0-q4_k"]["file_bytes"] < models["mote-tq2_0-bf16"]["file_bytes"]
    assert "shared" not in f16["group_bytes"] and f16["group_bytes"]["padding"] > 0  # zeros, not an expert
    m, g = models["mote-tq2_0-bf16"], models["mote-tq2_0-bf16"]["group_bytes"]
    assert (m["experts"], m["top_k"]) == (4, 1)  # per token: 1 of 4 routed experts, one embedding row
    assert m["bytes_per_token"] == sum(g.values()) - g["token_embd"] + g["token_embd"] // 356 - g["routed"] * 3 // 4
    # MoTE-bf16 is the dense model plus routers and routed experts; dense reads its whole FFN per token
    assert models["mote-tq2_0-bf16"]["group_bytes"]["shared"] == models["dense-bf16"]["group_bytes"]["ffn"]
    assert r["roofline_read_gbs"] > 0 and r["machine"]["cores"] >= 1 and r["machine"]["llama_cpp_python"]
    assert not list(cache.glob("*/ckpt-*"))  # checkpoints go once their GGUFs exist

    # a second run reuses the cached files: nothing is built
    bench.main(["--preset", "tiny", "--models", "mote-tq2_0-bf16", "--cache", str(cache), "--out", str(out),
                "--repeats", "1", "--warmup", "0", "--n-gen", "4"])
    again = json.loads((out / "bench.json").read_text())
    assert again["build"] == [] and again["models"][0]["path"] == models["mote-tq2_0-bf16"]["path"]
    assert r["settings"]["engines"] == ["llama.cpp"] and {m["engine"] for m in r["models"]} == {"llama.cpp"}
    assert "## Speed (llama.cpp, CPU)" in md


def test_mote_bench_measures_given_gguf_files(tiny_run, tmp_path):
    model = tiny_run[1] / "tiny" / "dense-bf16.gguf"
    bench.main([str(model), "--mmproj", str(model.with_name("mmproj.gguf")), "--out", str(tmp_path / "b"),
                "--repeats", "1", "--warmup", "0", "--n-gen", "2"])
    r = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert [m["name"] for m in r["models"]] == ["dense-bf16"] and r["models"][0]["spec"] is None
    assert r["models"][0]["group_bytes"]["ffn"] > 0 and "| dense-bf16 | qwen2 |" in (tmp_path / "b" / "bench.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--preset", "qwen2.5-7b"], "unknown preset 'qwen2.5-7b'"),
    (["missing.gguf"], "model file 'missing.gguf' does not exist"),
    (["--preset", "tiny", "--models", "mote-tq3"], "--models: unknown model 'mote-tq3'"),
    (["--preset", "tiny", "--out", "no/such/dir/out"], "output folder's parent 'no/such/dir' does not exist"),
    ([], "give either --preset NAME or GGUF files"),
    (["--preset", "tiny", "--repeats", "0"], "--repeats must be at least 1"),
    (["--preset", "tiny", "--other-type", "tq2_0"], "--other-type tq2_0"),
    (["--preset", "tiny", "--vision-layers", "9"], "--vision-layers 9"),
    (["--preset", "tiny", "--engines", "llama.cpp,tensorrt"], "--engines 'llama.cpp,tensorrt'; accepted: "),
])
def test_bad_input_is_one_error_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, cap = _run(argv + ["--cache", str(tmp_path / "cache")], capsys)
    err = cap.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []  # no report folder, no cache


def test_plot_labels_of_coinciding_points_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mote_edge.benchmarks.bench_report import _label_offsets

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    points = [("a-long-name", 5.0, 5.0), ("b-long-name", 5.05, 5.02), ("c", 9.0, 1.0)]
    offsets = {name: dy for name, _, _, dy in _label_offsets(ax, points)}
    assert abs(offsets["a-long-name"] - offsets["b-long-name"]) >= 10  # one line apart at least
    assert offsets["c"] == 4  # a lone point keeps the default place
    plt.close(fig)


def test_mote_bench_both_engines_side_by_side(tmp_path):
    """--engines mote,llama.cpp: every model measured by both engines on the same file, one row each."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("matplotlib")
    import contextlib
    import io

    out, cache, printed = tmp_path / "out", tmp_path / "cache", io.StringIO()
    with contextlib.redirect_stdout(printed):
        bench.main(["--preset", "tiny", "--models", "mote-tq2_0-bf16,dense", "--cache", str(cache), "--out", str(out),
                    "--engines", "mote,llama.cpp", "--repeats", "1", "--warmup", "0", "--n-gen", "4", "--threads", "2"])
    r = json.loads((out / "bench.json").read_text())
    md = (out / "bench.md").read_text()
    assert r["settings"]["engines"] == ["mote", "llama.cpp"] and "## Speed (mote, llama.cpp, CPU)" in md
    rows = {(m["model"], m["engine"]): m for m in r["models"]}
    assert list(rows) == [(n, e) for n in ("mote-tq2_0-bf16", "dense-bf16") for e in ("mote", "llama.cpp")]
    for (name, engine), m in rows.items():
        assert m["name"] == f"{name} [{engine}]" and f"| {name} [{engine}] |" in md
        assert len(m["rounds"]) == 1
        x = m["rounds"][0]
        assert x["decode_tok_s"] > 0 and x["prefill_tok_s"] > 0 and x["image_tokens"] == 36
        assert 0 <= x["encode_s"] < x["ttft_s"] and x["prompt_tokens"] > 36
        assert 0 < m["rss_load"] <= m["rss_peak"] and m["n_ctx"] > x["prompt_tokens"]
        assert m["roofline_tok_s"] > 0 and m["decode_fraction_of_bound"] > 0
        assert m["path"] == rows[(name, "llama.cpp")]["path"]  # the same file for both engines
    # both engines see the same prompt: the chat template, the image's 36 positions, the question
    for name in ("mote-tq2_0-bf16", "dense-bf16"):
        assert rows[(name, "mote")]["rounds"][0]["prompt_tokens"] == rows[(name, "llama.cpp")]["rounds"][0]["prompt_tokens"]
    assert rows[("mote-tq2_0-bf16", "mote")]["engine_report"]["variant"] == "mote"
    assert "repacks some tensors at load" in md
    for png in ("memory_vs_decode.png", "expert_memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name, spec in (("mote-tq2_0-bf16", bench.MODELS["mote-tq2_0-bf16"]), ("dense-bf16", bench.MODELS["dense-bf16"])):
        assert not bench.stale_routed_types(Path(rows[(name, "mote")]["path"]), spec)  # fresh files have mote.*


def test_cached_moe_file_without_mote_keys_is_rebuilt(tmp_path):
    """An older mote-export's qwen2moe file (no mote.* keys: the mote engine refuses it) is stale for
    mote-bench's cache, as a file with outdated routed types is; a dense qwen2 file needs no keys."""
    from gguf import GGUFWriter

    path = tmp_path / "old.gguf"
    w = GGUFWriter(str(path), "qwen2moe")
    w.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((4, 64, 256), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for model in ("mote-tq2_0-bf16", "moe-llava-f16"):
        assert bench.stale_routed_types(path, bench.MODELS[model])
    assert not bench.stale_routed_types(path, bench.MODELS["dense-bf16"])
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    assert bench.stale_routed_types(tmp_path / "bad.gguf", bench.MODELS["moe-llava-f16"])

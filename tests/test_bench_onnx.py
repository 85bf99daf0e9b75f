"""mote-bench --engines onnxruntime on the tiny preset: ONNX folders exported from the checkpoints the GGUFs come
from, measured beside llama.cpp on the same checkpoint (rows, figures, byte accounting against onnx's own loader,
the report's tables, the profiler's breakdown), the cache (a partial or stale folder is rebuilt), and bad input."""
import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mote_edge.benchmarks import bench

pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")
pytest.importorskip("matplotlib")

MODELS = "mote-tq2_0-q8_0,dense"
N_GEN = 4


def _bench(argv) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        bench.main(argv)
    return printed.getvalue()


@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory):
    """One run: two models, llama.cpp and onnxruntime (both bodies), the profiler on: (report, markdown,
    printed, cache folder)."""
    tmp = tmp_path_factory.mktemp("bench-onnx")
    out, cache = tmp / "out", tmp / "cache"
    printed = _bench(["--preset", "tiny", "--models", MODELS, "--engines", "onnxruntime,llama.cpp", "--ort-profile",
                      "--cache", str(cache), "--out", str(out), "--repeats", "2", "--warmup", "1",
                      "--n-gen", str(N_GEN), "--threads", "2"])
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text(), printed, cache, out


def _disk_bytes(folder: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def _decoder_tensors(folder: Path) -> dict[str, np.ndarray]:
    """decoder.onnx's initializers with their data, as onnx itself loads them (external data included)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(folder / "decoder.onnx"), load_external_data=True)
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _folded_at_load(folder: Path, tmp: Path) -> int:
    """Bytes of the weights onnxruntime itself makes at load (its optimized decoder's fp32 initializers that the
    stored decoder lacks: casts of stored weights folded into copies)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    so = ort.SessionOptions()
    so.log_severity_level, so.optimized_model_filepath = 3, str(tmp / "optimized.onnx")
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
    ort.InferenceSession(str(folder / "decoder.onnx"), so, providers=["CPUExecutionProvider"])
    stored = {t.name for t in onnx.load(str(folder / "decoder.onnx"), load_external_data=False).graph.initializer}
    made = [numpy_helper.to_array(t) for t in onnx.load(str(tmp / "optimized.onnx")).graph.initializer
            if t.name not in stored]
    return sum(a.nbytes for a in made if a.dtype == np.float32 and a.ndim >= 2)


def test_onnx_rows_beside_llama_cpp(onnx_run, tmp_path):
    from mote_edge.benchmarks.bench_models import onnx_types
    from mote_edge.benchmarks.random_ckpt import preset

    r, _, _, cache, _ = onnx_run
    rows = {(m["model"], m["engine"], m["body"]): m for m in r["models"]}
    assert list(rows) == [("mote-tq2_0-q8_0", "onnxruntime", "exact"), ("mote-tq2_0-q8_0", "onnxruntime", "fast"),
                          ("mote-tq2_0-q8_0", "llama.cpp", None), ("dense-bf16", "onnxruntime", "exact"),
                          ("dense-bf16", "llama.cpp", None)]  # a model without ternary experts: one ONNX export
    assert r["settings"]["onnx_kernels"] == ["exact", "fast"] and r["machine"]["onnxruntime"]
    assert {b["job"] for b in r["build"]} == {
        "checkpoint mote", "checkpoint dense", "export mote-tq2_0-q8_0", "export dense-bf16", "mmproj",
        "onnx mote-tq2_0-q8_0.onnx-exact", "onnx mote-tq2_0-q8_0.onnx-fast", "onnx dense-bf16.onnx-exact"}
    assert not list(cache.glob("*/ckpt-*"))  # the checkpoint goes once its GGUF and ONNX folders exist
    for (name, engine, body), m in rows.items():
        for x in m["rounds"]:
            assert x["decode_tok_s"] == pytest.approx(N_GEN / x["decode_s"]) and x["decode_tok_s"] > 0
            assert x["prefill_tok_s"] == pytest.approx(x["prompt_tokens"] / (x["ttft_s"] - x["encode_s"]))
            assert 0 < x["encode_s"] < x["ttft_s"] and x["image_tokens"] == 36
            # the same prompt as llama.cpp renders it: chat template, the image's 36 positions, the question
            assert x["prompt_tokens"] == rows[(name, "llama.cpp", None)]["rounds"][0]["prompt_tokens"]
        assert 0 < m["rss_load"] <= m["rss_peak"] and m["roofline_tok_s"] > 0 and m["decode_fraction_of_bound"] > 0
        if engine != "onnxruntime":
            assert "ort_profile" not in m
            continue
        folder = Path(m["path"])
        assert folder == cache / "tiny" / f"{name}.onnx-{body}" and m["mmproj"] is None
        assert m["file_bytes"] == _disk_bytes(folder) and m["arch"] == f"onnx {body}"
        est = bench.estimate_onnx(preset("tiny"), bench.MODELS[name], body, onnx_types(bench.MODELS[name], "f16"))
        assert 0.95 < est / (folder / "model.onnx.data").stat().st_size < 1.05  # the disk check's estimate
        tensors = _decoder_tensors(folder)
        assert sum(m["group_bytes"].values()) == sum(a.nbytes for a in tensors.values())
        embedding = [a for k, a in tensors.items() if k.startswith("embed_tokens")]
        assert m["group_bytes"]["token_embd"] == sum(a.nbytes for a in embedding)
        g = m["group_bytes"]
        # f16 weights: what the decoder reads is the fp32 copy onnxruntime folds them into at load
        assert m["widened_bytes"] == _folded_at_load(folder, tmp_path) > 0
        f16 = sum(a.nbytes for a in tensors.values() if a.dtype == np.float16)
        assert m["widened_bytes"] == 2 * f16  # every f16 weight (the tied head: the embedding) read at fp32
        if name == "dense-bf16":
            assert m["bytes_per_token"] == sum(g.values()) + f16  # tied head: the embedding is read whole
            assert m["group_types"]["ffn"] == ["F16"] and "routed" not in g
            continue
        assert (m["experts"], m["top_k"]) == (4, 1)
        assert m["bytes_per_token"] == sum(g.values()) + f16 - g["routed"] * 3 // 4  # 1 of 4 experts a token
        assert m["group_types"]["shared"] == ["Q8_0"] and m["group_types"]["attention"] == ["F16"]
        assert m["group_types"]["routed"] == [{"exact": "TERNARY-I8", "fast": "TERNARY-2BIT"}[body]]
        assert "ONNX " + body in m["spec"]["label"] and "Q8_0 shared" in m["spec"]["label"]
    exact, fast = (rows[("mote-tq2_0-q8_0", "onnxruntime", b)] for b in ("exact", "fast"))
    # 2-bit codes + a scale per 128 weights against one int8 code a weight
    assert fast["group_bytes"]["routed"] * 3 < exact["group_bytes"]["routed"]
    assert fast["file_bytes"] < exact["file_bytes"]
    assert fast["group_bytes"]["shared"] == exact["group_bytes"]["shared"]  # the same Q8_0 shared expert
    gguf = rows[("mote-tq2_0-q8_0", "llama.cpp", None)]
    assert gguf["path"] == str(cache / "tiny" / "mote-tq2_0-q8_0.gguf")


def test_profile_and_report_tables(onnx_run):
    r, md, printed, _, out = onnx_run
    assert md in printed
    rows = {m["name"]: m for m in r["models"]}
    onnx_rows = ["mote-tq2_0-q8_0 [onnxruntime exact]", "mote-tq2_0-q8_0 [onnxruntime fast]",
                 "dense-bf16 [onnxruntime]"]
    for name in onnx_rows:
        assert sum(line.startswith(f"| {name} |") for line in md.splitlines()) == 2  # the speed and memory tables
        p = rows[name]["ort_profile"]
        assert p["tokens"] == N_GEN and 0 < p["nodes_ms"] <= p["run_ms"]
        assert sum(p["op_ms"].values()) == pytest.approx(p["nodes_ms"]) == sum(p["part_ms"].values())
        assert p["part_ms"]["attention"] > 0 and p["part_ms"]["head"] > 0
    ops = {n: rows[n]["ort_profile"]["op_ms"] for n in onnx_rows}
    assert ops[onnx_rows[0]]["MatMulInteger"] > 0 and "MatMulNBits" in ops[onnx_rows[1]]  # each body's kernels
    assert "MatMulInteger" not in ops[onnx_rows[2]]
    assert rows[onnx_rows[2]]["ort_profile"]["part_ms"].get("routed experts", 0) == 0  # dense: no experts
    assert rows[onnx_rows[1]]["ort_profile"]["part_ms"]["routed experts"] > 0
    assert "## Where a decoded token's time goes (onnxruntime profiler, --ort-profile)" in md
    assert "folds the graph's Cast of each f16 weight into an fp32 copy at load" in md
    assert "| MatMulNBits |" in md and "| routed experts |" in md
    assert "## onnxruntime against llama.cpp on the same checkpoint" in md
    for name in ("mote-tq2_0-q8_0 | onnxruntime exact", "mote-tq2_0-q8_0 | onnxruntime fast",
                 "dense-bf16 | onnxruntime"):
        assert f"| {name} |" in md
    assert ("| MoTE, ONNX fast: 2-bit ternary codes (MatMulNBits) experts + Q8_0 shared; F16 attention, F16 embedding "
            "(tied head) |") in md
    for png in ("memory_vs_decode.png", "expert_memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_partial_or_stale_cached_folder_is_rebuilt(onnx_run, tmp_path):
    """The cache's check, then the build (bench.build_preset, what mote-bench runs before measuring)."""
    from mote_edge.benchmarks.bench_models import onnx_types, stale_onnx_folder
    from mote_edge.benchmarks.random_ckpt import preset

    r, _, _, cache, _ = onnx_run
    sizes = {m["body"]: m["file_bytes"] for m in r["models"]
             if m["engine"] == "onnxruntime" and m["model"] == "mote-tq2_0-q8_0"}
    shutil.copytree(cache, tmp_path / "cache")
    tiny, spec = tmp_path / "cache" / "tiny", bench.MODELS["mote-tq2_0-q8_0"]
    folders = {b: tiny / f"mote-tq2_0-q8_0.onnx-{b}" for b in ("exact", "fast")}
    types = onnx_types(spec, "f16")
    assert not any(stale_onnx_folder(f, spec, b, types) for b, f in folders.items())
    assert stale_onnx_folder(folders["fast"], spec, "fast", onnx_types(bench.MODELS["mote-tq2_0-bf16"], "f16"))
    data = folders["fast"] / "model.onnx.data"
    os.truncate(data, data.stat().st_size - 4096)  # partial: the last tensors cut off
    cfg_path = folders["exact"] / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["mote_onnx"]["kernels"] = "fast"  # stale: another body under this name
    cfg_path.write_text(json.dumps(cfg))
    assert all(stale_onnx_folder(f, spec, b, types) for b, f in folders.items())
    paths, mmproj, log = bench.build_preset(preset("tiny"), ("tiny", None), [spec], tmp_path / "cache", "f16", 2,
                                            False, gguf=False, bodies=("exact", "fast"))
    # the checkpoint again and both folders; no GGUF, no projector (no engine measured here needs them)
    assert sorted(b["job"] for b in log) == ["checkpoint mote", "onnx mote-tq2_0-q8_0.onnx-exact",
                                             "onnx mote-tq2_0-q8_0.onnx-fast"]
    assert paths == {("mote-tq2_0-q8_0", b): f for b, f in folders.items()} and mmproj is None
    assert {b: _disk_bytes(f) for b, f in folders.items()} == sizes  # whole again (exports are deterministic)
    assert not any(stale_onnx_folder(f, spec, b, types) for b, f in folders.items())
    assert not list(tiny.glob("ckpt-*")) and not list(tiny.glob(".*"))  # no checkpoint, no temporaries
    assert bench.build_preset(preset("tiny"), ("tiny", None), [spec], tmp_path / "cache", "f16", 2, False,
                              gguf=False, bodies=("exact", "fast"))[2] == []  # fresh now: nothing built


@pytest.mark.parametrize("argv, message", [
    (["--engines", "onnxruntime", "--onnx-kernels", "exact,turbo"], "--onnx-kernels 'exact,turbo'; accepted: "),
    (["--engines", "onnxruntime", "--onnx-kernels", ","], "--onnx-kernels ','; accepted: "),
    (["--onnx-kernels", "fast"], "add onnxruntime to --engines"),
    (["--ort-profile"], "--ort-profile profiles the onnxruntime engine"),
    (["--engines", "onnxruntime", "--other-type", "q6_k"], "--other-type q6_k: the ONNX export has no type for it"),
])
def test_bad_onnx_input_is_one_error_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--preset", "tiny", "--cache", str(tmp_path / "cache")] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []  # no report folder, no cache


def test_gguf_files_with_onnxruntime_is_one_error_line(tmp_path, capsys):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(SystemExit) as exc:
        bench.main([str(model), "--engines", "llama.cpp,onnxruntime", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "--engines onnxruntime measures a preset's models" in err[0]
    assert not (tmp_path / "out").exists()

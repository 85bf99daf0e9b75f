"""mote-export's vision half (the mmproj GGUF) and mote-run: file layout against the checkpoint,
clip.cpp's conventions (feature layer, post_ln, ffn naming, normalisation), bad input, and (when
llama-cpp-python is installed) image-embedding parity with transformers and answer agreement with
the PyTorch model on the embedded tiny MoTE checkpoint's held-out questions."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, GGUFReader
from gguf.quants import dequantize

from mote_edge.checkpoint import save_model
from mote_edge.exporters.errors import MoteExportError
from mote_edge.exporters.gguf_mmproj import feature_layers, image_normalization, write_mmproj
from mote_edge.runtime_cpu.records import normalize_answer
from mote_edge.exporters.safetensors_np import SafetensorsFile
from mote_edge.tiny import ASSETS
from mote_edge.tokenizer import normalize_answer as torch_side_normalize

from .conftest import TEXT, VISION

TOWER, PROJ = "model.vision_tower.", "model.multi_modal_projector."


def _tensors(path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


def _values(t) -> np.ndarray:
    """GGUF tensor values in numpy order (outer dims first)."""
    return dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))


def _ckpt(ckpt) -> dict:
    with SafetensorsFile(Path(ckpt) / "model.safetensors") as f:
        return {k: np.array(f.get(k), dtype=np.float32) for k in f.keys()}


def expected_names(n_blocks: int) -> set:
    names = {"v.patch_embd.weight", "v.patch_embd.bias", "v.position_embd.weight",
             "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"}
    for i in range(n_blocks):
        for t in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down"):
            names |= {f"v.blk.{i}.{t}.weight", f"v.blk.{i}.{t}.bias"}
    return names


def test_mmproj_keys_tensors_and_values(dense_ckpt, tmp_path):
    out = tmp_path / "m-mmproj.gguf"
    info = write_mmproj(dense_ckpt, out, ftype="f32")
    assert info["path"] == str(out) and info["bytes"] == out.stat().st_size and info["tensors"] == 39
    r = GGUFReader(out)
    f = {k: r.fields[k].contents() for k in r.fields if not k.startswith("GGUF.")}
    d, ff, n, p, img = (VISION[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                             "patch_size", "image_size"))
    assert f["general.architecture"] == "clip" and f["clip.projector_type"] == "mlp"
    assert f["clip.has_vision_encoder"] is True and f["clip.use_gelu"] is True
    assert (f["clip.vision.image_size"], f["clip.vision.patch_size"]) == (img, p)
    assert (f["clip.vision.embedding_length"], f["clip.vision.feed_forward_length"]) == (d, ff)
    assert f["clip.vision.block_count"] == n and f["clip.vision.attention.head_count"] == VISION["num_attention_heads"]
    assert f["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    assert f["clip.vision.projection_dim"] == TEXT["hidden_size"]
    assert f["clip.vision.image_mean"] == pytest.approx([0.5] * 3)
    assert f["clip.vision.image_std"] == pytest.approx([0.5] * 3)
    # vision_feature_layer -1 = hidden_states[n]: all blocks, and no post_layernorm (LLaVA skips it)
    assert f["clip.vision.feature_layer"] == [n]
    assert r.fields["clip.vision.feature_layer"].types[-1].name == "INT32"  # clip.cpp accepts INT32 only

    tensors = _tensors(out)
    assert set(tensors) == expected_names(n)
    w = _ckpt(dense_ckpt)
    pairs = {"v.patch_embd.weight": TOWER + "embeddings.patch_embedding.weight",
             "v.position_embd.weight": TOWER + "embeddings.position_embedding.weight",
             "v.blk.1.attn_q.weight": TOWER + "encoder.layers.1.self_attn.q_proj.weight",
             "v.blk.0.attn_out.bias": TOWER + "encoder.layers.0.self_attn.out_proj.bias",
             "v.blk.0.ffn_up.weight": TOWER + "encoder.layers.0.mlp.fc1.weight",
             "v.blk.1.ffn_down.weight": TOWER + "encoder.layers.1.mlp.fc2.weight",
             "v.blk.1.ln2.bias": TOWER + "encoder.layers.1.layer_norm2.bias",
             "mm.0.weight": PROJ + "linear_1.weight", "mm.2.bias": PROJ + "linear_2.bias"}
    for gg, hf in pairs.items():
        assert tensors[gg].tensor_type == T.F32
        assert np.array_equal(_values(tensors[gg]), w[hf]), gg
    assert list(tensors["v.patch_embd.weight"].shape) == [p, p, 3, d]  # ggml ne: numpy order reversed
    assert list(tensors["mm.2.weight"].shape) == [TEXT["hidden_size"], TEXT["hidden_size"]]


def test_default_f16_keeps_norms_biases_positions_f32(dense_ckpt, tmp_path):
    write_mmproj(dense_ckpt, tmp_path / "m.gguf")
    for name, t in _tensors(tmp_path / "m.gguf").items():
        matrix = name.endswith(".weight") and len(t.shape) >= 2 and "position" not in name
        assert t.tensor_type == (T.F16 if matrix else T.F32), name


def test_q8_0_falls_back_to_f16_where_rows_do_not_fit(dense_ckpt, tmp_path):
    info = write_mmproj(dense_ckpt, tmp_path / "m.gguf", ftype="q8_0")
    t = _tensors(tmp_path / "m.gguf")
    assert t["v.blk.0.attn_q.weight"].tensor_type == T.Q8_0  # 32 wide: one block
    assert t["v.patch_embd.weight"].tensor_type == T.F16  # im2col takes a float kernel
    assert set(info["types"]) == {"Q8_0", "F16", "F32"}


def test_feature_layer_semantics():
    assert feature_layers({"vision_feature_layer": -1}, 4) == [4]
    assert feature_layers({"vision_feature_layer": -2}, 4) == [3]
    assert feature_layers({}, 4) == [3]  # LLaVA's default
    assert feature_layers({"vision_feature_layer": [-4, 2, -1]}, 4) == [1, 2, 4]
    for bad in (5, -6, [3, 1], [2, 2], "last", True):
        with pytest.raises(MoteExportError):
            feature_layers({"vision_feature_layer": bad}, 4)


def test_shallower_feature_layer_drops_unused_blocks(dense_ckpt, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(dense_ckpt, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["vision_feature_layer"] = -2
    (ck / "config.json").write_text(json.dumps(cfg))
    info = write_mmproj(ck, tmp_path / "m.gguf")
    r = GGUFReader(tmp_path / "m.gguf")
    assert info["blocks"] == 1 and r.fields["clip.vision.feature_layer"].contents() == [1]
    assert r.fields["clip.vision.block_count"].contents() == 1
    assert set(_tensors(tmp_path / "m.gguf")) == expected_names(1)


@pytest.fixture(scope="module")
def square_ffn_ckpt(tmp_path_factory, processor):
    """intermediate == hidden: the case clip.cpp's legacy up/down swap misreads."""
    from mote_edge.tiny import build_dense

    out = tmp_path_factory.mktemp("sq") / "dense"
    vision = VISION | {"intermediate_size": VISION["hidden_size"]}
    save_model(build_dense(processor.tokenizer, seed=1, vision=vision, text=TEXT), out)
    processor.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def multilayer_ckpt(tmp_path_factory, processor):
    """Two feature layers, one of them the embeddings (hidden_states[0]), and no connector biases."""
    from transformers import LlavaForConditionalGeneration

    from mote_edge.tiny import dense_config

    tok = processor.tokenizer
    cfg = dense_config(VISION, TEXT, len(tok), tok.convert_tokens_to_ids("<image>"), tok.eos_token_id,
                       tok.pad_token_id)
    cfg.vision_feature_layer, cfg.multimodal_projector_bias = [-3, -1], False
    torch.manual_seed(2)
    out = tmp_path_factory.mktemp("ml") / "dense"
    save_model(LlavaForConditionalGeneration(cfg), out)
    processor.save_pretrained(str(out))
    return out


def test_multiple_feature_layers_and_no_connector_bias(multilayer_ckpt, tmp_path):
    info = write_mmproj(multilayer_ckpt, tmp_path / "m.gguf")
    t = _tensors(tmp_path / "m.gguf")
    assert info["feature_layers"] == [0, VISION["num_hidden_layers"]]
    assert list(t["mm.0.weight"].shape) == [2 * VISION["hidden_size"], TEXT["hidden_size"]]
    assert not _values(t["mm.0.bias"]).any() and not _values(t["mm.2.bias"]).any()


def test_square_ffn_written_under_legacy_names(square_ffn_ckpt, tmp_path):
    write_mmproj(square_ffn_ckpt, tmp_path / "m.gguf", ftype="f32")
    t, w = _tensors(tmp_path / "m.gguf"), _ckpt(square_ffn_ckpt)
    for i in range(VISION["num_hidden_layers"]):
        fc = TOWER + f"encoder.layers.{i}.mlp."
        assert np.array_equal(_values(t[f"v.blk.{i}.ffn_down.weight"]), w[fc + "fc1.weight"])
        assert np.array_equal(_values(t[f"v.blk.{i}.ffn_up.bias"]), w[fc + "fc2.bias"])


def test_rescale_factor_folded_into_mean_std(tmp_path):
    proc = {"image_processor": {"image_mean": [0.48, 0.45, 0.4], "image_std": [0.26, 0.26, 0.27],
                                "rescale_factor": 1 / 127.5, "do_rescale": True, "do_normalize": True}}
    (tmp_path / "processor_config.json").write_text(json.dumps(proc))
    mean, std = image_normalization(tmp_path)
    x = np.arange(256, dtype=np.float64)
    for c in range(3):  # clip.cpp: (x/255 - mean)/std == processor: (x*rescale - m)/s
        want = (x / 127.5 - proc["image_processor"]["image_mean"][c]) / proc["image_processor"]["image_std"][c]
        assert np.allclose((x / 255 - mean[c]) / std[c], want)


def test_bad_input_is_one_error_and_writes_nothing(dense_ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    with pytest.raises(MoteExportError, match="does not exist"):
        write_mmproj(tmp_path / "nope", out)
    with pytest.raises(MoteExportError, match="accepted"):
        write_mmproj(dense_ckpt, out, ftype="tq2_0")
    bad = tmp_path / "bad"
    shutil.copytree(dense_ckpt, bad)
    (bad / "processor_config.json").unlink()
    with pytest.raises(MoteExportError, match="image processor"):
        write_mmproj(bad, out)
    shutil.copytree(dense_ckpt, bad, dirs_exist_ok=True)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vision_config"]["hidden_act"] = "relu"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoteExportError, match="activation"):
        write_mmproj(bad, out)
    shutil.copy2(dense_ckpt / "config.json", bad / "config.json")
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(MoteExportError, match="safetensors"):
        write_mmproj(bad, out)
    assert not out.exists() and not list(tmp_path.glob(".m.gguf*"))


def test_normalize_answer_matches_torch_side():
    for s in ["Red", "  two  squares.", "Top left!", "BLUE?!", "", "a\tb\n", "yes...", "green ,", "1 - 2"]:
        assert normalize_answer(s) == torch_side_normalize(s), s


def test_exporters_never_import_torch():
    code = ("import sys; import mote_edge.exporters.gguf_mmproj, mote_edge.runtime_cpu.llama_engine; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('transformers')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_mote_run_bad_input_one_line(tmp_path):
    exe = Path(sys.executable).parent / "mote-run"
    r = subprocess.run([exe, str(tmp_path / "none.gguf"), "--image", "x.png", "--prompt", "q"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


# ---- llama-cpp-python: the mmproj graph and the whole model against PyTorch ----------------------------


def _export(ckpt: Path, out: Path) -> Path:
    from mote_edge.exporters.gguf_llm import write_llm_gguf

    write_llm_gguf(ckpt, out, progress=False)
    write_mmproj(ckpt, out.with_name(out.stem + "-mmproj.gguf"))
    return out


def _torch_image_features(ckpt: Path, image: Path) -> np.ndarray:
    from PIL import Image
    from transformers import AutoProcessor

    from mote_edge.checkpoint import load_model

    model, proc = load_model(ckpt), AutoProcessor.from_pretrained(str(ckpt))
    pix = proc.image_processor(images=Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pix, vision_feature_layer=model.config.vision_feature_layer,
                                               vision_feature_select_strategy="full")
    out = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    return out[0].numpy()


@pytest.mark.parametrize("ckpt_name", ["dense_ckpt", "square_ffn_ckpt", "multilayer_ckpt"])
def test_image_embeddings_match_transformers(ckpt_name, request, tmp_path, data_dir):
    pytest.importorskip("llama_cpp")
    from mote_edge.runtime_cpu.llama_engine import image_embeddings, load

    ckpt = request.getfixturevalue(ckpt_name)
    model = _export(ckpt, tmp_path / "m.gguf")
    llm = load(model, n_threads=2)
    for rec in json.loads((data_dir / "test.json").read_text())[:3]:
        img = data_dir / "images" / rec["image"]
        got, want = image_embeddings(llm, img), _torch_image_features(ckpt, img)
        assert got.shape == want.shape == ((VISION["image_size"] // VISION["patch_size"]) ** 2, TEXT["hidden_size"])
        # f16 weights, tanh-GELU in the connector, fp16 GELU table: close, not equal
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() > 0.999 and np.abs(got - want).max() < 2e-2 * np.abs(want).max()


TINY = ASSETS / "mote"


@pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="embedded tiny checkpoint not built")
def test_gguf_answers_agree_with_pytorch_on_tiny_test_set(tmp_path):
    pytest.importorskip("llama_cpp")
    from transformers import AutoProcessor

    from mote_edge.checkpoint import load_model
    from mote_edge.data import load_records
    from mote_edge.evaluate import accuracy, generate_answers
    from mote_edge.runtime_cpu.llama_engine import evaluate_gguf

    data = ASSETS / "data"
    model = _export(TINY, tmp_path / "tiny.gguf")
    records = load_records(data / "test.json")
    ref = generate_answers(load_model(TINY), AutoProcessor.from_pretrained(str(TINY)), records,
                           data / "images", progress=False)
    got = evaluate_gguf(model, data / "test.json", data / "images", n_threads=2)
    agree = np.mean([normalize_answer(a) == normalize_answer(b) for a, b in zip(ref, got["answers"])])
    ref_acc = accuracy(records, ref)["overall"]
    print(f"GGUF vs PyTorch: agreement {100 * agree:.1f}%, accuracy {got['overall']:.1f}% vs {ref_acc:.1f}% "
          f"on {got['n']} questions")
    assert got["n"] == len(records)
    assert agree >= 0.98
    assert abs(got["overall"] - ref_acc) <= 1.0


@pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="embedded tiny checkpoint not built")
def test_mote_run_cli_streams_answer_and_stats(tmp_path):
    pytest.importorskip("llama_cpp")
    model = _export(TINY, tmp_path / "tiny.gguf")
    rec = json.loads((ASSETS / "data" / "test.json").read_text())[0]
    question = rec["conversations"][0]["value"].removeprefix("<image>\n")
    r = subprocess.run([Path(sys.executable).parent / "mote-run", model, "--image",
                        ASSETS / "data" / "images" / rec["image"], "--prompt", question, "--threads", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip()
    for key in ("time to first token", "tokens/s", "peak RSS"):
        assert key in r.stderr

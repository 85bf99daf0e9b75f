"""mote-export --format gguf, LLM half: exact ternary packing, the qwen2moe mapping, bad input, and
(when llama-cpp-python is installed) loading, tokenizer parity and logit parity with PyTorch."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from types import SimpleNamespace

from gguf import GGMLQuantizationType as T, GGUFReader

from mote_edge.checkpoint import load_model, save_model
from mote_edge.deploy import ternary_experts
from mote_edge.exporters import cli
from mote_edge.exporters.errors import MoteExportError
from mote_edge.exporters.gguf_header import read_gguf_header
from mote_edge.exporters.gguf_llm import SHEXP_GATE, write_llm_gguf
from mote_edge.exporters.safetensors_np import SafetensorsFile
from mote_edge.exporters.ternary import (Q2_0, dequantize, pack_ternary, ternary_codes, ternary_form,
                                         ternary_gguf_type)
from mote_edge.upcycle import upcycle

from .conftest import TEXT, VISION, perturb_experts

TEXT256 = TEXT | {"hidden_size": 256, "intermediate_size": 512}
# hidden 320: a multiple of 64, not of 256, like Qwen2.5-0.5B's 896; gate/up rows take Q2_0, down (512) TQ2_0
TEXT320 = TEXT | {"hidden_size": 320, "intermediate_size": 512}
LM = "model.language_model."


def _moe_ckpt(base: Path, out: Path, **kw) -> Path:
    upcycle(base, out, experts=4, **kw)
    model = load_model(out)
    perturb_experts(model)
    save_model(model, out, side_files_from=base)
    return out


def _dense(tmp_path_factory, processor, text: dict, tag: str) -> Path:
    from mote_edge.tiny import build_dense

    out = tmp_path_factory.mktemp(tag) / "dense"
    save_model(build_dense(processor.tokenizer, seed=0, vision=VISION, text=text), out)
    processor.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def dense256(tmp_path_factory, processor):
    """LLM widths 256 / 512, so the 256-weight ternary block types apply."""
    return _dense(tmp_path_factory, processor, TEXT256, "ckpt256")


@pytest.fixture(scope="session")
def mote320(tmp_path_factory, processor) -> Path:
    """LLM widths 320 / 512: gate/up rows (320) fall back to Q2_0, down rows (512) stay TQ2_0."""
    dense = _dense(tmp_path_factory, processor, TEXT320, "ckpt320")
    return _moe_ckpt(dense, tmp_path_factory.mktemp("ckpt320") / "mote", top_k=1, layers="all")


@pytest.fixture(scope="session")
def mote256(tmp_path_factory, dense256) -> Path:
    return _moe_ckpt(dense256, tmp_path_factory.mktemp("ckpt256") / "mote", top_k=1, layers="all")


@pytest.fixture(scope="session")
def mote64(tmp_path_factory, dense_ckpt) -> Path:
    return _moe_ckpt(dense_ckpt, tmp_path_factory.mktemp("ckpt64") / "mote", top_k=1, layers="all")


@pytest.fixture(scope="session")
def embedded() -> Path:
    """The trained tiny MoTE checkpoint shipped in the package (4 layers, hidden 256, 4 experts)."""
    from mote_edge.tiny import ASSETS

    if not (ASSETS / "mote" / "model.safetensors").is_file():
        pytest.skip("embedded checkpoints not built")
    return ASSETS / "mote"


def _tensors(path) -> dict:
    """name -> tensor (tensor_type, shape in ggml order, raw bytes), through the project's header reader:
    gguf.GGUFReader cannot open files holding Q2_0 (ggml type 42, unknown to gguf-py 0.19)."""
    h = read_gguf_header(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    return {t.name: SimpleNamespace(name=t.name, tensor_type=t.qtype, shape=t.dims,
                                    data=raw[h.data_start + t.offset:h.data_start + t.offset + t.nbytes])
            for t in h.tensors}


def _values(t) -> np.ndarray:
    """Dequantized values of a GGUF tensor in numpy order (outer dims first)."""
    shape = tuple(int(d) for d in reversed(t.shape))
    rows = np.asarray(t.data).reshape(int(np.prod(shape[:-1], dtype=np.int64)), -1)
    return dequantize(rows, t.tensor_type).reshape(shape)


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def _ckpt_weights(ckpt) -> dict:
    with SafetensorsFile(Path(ckpt) / "model.safetensors") as f:
        return {k: np.array(f.get(k), dtype=np.float32) for k in f.keys()}


# ---- the deployable form, bit-exact with the torch code ------------------------------------------------


@pytest.mark.parametrize("ckpt", ["embedded", "mote256", "mote64"])
def test_numpy_ternary_form_equals_torch_deploy_form(ckpt, request):
    path = request.getfixturevalue(ckpt)
    deploy = ternary_experts(load_model(path))
    weights = _ckpt_weights(path)
    mote = json.loads((path / "config.json").read_text())["mote"]
    assert len(deploy) == len(mote["layers"]) * mote["num_experts"] * 3
    for name, (codes, scale) in deploy.items():
        np_codes, np_scale = ternary_form(weights[name])
        assert np_scale == scale and np_scale.dtype == np.float32, name
        assert np.array_equal(np_codes, codes), name
        assert len(np.unique(codes)) == 3


def test_numpy_ternary_form_reads_bf16_and_fp16_checkpoints_like_torch(mote256, tmp_path):
    for dtype in (torch.bfloat16, torch.float16):
        model = load_model(mote256)
        save_model(model, tmp_path / str(dtype), dtype=dtype)
        deploy = ternary_experts(load_model(tmp_path / str(dtype)))
        weights = _ckpt_weights(tmp_path / str(dtype))
        for name, (codes, scale) in deploy.items():
            np_codes, np_scale = ternary_form(weights[name])
            assert np_scale == scale and np.array_equal(np_codes, codes), (dtype, name)


# ---- packing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype, cols", [(T.TQ2_0, 512), (T.TQ1_0, 512), (Q2_0, 192), (T.Q4_0, 96), (T.F16, 40)])
def test_pack_ternary_dequantizes_to_codes_times_fp16_scale(qtype, cols):
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, size=(3, 8, cols)).astype(np.int8)
    codes[1, :2] = 0  # all-zero rows/blocks must stay exact too
    scales = np.array([0.0123, 1.5e-5, 3.75], dtype=np.float32)
    packed = pack_ternary(codes, scales, qtype)
    got = dequantize(packed, qtype) if qtype != T.F16 else packed.astype(np.float32)
    want = codes * scales.astype(np.float16).astype(np.float32)[:, None, None]
    assert got.shape == codes.shape and np.array_equal(got, want)


@pytest.mark.parametrize("qtype", [T.TQ2_0, T.TQ1_0])
def test_pack_ternary_bytes_equal_gguf_py_quantizer(qtype):
    """The packer works from the codes; its bytes are what gguf-py's quantizer makes of codes * s
    (an all-zero block gets d = 0 there, and here)."""
    from gguf.quants import quantize

    codes = np.random.default_rng(1).integers(-1, 2, size=(2, 6, 768)).astype(np.int8)
    codes[0, :3, :256] = 0
    scales = np.array([0.02, 3.0], np.float32)
    want = np.stack([quantize(c.astype(np.float32) * s, qtype) for c, s in zip(codes, scales)])
    assert np.array_equal(pack_ternary(codes, scales, qtype), want)


def test_ternary_fallback_order():
    """Row width K: K % 256 == 0 -> the type asked for; else K % 64 -> Q2_0; else K % 32 -> Q4_0; else F16."""
    for asked in (T.TQ2_0, T.TQ1_0):
        assert [ternary_gguf_type(asked, k) for k in (256, 4864, 896, 320, 64, 96, 32, 40)] == \
            [asked, asked, Q2_0, Q2_0, Q2_0, T.Q4_0, T.Q4_0, T.F16]
    assert [ternary_gguf_type(Q2_0, k) for k in (256, 896, 64, 96, 40)] == [Q2_0, Q2_0, Q2_0, T.Q4_0, T.F16]


def _ggml_traits(qtype: int):
    """ggml's own type traits (name, block size, block bytes, to_float) from llama-cpp-python's libggml-base."""
    import ctypes

    from mote_edge.exporters.quantize import ggml_lib

    class Traits(ctypes.Structure):  # struct ggml_type_traits, ggml.h of llama-cpp-python 0.3.36
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                    ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                    ("from_float_ref", ctypes.c_void_p)]
    lib = ggml_lib()
    lib.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    t = lib.ggml_get_type_traits(int(qtype)).contents
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(t.to_float)

    def decode(raw: np.ndarray, n: int) -> np.ndarray:
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        out = np.empty(n, np.float32)
        to_float(raw.ctypes.data, out.ctypes.data, n)
        return out
    return t.type_name.decode(), t.blck_size, t.type_size, decode


def test_q2_0_packing_equals_ggml_quantizer_and_decodes_exactly():
    """Q2_0 (ggml type 42, 64-weight blocks) from the codes is byte for byte ggml_quantize_chunk(42) of
    codes * s (exactly ternary input), and ggml's own to_float gives back codes * fp16(s) bit-exactly;
    the numpy dequantizer the tests read files with equals ggml's to_float, on any bytes."""
    pytest.importorskip("llama_cpp")
    from mote_edge.exporters.quantize import _ggml_quantize

    name, block, size, to_float = _ggml_traits(Q2_0)
    assert (name, block, size) == ("q2_0", 64, 18)
    rng = np.random.default_rng(7)
    codes = rng.integers(-1, 2, size=(4, 64, 896)).astype(np.int8)
    codes[0, 0], codes[0, 1], codes[0, 2] = 1, -1, 0  # adversarial rows: all +1, all -1, all 0
    codes[1, 3, :64] = 0  # one all-zero block in an otherwise mixed row
    codes[1, 4, 64:128] = 1
    codes[1, 5, 128:192] = -1
    scales = np.array([0.0123, 1.5e-5, 3.75, 1e-5], np.float32)  # incl. fp16-subnormal scales
    packed = pack_ternary(codes, scales, Q2_0)
    assert packed.shape == (4, 64, 896 // 64 * 18)
    for m in range(4):
        want = _ggml_quantize(np.ascontiguousarray(codes[m].astype(np.float32) * scales[m]), Q2_0)
        assert np.array_equal(packed[m], want), m
        exact = (codes[m] * np.float32(np.float16(scales[m]))).reshape(-1)
        got = to_float(packed[m], codes[m].size)
        assert np.array_equal(got, exact) and np.array_equal(np.signbit(got), np.signbit(exact)), m
        assert np.array_equal(dequantize(packed[m], Q2_0).reshape(-1), exact), m
    # the numpy decoder on arbitrary blocks (code 3 = +2d included), finite fp16 d of any sign
    raw = rng.integers(0, 256, size=(512, 18), dtype=np.uint8)
    raw[:, :2] = rng.normal(0, 2, size=(512, 1)).astype(np.float16).view(np.uint8)
    assert np.array_equal(dequantize(raw.reshape(8, -1), Q2_0).reshape(-1), to_float(raw, 512 * 64))


def test_ternary_codes_round_half_to_even_like_torch():
    w = np.array([[0.5, -0.5, 0.50000006, -0.50000006, 1.5, 2.5, -1.5, 0.0, -0.0, 0.49999997]], np.float32)
    want = torch.from_numpy(w).round().clamp(-1, 1).to(torch.int8).numpy()
    assert np.array_equal(ternary_codes(w, np.float32(1.0)), want)


def test_pack_ternary_takes_codes_only():
    with pytest.raises(ValueError, match="int8 codes"):
        pack_ternary(np.ones((4, 256), np.float32), np.float32(1.0), T.TQ2_0)
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        pack_ternary(np.full((4, 256), 2, np.int8), np.float32(1.0), T.TQ2_0)


# ---- the written GGUF -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ckpt, ternary, want", [("embedded", "tq2_0", {"gate": T.TQ2_0, "up": T.TQ2_0, "down": T.TQ2_0}),
                                                 ("mote256", "tq2_0", {"gate": T.TQ2_0, "up": T.TQ2_0, "down": T.TQ2_0}),
                                                 ("mote256", "tq1_0", {"gate": T.TQ1_0, "up": T.TQ1_0, "down": T.TQ1_0}),
                                                 ("mote256", "q2_0", {"gate": Q2_0, "up": Q2_0, "down": Q2_0}),
                                                 ("mote320", "tq2_0", {"gate": Q2_0, "up": Q2_0, "down": T.TQ2_0}),
                                                 ("mote320", "tq1_0", {"gate": Q2_0, "up": Q2_0, "down": T.TQ1_0}),
                                                 ("mote64", "tq2_0", {"gate": Q2_0, "up": Q2_0, "down": Q2_0})])
def test_gguf_routed_experts_are_exactly_the_deployable_form(ckpt, ternary, want, request, tmp_path):
    path = request.getfixturevalue(ckpt)
    out = tmp_path / "m.gguf"
    s = write_llm_gguf(path, out, ternary_type=ternary, progress=False)
    deploy = ternary_experts(load_model(path))
    tensors = _tensors(out)
    for layer in s["moe_layers"]:
        for proj, qtype in want.items():
            t = tensors[f"blk.{layer}.ffn_{proj}_exps.weight"]
            assert t.tensor_type == qtype
            expect = np.stack([codes * np.float32(np.float16(scale)) for codes, scale in
                               (deploy[f"{LM}layers.{layer}.mlp.experts.{e}.{proj}_proj.weight"] for e in range(4))])
            assert np.array_equal(_values(t), expect), (layer, proj)
    bpw = {T.TQ2_0: 2.0625, T.TQ1_0: 1.6875, Q2_0: 2.25, T.Q4_0: 4.5}
    assert s["routed_bpw"] == pytest.approx(sum(bpw[q] for q in want.values()) / 3)  # gate, up, down: as many weights
    assert s["routed_types"] == sorted({q.name for q in want.values()})
    assert s["file_bytes"] == out.stat().st_size
    fallback = [f for f in s["fallbacks"] if "Q2_0" in f]
    assert bool(fallback) == (ternary != "q2_0" and Q2_0 in want.values())


def test_gguf_mapping_shared_expert_router_attention_and_keys(mote256, tmp_path):
    out = tmp_path / "m.gguf"
    write_llm_gguf(mote256, out, shared_type="f32", other_type="f32", progress=False)
    w = _ckpt_weights(mote256)
    reader = GGUFReader(out)
    t = {x.name: x for x in reader.tensors}
    for layer in range(2):
        L, b = f"{LM}layers.{layer}.", f"blk.{layer}."
        for proj, factor in (("gate", 1), ("up", 1), ("down", 2)):  # down doubled: the 0.5 gate is undone
            assert np.array_equal(_values(t[f"{b}ffn_{proj}_shexp.weight"]),
                                  factor * w[f"{L}mlp.shared_expert.{proj}_proj.weight"])
        assert np.all(_values(t[f"{b}ffn_gate_inp_shexp.weight"]) == SHEXP_GATE)
        assert np.array_equal(_values(t[f"{b}ffn_gate_inp.weight"]), w[f"{L}mlp.router.weight"])
        for p in "qkv":
            assert np.array_equal(_values(t[f"{b}attn_{p}.weight"]), w[f"{L}self_attn.{p}_proj.weight"])
            assert np.array_equal(_values(t[f"{b}attn_{p}.bias"]), w[f"{L}self_attn.{p}_proj.bias"])
        assert t[f"{b}attn_norm.weight"].tensor_type == T.F32
    emb = w[f"{LM}embed_tokens.weight"]
    assert np.array_equal(_values(t["token_embd.weight"]), emb) and np.array_equal(_values(t["output.weight"]), emb)
    cfg = json.loads((mote256 / "config.json").read_text())["text_config"]
    keys = {"general.architecture": "qwen2moe", "qwen2moe.block_count": 2, "qwen2moe.embedding_length": 256,
            "qwen2moe.expert_count": 4, "qwen2moe.expert_used_count": 1, "qwen2moe.attention.head_count": 4,
            "qwen2moe.attention.head_count_kv": 2, "qwen2moe.expert_feed_forward_length": 512,
            "qwen2moe.expert_shared_feed_forward_length": 512, "qwen2moe.context_length": 256,
            "qwen2moe.rope.freq_base": 10000.0, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
            "tokenizer.ggml.add_bos_token": False}
    for k, v in keys.items():
        assert _field(reader, k) == pytest.approx(v) if isinstance(v, float) else _field(reader, k) == v, k
    assert _field(reader, "qwen2moe.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])
    tok = json.loads((mote256 / "tokenizer.json").read_text())
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg["vocab_size"]
    assert all(tokens[i] == s for s, i in tok["model"]["vocab"].items())
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokens.index("<|im_end|>")
    assert "<|im_start|>" in _field(reader, "tokenizer.chat_template")


def test_sparse_layers_are_encoded_exactly(dense256, tmp_path):
    ckpt = _moe_ckpt(dense256, tmp_path / "sparse", top_k=1, layers="sparse")  # MoE on layer 1 only
    out = tmp_path / "m.gguf"
    s = write_llm_gguf(ckpt, out, shared_type="f32", progress=False)
    assert s["dense_layers"] == [0] and s["moe_layers"] == [1]
    w, t = _ckpt_weights(ckpt), _tensors(out)
    for proj, factor in (("gate", 1), ("up", 1), ("down", 2)):  # the dense FFN rides as the shared expert
        assert np.array_equal(_values(t[f"blk.0.ffn_{proj}_shexp.weight"]),
                              factor * w[f"{LM}layers.0.mlp.{proj}_proj.weight"])
        assert not np.any(_values(t[f"blk.0.ffn_{proj}_exps.weight"]))
    assert not np.any(_values(t["blk.0.ffn_gate_inp.weight"]))
    assert np.any(_values(t["blk.1.ffn_gate_exps.weight"]))


def test_moe_llava_experts_and_zero_shared_expert(dense256, tmp_path):
    ckpt = _moe_ckpt(dense256, tmp_path / "moe", variant="moe-llava", layers="all")
    out = tmp_path / "m.gguf"
    s = write_llm_gguf(ckpt, out, expert_type="f16", progress=False)
    w, t = _ckpt_weights(ckpt), _tensors(out)
    assert s["top_k"] == 2 and s["routed_types"] == ["F16"]
    got = _values(t["blk.1.ffn_down_exps.weight"])
    want = np.stack([w[f"{LM}layers.1.mlp.experts.{e}.down_proj.weight"] for e in range(4)])
    assert np.array_equal(got, want.astype(np.float16).astype(np.float32))
    assert _values(t["blk.0.ffn_up_shexp.weight"]).shape == (32, 256)
    assert not np.any(_values(t["blk.0.ffn_down_shexp.weight"]))
    with pytest.raises(MoteExportError, match="--ternary-type is for MoTE"):
        write_llm_gguf(ckpt, tmp_path / "x.gguf", ternary_type="tq2_0", progress=False)


def test_dense_checkpoint_is_written_as_qwen2(dense_ckpt, tmp_path):
    s = write_llm_gguf(dense_ckpt, tmp_path / "d.gguf", shared_type="f32", progress=False)
    reader = GGUFReader(tmp_path / "d.gguf")
    t, w = {x.name: x for x in reader.tensors}, _ckpt_weights(dense_ckpt)
    assert _field(reader, "general.architecture") == "qwen2" and s["variant"] == "dense"
    for p in ("gate", "up", "down"):
        assert np.array_equal(_values(t[f"blk.1.ffn_{p}.weight"]), w[f"{LM}layers.1.mlp.{p}_proj.weight"])
    assert "output.weight" not in t  # tied: qwen2 reuses token_embd
    assert not any("exps" in n or "shexp" in n for n in t)


def test_cli_writes_llm_and_mmproj_or_neither(mote64, tmp_path, capsys, monkeypatch):
    cli.main([str(mote64), "-o", str(tmp_path / "m.gguf"), "--quiet"])
    out = capsys.readouterr().out
    assert "routed experts: Q2_0" in out and "expert memory (shared + routed)" in out and "file size" in out
    assert (tmp_path / "m.gguf").is_file() and (tmp_path / "m-mmproj.gguf").is_file()

    def broken(*a, **k):
        raise MoteExportError("bad vision tower")
    from mote_edge.exporters import gguf_mmproj

    monkeypatch.setattr(gguf_mmproj, "write_mmproj", broken)
    (tmp_path / "again").mkdir()
    with pytest.raises(SystemExit) as exc:
        cli.main([str(mote64), "-o", str(tmp_path / "again" / "m.gguf"), "--quiet"])
    assert exc.value.code == 2 and "error: bad vision tower" in capsys.readouterr().err
    assert list((tmp_path / "again").iterdir()) == []  # the LLM file written first is removed again


def test_k_quants_without_llama_cpp_is_one_clear_error(monkeypatch):
    from mote_edge.exporters import quantize

    quantize.ggml_lib.cache_clear()
    monkeypatch.setattr(quantize.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MoteExportError, match="llama-cpp-python is not installed"):
        quantize.parse_type("q4_k", "--shared-type")
    quantize.ggml_lib.cache_clear()


def test_float_types_and_fallback_report(mote64, tmp_path):
    s = write_llm_gguf(mote64, tmp_path / "m.gguf", shared_type="q8_0", other_type="q4_0", progress=False)
    t = _tensors(tmp_path / "m.gguf")
    assert t["blk.0.ffn_up_shexp.weight"].tensor_type == T.Q8_0
    assert t["blk.0.attn_q.weight"].tensor_type == T.Q4_0
    assert t["blk.0.attn_norm.weight"].tensor_type == T.F32
    assert any("TQ2_0 -> Q2_0" in f for f in s["fallbacks"])


def test_exporter_does_not_import_torch(mote64, tmp_path):
    """Export in a fresh interpreter where importing torch fails."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from mote_edge.exporters.cli import main\n"
        f"main([{str(mote64)!r}, '-o', {str(tmp_path / 'm.gguf')!r}, '--quiet', '--no-mmproj'])\n"
        "assert not any(m.split('.')[0] == 'torch' for m in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "m.gguf").is_file()


# ---- bad input: one error line, exit 2, nothing written ---------------------------------------------------


def _edit_config(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _truncate(src, dst):
    shutil.copytree(src, dst)
    p = dst / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size - 100])
    return dst


@pytest.mark.parametrize("case, args, message", [
    ("missing", [], "does not exist"),
    ("llama", [], "unsupported architecture"),
    ("not_qwen2", [], "unsupported language model"),
    ("more_experts", [], "lacks model.language_model.layers.0.mlp.experts.4"),
    ("no_tokenizer", [], "has no tokenizer.json"),
    ("truncated", [], "is truncated"),
    ("garbage", [], "not a readable safetensors"),
    ("ok", ["--shared-type", "q9_9"], "not a known type"),
    ("ok", ["--other-type", "tq2_0"], "only for MoTE routed experts"),
    ("ok", ["--ternary-type", "q4_0"], "accepted: tq2_0, tq1_0, q2_0"),
    ("ok", ["--shared-type", "q2_0"], "only for MoTE routed experts"),
    ("ok", ["--expert-type", "f16"], "--expert-type is for MoE-LLaVA"),
    ("ok", ["--format", "tflite"], "accepted: gguf, onnx"),
    ("no_out_dir", [], "output folder"),
])
def test_bad_input(case, args, message, mote64, dense_ckpt, tmp_path, capsys):
    src = {
        "missing": tmp_path / "nope",
        "llama": lambda: _edit_config(mote64, tmp_path / "c", lambda c: c.update(model_type="llama")),
        "not_qwen2": lambda: _edit_config(mote64, tmp_path / "c", lambda c: c["text_config"].update(model_type="llama")),
        "more_experts": lambda: _edit_config(mote64, tmp_path / "c", lambda c: c["mote"].update(num_experts=5)),
        "no_tokenizer": lambda: _edit_config(mote64, tmp_path / "c", lambda c: None),
        "truncated": lambda: _truncate(mote64, tmp_path / "c"),
        "garbage": lambda: _edit_config(mote64, tmp_path / "c", lambda c: None),
    }.get(case, mote64)
    src = src() if callable(src) else src
    if case == "garbage":
        (src / "model.safetensors").write_bytes(b"\xff" * 64)
    if case == "no_tokenizer":
        (src / "tokenizer.json").unlink()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = (tmp_path / "no" / "m.gguf") if case == "no_out_dir" else out_dir / "m.gguf"
    with pytest.raises(SystemExit) as exc:
        cli.main([str(src), "-o", str(out), "--quiet", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(out_dir.iterdir()) == []


def test_failure_while_writing_leaves_nothing(mote64, tmp_path, monkeypatch):
    from mote_edge.exporters import gguf_llm

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(gguf_llm, "pack_ternary", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_llm_gguf(mote64, tmp_path / "m.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_safetensors_reader_matches_safetensors_library(mote256, tmp_path):
    from safetensors.numpy import load_file

    ref = load_file(str(mote256 / "model.safetensors"))
    with SafetensorsFile(mote256 / "model.safetensors") as f:
        assert sorted(f.keys()) == sorted(ref)
        for k, v in ref.items():
            assert f.shape(k) == v.shape and np.array_equal(f.get(k), v)
    model = load_model(mote256)
    save_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    sd = model.to(torch.bfloat16).state_dict()
    with SafetensorsFile(tmp_path / "bf16" / "model.safetensors") as f:
        name = f"{LM}layers.0.mlp.experts.1.up_proj.weight"
        assert f.dtype(name) == "BF16"
        assert np.array_equal(f.get(name), sd[name].float().numpy())


# ---- llama.cpp (llama-cpp-python): K-quants, loading, tokenizer and logit parity ---------------------------

PROMPTS = ["What colour is the square?",
           "<|im_start|>user\n<image>\nHow many shapes are there?<|im_end|>\n<|im_start|>assistant\n",
           "There are 3 shapes: red, green & blue!!\n\n  two  spaces\ttab",
           "h\u00e9llo w\u00f6rld \u2713 don't I'll 12345"]


def test_ggml_c_quantizer_through_ctypes(mote256, tmp_path):
    pytest.importorskip("llama_cpp")
    from gguf.quants import quantize

    from mote_edge.exporters.quantize import _ggml_quantize

    rows = np.random.default_rng(0).normal(size=(8, 512)).astype(np.float32)
    assert np.array_equal(_ggml_quantize(rows, T.Q8_0), quantize(rows, T.Q8_0))  # same bytes as gguf-py's
    s = write_llm_gguf(mote256, tmp_path / "m.gguf", shared_type="q4_k", other_type="q6_k", progress=False)
    t, w = _tensors(tmp_path / "m.gguf"), _ckpt_weights(mote256)
    for name, src, qtype, tol in (("blk.0.ffn_gate_shexp.weight", "layers.0.mlp.shared_expert.gate_proj.weight", T.Q4_K, 0.15),
                                  ("blk.1.attn_q.weight", "layers.1.self_attn.q_proj.weight", T.Q6_K, 0.04)):
        ref = w[LM + src]
        assert t[name].tensor_type == qtype
        assert np.abs(_values(t[name]) - ref).mean() < tol * np.abs(ref).mean(), name
    assert not s["fallbacks"]


def _llama(path, **kw):
    from mote_edge.runtime_cpu.llama_engine import llama

    return llama(path, **({"n_ctx": 256} | kw))  # as the engine loads (AMX workaround)


@pytest.fixture(scope="module", params=["embedded", "mote256", "mote320"])
def exported(request, tmp_path_factory):
    """(checkpoint, GGUF) with everything but the ternary experts in f32, which isolates the MoE mapping."""
    pytest.importorskip("llama_cpp")
    ckpt = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp("gguf") / "mote.gguf"
    write_llm_gguf(ckpt, out, shared_type="f32", other_type="f32", progress=False)
    return ckpt, out


def test_llama_cpp_tokenizer_matches_hf(exported):
    from transformers import AutoTokenizer

    ckpt, path = exported
    hf = AutoTokenizer.from_pretrained(str(ckpt))
    llm = _llama(path, vocab_only=True)
    for text in PROMPTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf.encode(text, add_special_tokens=False), text


def _q8_activations(x, block: int, fp16_scale: bool):
    """llama.cpp's int8 activation quantization, per `block` values (round(x * 127 / max|block|)), where
    MoTE quantizes per token: Q8_K (block 256, fp32 scale) for TQ2_0 / TQ1_0 dot products, Q8_0 (block
    32, fp16 scale) for Q2_0 / Q4_0 ones."""
    import mote_edge.quant as mq

    xf = x.detach().float()
    b = xf.reshape(*xf.shape[:-1], xf.shape[-1] // block, block)
    amax = b.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    d = (amax / 127).half().float() if fp16_scale else amax / 127
    q = ((b * (127 / amax)).round() * d).reshape(xf.shape)
    return mq.ste(x, q.to(x.dtype))


def _q8k_activations(x):
    return _q8_activations(x, 256, False)


def _llama_activations(ternary: str = "tq2_0"):
    """The activation quantization llama.cpp's CPU backend applies before each ternary matmul of an export
    with this --ternary-type: chosen by the matrix's input width K, as the exporter chooses its type."""
    from mote_edge.exporters.ternary import TERNARY_TYPES

    def act(x):
        qtype = ternary_gguf_type(TERNARY_TYPES[ternary], x.shape[-1])
        if qtype in (T.TQ2_0, T.TQ1_0):
            return _q8_activations(x, 256, False)  # vec_dot_type Q8_K
        assert qtype in (Q2_0, T.Q4_0), qtype
        return _q8_activations(x, 32, True)  # vec_dot_type Q8_0
    return act


def _parity(gguf_path, ckpt, text, monkeypatch, ternary: str = "tq2_0"):
    """llama.cpp teacher-forced logits vs PyTorch's (MoTE as trained, and with llama.cpp's activation
    quantization: Q8_K for TQ2_0 / TQ1_0 matrices, Q8_0 for Q2_0 / Q4_0 ones)."""
    from transformers import AutoTokenizer

    import mote_edge.quant as mq

    ids = AutoTokenizer.from_pretrained(str(ckpt)).encode(text, add_special_tokens=False)
    llm = _llama(gguf_path, logits_all=True, type_k=0, type_v=0)  # f32 KV cache
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    refs = []
    for act in (mq.int8_fake_quant, _llama_activations(ternary)):  # the activation values TernaryLinear uses
        monkeypatch.setattr(mq, "int8_fake_quant", act)
        with torch.no_grad():
            refs.append(load_model(ckpt)(input_ids=torch.tensor([ids])).logits[0].numpy())
    monkeypatch.undo()
    stats = []
    for ref in refs:
        d = np.abs(got - ref)
        stats.append(dict(top1=(got.argmax(-1) == ref.argmax(-1)).mean(), max=d.max(), mean=d.mean(),
                          scale=np.abs(ref).mean()))
    return stats


PARITY_TEXT = PROMPTS[1] + "red circle<|im_end|>\n" + PROMPTS[1] + "two<|im_end|>\n" + PROMPTS[0]


def test_llama_cpp_logits_match_pytorch(exported, monkeypatch):
    """Teacher-forced, text only. llama.cpp quantizes the activations of ternary products to int8
    per 256-weight block (Q8_K; per 32 = Q8_0 for the Q2_0 rows of mote320), MoTE per token: close,
    not equal. With PyTorch switched to llama.cpp's activation quantization the rest of the mapping
    is checked to fp32 rounding and int8 rounding flips."""
    ckpt, path = exported
    mote, q8k = _parity(path, ckpt, PARITY_TEXT, monkeypatch)
    for tag, s in (("MoTE", mote), ("llama.cpp Q8_K/Q8_0", q8k)):
        print(f"{ckpt.parent.name}/{ckpt.name} llama.cpp vs PyTorch ({tag} activations): top-1 {s['top1']:.3f}, "
              f"max |dlogit| {s['max']:.2e}, mean {s['mean']:.2e} (mean |logit| {s['scale']:.3f})")
    assert np.isfinite(mote["max"]) and mote["top1"] >= 0.95 and mote["mean"] < 0.01 * mote["scale"]
    assert q8k["mean"] < 2e-3 * q8k["scale"] and q8k["max"] < 0.02 * q8k["scale"]


def test_llama_cpp_runs_q2_0_experts(mote256, mote320, tmp_path, monkeypatch):
    """--ternary-type q2_0 (every routed matrix Q2_0, Q8_0 activations) and the default export of a
    320-wide model (gate/up Q2_0): both load in llama.cpp, generate, and match PyTorch with the same
    tolerances as the TQ2_0 files."""
    pytest.importorskip("llama_cpp")
    for ckpt, ternary in ((mote256, "q2_0"), (mote320, "tq2_0")):
        out = tmp_path / f"{ckpt.parent.name}-{ternary}.gguf"
        s = write_llm_gguf(ckpt, out, ternary_type=ternary, shared_type="f32", other_type="f32", progress=False)
        assert "Q2_0" in s["routed_types"]
        mote, q8 = _parity(out, ckpt, PARITY_TEXT, monkeypatch, ternary)
        print(f"{ckpt.parent.name} --ternary-type {ternary} ({', '.join(s['routed_types'])}): top-1 {mote['top1']:.3f} / "
              f"{q8['top1']:.3f}, max |dlogit| {mote['max']:.2e} / {q8['max']:.2e}, mean {mote['mean']:.2e} / "
              f"{q8['mean']:.2e} (MoTE / llama.cpp activations; mean |logit| {mote['scale']:.3f})")
        assert np.isfinite(mote["max"]) and mote["top1"] >= 0.95 and mote["mean"] < 0.01 * mote["scale"]
        assert q8["mean"] < 2e-3 * q8["scale"] and q8["max"] < 0.02 * q8["scale"]
        llm = _llama(out)
        ids = llm.tokenize(PROMPTS[1].encode(), add_bos=False, special=True)
        gen = []
        for tok in llm.generate(ids, temp=0.0, repeat_penalty=1.0):
            gen.append(tok)
            if len(gen) == 8:
                break
        assert len(gen) == 8 and all(0 <= t < llm.n_vocab() for t in gen)


def test_llama_cpp_dense_qwen2_matches_pytorch(dense_ckpt, tmp_path, monkeypatch):
    """No quantization anywhere: the plain qwen2 export agrees to fp32 rounding."""
    pytest.importorskip("llama_cpp")
    out = tmp_path / "d.gguf"
    write_llm_gguf(dense_ckpt, out, shared_type="f32", other_type="f32", progress=False)
    s = _parity(out, dense_ckpt, PARITY_TEXT, monkeypatch)[0]
    print(f"dense qwen2: top-1 {s['top1']:.3f}, max |dlogit| {s['max']:.2e}, mean {s['mean']:.2e}")
    assert s["top1"] == 1.0 and s["max"] < 1e-3 * max(1.0, s["scale"])


def test_llama_cpp_runs_sparse_and_moe_llava_encodings(dense256, tmp_path, monkeypatch):
    """Dense layers (zero routed experts) and MoE-LLaVA (zero shared expert) load and match too."""
    pytest.importorskip("llama_cpp")
    for name, kw, ex in (("sparse", dict(top_k=1, layers="sparse"), {}),
                         ("moe", dict(variant="moe-llava", layers="all"), {"expert_type": "f32"})):
        ckpt = _moe_ckpt(dense256, tmp_path / name, **kw)
        out = tmp_path / f"{name}.gguf"
        write_llm_gguf(ckpt, out, shared_type="f32", other_type="f32", progress=False, **ex)
        s = _parity(out, ckpt, PARITY_TEXT, monkeypatch)[1 if name == "sparse" else 0]
        print(f"{name}: top-1 {s['top1']:.3f}, max |dlogit| {s['max']:.2e}, mean {s['mean']:.2e}")
        assert np.isfinite(s["max"]) and s["top1"] >= 0.95 and s["mean"] < 2e-3 * s["scale"], name

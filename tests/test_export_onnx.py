"""mote-export --format onnx and mote-run --engine onnxruntime: the folder (checker, functions, one weights
file), the ternary experts bit-exact with the deployable form, the ai.mote::TernaryMatMul body on three
evaluators, parity with PyTorch (decoder logits, vision features, prompts, greedy answers on held-out
questions), every checkpoint variant, onnxruntime-genai, and bad input."""
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto  # noqa: E402

from mote_edge.checkpoint import load_model, save_model  # noqa: E402
from mote_edge.deploy import ternary_experts  # noqa: E402
from mote_edge.exporters import cli  # noqa: E402
from mote_edge.exporters.errors import MoteExportError  # noqa: E402
from mote_edge.exporters.onnx_files import image_processor  # noqa: E402
from mote_edge.exporters.onnx_folder import write_onnx_folder  # noqa: E402
from mote_edge.exporters.onnx_graph import (MOTE_DOMAIN, Graph, functions_used, pack_nbits2,  # noqa: E402
                                             ternary_matmul_exact, ternary_matmul_nbits, unpack_nbits2)
from mote_edge.runtime_cpu import onnx_engine, run  # noqa: E402
from mote_edge.runtime_cpu.records import normalize_answer  # noqa: E402
from mote_edge.tiny import ASSETS  # noqa: E402
from mote_edge.upcycle import upcycle  # noqa: E402

from .conftest import perturb_experts  # noqa: E402

TINY = ASSETS / "mote"
DATA = ASSETS / "data"
LM = "model.language_model."
PROMPTS = ["<|im_start|>user\nWhat colour is the square?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n",
           "<|im_start|>user\nHow many shapes are there?<|im_end|>\n<|im_start|>assistant\ntwo<|im_end|>\n"
           "<|im_start|>user\nWhere is the circle?<|im_end|>\n<|im_start|>assistant\ntop left"]
needs_tiny = pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="embedded tiny checkpoint not built")


def _sessions(folder: Path) -> dict:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    return {k: ort.InferenceSession(str(folder / f"{k}.onnx"), so) for k in ("vision", "embedding", "decoder")}


def _decoder_run(dec, cfg: dict, embeds=None, ids=None, past=None, start: int = 0):
    heads = cfg["num_attention_heads"]
    kvh, d = cfg["num_key_value_heads"], cfg["hidden_size"] // heads
    n = (embeds if embeds is not None else ids).shape[1]
    feed = {"input_ids": np.zeros((1, 0), np.int64) if ids is None else ids,
            "attention_mask": np.ones((1, start + n), np.int64), "position_ids": np.arange(start, start + n)[None]}
    if embeds is not None:
        feed["inputs_embeds"] = embeds
    for i in range(cfg["num_hidden_layers"]):
        for j, kv in enumerate(("key", "value")):
            feed[f"past_key_values.{i}.{kv}"] = past[2 * i + j] if past else np.zeros((1, kvh, 0, d), np.float32)
    out = dec.run(None, feed)
    return out[0][0], out[1:]


def _stats(got, ref) -> dict:
    d = np.abs(got - ref)
    return dict(top1=float((got.argmax(-1) == ref.argmax(-1)).mean()), max=float(d.max()), mean=float(d.mean()),
                scale=float(np.abs(ref).mean()))


# ---- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    if not (TINY / "model.safetensors").is_file():
        pytest.skip("embedded tiny checkpoint not built")
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    write_onnx_folder(TINY, out, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_torch():
    if not (TINY / "model.safetensors").is_file():
        pytest.skip("embedded tiny checkpoint not built")
    from transformers import AutoProcessor

    return load_model(TINY), AutoProcessor.from_pretrained(str(TINY))


N_ANSWERS = 40


@pytest.fixture(scope="module")
def torch_answers(tiny_torch) -> list[str]:
    """PyTorch's greedy answers to the first N_ANSWERS held-out questions (mote_edge.evaluate)."""
    from mote_edge.evaluate import generate_answers

    model, proc = tiny_torch
    return generate_answers(model, proc, _records(N_ANSWERS), DATA / "images", progress=False)


def _variant(base: Path, out: Path, **kw) -> Path:
    upcycle(base, out, experts=4, **kw)
    model = load_model(out)
    perturb_experts(model)
    save_model(model, out, side_files_from=base)
    return out


@pytest.fixture(scope="module")
def variants(tmp_path_factory, dense_ckpt) -> dict:
    """The checkpoint kinds the exporter accepts, small (hidden 64): MoTE top-1 on every layer, MoTE top-2
    on the sparse layers (others dense FFN), MoE-LLaVA (fp experts, top-2, no shared expert), dense."""
    d = tmp_path_factory.mktemp("variants")
    return {"mote": _variant(dense_ckpt, d / "mote", top_k=1, layers="all"),
            "sparse_top2": _variant(dense_ckpt, d / "sparse", top_k=2, layers="sparse"),
            "moe-llava": _variant(dense_ckpt, d / "moe", variant="moe-llava", layers="all"),
            "dense": dense_ckpt}


# ---- the folder -----------------------------------------------------------------------------------------------


def test_folder_files_checker_functions_and_one_weights_file(tiny_onnx):
    names = sorted(p.name for p in tiny_onnx.iterdir())
    for f in ("vision.onnx", "embedding.onnx", "decoder.onnx", "model.onnx.data", "config.json",
              "generation_config.json", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "processor_config.json"):
        assert f in names, f
    assert not [n for n in names if n.endswith(".tmp")]
    cfg = json.loads((tiny_onnx / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["mote_onnx"]["kernels"] == "exact"
    assert cfg["mote_onnx"]["image_seq_length"] == 36 and cfg["mote"]["num_experts"] == 4
    offsets = {}
    for f in ("vision", "embedding", "decoder"):
        path = tiny_onnx / f"{f}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        m = onnx.load(str(path), load_external_data=False)
        assert {(fn.domain, fn.name) for fn in m.functions} >= functions_used(m), f  # every custom node has its function
        locations = set()
        for t in m.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                ext = {e.key: e.value for e in t.external_data}
                locations.add(ext["location"])
                offsets.setdefault(t.name, set()).add(ext["offset"])
        assert locations == {"model.onnx.data"}, f
    dec = onnx.load(str(tiny_onnx / "decoder.onnx"), load_external_data=False)
    assert functions_used(dec) == {(MOTE_DOMAIN, "TernaryMatMul")}
    assert sum(n.op_type == "TernaryMatMul" for n in dec.graph.node) == 4 * 4 * 3
    assert any(o.domain == MOTE_DOMAIN for o in dec.opset_import)
    assert len(offsets["embed_tokens.weight"]) == 1  # written once, used by embedding.onnx and the decoder (and head)
    total = sum(p.stat().st_size for p in tiny_onnx.iterdir())
    print(f"tiny ONNX folder: {total / 2 ** 20:.2f} MiB, weights file "
          f"{(tiny_onnx / 'model.onnx.data').stat().st_size / 2 ** 20:.2f} MiB")


def test_ternary_initializers_are_exactly_the_deployable_form(tiny_onnx, tiny_torch):
    deploy = ternary_experts(tiny_torch[0])
    m = onnx.load(str(tiny_onnx / "decoder.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    assert len(deploy) == 48
    for name, (codes, scale) in deploy.items():
        key = name.removeprefix(LM).removesuffix(".weight")
        got_codes, got_scale = inits[key + ".codes"], inits[key + ".scale"]
        assert got_codes.dtype == np.int8 and np.array_equal(got_codes, codes.T), name  # [K, N] for MatMulInteger
        assert got_scale.dtype == np.float32 and got_scale.tobytes() == np.float32(scale).tobytes(), name


def _ternary_model(k: int, n: int, codes: np.ndarray, scale: np.float32) -> onnx.ModelProto:
    g = Graph("ternary")
    x = g.input("x", TensorProto.FLOAT, [None, None, k])
    y = g.op("TernaryMatMul", x, g.weight("w", codes), g.weight("s", np.asarray(scale)), domain=MOTE_DOMAIN)
    g.output(y, "y", TensorProto.FLOAT, [None, None, n])
    return g.model([ternary_matmul_exact()])


def test_ternary_matmul_body_reference_evaluator_ort_numpy_and_torch():
    import mote_edge.quant as mq
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    k, n = 96, 40
    codes = rng.integers(-1, 2, (k, n)).astype(np.int8)
    scale = np.float32(0.0371)
    m = _ternary_model(k, n, codes, scale)
    onnx.checker.check_model(m, full_check=True)
    x = (rng.standard_normal((2, 5, k)) * rng.uniform(0.1, 5, (2, 5, 1))).astype(np.float32)
    x[0, 0] = 0  # an all-zero token: the 1e-5 floor of the scale
    x[0, 1, :3] = [1.0, 1 / 127, -1.0]  # 0.5 exactly after scaling: round half to even
    x[1, 0, 0] = 1e4  # one huge activation: all others round to 0
    ref = ReferenceEvaluator(m).run(None, {"x": x})[0]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    got = ort.InferenceSession(m.SerializeToString(), so).run(None, {"x": x})[0]
    amax = np.maximum(np.abs(x).max(-1, keepdims=True), np.float32(1e-5))
    q = np.clip(np.rint(x * (np.float32(127) / amax)), -128, 127)
    numpy_ref = (q.astype(np.int64) @ codes.astype(np.int64)).astype(np.float32) * (amax / np.float32(127)) * scale
    assert np.array_equal(ref, numpy_ref) and np.array_equal(got, numpy_ref)
    with torch.no_grad():
        w = torch.from_numpy(codes.T.astype(np.float32)) * torch.tensor(scale)
        torch_ref = torch.nn.functional.linear(mq.quantize_activation_int8(torch.from_numpy(x)), w).numpy()
    print(f"TernaryMatMul exact body: ReferenceEvaluator == onnxruntime == int64 numpy; vs torch fake-quant "
          f"max |d| {np.abs(got - torch_ref).max():.2e} (max |y| {np.abs(torch_ref).max():.2f})")
    assert np.abs(got - torch_ref).max() <= 1e-5 * max(1.0, np.abs(torch_ref).max())


def test_missing_function_does_not_load():
    m = _ternary_model(8, 4, np.ones((8, 4), np.int8), np.float32(1.0))
    del m.functions[:]
    with pytest.raises(Exception, match="TernaryMatMul"):
        ort.InferenceSession(m.SerializeToString())


@pytest.mark.parametrize("k", [256, 320, 896])
def test_fast_body_packs_codes_exactly_and_is_matmulnbits_per_block_int8(k):
    """TernaryMatMulNBits: the 2-bit packing round-trips the codes (K not a multiple of 128 too, padded with
    code 2 = 0), and onnxruntime's MatMulNBits (accuracy_level 4) is exactly a product with int8 activations
    per 128-block along K (not per token): a numpy model of that matches to fp32 rounding."""
    rng = np.random.default_rng(k)
    n = 48
    codes = rng.integers(-1, 2, (n, k)).astype(np.int8)
    scale = np.float32(0.021)
    packed, scales = pack_nbits2(codes, scale)
    blocks = -(-k // 128)
    assert packed.shape == (n, blocks, 32) and packed.dtype == np.uint8 and scales.shape == (n * blocks,)
    assert np.array_equal(unpack_nbits2(packed, k), codes) and np.all(scales == scale)
    g = Graph("nbits")
    x = g.input("x", TensorProto.FLOAT, [None, k])
    y = g.op("TernaryMatMulNBits", x, g.weight("b", packed), g.weight("s", scales), domain=MOTE_DOMAIN, K=k, N=n)
    g.value_info.append(onnx.helper.make_tensor_value_info(y, TensorProto.FLOAT, [None, n]))
    g.output(y, "y", TensorProto.FLOAT, [None, n])
    m = g.model([ternary_matmul_nbits()])
    onnx.checker.check_model(m, full_check=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    xs = (rng.standard_normal((7, k)) * rng.uniform(0.1, 3, (7, 1))).astype(np.float32)
    got = ort.InferenceSession(m.SerializeToString(), so).run(None, {"x": xs})[0]
    xp = np.zeros((7, blocks * 128), np.float32)
    xp[:, :k] = xs
    cp = np.zeros((blocks * 128, n), np.float32)
    cp[:k] = codes.T
    xb = xp.reshape(7, blocks, 128)
    d = np.abs(xb).max(-1, keepdims=True) / 127
    q = np.rint(xb / np.where(d == 0, 1, d))
    model = (np.einsum("rbk,bkn->rbn", q, cp.reshape(blocks, 128, n)) * d).sum(1) * scale
    assert np.abs(got - model).max() < 1e-5 * np.abs(model).max()


# ---- parity with PyTorch --------------------------------------------------------------------------------------


def _records(n: int) -> list[dict]:
    return json.loads((DATA / "test.json").read_text())[:n]


def test_multimodal_logits_and_vision_features_match_pytorch(tiny_onnx, tiny_torch):
    """Teacher-forced through vision.onnx -> embedding.onnx -> decoder.onnx (prefill, then the last tokens one
    at a time through the KV cache and the decoder's input_ids path) against the PyTorch model."""
    from PIL import Image

    model, proc = tiny_torch
    s, cfg = _sessions(tiny_onnx), json.loads((tiny_onnx / "config.json").read_text())
    worst, cos_min, top1, kv_worst = 0.0, 1.0, [], 0.0
    means = []
    for r in _records(6):
        img = Image.open(DATA / "images" / r["image"]).convert("RGB")
        msgs = [{"role": "user", "content": r["conversations"][0]["value"]},
                {"role": "assistant", "content": r["conversations"][1]["value"]}]
        enc = proc(images=[img], text=[proc.tokenizer.apply_chat_template(msgs, tokenize=False)], return_tensors="pt")
        with torch.no_grad():
            ref = model(**enc).logits[0].numpy()
            f = model.model.get_image_features(pixel_values=enc["pixel_values"], vision_feature_layer=-1,
                                               vision_feature_select_strategy="full")
            f_ref = (f.pooler_output if hasattr(f, "pooler_output") else f)[0].numpy()
        pix = onnx_engine.pixel_values(DATA / "images" / r["image"], image_processor(tiny_onnx), 48)
        assert np.array_equal(pix, enc["pixel_values"].numpy())  # the engine's preprocessing is the processor's
        feats = s["vision"].run(None, {"pixel_values": pix})[0]
        cos_min = min(cos_min, float(((feats * f_ref).sum(1) / np.linalg.norm(feats, axis=1)
                                      / np.linalg.norm(f_ref, axis=1)).min()))
        ids = enc["input_ids"].numpy()
        embeds = s["embedding"].run(None, {"input_ids": ids, "image_features": feats})[0]
        logits, _ = _decoder_run(s["decoder"], cfg, embeds=embeds)
        st = _stats(logits, ref)
        worst, means = max(worst, st["max"]), means + [st["mean"]]
        top1.append(st["top1"])
        cut = ids.shape[1] - 4
        _, past = _decoder_run(s["decoder"], cfg, embeds=embeds[:, :cut])
        for t in range(cut, ids.shape[1]):
            step, past = _decoder_run(s["decoder"], cfg, ids=ids[:, t:t + 1], past=past, start=t)
            kv_worst = max(kv_worst, float(np.abs(step[-1] - logits[t]).max()))
    print(f"tiny MoTE, ONNX (exact) vs PyTorch, 6 image prompts teacher-forced: top-1 {np.mean(top1):.3f}, "
          f"max |dlogit| {worst:.2e}, mean {np.mean(means):.2e}; KV-cache steps vs one pass max {kv_worst:.2e}; "
          f"vision features cosine min {cos_min:.7f}")
    assert min(top1) == 1.0
    assert worst < 2e-3 and np.mean(means) < 5e-5  # measured 2.9e-4 (one int8 rounding flip) / 6e-6
    assert kv_worst < 1e-4
    assert cos_min >= 0.99999


def test_prompt_ids_equal_the_hf_processor(tiny_onnx, tiny_torch):
    from PIL import Image

    _, proc = tiny_torch
    s = onnx_engine.Session(tiny_onnx, threads=2)
    for r in _records(4):
        q = r["conversations"][0]["value"]
        text = proc.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=False)
        want = proc(images=[Image.open(DATA / "images" / r["image"]).convert("RGB")], text=[text])["input_ids"][0]
        assert s.prompt_ids(q) == list(want) == s.prompt_ids(q.removeprefix("<image>\n"))


def test_greedy_answers_equal_pytorch_on_held_out_questions(tiny_onnx, torch_answers):
    """40 of the 300 held-out questions (all 300: 300/300, measured once, see the README)."""
    from mote_edge.evaluate import accuracy

    records, ref = _records(N_ANSWERS), torch_answers
    got = onnx_engine.evaluate_onnx(tiny_onnx, DATA / "test.json", DATA / "images", limit=N_ANSWERS, threads=2)
    same = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(ref, got["answers"]))
    print(f"ONNX engine vs PyTorch greedy answers: {same}/{len(records)} equal, accuracy {got['overall']:.1f}% vs "
          f"{accuracy(records, ref)['overall']:.1f}%")
    assert got["answers"] == ref


def test_fast_export_codes_logits_and_answers(tiny_onnx, tiny_torch, torch_answers, tmp_path):
    """--onnx-kernels fast: the same codes and scales in 2-bit form, the folder checks, teacher-forced logits
    close to PyTorch's, and greedy answers on held-out questions agree (300/300 measured once)."""
    model, proc = tiny_torch
    out = tmp_path / "fast"
    summary = write_onnx_folder(TINY, out, kernels="fast", progress=False)
    assert summary["kernels"] == "fast" and summary["ternary_nodes"] == 48
    onnx.checker.check_model(str(out / "decoder.onnx"), full_check=True)
    m = onnx.load(str(out / "decoder.onnx"))
    assert {(f.domain, f.name) for f in m.functions} == {(MOTE_DOMAIN, "TernaryMatMulNBits")} == functions_used(m)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    for name, (codes, scale) in ternary_experts(model).items():
        key = name.removeprefix(LM).removesuffix(".weight")
        assert np.array_equal(unpack_nbits2(inits[key + ".nbits2"], codes.shape[1]), codes), name
        assert np.all(inits[key + ".scales"] == np.float32(scale)), name
    exact_bytes = (tiny_onnx / "model.onnx.data").stat().st_size
    ids = np.array([proc.tokenizer.encode(PROMPTS[0] + PROMPTS[1], add_special_tokens=False)])
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits[0].numpy()
    cfg = json.loads((out / "config.json").read_text())
    st = _stats(_decoder_run(_sessions(out)["decoder"], cfg, ids=ids)[0], ref)
    records, want = _records(N_ANSWERS), torch_answers
    got = onnx_engine.evaluate_onnx(out, DATA / "test.json", DATA / "images", limit=N_ANSWERS, threads=2)["answers"]
    same = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(want, got))
    print(f"fast body: routed experts {summary['routed_bytes'] / 2 ** 20:.2f} MiB, weights file "
          f"{summary['files']['model.onnx.data'] / 2 ** 20:.2f} MiB (exact {exact_bytes / 2 ** 20:.2f}); "
          f"teacher-forced top-1 {st['top1']:.3f}, max |dlogit| {st['max']:.2e}, mean {st['mean']:.2e} "
          f"(mean |logit| {st['scale']:.3f}); answers {same}/{len(records)} equal PyTorch's")
    assert st["top1"] >= 0.95 and st["mean"] < 0.01 * st["scale"]
    assert same >= len(records) - 1


@pytest.mark.parametrize("kind", ["mote", "sparse_top2", "moe-llava", "dense"])
def test_every_checkpoint_kind_exports_and_matches_pytorch(kind, variants, tmp_path):
    from transformers import AutoTokenizer

    ckpt = variants[kind]
    out = tmp_path / "onnx"
    summary = write_onnx_folder(ckpt, out, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    dec = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    n_tern = sum(n.op_type == "TernaryMatMul" for n in dec.graph.node)
    mote = json.loads((ckpt / "config.json").read_text()).get("mote") or {}
    want = 3 * mote["num_experts"] * len(mote["layers"]) if mote.get("variant") == "mote" else 0
    assert n_tern == summary["ternary_nodes"] == want
    if not want:
        assert not dec.functions
    onnx.checker.check_model(str(out / "decoder.onnx"), full_check=True)
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    ids = np.array([tok.encode(PROMPTS[0] + PROMPTS[1], add_special_tokens=False)])
    with torch.no_grad():
        ref = load_model(ckpt)(input_ids=torch.from_numpy(ids)).logits[0].numpy()
    got, _ = _decoder_run(_sessions(out)["decoder"], cfg, ids=ids)
    st = _stats(got, ref)
    print(f"{kind}: {n_tern} TernaryMatMul nodes; ONNX vs PyTorch teacher-forced top-1 {st['top1']:.3f}, "
          f"max |dlogit| {st['max']:.2e}, mean {st['mean']:.2e} (mean |logit| {st['scale']:.3f})")
    assert st["top1"] == 1.0 and st["max"] < (2e-3 if want else 1e-4)


def test_onnxruntime_genai_loads_the_folder_and_generates_like_pytorch(tiny_onnx, tiny_torch):
    og = pytest.importorskip("onnxruntime_genai")
    model, proc = tiny_torch
    prompt = "<|im_start|>user\nHow many shapes are there?<|im_end|>\n<|im_start|>assistant\n"
    ids = proc.tokenizer.encode(prompt, add_special_tokens=False)
    m = og.Model(str(tiny_onnx))
    assert list(og.Tokenizer(m).encode(prompt)) == ids  # its tokenizer reads the copied tokenizer files
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=len(ids) + 6, do_sample=False)
    gen = og.Generator(m, params)
    gen.append_tokens(np.array(ids, np.int32))
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                             eos_token_id=proc.tokenizer.eos_token_id, pad_token_id=proc.tokenizer.pad_token_id)
    ref = ref[0, len(ids):].tolist()
    print(f"onnxruntime-genai greedy {got} vs PyTorch {ref}")
    assert got == ref


# ---- mote-run ---------------------------------------------------------------------------------------------------


def test_mote_run_onnxruntime_streams_answer_and_stats_within_plan(tiny_onnx):
    rec = _records(1)[0]
    question = rec["conversations"][0]["value"].removeprefix("<image>\n")
    plan = onnx_engine.plan_memory(tiny_onnx, None, None)
    args = [Path(sys.executable).parent / "mote-run", tiny_onnx, "--engine", "onnxruntime", "--image",
            DATA / "images" / rec["image"], "--prompt", question, "--threads", "2", "--memory-limit", "1GB"]
    # through sh, which forks mote-run: a process exec'ed straight from this one would report pytest's peak RSS
    # (Linux keeps ru_maxrss across fork + exec)
    r = subprocess.run(["/bin/sh", "-c", " ".join(shlex.quote(str(x)) for x in args) + "; exit $?"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    s = onnx_engine.Session(tiny_onnx, threads=2)
    assert r.stdout.strip() == s.answer(DATA / "images" / rec["image"], question, 128).strip()
    for key in ("planned resident memory", "time to first token", "tokens/s", "peak RSS"):
        assert key in r.stderr, key
    peak = float(r.stderr.split("peak RSS: ")[1].split()[0]) * 2 ** 20
    print(f"mote-run --engine onnxruntime: {r.stdout.strip()!r}; peak RSS {peak / 2 ** 20:.0f} MiB, planned "
          f"{plan['total_bytes'] / 2 ** 20:.0f} MiB")
    assert peak < plan["total_bytes"]


def test_memory_limit_refuses_before_loading(tiny_onnx, capsys):
    img = DATA / "images" / _records(1)[0]["image"]
    with pytest.raises(SystemExit) as exc:
        run.main([str(tiny_onnx), "--engine", "onnxruntime", "--image", str(img), "--prompt", "q",
                  "--memory-limit", "20MiB"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "exceeds --memory-limit" in err[0], err


def _broken(tiny_onnx: Path, tmp_path: Path, case: str) -> Path:
    d = tmp_path / case
    shutil.copytree(tiny_onnx, d)
    if case == "missing_decoder":
        (d / "decoder.onnx").unlink()
    elif case == "corrupt_decoder":
        (d / "decoder.onnx").write_bytes(b"\x08\x07garbage" * 20)
    elif case == "truncated_data":
        p = d / "model.onnx.data"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif case == "not_an_export":
        (d / "config.json").write_text(json.dumps({"model_type": "llava"}))
    return d


@pytest.mark.parametrize("case, message", [
    ("missing_decoder", "lacks decoder.onnx"),
    ("corrupt_decoder", "onnxruntime could not load"),
    ("truncated_data", "onnxruntime could not load"),
    ("not_an_export", "not an ONNX export"),
    ("no_folder", "does not exist"),
    ("mmproj", "--mmproj is for GGUF"),
])
def test_mote_run_bad_folder_is_one_error_line(case, message, tiny_onnx, tmp_path, capsys):
    folder = tmp_path / "none" if case == "no_folder" else _broken(tiny_onnx, tmp_path, case)
    img = DATA / "images" / _records(1)[0]["image"]
    extra = ["--mmproj", str(img)] if case == "mmproj" else []
    with pytest.raises(SystemExit) as exc:
        run.main([str(folder), "--engine", "onnxruntime", "--image", str(img), "--prompt", "q", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_llama_engine_on_a_folder_points_to_onnxruntime(tiny_onnx, capsys):
    img = DATA / "images" / _records(1)[0]["image"]
    with pytest.raises(SystemExit):
        run.main([str(tiny_onnx), "--image", str(img), "--prompt", "q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--engine onnxruntime" in err[0], err


# ---- mote-export bad input -------------------------------------------------------------------------------------


def _edit(src: Path, dst: Path, edit=None, drop: str | None = None) -> Path:
    shutil.copytree(src, dst)
    if edit:
        cfg = json.loads((dst / "config.json").read_text())
        edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if drop:
        (dst / drop).unlink()
    return dst


@pytest.mark.parametrize("case, args, message", [
    ("llama", [], "unsupported architecture"),
    ("rope", [], "RoPE scaling"),
    ("no_tokenizer", [], "has no tokenizer.json"),
    ("no_processor", [], "image processor"),
    ("exists", [], "already exists"),
    ("ok", ["--onnx-kernels", "int4"], "accepted: exact, fast"),
    ("ok", ["--ternary-type", "tq2_0"], "--ternary-type is for --format gguf"),
    ("ok", ["--memory-budget", "1GB"], "--memory-budget is for --format gguf"),
])
def test_export_bad_input_is_one_error_line_and_writes_nothing(case, args, message, variants, tmp_path, capsys):
    base = variants["mote"]
    src = {"llama": lambda: _edit(base, tmp_path / "c", lambda c: c.update(model_type="llama")),
           "rope": lambda: _edit(base, tmp_path / "c", lambda c: c["text_config"].update(
               rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4})),
           "no_tokenizer": lambda: _edit(base, tmp_path / "c", drop="tokenizer.json"),
           "no_processor": lambda: _edit(base, tmp_path / "c", drop="processor_config.json")}.get(case, lambda: base)()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "onnx"
    if case == "exists":
        out.mkdir()
    with pytest.raises(SystemExit) as exc:
        cli.main([str(src), "--format", "onnx", "-o", str(out), "--quiet", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert [p.name for p in out_dir.iterdir()] == (["onnx"] if case == "exists" else [])
    if case == "exists":
        assert not list(out.iterdir())


def test_onnx_kernels_without_format_onnx(variants, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main([str(variants["mote"]), "-o", str(tmp_path / "m.gguf"), "--onnx-kernels", "exact"])
    assert "--onnx-kernels is for --format onnx" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_failure_while_writing_leaves_nothing(variants, tmp_path, monkeypatch):
    from mote_edge.exporters import onnx_llm

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(onnx_llm, "build_decoder", boom)
    with pytest.raises(MoteExportError, match=r"writing in .* failed \(disk full\); nothing was written"):
        write_onnx_folder(variants["mote"], tmp_path / "onnx", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_and_no_torch_in_export_or_engine(variants, tmp_path):
    code = ("import sys; from mote_edge.exporters import cli; cli.main(sys.argv[1:]); "
            "import mote_edge.runtime_cpu.onnx_engine; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'transformers'))]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code, str(variants["mote"]), "--format", "onnx", "-o",
                        str(tmp_path / "o"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "TernaryMatMul nodes" in r.stdout and (tmp_path / "o" / "decoder.onnx").is_file()

"""The mote engine (runtime_cpu: our own numpy runtime, `mote-run --engine mote`) against PyTorch on the
files mote-export writes: exact ternary decoding and integer kernels, the mote.* keys, tokenizer ids,
teacher-forced logits (MoTE TQ2_0 / TQ1_0 / Q2_0 / Q4_0 / F16 experts, sparse layers, MoE-LLaVA, dense),
image embeddings, greedy answers, the mote-run front, the memory plan, and bad input."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from mote_edge.checkpoint import load_model
from mote_edge.deploy import ternary_experts
from mote_edge.exporters.gguf_header import read_gguf_header
from mote_edge.exporters.gguf_llm import write_llm_gguf
from mote_edge.exporters.gguf_mmproj import write_mmproj
from mote_edge.exporters.errors import MoteExportError
from mote_edge.exporters.ternary import Q2_0, pack_ternary
from mote_edge.runtime_cpu import run
from mote_edge.runtime_cpu.kernels import EXACT_F32_K, TernaryLinear, quantize_per_token
from mote_edge.runtime_cpu.mote_engine import MoteModel, evaluate, plan_memory
from mote_edge.runtime_cpu.quants import decode_ternary

from .conftest import TEXT
from .test_export_gguf import PARITY_TEXT, PROMPTS, _dense, _moe_ckpt, dense256, embedded, mote256, mote320  # noqa: F401
from .test_mmproj_run import _torch_image_features, multilayer_ckpt, square_ffn_ckpt  # noqa: F401

LM = "model.language_model."
# Teacher-forced logits, measured on every file below: typically 1e-6..4e-5 from PyTorch (fp32 rounding);
# the maximum is set by the rare activation whose x * 127 / max|x| lands within an ulp of a .5 tie, so that
# its int8 code differs by one between the two float computations (0.0011 on the embedded model's f32
# export, at one of 45 positions). llama.cpp on the same file: 0.017 (per-256-block activations).
MAX_DLOGIT = 5e-3
MEAN_DLOGIT = 1e-4
# hidden 96: gate/up rows (96 wide) take the exact Q4_0 fallback; FFN 136: down rows (136) the F16 one
TEXT96 = TEXT | {"hidden_size": 96, "intermediate_size": 136}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """PyTorch references on one thread: on this shared 2-core machine torch's 2 spinning threads took 8 s
    for a 45-token forward of the tiny model that one thread does in 0.06 s (both engines run on one too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _export(ckpt: Path, out: Path, mmproj: bool = False, mmproj_type: str = "f16", **types) -> Path:
    write_llm_gguf(ckpt, out, progress=False, **types)
    if mmproj:
        write_mmproj(ckpt, out.with_name(out.stem + "-mmproj.gguf"), ftype=mmproj_type)
    return out


def _torch_logits(ckpt: Path, ids: list[int], f16: str | None = None) -> np.ndarray:
    """PyTorch's logits; f16 "all": the weights the exporter writes in f16 rounded to f16 first (every matrix
    but the router, which is F32 in the file, and MoTE's ternary latents, which the file holds as codes x
    scale); "experts": only the (MoE-LLaVA, full-precision) experts."""
    model = load_model(ckpt).eval()
    if f16:
        ternary = set(ternary_experts(model))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.ndim >= 2 and "router" not in n and n not in ternary and (f16 == "all" or ".experts." in n):
                    p.copy_(p.half().float())
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def _ids(ckpt: Path, text: str = PARITY_TEXT) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt)).encode(text, add_special_tokens=False)


def _check_logits(tag: str, got: np.ndarray, ref: np.ndarray) -> None:
    d = np.abs(got - ref)
    top1 = (got.argmax(-1) == ref.argmax(-1)).mean()
    print(f"{tag}: mote engine vs PyTorch, top-1 {top1:.3f}, max |dlogit| {d.max():.2e}, mean {d.mean():.2e} "
          f"(mean |logit| {np.abs(ref).mean():.3f})")
    assert top1 == 1.0 and d.max() < MAX_DLOGIT and d.mean() < MEAN_DLOGIT, tag


def _check_plan(gguf: Path, m: MoteModel) -> None:
    """The header-only memory plan counts what the loader mapped and repacked, byte for byte."""
    plan = plan_memory(gguf, None, m.n_ctx)
    assert (plan["mapped_bytes"], plan["repack_bytes"]) == (m.report["mapped_bytes"], m.report["repacked_bytes"])


@pytest.fixture(scope="module")
def tiny_gguf(embedded, tmp_path_factory) -> Path:
    """The embedded MoTE exported with mote-export's defaults (TQ2_0 experts, f16 elsewhere) + mmproj."""
    return _export(embedded, tmp_path_factory.mktemp("tiny") / "tiny.gguf", mmproj=True)


@pytest.fixture(scope="module")
def tiny_model(tiny_gguf) -> MoteModel:
    return MoteModel(tiny_gguf, threads=1)


@pytest.fixture(scope="module")
def mote96(tmp_path_factory, processor) -> Path:
    dense = _dense(tmp_path_factory, processor, TEXT96, "ckpt96")
    return _moe_ckpt(dense, tmp_path_factory.mktemp("ckpt96") / "mote", top_k=2, layers="all")


# ---- decoding and kernels: exact -------------------------------------------------------------------------


@pytest.mark.parametrize("qtype, cols", [(T.TQ2_0, 512), (T.TQ1_0, 768), (Q2_0, 192), (T.Q4_0, 96), (T.F16, 40)])
def test_ternary_decoders_give_back_the_codes(qtype, cols):
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, size=(3, 8, cols)).astype(np.int8)
    codes[0] = 1  # all +1
    codes[1, :3] = 0  # all-zero rows / blocks (d = 0 in the file)
    scales = np.array([0.0123, 1.5e-5, 3.75], np.float32)
    raw = pack_ternary(codes, scales, qtype)
    raw = raw.view(np.uint8).reshape(-1) if qtype == T.F16 else raw.reshape(-1)
    assert np.array_equal(decode_ternary(raw, qtype, codes.shape, scales, "t"), codes)
    with pytest.raises(MoteExportError, match="not"):  # a scale the blocks do not hold
        decode_ternary(raw, qtype, codes.shape, scales * np.float32(1.01), "t")


def test_ternary_decoder_refuses_a_non_ternary_block():
    codes = np.ones((1, 4, 256), np.int8)
    raw = pack_ternary(codes, np.ones(1, np.float32), T.TQ2_0).reshape(-1).copy()
    raw[0] |= 3  # code 3 (+2): not ternary
    with pytest.raises(MoteExportError, match=r"codes outside \{-1, 0, 1\}"):
        decode_ternary(raw, T.TQ2_0, codes.shape, np.ones(1, np.float32), "t")


def test_activation_codes_equal_torch_quantizer():
    """quantize_per_token's codes and step are quantize_activation_int8's, bit for bit (ties included)."""
    import mote_edge.quant as mq

    rng = np.random.default_rng(1)
    x = rng.normal(0, 3, size=(64, 512)).astype(np.float32)
    x[0, :4] = [127.0, 0.5, 1.5, -2.5]  # x * 127 / 127 = exact ties: round half to even
    x[1] = 0  # all zero: eps
    x[2, :] = 1e-7
    q, step = quantize_per_token(x, 1e-5)
    want = mq.quantize_activation_int8(torch.from_numpy(x)).numpy()
    assert np.array_equal(q * step, want)
    assert q.min() >= -128 and q.max() <= 127 and np.array_equal(q, np.rint(q))


def test_ternary_int_dot_is_exact_on_adversarial_inputs():
    """All +1 codes against activations of +127 / -128 (the largest sums), odd row counts, K tails: the
    float32 BLAS product equals the int64 reference exactly up to K = EXACT_F32_K."""
    rng = np.random.default_rng(2)
    for k, n in ((EXACT_F32_K, 3), (4864 + 64, 7), (96, 1)):
        codes = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
        codes[0] = 1
        if n > 1:
            codes[1] = -1
        q = rng.integers(-128, 128, size=(5, k)).astype(np.float32)
        q[0], q[1] = 127, -128
        want = q.astype(np.int64) @ codes.astype(np.int64).T
        for form in ("int8", "f32"):
            lin = TernaryLinear(codes, np.float32(0.5), 1e-5, form)
            assert np.array_equal(lin.int_dot(q).astype(np.int64), want), (k, form)
    assert abs(want[0, 0]) == 96 * 127


# ---- the file: mote.* keys ------------------------------------------------------------------------------


def test_mote_keys_state_the_model(mote256, tmp_path):
    out = _export(mote256, tmp_path / "m.gguf")
    f = read_gguf_header(out, arrays=("mote.moe_layers", "mote.layer_has_shared_expert", "mote.ternary_scales")).fields
    assert (f["mote.variant"], f["mote.routing"], f["mote.top_k"], f["mote.expert_count"]) == \
        ("mote", "softmax_topk_no_renorm", 1, 4)
    assert f["mote.moe_layers"] == [0, 1] and f["mote.layer_has_shared_expert"] == [True, True]
    assert f["mote.shared_expert_scale"] == 0.5 and "2^-64" in f["mote.shared_expert_gate"]
    deploy = ternary_experts(load_model(mote256))
    want = [deploy[f"{LM}layers.{i}.mlp.experts.{e}.{p}_proj.weight"][1]
            for i in (0, 1) for p in ("gate", "up", "down") for e in range(4)]
    assert np.array_equal(np.float32(f["mote.ternary_scales"]), np.float32(want))  # exact fp32 scales


# ---- tokenizer ----------------------------------------------------------------------------------------------


def test_tokenizer_ids_equal_hf(tiny_model, embedded):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(embedded))
    for text in PROMPTS + [PARITY_TEXT, "", "<image><image>\n\n<|im_end|>x"]:
        ids = tiny_model.tokenizer.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert tiny_model.tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    question = "What colour is the square?"
    from mote_edge.tokenizer import prompt_for

    assert tiny_model.prompt(question) == prompt_for(question)  # the GGUF's template, rendered with jinja2


# ---- parity with PyTorch ------------------------------------------------------------------------------------


def test_embedded_logits_match_pytorch(embedded, tiny_model, tmp_path):
    """Default export (f16 attention / shared expert / embeddings) against PyTorch with those weights
    rounded to f16, and an all-f32 export against PyTorch as trained."""
    ids = _ids(embedded)
    _check_logits("embedded tq2_0 + f16", tiny_model.logits(ids), _torch_logits(embedded, ids, f16="all"))
    f32 = MoteModel(_export(embedded, tmp_path / "f32.gguf", shared_type="f32", other_type="f32"), threads=1, vision=False)
    _check_logits("embedded tq2_0 + f32", f32.logits(ids), _torch_logits(embedded, ids))


@pytest.mark.parametrize("ckpt, ternary, types", [
    ("mote256", "tq1_0", {"TQ1_0"}), ("mote256", "q2_0", {"Q2_0"}),
    ("mote320", "tq2_0", {"Q2_0", "TQ2_0"}),  # 320-wide gate/up rows: the exact Q2_0 fallback
    ("mote96", "tq2_0", {"Q4_0", "F16"}),  # 96-wide: Q4_0 fallback; 136-wide down rows: F16; top-2
])
def test_ternary_types_match_pytorch(ckpt, ternary, types, request, tmp_path):
    path = request.getfixturevalue(ckpt)
    out = _export(path, tmp_path / "m.gguf", ternary_type=ternary, shared_type="f32", other_type="f32")
    got = {t.qtype.name for t in read_gguf_header(out).tensors if "_exps" in t.name}
    assert got == types
    ids = _ids(path)
    m = MoteModel(out, threads=1, vision=False)
    _check_plan(out, m)
    _check_logits(f"{ckpt} {'+'.join(sorted(types))}", m.logits(ids), _torch_logits(path, ids))


@pytest.mark.parametrize("variant", ["sparse", "moe-llava", "moe-llava-f32", "dense"])
def test_sparse_moe_llava_and_dense_files_match_pytorch(variant, dense256, dense_ckpt, tmp_path):
    if variant == "dense":
        ckpt, types = dense_ckpt, {}
    elif variant == "sparse":  # MoE on layer 1 only: layer 0 is the FFN as a shared expert, zero experts
        ckpt, types = _moe_ckpt(dense256, tmp_path / "c", top_k=1, layers="sparse"), {}
    else:  # no shared expert (zero padding in the file), fp experts (f16: stacked copies, f32: in place), top-2
        ckpt = _moe_ckpt(dense256, tmp_path / "c", variant="moe-llava", layers="all")
        types = {"expert_type": "f32" if variant.endswith("f32") else "f16"}
    out = _export(ckpt, tmp_path / "m.gguf", shared_type="f32", other_type="f32", **types)
    m = MoteModel(out, threads=1, vision=False)
    assert m.llm.c.variant == ("dense" if variant == "dense" else "mote" if variant == "sparse" else "moe-llava")
    _check_plan(out, m)
    if variant != "dense":
        assert m.report["untouched_bytes"] > 0  # the padding is never read
    ids = _ids(ckpt)
    _check_logits(variant, m.logits(ids), _torch_logits(ckpt, ids, f16="experts" if types.get("expert_type") == "f16" else None))


def _torch_logits_with_file_weights(ckpt: Path, gguf: Path, ids: list[int]) -> np.ndarray:
    """PyTorch's logits with every float matrix the file holds (embeddings, attention, shared expert)
    replaced by the file's values as gguf-py dequantizes them (ffn_down_shexp halved back)."""
    from .test_export_gguf import _tensors, _values

    model, t = load_model(ckpt).eval(), _tensors(gguf)
    lm = model.model.language_model
    with torch.no_grad():
        lm.embed_tokens.weight.copy_(torch.from_numpy(_values(t["token_embd.weight"])))
        for i, layer in enumerate(lm.layers):
            for p in "qkvo":
                name = f"blk.{i}.attn_{'output' if p == 'o' else p}.weight"
                getattr(layer.self_attn, f"{p}_proj").weight.copy_(torch.from_numpy(_values(t[name])))
            for p in ("gate", "up", "down"):
                w = _values(t[f"blk.{i}.ffn_{p}_shexp.weight"]) * (0.5 if p == "down" else 1.0)
                getattr(layer.mlp.shared_expert, f"{p}_proj").weight.copy_(torch.from_numpy(w))
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("shared, other", [("q8_0", "bf16"), ("bf16", "q4_0"), ("q4_k", "q6_k")])
def test_float_types_match_pytorch_on_the_files_values(shared, other, mote256, tmp_path):
    """BF16 / Q8_0 / Q4_0 decoded natively; K-quants (no kernel here) converted to F32 at load with a
    notice; all against PyTorch holding the very values the file stores."""
    if "_k" in shared:
        pytest.importorskip("llama_cpp")  # ggml's own K-quant writer
    out = _export(mote256, tmp_path / "m.gguf", shared_type=shared, other_type=other)
    m = MoteModel(out, threads=1, vision=False)
    notices = " ".join(m.report["notices"])
    assert ("converted to F32 at load" in notices) == ("_k" in shared), notices
    _check_plan(out, m)
    ids = _ids(mote256)
    _check_logits(f"mote256 shared {shared} other {other}", m.logits(ids), _torch_logits_with_file_weights(mote256, out, ids))


@pytest.mark.parametrize("ckpt_name", ["embedded", "dense_ckpt", "square_ffn_ckpt", "multilayer_ckpt"])
def test_image_embeddings_match_transformers(ckpt_name, request, tmp_path, data_dir):
    """SigLIP tower + connector from the mmproj against get_image_features: the embedded model's default
    export (f16 matrices, exact for its bf16-stored weights), and f32 exports of random checkpoints with the
    legacy ffn names (intermediate == hidden), two feature layers incl. the embeddings, no connector bias."""
    ckpt = request.getfixturevalue(ckpt_name)
    m = MoteModel(_export(ckpt, tmp_path / "m.gguf", mmproj=True, mmproj_type="f16" if ckpt_name == "embedded" else "f32"),
                  threads=1)
    images = sorted((data_dir / "images").iterdir())[:3]
    for img in images:
        got, want = m.image_embeddings(img), _torch_image_features(ckpt, img)
        assert got.shape == want.shape == (m.vision.n_tokens, m.llm.c.hidden)
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        rel = np.abs(got - want).max() / np.abs(want).max()
        print(f"{ckpt_name}: image embeddings cosine min {cos.min():.8f}, max |diff| / max |value| {rel:.1e}")
        assert cos.min() >= 0.99999 and rel < 1e-5, ckpt_name


N_QUESTIONS = 64  # of the 300 held out (all 300 agree: README); two PyTorch batches


def test_greedy_answers_equal_pytorch(embedded, tiny_model):
    from transformers import AutoProcessor

    from mote_edge.data import load_records
    from mote_edge.evaluate import generate_answers
    from mote_edge.runtime_cpu.records import normalize_answer
    from mote_edge.tiny import ASSETS

    records = load_records(ASSETS / "data" / "test.json")[:N_QUESTIONS]
    ref = generate_answers(load_model(embedded), AutoProcessor.from_pretrained(str(embedded)), records,
                           ASSETS / "data" / "images", progress=False)
    got = evaluate(tiny_model, records, ASSETS / "data" / "images")["answers"]
    assert [normalize_answer(a) for a in got] == [normalize_answer(a) for a in ref]


# ---- the Python API and mote-run ----------------------------------------------------------------------------


def test_api_streams_many_questions_and_samples_by_seed(tiny_model, data_dir):
    img = sorted((data_dir / "images").iterdir())[0]
    pieces = list(tiny_model.ask(img, "What colour is the square?", max_tokens=6))
    assert pieces and "".join(pieces) == tiny_model.answer(img, "What colour is the square?", max_tokens=6)
    kw = dict(max_tokens=6, temperature=1.5, top_k=20, top_p=0.9)
    a = [tiny_model.answer(img, "How many shapes are there?", seed=s, **kw) for s in (1, 1, 2, 3, 4, 5)]
    assert a[0] == a[1] and len(set(a)) > 1  # reproducible by seed, not greedy
    assert tiny_model.answer(img, "How many shapes are there?", temperature=0.7, top_k=1) == \
        tiny_model.answer(img, "How many shapes are there?")  # top-1 sampling is greedy
    finish = [why for _, why in tiny_model.stream(img, "How many shapes are there?", max_tokens=1)][-1]
    assert finish in ("stop", "length")


def test_memory_plan_is_what_the_loader_keeps(tiny_gguf, tiny_model):
    plan = plan_memory(tiny_gguf, tiny_gguf.with_name("tiny-mmproj.gguf"), None)
    r = tiny_model.report
    assert plan["mapped_bytes"] == r["mapped_bytes"] and plan["repack_bytes"] == r["repacked_bytes"]
    assert plan["kv_cache_bytes"] == r["kv_cache_bytes"] and plan["n_ctx"] == tiny_model.n_ctx
    # the C kernels read the file's TQ2_0 experts in place (4 layers x 3 projections x 4 experts x 256 x 512)
    assert r["kernel"] == "auto" and set(r["families"]) == {"512x256", "256x512"}
    if set(r["families"].values()) == {"mad"}:
        assert not any(k.startswith("TQ2_0") for k in r["repacked_by"])
        assert r["mapped_bytes"] >= 4 * 3 * 4 * 256 * 512 // 256 * 66
    for kernel in ("mad", "lut"):  # each family forced: the plan still counts what the loader keeps
        m = MoteModel(tiny_gguf, kernel=kernel, vision=False)
        plan = plan_memory(tiny_gguf, None, None, kernel=kernel)
        assert (plan["mapped_bytes"], plan["repack_bytes"]) == (m.report["mapped_bytes"], m.report["repacked_bytes"])
        assert set(m.report["families"].values()) == {kernel}
    numpy = MoteModel(tiny_gguf, kernel="numpy", vision=False)  # the numpy kernels: 1 byte a ternary weight
    assert numpy.report["repacked_by"]["TQ2_0 -> int8 codes"] == 4 * 4 * 3 * 256 * 512
    plan = plan_memory(tiny_gguf, None, None, kernel="numpy")
    assert plan["repack_bytes"] == numpy.report["repacked_bytes"]


def test_mote_run_engine_mote_streams_answer_and_stays_under_its_plan(tiny_gguf, embedded):
    from mote_edge.runtime_cpu.records import normalize_answer
    from mote_edge.tiny import ASSETS

    rec = json.loads((ASSETS / "data" / "test.json").read_text())[0]
    question = rec["conversations"][0]["value"].removeprefix("<image>\n")
    cmd = [Path(sys.executable).parent / "mote-run", tiny_gguf, "--image", ASSETS / "data" / "images" / rec["image"],
           "--prompt", question, "--engine", "mote", "--threads", "1", "--memory-limit", "1GB"]
    # through a small bash that forks mote-run: a process forked straight from this (large) pytest process
    # inherits its RSS high-water mark into ru_maxrss at exec, which mote-run's "peak RSS" reads
    r = subprocess.run(["bash", "-c", " ".join(f"'{c}'" for c in cmd) + "; exit $?"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for key in ("time to first token", "tokens/s", "peak RSS", "repacked at load"):
        assert key in r.stderr
    planned = int(re.search(r"planned resident memory: (\d+) bytes", r.stderr).group(1))
    peak = float(re.search(r"peak RSS: (\d+) MiB", r.stderr).group(1)) * 2 ** 20
    assert peak < planned, (peak, planned)
    want = MoteModel(tiny_gguf, threads=1).answer(ASSETS / "data" / "images" / rec["image"], question, max_tokens=128)
    assert normalize_answer(r.stdout) == normalize_answer(want) != ""


def test_runtime_path_imports_no_torch(tiny_gguf, data_dir):
    img = sorted((data_dir / "images").iterdir())[0]
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'): raise ImportError(name + ' is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from mote_edge.runtime_cpu.mote_engine import MoteModel\n"
        f"m = MoteModel({str(tiny_gguf)!r}, threads=1)\n"
        f"assert m.answer({str(img)!r}, 'What colour is the square?')\n"
        "assert not any(k.split('.')[0] in ('torch', 'transformers') for k in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ---- bad input: one error line, exit 2 -------------------------------------------------------------------------


def _patch_tensor_info(path: Path, name: str, *, offset: int | None = None, qtype: int | None = None) -> None:
    """Rewrite one tensor info in place: name, n_dims u32, dims u64..., type u32, offset u64."""
    data = bytearray(path.read_bytes())
    key = name.encode()
    at = data.index(len(key).to_bytes(8, "little") + key) + 8 + len(key)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    at += 4 + 8 * n_dims
    if qtype is not None:
        data[at:at + 4] = qtype.to_bytes(4, "little")
    if offset is not None:
        data[at + 4:at + 12] = offset.to_bytes(8, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case, message", [
    ("truncated", "is truncated or the tensor offset is wrong"),
    ("offset_past_end", "is truncated or the tensor offset is wrong"),
    ("unknown_type", "not a readable GGUF file"),
    ("type_disagrees", "not the exporter's exact ternary form"),
    ("no_mote_keys", "without mote.* keys"),
    ("not_an_llm", "architecture 'clip'"),
    ("missing_mmproj", "mmproj file"),
    ("unreadable_image", "cannot read image"),
    ("n_ctx_too_small", "does not fit n_ctx 16"),
])
def test_bad_input_is_one_error_line(case, message, tiny_gguf, embedded, tmp_path, data_dir, capsys, monkeypatch):
    import shutil

    model = tmp_path / "m.gguf"
    shutil.copy(tiny_gguf, model)
    shutil.copy(tiny_gguf.with_name("tiny-mmproj.gguf"), tmp_path / "m-mmproj.gguf")
    image = sorted((data_dir / "images").iterdir())[0]
    args = []
    if case == "truncated":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif case == "offset_past_end":
        _patch_tensor_info(model, "blk.3.ffn_down_exps.weight", offset=2 ** 40)
    elif case == "unknown_type":
        _patch_tensor_info(model, "blk.0.attn_q.weight", qtype=99)
    elif case == "type_disagrees":  # TQ2_0 bytes read as TQ1_0 (smaller, so inside the file)
        _patch_tensor_info(model, "blk.0.ffn_gate_exps.weight", qtype=int(T.TQ1_0))
    elif case == "no_mote_keys":  # an export from before the mote.* keys
        from mote_edge.exporters import gguf_llm

        monkeypatch.setattr(gguf_llm, "_write_mote_kv", lambda *a: None)
        _export(embedded, model.with_name("old.gguf"))
        model.with_name("old.gguf").replace(model)
    elif case == "not_an_llm":
        args = ["--mmproj", str(tmp_path / "m-mmproj.gguf")]
        model = tmp_path / "m-mmproj.gguf"
    elif case == "missing_mmproj":
        (tmp_path / "m-mmproj.gguf").unlink()
    elif case == "unreadable_image":
        image = tmp_path / "x.png"
        image.write_bytes(b"not a png")
    elif case == "n_ctx_too_small":  # 36 image tokens + the prompt
        args = ["--n-ctx", "16"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run.main([str(model), "--image", str(image), "--prompt", "q", "--engine", "mote", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_memory_limit_refuses_before_mapping(tiny_gguf, data_dir, capsys, monkeypatch):
    from mote_edge.runtime_cpu import gguf_model

    monkeypatch.setattr(gguf_model.GGUFModel, "__init__", lambda *a: pytest.fail("mapped before the check"))
    image = sorted((data_dir / "images").iterdir())[0]
    with pytest.raises(SystemExit) as exc:
        run.main([str(tiny_gguf), "--image", str(image), "--prompt", "q", "--engine", "mote", "--memory-limit", "20MB"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "exceeds --memory-limit" in err[0] and "KV cache" in err[0]


def test_routes_record_every_token_and_plot(tiny_gguf, tmp_path, capsys):
    """mote-run --routes writes, per MoE layer, the top-k experts of every evaluated token (prompt text,
    image, generated), the same choices the numpy kernels make; mote-routes plots and tables them."""
    from mote_edge.benchmarks.routes import main as routes_main
    from mote_edge.runtime_cpu.run import main as run_main
    from mote_edge.tiny import ASSETS

    img = ASSETS / "data" / "images" / "test_00000.png"
    out = tmp_path / "routes.json"
    run_main([str(tiny_gguf), "--image", str(img), "--prompt", "How many shapes are there?", "--engine", "mote",
              "--threads", "1", "--routes", str(out), "--max-tokens", "4"])
    r = json.loads(out.read_text())
    m = MoteModel(tiny_gguf, threads=1, kernel="numpy")
    m.trace_routes()
    list(m.stream(img, "How many shapes are there?", max_tokens=4))
    assert r == m.routes()
    n_img = m.image_embeddings(img).shape[0]
    assert r["kinds"].count("image") == n_img and r["kinds"].count("text") > 5
    assert sorted(map(int, r["layers"])) == list(m.llm.c.moe_layers)
    assert all(len(c) == len(r["kinds"]) for c in r["layers"].values())
    capsys.readouterr()
    routes_main([str(out), "-o", str(tmp_path / "routes.png")])
    text = capsys.readouterr().out
    assert (tmp_path / "routes.png").stat().st_size > 10_000
    rows = [line.split("|")[3:-1] for line in text.splitlines() if line.startswith("| 0 |")]
    assert len(rows) == 2 and all(abs(sum(float(v) for v in row) - r["top_k"]) < 0.02 for row in rows)


@pytest.mark.parametrize("args, message", [
    (["--engine", "llama.cpp", "--routes", "r.json"], "not an option of --engine llama.cpp"),
    (["--engine", "mote", "--kernel", "sse"], "invalid choice"),
])
def test_engine_only_flags_are_refused_elsewhere(tiny_gguf, tmp_path, args, message):
    from mote_edge.tiny import ASSETS

    r = subprocess.run([Path(sys.executable).parent / "mote-run", tiny_gguf, "--image",
                        ASSETS / "data" / "images" / "test_00000.png", "--prompt", "hi", *args],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_routes_file_errors_are_one_line(tmp_path, capsys):
    from mote_edge.benchmarks.routes import main as routes_main

    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "mote-routes/1", "experts": 4, "top_k": 1, "kinds": ["text"], "layers": {"0": [[7]]}}')
    for path, message in ((tmp_path / "missing.json", "does not exist"), (bad, "ids below 4")):
        with pytest.raises(SystemExit) as e:
            routes_main([str(path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1

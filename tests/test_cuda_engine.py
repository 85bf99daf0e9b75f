"""The GPU engine (cuda_kernels/engine.py, `mote-run --engine cuda`) proven on the CPU: its loading of the
files mote-export writes, routing, KV cache, sampling and memory plan, with device="cpu".

Tolerances (teacher-forced logits, text only; measured on the embedded tiny MoTE, default export):
  fp32 float weights, torch W2A8 kernels   vs the mote CPU engine (numpy kernels) and vs PyTorch with the f16 file
                                           values: runtime_cpu's bounds, max |dlogit| < 5e-3, mean < 1e-4. Typically
                                           ~4e-6 (the same integer dot, fp32 rounding elsewhere); the maximum (1.1e-3 at
                                           one of 45 positions of PARITY_TEXT) is an activation within an ulp of a .5
                                           tie, whose int8 code then differs by one between the two computations
  bf16 float weights (the CUDA default)    vs the mote engine: top-1 equal at every position, max |dlogit| below
                                           BF16_DLOGIT (measured 0.071, mean 0.009, mean |logit| 2.8: f16 values
                                           rounded to bf16, bf16 matmul inputs)
  Triton kernels under TRITON_INTERPRET=1  vs the torch kernels: logits within 1e-5 relative (the integer dot is exact,
                                           the epilogue the same op order), the same greedy answer
No test here needs a GPU; what only a GPU shows (speed, peak memory against the plan) is device_check's.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mote_edge.cuda_kernels import engine as E
from mote_edge.cuda_kernels.engine_memory import plan_gpu
from mote_edge.exporters.errors import MoteExportError
from mote_edge.runtime_cpu import run
from mote_edge.runtime_cpu.mote_engine import MoteModel

from .test_export_gguf import PARITY_TEXT, _moe_ckpt, embedded  # noqa: F401
from .test_runtime_cpu import MAX_DLOGIT, MEAN_DLOGIT, _export, _ids, _torch_logits

ROOT = Path(__file__).resolve().parents[1]
BF16_DLOGIT = 0.25
N_QUESTIONS = 12  # held-out questions whose greedy answers must equal the mote engine's


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One torch thread: on this shared 2-core machine a second spinning thread only slows everything."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_gguf(embedded, tmp_path_factory) -> Path:
    """The embedded MoTE with mote-export's defaults (TQ2_0 experts, f16 elsewhere) + its mmproj."""
    return _export(embedded, tmp_path_factory.mktemp("cuda-tiny") / "tiny.gguf", mmproj=True)


@pytest.fixture(scope="module")
def cpu_engine(tiny_gguf) -> MoteModel:
    return MoteModel(tiny_gguf, threads=1, kernel="numpy")


@pytest.fixture(scope="module")
def fp32(tiny_gguf) -> E.CudaModel:
    return E.CudaModel(tiny_gguf, device="cpu", kernel="torch")


@pytest.fixture(scope="module")
def bf16(tiny_gguf) -> E.CudaModel:
    return E.CudaModel(tiny_gguf, device="cpu", kernel="torch", dtype="bfloat16")


def _compare(tag: str, got: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    d = np.abs(got - ref)
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(f"{tag}: top-1 {top1:.3f}, max |dlogit| {d.max():.2e}, mean {d.mean():.2e} "
          f"(mean |logit| {np.abs(ref).mean():.2f})")
    return top1, float(d.max()), float(d.mean())


def _fp32_close(tag: str, got: np.ndarray, ref: np.ndarray) -> None:
    top1, dmax, dmean = _compare(tag, got, ref)
    assert top1 == 1.0 and dmax < MAX_DLOGIT and dmean < MEAN_DLOGIT, tag


# ---- parity: logits, image embeddings, answers ----------------------------------------------------------------


def test_logits_match_the_mote_engine_and_pytorch(embedded, tiny_gguf, fp32, bf16, cpu_engine):
    ids = _ids(embedded, PARITY_TEXT)
    ref = cpu_engine.logits(ids)
    _fp32_close("cuda engine fp32 vs mote engine", fp32.logits(ids), ref)
    _fp32_close("cuda engine fp32 vs PyTorch (f16 file values)", fp32.logits(ids),
                _torch_logits(embedded, ids, f16="all"))
    top1, d, _ = _compare("cuda engine bf16 vs mote engine", bf16.logits(ids), ref)
    assert top1 == 1.0 and 0 < d < BF16_DLOGIT  # bf16 really ran (not exactly the fp32 logits)


def test_image_embeddings_match_the_mote_engine(fp32, bf16, cpu_engine):
    from mote_edge.tiny import ASSETS

    for img in sorted((ASSETS / "data" / "images").iterdir())[:2]:
        want = cpu_engine.image_embeddings(img)
        for tag, m, rel_tol in (("fp32", fp32, 1e-5), ("bf16", bf16, 5e-2)):
            got = m.image_embeddings(img)
            assert got.shape == want.shape == (m.vision.n_tokens, m.c.hidden)
            cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
            rel = np.abs(got - want).max() / np.abs(want).max()
            print(f"{tag}: image embeddings cosine min {cos.min():.6f}, max |diff| / max |value| {rel:.1e}")
            assert cos.min() > 0.999 and rel < rel_tol, tag


def test_greedy_answers_equal_the_mote_engine(fp32, bf16, cpu_engine):
    from mote_edge.runtime_cpu.records import question_and_answer, read_records
    from mote_edge.tiny import ASSETS

    records = read_records(ASSETS / "data" / "test.json", N_QUESTIONS)
    for r in records:
        img, (question, _) = ASSETS / "data" / "images" / r["image"], question_and_answer(r)
        want = cpu_engine.answer(img, question)
        assert want and fp32.answer(img, question) == want and bf16.answer(img, question) == want, question


def test_sampling_follows_the_seed_as_the_mote_engine(fp32, cpu_engine, data_dir):
    """The same sampler on (nearly) the same logits: sampled answers equal the mote engine's seed for seed."""
    img = sorted((data_dir / "images").iterdir())[0]
    kw = dict(max_tokens=6, temperature=1.5, top_k=20, top_p=0.9)
    seeds = (1, 2, 3, 4, 5)
    got = [fp32.answer(img, "How many shapes are there?", seed=s, **kw) for s in seeds]
    assert got == [cpu_engine.answer(img, "How many shapes are there?", seed=s, **kw) for s in seeds]
    assert len(set(got)) > 1  # not greedy
    finish = [why for _, why in fp32.stream(img, "How many shapes are there?", max_tokens=1)][-1]
    assert finish in ("stop", "length")


@pytest.mark.parametrize("variant", ["mote-top2", "sparse", "moe-llava", "dense"])
def test_every_variant_matches_the_mote_engine_and_its_plan(variant, dense_ckpt, tmp_path):
    """64-wide models: Q2_0 experts (rows of 64 / 128), top-2 (two experts summed per token), a sparse MoE
    (layer 0 a plain FFN as shared expert, zero padding never placed), MoE-LLaVA's f16 experts, plain qwen2;
    teacher-forced logits against the mote engine; the header plan equals what was placed, byte for byte."""
    types = {}
    if variant == "dense":
        ckpt = dense_ckpt
    elif variant == "moe-llava":
        ckpt, types = _moe_ckpt(dense_ckpt, tmp_path / "c", variant="moe-llava", layers="all"), {"expert_type": "f16"}
    else:
        ckpt = _moe_ckpt(dense_ckpt, tmp_path / "c", top_k=2 if variant == "mote-top2" else 1,
                         layers="all" if variant == "mote-top2" else "sparse")
    out = _export(ckpt, tmp_path / "m.gguf", mmproj=True, **types)
    m = E.CudaModel(out, device="cpu", kernel="torch")
    assert m.c.variant == {"mote-top2": "mote", "sparse": "mote"}.get(variant, variant)
    ids = _ids(ckpt, PARITY_TEXT)
    _fp32_close(f"{variant}: cuda engine fp32 vs mote engine", m.logits(ids),
                MoteModel(out, threads=1, kernel="numpy", vision=False).logits(ids))
    plan = plan_gpu(out, out.with_name("m-mmproj.gguf"), None, "float32")
    r = m.report
    assert (plan["llm_weights_bytes"], plan["vision_weights_bytes"], plan["kv_cache_bytes"], plan["rope_bytes"]) == \
        (r["llm_weights_bytes"], r["vision_bytes"], r["kv_cache_bytes"], r["rope_bytes"])
    if variant == "sparse":  # layer 0's zero router / experts are in the file, not on the device
        assert r["placed_by"]["ternary 2-bit words"] == 3 * 4 * (128 * 64 // 16 * 4) + 3 * 4 * 4


def test_plan_counts_the_placed_bytes_of_the_default_export(tiny_gguf, fp32, bf16):
    for m, dtype in ((fp32, "float32"), (bf16, "bfloat16")):
        plan = plan_gpu(tiny_gguf, tiny_gguf.with_name("tiny-mmproj.gguf"), None, dtype)
        r = m.report
        assert plan["llm_weights_bytes"] == r["llm_weights_bytes"] and plan["vision_weights_bytes"] == r["vision_bytes"]
        assert plan["kv_cache_bytes"] == r["kv_cache_bytes"] and plan["n_ctx"] == m.n_ctx == 512
    # 4 layers x 3 projections x 4 experts of 512 x 256: exactly 2 bits a weight + one fp32 scale a matrix
    assert fp32.report["placed_by"]["ternary 2-bit words"] == 4 * 3 * 4 * (512 * 256 // 4 + 4)
    # bf16 halves every float matrix, keeps the ternary words, router, norms and biases
    f, b = fp32.report["placed_by"], bf16.report["placed_by"]
    assert b["float matrices"] * 2 == f["float matrices"] and b["ternary 2-bit words"] == f["ternary 2-bit words"]
    assert b["routers (fp32)"] == f["routers (fp32)"] and b["fp32 vectors"] == f["fp32 vectors"]
    assert "token_embd" not in " ".join(f)  # the embedding table stays on the host


# ---- the Triton kernels, through the interpreter -----------------------------------------------------------------

INTERPRET_CODE = r"""
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
from mote_edge.cuda_kernels.engine import CudaModel
model, image, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {}
for kernel in ("torch", "triton"):
    m = CudaModel(model, device="cpu", kernel=kernel)
    out[kernel] = {"answer": m.answer(image, "How many shapes are there?", max_tokens=3),
                   "logits": m.logits(ids).tolist(), "ran": type(m.llm.layers[0].ffn.experts.k).__name__}
print(json.dumps(out))
"""


def test_triton_kernels_under_the_interpreter_equal_the_torch_kernels(dense_ckpt, tmp_path, data_dir):
    """The same engine on the Triton kernels (TRITON_INTERPRET=1, CPU tensors: GEMV at decode, grouped
    experts at prefill) and on their torch reference: a 64-wide top-2 MoTE with Q2_0 experts, image + prompt."""
    ckpt = _moe_ckpt(dense_ckpt, tmp_path / "c", top_k=2, layers="all")
    out = _export(ckpt, tmp_path / "m.gguf", mmproj=True)
    ids = _ids(ckpt, "<|im_start|>user\nHow many shapes are there?<|im_end|>\n")
    image = sorted((data_dir / "images").iterdir())[0]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", INTERPRET_CODE, str(out), str(image), json.dumps(ids)], env=env,
                       capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    a, b = (np.asarray(got[k]["logits"], np.float32) for k in ("triton", "torch"))
    rel = np.abs(a - b).max() / np.abs(b).max()
    print(f"Triton (interpreter) vs torch kernels: max |dlogit| / max |logit| {rel:.1e}; answers "
          f"{got['triton']['answer']!r} / {got['torch']['answer']!r}")
    assert (got["triton"]["ran"], got["torch"]["ran"]) == ("TritonW2A8", "TorchW2A8")
    assert rel < 1e-5 and got["triton"]["answer"] == got["torch"]["answer"] != ""


# ---- the mote-run front, the memory plan and bad input ------------------------------------------------------------


def test_engine_interface_streams_like_the_mote_engine(tiny_gguf, cpu_engine, capsys):
    from mote_edge.tiny import ASSETS

    img = ASSETS / "data" / "images" / "test_00001.png"
    eng = E.Engine(tiny_gguf, tiny_gguf.with_name("tiny-mmproj.gguf"), threads=1, kernel="torch", device="cpu")
    pieces = list(eng.stream(img, "What colour is the square?", max_tokens=8))
    assert pieces[-1][1] in ("stop", "length")
    assert "".join(p for p, _ in pieces) == cpu_engine.answer(img, "What colour is the square?", max_tokens=8)
    assert "cuda engine: mote on cpu (float32 float weights, torch W2A8 kernels, gemv MoE decode)" in capsys.readouterr().err


def test_memory_limit_refuses_before_loading(tiny_gguf, data_dir, capsys, monkeypatch):
    from mote_edge.runtime_cpu import gguf_model

    monkeypatch.setattr(gguf_model.GGUFModel, "__init__", lambda *a: pytest.fail("mapped before the check"))
    image = sorted((data_dir / "images").iterdir())[0]
    with pytest.raises(SystemExit) as exc:
        run.main([str(tiny_gguf), "--image", str(image), "--prompt", "q", "--engine", "cuda", "--memory-limit", "50MB"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "exceeds --memory-limit" in err[0], err
    assert "of GPU memory" in err[0] and "KV cache" in err[0] and "CUDA runtime" in err[0]


def test_device_memory_is_checked_against_what_the_gpu_has_free(tiny_gguf, monkeypatch):
    """The second check, before the first allocation: the plan's device bytes against mem_get_info."""
    plan = plan_gpu(tiny_gguf, tiny_gguf.with_name("tiny-mmproj.gguf"), None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (plan["device_bytes"] - 1, 80 << 30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "Fake GPU")
    with pytest.raises(MoteExportError, match=r"needs .* of GPU memory as planned .* Fake GPU has .* free of 80"):
        E.check_device_memory(plan, torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (plan["device_bytes"], 80 << 30))
    E.check_device_memory(plan, torch.device("cuda", 0))  # exactly enough: accepted


def test_gpu_below_sm80_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "Tesla T4")
    with pytest.raises(MoteExportError, match="needs sm_80 or newer .* Tesla T4 is sm_75"):
        E.resolve_device("auto")


BLOCK = ("import sys, importlib.abc\n"
         "class Block(importlib.abc.MetaPathFinder):\n"
         "    def find_spec(self, name, path, target=None):\n"
         "        if name.split('.')[0] == {lib!r}: raise ImportError(name + ' is blocked')\n"
         "sys.meta_path.insert(0, Block())\n"
         "from mote_edge.runtime_cpu.run import main\n"
         "main({argv!r})\n")


@pytest.mark.parametrize("case, message", [
    ("no_gpu", "error: --engine cuda needs a CUDA GPU (sm_80 or newer) and torch"),
    ("no_triton", "error: --engine cuda needs triton"),
    ("no_torch", "error: --engine cuda needs torch and triton"),
    ("kernel", "error: --kernel 'numpy' for --engine cuda; accepted: auto, triton, torch"),
])
def test_missing_parts_are_one_error_line(case, message, tiny_gguf, data_dir, tmp_path):
    """mote-run --engine cuda on this machine (no GPU): one error line, exit 2, whatever is missing."""
    image = sorted((data_dir / "images").iterdir())[0]
    argv = [str(tiny_gguf), "--image", str(image), "--prompt", "q", "--engine", "cuda"]
    if case == "kernel":
        argv += ["--kernel", "numpy"]
    lib = {"no_triton": "triton", "no_torch": "torch"}.get(case, "nothing-blocked")
    r = subprocess.run([sys.executable, "-c", BLOCK.format(lib=lib, argv=argv)], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), r.stderr[-2000:]


def test_prompt_longer_than_the_context_is_one_error(tiny_gguf, monkeypatch):
    m = E.CudaModel(tiny_gguf, device="cpu", kernel="torch", n_ctx=16, vision=False)
    assert m.plan["n_ctx"] == 16 and m.report["kv_cache_bytes"] == 2 * 4 * 2 * 16 * 64 * 4
    with pytest.raises(MoteExportError, match="do not fit the context of 16"):
        m.logits(list(range(17)))
    from mote_edge.tiny import ASSETS

    m2 = E.CudaModel(tiny_gguf, device="cpu", kernel="torch", n_ctx=16)
    with pytest.raises(MoteExportError, match="does not fit n_ctx 16"):
        list(m2.stream(ASSETS / "data" / "images" / "test_00000.png", "q"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (conftest sets it for the suite)
    with pytest.raises(MoteExportError, match="--kernel triton on the CPU runs only under Triton's interpreter"):
        E.CudaModel(tiny_gguf, device="cpu", kernel="triton")


def test_random_weights_decode_timing_at_a_tiny_shape():
    """device_check's hook (random weights made on the device, greedy decode timed) at a tiny shape."""
    llm = E.random_llm(layers=2, hidden=64, ffn=128, heads=4, kv_heads=2, vocab=100, n_ctx=32, device="cpu",
                       kernel="torch")
    t = E.time_decode(llm, prompt=5, tokens=3)
    assert t["tokens"] == 3 and t["tokens_per_s"] > 0
    placed = llm.src.placed
    # per token: every float byte, a quarter of the ternary words (top-1 of 4), the KV cache filled to the middle
    want = sum(placed.values()) - placed["ternary 2-bit words"] * 3 // 4
    assert t["bytes_per_token"] == want + 2 * 2 * 2 * 16 * 4 * (5 + 2 + 3 - 3 // 2)


# ---- --moe-decode grouped: decode steps with no host read ------------------------------------------------------


def _decode_logits(m: E.CudaModel, ids: list[int]) -> torch.Tensor:
    """Every position fed alone (T = 1: the decode path), in order, into a fresh cache."""
    h = m.llm.embed(ids)
    return torch.stack([m.llm.forward(h[t:t + 1], t) for t in range(len(ids))])


@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_moe_decode_is_bit_identical_to_gemv_decode(top_k, embedded, tiny_gguf, dense_ckpt, tmp_path):
    """The same sums in the same order: decode logits equal bit for bit (top-1 and top-2 routing), and both
    agree with the teacher-forced prefill; the report says which path ran."""
    if top_k == 1:
        path, ckpt = tiny_gguf, embedded
    else:
        ckpt = _moe_ckpt(dense_ckpt, tmp_path / "c", top_k=2, layers="all")
        path = _export(ckpt, tmp_path / "m.gguf", mmproj=True)
    ids = _ids(ckpt, PARITY_TEXT)[:24]
    gemv = E.CudaModel(path, device="cpu", kernel="torch", vision=False)
    grouped = E.CudaModel(path, device="cpu", kernel="torch", vision=False, moe_decode="grouped")
    assert grouped.report["moe_decode"] == "grouped" and "grouped MoE decode" in grouped.format_report()
    want, got = _decode_logits(gemv, ids), _decode_logits(grouped, ids)
    assert torch.equal(got, want)
    _fp32_close(f"top-{top_k}: decode steps vs prefill", got.numpy(), gemv.logits(ids))


def test_grouped_moe_decode_reads_nothing_back_to_the_host(tiny_gguf, monkeypatch):
    """On CUDA a host read (tolist, item, bool, nonzero, bincount's size) waits for the stream. With host
    reads made to fail everywhere but inside the W2A8 kernels (whose torch reference reads its offsets; the
    Triton launch does not), a grouped decode step runs, and a gemv one does not."""
    allowed = [False]

    def guard(name):
        real = getattr(torch.Tensor, name)

        def call(self, *a, **k):
            if not allowed[0]:
                raise AssertionError(f"host read: Tensor.{name}")
            return real(self, *a, **k)
        return call

    class Kernels(E.TorchW2A8):
        def _open(self, fn, *a):
            allowed[0] = True
            try:
                return fn(*a)
            finally:
                allowed[0] = False

        def quantize(self, x):
            return self._open(super().quantize, x)

        def linear(self, a, w):
            return self._open(super().linear, a, w)

        def grouped(self, a, w, offs):
            return self._open(super().grouped, a, w, offs)

    m = {d: E.CudaModel(tiny_gguf, device="cpu", kernel="torch", vision=False, moe_decode=d) for d in E.MOE_DECODE}
    for model in m.values():
        for layer in model.llm.layers:
            layer.ffn.experts.k = Kernels()
    x = m["grouped"].llm.embed([5])
    for name in ("tolist", "item", "__bool__", "__int__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, guard(name))
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: (_ for _ in ()).throw(AssertionError("host read: bincount")))
    moe = [layer.ffn for layer in m["grouped"].llm.layers if layer.ffn.router is not None]
    assert moe, "the tiny model has MoE layers"
    for ffn in moe:
        assert ffn(x).shape == x.shape
    with pytest.raises(AssertionError, match="host read"):
        [layer.ffn for layer in m["gemv"].llm.layers if layer.ffn.router is not None][0](x)

"""The training kernels of cuda_kernels/ (ternary_train.py, train_ops.py) without a GPU, and the
quantise-once-per-step cache of mote_edge/quant.py.

- Every Triton kernel runs under TRITON_INTERPRET=1 on CPU tensors at tiny shapes and equals a torch
  reference: bit-exactly on the integer paths (codes, activation codes, int32 accumulators) and on the
  float epilogue when computed in the same order (float32(acc) * step * s); against mote_edge/quant.py's
  fake-quantised float matmul within 1e-5 of max |y| (fp32 rounding of a K-long float sum). Outputs are
  poisoned first, so an element a kernel fails to write shows.
- The compile gate: every shipped config (ternary_train.CONFIGS) compiles for sm_80 and sm_90a with the
  runtime's divisibility hints, without register spills, int8 GEMMs on mma.sync / wgmma, the activation
  quantiser without FMA contraction (in a subprocess: the interpreter must be off there).
- opcheck and torch.compile of the ops; straight-through gradients equal to the fake-quant STE.
- End to end: mote-train --kernels triton under the interpreter vs --kernels torch, per-step losses.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # effective only if nothing imported triton yet

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from mote_edge.cuda_kernels import ternary_train as tt  # noqa: E402
from mote_edge.cuda_kernels import train_ops as ops  # noqa: E402
from mote_edge.quant import (QuantCache, TernaryLinear, fake_quant_weight, quantize_activation_int8,  # noqa: E402
                             quantize_weight_ternary, ternary_codes, ternary_scale)
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

# The interpreter needs TRITON_INTERPRET=1 before triton's first import (triton.language's own @jit
# functions, tl.sum among them, are decorated then): tests/conftest.py sets it before anything imports torch.
INTERPRETED = isinstance(triton.language.sum, InterpretedFunction) and isinstance(tt.int8_gemm_kernel, InterpretedFunction)


def under_interpreter(fn):
    """A kernel test: it needs the interpreter (conftest.py turns it on for the suite)."""
    return fn


def test_the_interpreter_is_on():
    assert INTERPRETED, "TRITON_INTERPRET=1 was not set before triton's first import (tests/conftest.py sets it)"


POISON_I8, POISON_I32 = 99, -777777


def _ties_matrix(rows: int, reps: int) -> torch.Tensor:
    """mean|W| is exactly 1, and W / s hits the ties +-0.5 (round to 0) and +-1.5, 2 (clip to +-1)."""
    row = torch.tensor([0.5, 1.5, -0.5, -1.5, 1.0, -1.0, 0.0, 2.0])
    return row.repeat(rows, reps)


# ---------------------------------------------------------------------------------------------
# kernels under the interpreter vs torch


@under_interpreter
@pytest.mark.parametrize("case", ["random", "ties", "zeros", "two_stage", "bf16", "one"])
def test_ternary_quantize_equals_quant_py(case):
    g = torch.Generator().manual_seed(1)
    w = {"random": torch.randn(45, 70, generator=g) * 0.02, "ties": _ties_matrix(5, 9),
         "zeros": torch.zeros(3, 40), "two_stage": torch.randn(97, 130, generator=g) * torch.rand(97, 1, generator=g),
         "bf16": (torch.randn(33, 64, generator=g) * 0.1).bfloat16(), "one": torch.tensor([[-0.3]])}[case]
    assert case != "two_stage" or w.numel() > 2 * tt.CONFIGS["absmean_partial"]["BLOCK"]  # 3 partial sums
    codes = torch.full(w.shape, POISON_I8, dtype=torch.int8)
    scale = torch.tensor(float("nan"))
    tt.ternary_quantize(w, scale_out=scale, codes_out=codes)
    want_s = w.detach().abs().double().mean().float().clamp(min=1e-5)  # ternary_scale's torch formula
    assert scale.dtype == torch.float32 and scale.item() == want_s.item() == ternary_scale(w).item()
    assert torch.equal(codes, ternary_codes(w))
    if case == "ties":
        assert scale.item() == 1.0 and codes[0, :8].tolist() == [0, 1, 0, -1, 1, -1, 0, 1]
    if case == "zeros":
        assert scale.item() == pytest.approx(1e-5) and not codes.any()


@under_interpreter
@pytest.mark.parametrize("case", ["random", "ties", "tail", "two_chunks", "bf16"])
def test_act_quant_equals_quantize_activation_int8(case):
    g = torch.Generator().manual_seed(2)
    x = {"random": torch.randn(9, 64, generator=g) * torch.logspace(-3, 3, 9)[:, None],
         "ties": torch.randn(6, 40, generator=g), "tail": torch.randn(5, 37, generator=g),
         "two_chunks": torch.randn(3, tt.CONFIGS["act_quant_int8"]["BLOCK_K"] + 70, generator=g),
         "bf16": torch.randn(4, 48, generator=g).bfloat16()}[case]
    if case == "ties":
        x[0, :6] = torch.tensor([127.0, 0.5, 1.5, -2.5, -127.0, 126.5])  # r = 1: exact halves round to even
        x[1] = 0  # all zero: the 1e-5 floor
        x[2] = 1e-7
        x[3, 0] = 1e4  # one huge value: everything else rounds to 0
    q = torch.full(x.shape, POISON_I8, dtype=torch.int8)
    step = torch.full((x.shape[0],), float("nan"))
    tt.act_quant_int8(x, q_out=q, step_out=step)
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    want_q = (xf * (127 / amax)).round().clamp(-128, 127)
    assert torch.equal(q.float(), want_q) and torch.equal(step, (amax / 127)[:, 0])
    assert torch.equal((q.float() * step[:, None]).to(x.dtype), quantize_activation_int8(x))
    if case == "ties":
        assert q[0, :6].tolist() == [127, 0, 2, -2, -127, 126]


def _int_ref(q, codes):
    return (q.long() @ codes.long().T).int()


@under_interpreter
@pytest.mark.parametrize("shape", [(37, 45, 70), (150, 200, 130), (1, 3, 32), (64, 128, 64)])
def test_int8_gemm_int32_and_epilogue(shape):
    n, m, k = shape
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    codes = torch.randint(-1, 2, (m, k), generator=g, dtype=torch.int8)
    step, s = torch.rand(n, generator=g) * 0.1, torch.tensor(0.0371)
    acc = torch.full((n, m), POISON_I32, dtype=torch.int32)
    tt.int8_gemm(q, codes, step, s, acc)
    assert torch.equal(acc, _int_ref(q, codes))
    y = torch.full((n, m), float("nan"))
    tt.int8_gemm(q, codes, step, s, y)
    # stated tolerance of the float epilogue: none, in the reference's order
    assert torch.equal(y, acc.float() * step[:, None] * s)


@under_interpreter
def test_int8_gemm_adversarial_extremes():
    """All +1 codes against +127 / -128 activations: the largest int32 sums, with K and M tails."""
    n, m, k = 5, 130, 1000
    q = torch.full((n, k), 127, dtype=torch.int8)
    q[1] = -128
    q[2, ::2] = -128
    codes = torch.ones(m, k, dtype=torch.int8)
    codes[-1] = -1
    acc = torch.full((n, m), POISON_I32, dtype=torch.int32)
    tt.int8_gemm(q, codes, torch.ones(n), torch.tensor(1.0), acc)
    assert torch.equal(acc, _int_ref(q, codes))
    assert acc[0, 0].item() == 127 * k and acc[1, -1].item() == 128 * k


@under_interpreter
@pytest.mark.parametrize("sizes", [[10, 0, 27, 0], [0, 0, 0, 70], [1, 64, 65, 0, 3], [0, 0, 0, 0, 0, 0, 0, 5]])
def test_grouped_gemm_ragged_and_empty_groups(sizes):
    g = torch.Generator().manual_seed(4)
    e, m, k = len(sizes), 45, 70
    t = sum(sizes)
    offsets = torch.tensor([0] + sizes, dtype=torch.int32).cumsum(0).int()
    q = torch.randint(-128, 128, (t, k), generator=g, dtype=torch.int8)
    q[:3] = 127  # with all +1 codes below: the largest sums
    codes = torch.randint(-1, 2, (e, m, k), generator=g, dtype=torch.int8)
    codes[0] = 1
    step, scales = torch.rand(t, generator=g), torch.rand(e, generator=g) + 0.01
    bounds = offsets.tolist()
    want = torch.cat([_int_ref(q[bounds[i]:bounds[i + 1]], codes[i]) for i in range(e)])
    acc = torch.full((t, m), POISON_I32, dtype=torch.int32)
    tt.grouped_int8_gemm(q, codes, step, scales, offsets, acc)
    assert torch.equal(acc, want)
    y = torch.full((t, m), float("nan"))
    tt.grouped_int8_gemm(q, codes, step, scales, offsets, y)
    row_scale = torch.repeat_interleave(scales, torch.tensor(sizes))
    assert torch.equal(y, want.float() * step[:, None] * row_scale[:, None])


# ---------------------------------------------------------------------------------------------
# torch ops: opcheck, straight-through gradients, torch.compile


def _expert_weights(e, m, k, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, k, generator=g) * 0.05).requires_grad_() for _ in range(e)]


@under_interpreter
def test_opcheck():
    w = _expert_weights(1, 45, 70)[0]
    x = torch.randn(19, 70, requires_grad=True)
    scale, codes = ops.ternary_quantize(w.detach())
    torch.library.opcheck(ops.ternary_quantize, (w.detach(),))
    torch.library.opcheck(ops.act_quant_int8, (x.detach(),))
    torch.library.opcheck(ops.ternary_linear_fwd, (x, w, codes, scale))
    ws = _expert_weights(4, 45, 70)
    scales, codes4 = (torch.stack(t) for t in zip(*(ops.ternary_quantize(v.detach()) for v in ws)))
    offsets = torch.tensor([0, 7, 7, 19, 19], dtype=torch.int32)
    torch.library.opcheck(ops.grouped_ternary_linear_fwd, (x, offsets, ws, codes4, scales))
    _, q = ops.act_quant_int8(x.detach())
    torch.library.opcheck(ops.grouped_ternary_linear_bwd, (torch.randn(19, 45), q, torch.rand(19), offsets, codes4, scales))


@under_interpreter
def test_ternary_linear_op_forward_and_ste_gradients():
    w = _expert_weights(1, 45, 70)[0]
    x = torch.randn(2, 19, 70, requires_grad=True)
    scale, codes = ops.ternary_quantize(w.detach())
    y = ops.ternary_linear(x, w, codes, scale)
    ref = F.linear(quantize_activation_int8(x), quantize_weight_ternary(w))
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    gy = torch.randn_like(y)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(y, (x, w), gy),
                                                  torch.autograd.grad(ref, (x, w), gy)))


@under_interpreter
def test_grouped_op_equals_per_expert_fake_quant():
    ws = _expert_weights(4, 45, 70)
    sizes = [7, 0, 12, 5]
    x = torch.randn(sum(sizes), 70, requires_grad=True)
    offsets = torch.tensor([0] + sizes).cumsum(0).int()
    scales, codes = (torch.stack(t) for t in zip(*(ops.ternary_quantize(v.detach()) for v in ws)))
    y = ops.grouped_ternary_linear(x, offsets, ws, codes, scales)
    parts = x.split(sizes)
    ref = torch.cat([F.linear(quantize_activation_int8(p), quantize_weight_ternary(w)) for p, w in zip(parts, ws)])
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    gy = torch.randn_like(y)
    got, want = torch.autograd.grad(y, [x, *ws], gy), torch.autograd.grad(ref, [x, *ws], gy)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not got[2].any(), "the empty expert gets a zero gradient"


@under_interpreter
def test_torch_compile_smoke():
    """The ops trace (fake tensors, AOT autograd) and run inside a compiled function with its backward."""
    ws = _expert_weights(3, 32, 64)
    w2 = _expert_weights(1, 16, 32, seed=6)[0]
    x = torch.randn(10, 64, requires_grad=True)
    offsets = torch.tensor([0, 4, 4, 10], dtype=torch.int32)

    def f(x, ws, w2):
        scales, codes = (torch.stack(t) for t in zip(*(ops.ternary_quantize(w.detach()) for w in ws)))
        h = ops.grouped_ternary_linear(x, offsets, ws, codes, scales)
        s2, c2 = ops.ternary_quantize(w2.detach())
        return ops.ternary_linear(F.silu(h), w2, c2, s2).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    loss = compiled(x, ws, w2)
    grads = torch.autograd.grad(loss, [x, *ws, w2])
    want_loss = f(x, ws, w2)
    want = torch.autograd.grad(want_loss, [x, *ws, w2])
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, want))


# ---------------------------------------------------------------------------------------------
# quantise once per step (mote_edge/quant.py)


def test_cache_reuses_until_the_weight_changes():
    lin = TernaryLinear(70, 45, bias=False)
    x = torch.randn(3, 70)
    lin(x)
    first = lin.quant_cache.value
    lin(x)
    assert lin.quant_cache.value is first, "a second call must not quantise again"
    assert torch.equal(first, ternary_codes(lin.weight).float() * ternary_scale(lin.weight))
    for kw in ({}, {"fused": True}):  # fused AdamW updates without bumping the version counter
        opt = torch.optim.AdamW(lin.parameters(), lr=0.1, **kw)
        lin(x).sum().backward()
        before = lin.quant_cache.value
        opt.step()
        lin(x)
        assert lin.quant_cache.value is not before
        assert torch.equal(lin.quant_cache.value, fake_quant_weight(lin.weight))
    with torch.no_grad():
        lin.weight.mul_(-1)
    assert torch.equal(lin(x), F.linear(quantize_activation_int8(x), quantize_weight_ternary(lin.weight)))
    lin.weight = torch.nn.Parameter(lin.weight.detach().clone() * 3)  # another tensor in its place
    assert torch.equal(lin(x), F.linear(quantize_activation_int8(x), quantize_weight_ternary(lin.weight)))
    lin.to(torch.float64)
    assert lin(x.double()).dtype == torch.float64
    import copy
    assert copy.deepcopy(lin).quant_cache.value is None


def test_cache_does_not_change_training(mote_ckpt, batch, monkeypatch):
    """Steps with grad accumulation (2 micro-batches, one quantisation per step): losses and weights are
    bit-identical to the per-call fake-quant STE this cache replaced."""
    from mote_edge.checkpoint import load_model
    from mote_edge.losses import lm_loss_sum, load_balance_loss
    from mote_edge.moe import moe_blocks
    from mote_edge.train import TrainConfig, param_groups, set_trainable

    def run():
        torch.manual_seed(0)
        model = load_model(mote_ckpt)
        named = set_trainable(model, TrainConfig(stage="moe"))
        opt = torch.optim.AdamW(param_groups(named, TrainConfig(stage="moe")), lr=3e-2)
        model.train()
        losses = []
        for _ in range(3):
            for half in (slice(0, 2), slice(2, 4)):
                b = {k: v[half] for k, v in batch.items()}
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
                loss = lm_loss_sum(out.logits, b["labels"]) / 50 + 0.01 * load_balance_loss(moe_blocks(model))
                loss.backward()
                losses.append(loss.item())
            opt.step()
            opt.zero_grad()
        return losses, {n: p.detach().clone() for n, p in named}

    calls = []
    real = QuantCache.get
    monkeypatch.setattr(QuantCache, "get", lambda self, ws, make: calls.append(1) or real(self, ws, make))
    monkeypatch.setattr("mote_edge.quant.fake_quant_weight", lambda w, f=fake_quant_weight: calls.append(0) or f(w))
    cached_losses, cached_w = run()
    n_linear = sum(isinstance(m, TernaryLinear) for m in load_model(mote_ckpt).modules())
    assert calls.count(0) == 3 * n_linear and calls.count(1) == 6 * n_linear, "quantised once per step"
    monkeypatch.undo()

    def old_forward(self, x):
        return F.linear(quantize_activation_int8(x), quantize_weight_ternary(self.weight), self.bias)

    monkeypatch.setattr(TernaryLinear, "forward", old_forward)
    ref_losses, ref_w = run()
    assert cached_losses == ref_losses
    assert all(torch.equal(cached_w[n], ref_w[n]) for n in ref_w)
    assert cached_losses[4] < cached_losses[0], "training moved: the same micro-batch scores better two steps on"


# ---------------------------------------------------------------------------------------------
# end to end and bad input


def _train_cli(ckpt, data_dir, out, *extra, interpret=True):
    env = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "mote_edge.train", str(ckpt), "--data", str(data_dir / "train.json"),
                           "--images", str(data_dir / "images"), "-o", str(out), "--batch-size", "8",
                           "--lr", "3e-3", "--warmup-ratio", "0", *map(str, extra)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_mote_train_triton_kernels_equal_torch_kernels(mote_ckpt, data_dir, tmp_path):
    hist = {}
    for kernels in ("torch", "triton"):
        r = _train_cli(mote_ckpt, data_dir, tmp_path / kernels, "--steps", 2, "--kernels", kernels)
        assert r.returncode == 0, r.stderr[-3000:]
        hist[kernels] = json.loads((tmp_path / kernels / "train_log.json").read_text())["history"]
    assert len(hist["torch"]) == len(hist["triton"]) == 2
    for a, b in zip(hist["torch"], hist["triton"]):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-3)
        assert b["balance_loss"] == pytest.approx(a["balance_loss"], rel=1e-3)
    print("per-step lm loss torch / triton:", [(a["lm_loss"], b["lm_loss"]) for a, b in zip(hist["torch"], hist["triton"])])


def test_triton_on_cpu_without_the_interpreter_is_one_error_line(mote_ckpt, data_dir, tmp_path):
    r = _train_cli(mote_ckpt, data_dir, tmp_path / "o", "--steps", 1, "--kernels", "triton", interpret=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --kernels triton needs a CUDA GPU; on CPU it runs only under Triton's interpreter "
        "(TRITON_INTERPRET=1, ~1000x slower: for tests); use --kernels torch"], r.stderr
    assert not (tmp_path / "o").exists()


def test_choose_kernels_refuses_what_cannot_run(monkeypatch):
    import importlib.util

    from mote_edge.errors import MoteError
    from mote_edge.train import choose_kernels

    assert choose_kernels(None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_kernels("triton", torch.device("cpu")) == "triton"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    with pytest.raises(MoteError, match=r"compute capability 8.0 or newer .*Tesla T4 is 7.5; use --kernels torch"):
        choose_kernels(None, torch.device("cuda", 0))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real(n, *a))
    with pytest.raises(MoteError, match=r"needs the triton package.*pip install 'mote-edge\[gpu\]'"):
        choose_kernels("triton", torch.device("cpu"))
    assert choose_kernels(None, torch.device("cpu")) == "torch"


# ---------------------------------------------------------------------------------------------
# compile gate (no interpreter: a subprocess)

GATE = r'''
import json, re, subprocess, tempfile, os
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from mote_edge.cuda_kernels import ternary_train as tt

D16 = [["tt.divisibility", 16]]
# kernel -> (argument types, arguments the runtime sees as multiples of 16 at real shapes: every
# pointer from torch's allocator, K / strides of the 0.5B-3B widths 896, 1536, 2048, 4864, 8960, 11008)
SPECS = {
    "absmean_partial": (tt.absmean_partial_kernel, {"w_ptr": "*fp32", "part_ptr": "*fp64", "n": "i32"}, "w_ptr part_ptr n"),
    "absmean_finish": (tt.absmean_finish_kernel, {"part_ptr": "*fp64", "scale_ptr": "*fp32", "n_parts": "i32",
                       "n": "i32", "eps": "fp32"}, "part_ptr scale_ptr n"),
    "ternary_codes": (tt.ternary_codes_kernel, {"w_ptr": "*fp32", "scale_ptr": "*fp32", "codes_ptr": "*i8", "n": "i32"},
                      "w_ptr scale_ptr codes_ptr n"),
    "act_quant_int8": (tt.act_quant_int8_kernel, {"x_ptr": "*bf16", "q_ptr": "*i8", "step_ptr": "*fp32", "sum_ptr": "*fp32",
                       "K": "i32", "stride_x": "i32", "stride_q": "i32", "eps": "fp32"},
                       "x_ptr q_ptr step_ptr sum_ptr K stride_x stride_q"),
    "int8_gemm": (tt.int8_gemm_kernel, {"a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": "*bf16", "step_ptr": "*fp32",
                  "scale_ptr": "*fp32", "N": "i32", "M": "i32", "K": "i32", "stride_a": "i32", "stride_b": "i32",
                  "stride_c": "i32"}, "a_ptr b_ptr c_ptr step_ptr scale_ptr M K stride_a stride_b stride_c"),
    "grouped_int8_gemm": (tt.grouped_int8_gemm_kernel, {"a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": "*bf16",
                          "step_ptr": "*fp32", "scale_ptr": "*fp32", "offs_ptr": "*i32", "E": "i32", "M": "i32",
                          "K": "i32", "stride_a": "i32", "stride_be": "i32", "stride_b": "i32", "stride_c": "i32"},
                          "a_ptr b_ptr c_ptr step_ptr scale_ptr offs_ptr M K stride_a stride_be stride_b stride_c"),
}
assert set(SPECS) == set(tt.CONFIGS), "every shipped kernel is gated"
out = {}
for cap, arch in ((80, "sm_80"), (90, "sm_90a")):
    for name, (fn, types, div) in SPECS.items():
        meta = dict(tt.CONFIGS[name])
        options = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta} | tt.OPTIONS.get(name, {})
        signature = {a: types.get(a, "constexpr") for a in fn.arg_names}
        attrs = {(fn.arg_names.index(a),): D16 for a in div.split()}
        k = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs=meta, attrs=attrs),
                           target=GPUTarget("cuda", cap, 32), options=options)
        ptx = k.asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        fmad = [] if options.get("enable_fp_fusion", True) else ["--fmad=false"]
        log = subprocess.run([get_ptxas(cap).path, "-v", *fmad, f"--gpu-name={arch}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
        os.unlink(f.name)
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
        out[f"{name}@{arch}"] = {"target": k.metadata.target.arch, "spill_bytes": sum(spills), "ptxas_ran": bool(spills),
                                 "mma_sync": len(re.findall(r"\bmma\.sync\.aligned\.\S*\.s32\.s8\.s8\.s32", ptx)),
                                 "wgmma_s8": len(re.findall(r"\bwgmma\.mma_async\.sync\.aligned\.\S*\.s32\.s8\.s8", ptx)),
                                 "fma_f32": len(re.findall(r"\bfma\.rn\.f32", ptx)),
                                 "div_rn_f32": len(re.findall(r"\bdiv\.rn\.f32", ptx)),
                                 "div_approx_f32": len(re.findall(r"\bdiv\.(?:full|approx)\.f32", ptx))}
print(json.dumps(out))
'''


def test_compile_gate_sm80_sm90a():
    env = os.environ.copy()
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", GATE], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rep) == 2 * len(tt.CONFIGS)
    for key, v in rep.items():
        name, arch = key.split("@")
        assert v["ptxas_ran"] and v["spill_bytes"] == 0, (key, v)
        if name in ("int8_gemm", "grouped_int8_gemm"):  # int8 tensor cores
            assert (v["mma_sync"] if arch == "sm_80" else v["wgmma_s8"]) > 0, (key, v)
        if name in ("act_quant_int8", "ternary_codes"):  # IEEE division; no FMA rounding the exact product
            assert v["div_rn_f32"] > 0 and v["div_approx_f32"] == 0, (key, v)
        if name == "act_quant_int8":
            assert v["fma_f32"] == 0, (key, v)
    print(json.dumps(rep, indent=1))

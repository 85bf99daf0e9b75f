"""Batched ternary products (csrc: mote_tern_gemm_batch, mote_lut_gemm_batch, pool.c's mote_parallel_tasks):
several matrices of mixed shapes and both kernel families in one pool job equal the int64 reference bit for bit
on every ISA path here, with shared and distinct activation sets, row slices of a wider set, empty products,
more products than one C batch holds, a long prompt among short ones (LUT super-blocks), 1 and 2 threads; and
clinear.TernaryExperts (a MoE layer by stage) equals running each expert's FFN in turn, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from mote_edge.runtime_cpu import clib
from mote_edge.runtime_cpu import ternary_ref as ref

if not clib.available():
    pytest.skip(f"the C kernel library is not built: {clib.error()}", allow_module_level=True)

from mote_edge.runtime_cpu import ternary_kernels as tk  # noqa: E402
from mote_edge.runtime_cpu.clinear import LutMatrix, TernaryExperts, products  # noqa: E402
from mote_edge.runtime_cpu.kernels import silu  # noqa: E402

ISAS = clib.isas_here()
EPS = 1e-5


def _codes(rng, n, k, kind="random"):
    if kind == "ones":
        return np.ones((n, k), np.int8)
    if kind == "minus":
        return -np.ones((n, k), np.int8)
    return rng.integers(-1, 2, (n, k)).astype(np.int8)


def _matrix(codes, scale, lut):
    m = tk.TernaryMatrix.from_codes(codes, scale)
    return LutMatrix(m) if lut else m


def _acts(rng, t, k, extreme=False):
    """Quantised activations (the C quantiser; checked against the numpy statement of the rule)."""
    if extreme:
        x = np.where(rng.random((t, k)) < 0.5, -1.0, 1.0).astype(np.float32) * 3.0  # all +-127 after quantisation
    else:
        x = rng.standard_normal((t, k)).astype(np.float32)
    got = tk.quantize(x, EPS, ref.padded(k))
    want = ref.quant_act_ref(x, EPS, ref.padded(k))
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    return got


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    clib.set_threads(request.param)
    yield request.param
    clib.set_threads(0)


@pytest.mark.parametrize("isa", ISAS)
def test_mixed_batch_equals_reference(isa, threads):
    rng = np.random.default_rng(7)
    shapes = [(40, 896, "random"), (33, 300, "ones"), (64, 256, "minus"), (5, 1000, "random"), (0, 256, "random")]
    x_sets = {k: _acts(rng, 3, k, extreme=(k == 300)) for k in {s[1] for s in shapes}}
    items, want = [], []
    for i, (n, k, kind) in enumerate(shapes):
        for lut in (False, True):
            codes = _codes(rng, n, k, kind)
            scale = rng.uniform(0.5, 2.0, n).astype(np.float32)
            q, sumq, step = x_sets[k]
            if i == 3:  # a row slice of the wider set: rows 1..2 only
                q, sumq, step = q[1:], sumq[1:], step[1:]
            items.append((_matrix(codes, scale, lut), q, sumq, step))
            want.append(ref.ref_gemm(codes, q, step, scale))
    got = products(items, isa)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and np.array_equal(g, w), (isa, threads, i)


@pytest.mark.parametrize("isa", ISAS)
def test_batch_longer_than_one_c_call_and_long_prompt(isa):
    """More products than MOTE_MAX_TASKS (the Python side splits), one of them a prompt longer than the LUT
    kernels' table super-block (run on its own inside the batch)."""
    rng = np.random.default_rng(3)
    k = 256
    short = _acts(rng, 2, k)
    n_items = tk.MAX_BATCH + 5
    items, want = [], []
    for i in range(n_items):
        codes = _codes(rng, 8 + i % 3, k)
        scale = rng.uniform(0.5, 2.0, codes.shape[0]).astype(np.float32)
        items.append((_matrix(codes, scale, lut=i % 2 == 1), *short))
        want.append(ref.ref_gemm(codes, short[0], short[2], scale))
    codes = _codes(rng, 16, k)
    scale = np.ones(16, np.float32)
    long_t = 800  # tables of 800 tokens x 29 columns x 192 bytes > the 4 MiB super-block
    long = _acts(rng, long_t, k)
    items.append((_matrix(codes, scale, lut=True), *long))
    want.append(ref.ref_gemm(codes, long[0], long[2], scale))
    got = products(items, isa)
    for i, (g, w) in enumerate(zip(got, want)):
        assert np.array_equal(g, w), (isa, i)


def _experts(rng, e_count, f, h, lut_gu, lut_down):
    gate, up, down = [], [], []
    for _ in range(e_count):
        for lst, (n, k), lut in ((gate, (f, h), lut_gu), (up, (f, h), lut_gu), (down, (h, f), lut_down)):
            lst.append(_matrix(_codes(rng, n, k), np.float32(rng.uniform(0.01, 0.05)), lut))
    return gate, up, down


def _one_expert(gate, up, down, x):
    """One expert's FFN as the engine ran it before batching: quantise, gate and up, silu * up, quantise, down."""
    q = tk.quantize(x, EPS, gate.kp)
    g, u = products([(gate, *q), (up, *q)])
    hq = tk.quantize(silu(g) * u, EPS, down.kp)
    return products([(down, *hq)])[0]


@pytest.mark.parametrize("lut_gu,lut_down", [(False, False), (True, True), (True, False)], ids=["mad", "lut", "mixed"])
def test_ternary_experts_equal_expert_by_expert(lut_gu, lut_down, threads):
    rng = np.random.default_rng(11)
    E, F, H, k = 6, 200, 96, 2
    gate, up, down = _experts(rng, E, F, H, lut_gu, lut_down)
    ex = TernaryExperts(gate, up, down, EPS)
    # decode: one token, the chosen experts in index order
    x = rng.standard_normal((1, H)).astype(np.float32)
    probs = rng.dirichlet(np.ones(E), 1).astype(np.float32)
    chosen = [1, 4]
    want = np.zeros_like(x)
    for e in chosen:
        want += _one_expert(gate[e], up[e], down[e], x) * probs[0, e]
    assert np.array_equal(ex.decode(x, probs, chosen), want)
    # prefill: 9 tokens, expert 5 chosen by none (an empty group)
    T = 9
    x = rng.standard_normal((T, H)).astype(np.float32)
    probs = rng.dirichlet(np.ones(E), T).astype(np.float32)
    top = np.stack([rng.choice(E - 1, k, replace=False) for _ in range(T)])
    want = np.zeros_like(x)
    for e in range(E):
        tok, _ = np.nonzero(top == e)
        if tok.size:
            want[tok] += _one_expert(gate[e], up[e], down[e], x[tok]) * probs[tok, e][:, None]
    got = ex.prefill(x, probs, top)
    assert np.array_equal(got, want)
    assert not np.array_equal(got, np.zeros_like(got))

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mote_edge.quant import (QB, TernaryLinear, quantize_activation_int8, quantize_weight_ternary,
                             ternary_codes, ternary_scale)


def test_ternary_codes_by_hand():
    w = torch.tensor([[0.9, -0.2, 0.05], [-1.5, 0.4, 0.0]])
    s = w.abs().mean()  # 0.5083
    assert torch.allclose(ternary_scale(w), s)
    # w / s = [1.77, -0.39, 0.10], [-2.95, 0.79, 0] -> round/clip
    assert ternary_codes(w).tolist() == [[1, 0, 0], [-1, 1, 0]]
    assert ternary_codes(w).dtype == torch.int8
    assert torch.equal(quantize_weight_ternary(w), ternary_codes(w).float() * s)


def test_ternary_values_are_three_levels():
    w = torch.randn(64, 96)
    q = quantize_weight_ternary(w)
    s = ternary_scale(w)
    assert set(torch.unique(q / s).tolist()) == {-1.0, 0.0, 1.0}


def test_activation_int8_per_token_grid_and_range():
    x = torch.randn(5, 33) * torch.tensor([0.01, 1, 10, 100, 1e4])[:, None]
    q = quantize_activation_int8(x)
    amax = x.abs().amax(-1, keepdim=True)
    k = q * QB / amax
    assert torch.allclose(k, k.round(), atol=1e-3), "values must sit on a per-token grid of amax/127"
    assert k.round().min() >= -128 and k.round().max() <= 127
    assert torch.allclose(k.abs().amax(-1), torch.full((5,), 127.0)), "each token's max maps to 127"
    assert ((q - x).abs() <= amax / QB / 2 + 1e-6).all(), "rounding error at most half a step"


def test_ste_passes_gradient_straight_through():
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    g = torch.randn(4, 16)
    (quantize_activation_int8(x) * g).sum().backward()
    assert torch.equal(x.grad, g)
    gw = torch.randn(8, 16)
    (quantize_weight_ternary(w) * gw).sum().backward()
    assert torch.equal(w.grad, gw)


def test_ternary_linear_forward_is_quantized_matmul():
    lin = TernaryLinear(32, 16, bias=False)
    x = torch.randn(3, 7, 32)
    ref = F.linear(quantize_activation_int8(x), ternary_codes(lin.weight).float() * ternary_scale(lin.weight))
    assert torch.equal(lin(x), ref)
    assert not torch.allclose(lin(x), F.linear(x, lin.weight), atol=1e-3), "must not be the fp matmul"


def _division_form(w, s):
    """The definition: clip(round_half_even(w / s), -1, 1) * s, +0 for zero codes."""
    return (w / s).clamp(-1, 1).round().mul(s).add(0.0)


@pytest.mark.parametrize("form", ["c", "torch"])
def test_fake_quant_weight_equals_the_division_form_at_the_rounding_edges(form, monkeypatch):
    """fake_quant_weight compares w with s/2 instead of dividing: weights at exactly s/2 (the half-way
    tie, code 0), one and two float32 either side, at +-s, +-0, huge and tiny give the division form's
    values and zero signs, for random scales and for powers of two."""
    from mote_edge import quant
    from mote_edge.quant import fake_quant_weight, ternary_values

    if form == "torch":  # the three-pass form used without the C library
        monkeypatch.setattr(quant, "_C_KERNELS", [None])
    else:
        assert quant._c_kernels() is not None, "the C library is built by the install"

    g = torch.Generator().manual_seed(0)
    up, down = torch.tensor([float("inf")]), torch.tensor([-float("inf")])
    scales = [2.0 ** k for k in range(-16, 4)] + (10 ** (torch.rand(300, generator=g) * 6 - 4)).tolist()
    for i, sv in enumerate(scales):
        s = torch.tensor(sv, dtype=torch.float32)
        w = torch.randn(17, 33, generator=g) * s
        half = (torch.tensor([0.5]) * s).float()
        above, below = torch.nextafter(half, up), torch.nextafter(half, down)
        edge = torch.cat([half, above, below, torch.nextafter(above, up), torch.nextafter(below, down), s.reshape(1),
                          torch.tensor([0.0, -0.0, 1e30, -1e-30])])
        w.view(-1)[i % 7:i % 7 + 2 * edge.numel()] = torch.cat([edge, -edge])
        got, want = ternary_values(w, s), _division_form(w, s)
        assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit()), sv
    w = torch.randn(64, 96)
    assert torch.equal(fake_quant_weight(w), _division_form(w, ternary_scale(w)))
    w[0, 0] = float("nan")
    assert fake_quant_weight(w).isnan().all() and _division_form(w, ternary_scale(w)).isnan().all()
    w[0, 0] = float("inf")
    got, want = fake_quant_weight(w), _division_form(w, ternary_scale(w))
    assert torch.allclose(got, want, rtol=0, atol=0, equal_nan=True) and got.isnan().any()
    big = torch.randn(3, 1 << 18) * 0.02  # several threads, ranges that do not divide evenly
    old = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert torch.equal(fake_quant_weight(big), _division_form(big, ternary_scale(big)))
    finally:
        torch.set_num_threads(old)
    wb = torch.randn(16, 16).bfloat16()  # other dtypes take the division form itself
    assert torch.equal(fake_quant_weight(wb), _division_form(wb.float(), ternary_scale(wb)).bfloat16())


@pytest.fixture(params=["torch-openmp", "pthreads"])
def threads_on(request):
    """The C training kernels' threads: torch's OpenMP team (what the training step uses where torch runs on
    OpenMP) or short-lived pthreads (no team); every C test runs on both."""
    from mote_edge import quant

    c = quant._c_kernels()
    assert c is not None
    team = quant.torch_openmp_parallel()
    if request.param == "torch-openmp":
        assert team, "torch's CPU build runs on OpenMP here; its GOMP_parallel must be found"
    c.set_team(team if request.param == "torch-openmp" else None)
    yield request.param
    c.set_team(team)


def test_c_values_are_the_division_form_on_every_isa_path(threads_on):
    """The C values pass on each ISA path this CPU runs (AVX512: 16 at a time with streaming stores from the
    output's first 64-byte boundary) gives the division form's bits: outputs that start off and on that
    boundary (out + 0..16 floats), lengths around a multiple of 16, the rounding edges in the vector body and
    in the scalar ends, 1-3 threads; a level this CPU does not run writes nothing."""
    from mote_edge import quant
    from mote_edge.runtime_cpu import clib

    c = quant._c_kernels()
    assert c is not None
    g = torch.Generator().manual_seed(1)
    up, down = torch.tensor([float("inf")]), torch.tensor([-float("inf")])
    for isa in clib.isas_here():
        for i, (shift, n) in enumerate(itertools.product(range(17), (1, 15, 16, 17, 47, 200, 1003))):
            sv = float(10 ** (torch.rand(1, generator=g) * 6 - 4))
            s = torch.tensor(sv, dtype=torch.float32)
            half = (torch.tensor([0.5]) * s).float()
            above, below = torch.nextafter(half, up), torch.nextafter(half, down)
            edge = torch.cat([half, above, below, s.reshape(1), torch.tensor([0.0, -0.0, 1e30])])
            w = torch.randn(n, generator=g) * s
            k = min(n, 2 * edge.numel())
            w[(i * 5) % (n - k + 1):][:k] = torch.cat([edge, -edge])[:k]
            buf = torch.full((n + 32,), float("nan"))  # poisoned: an unwritten value shows
            out = buf[shift:shift + n]
            for threads in (1, 2, 3):
                buf.fill_(float("nan"))
                assert c.values(w.data_ptr(), n, sv, out.data_ptr(), threads, clib.ISAS[isa])
                want = _division_form(w, s)
                assert torch.equal(out, want) and torch.equal(out.signbit(), want.signbit()), (isa, shift, n)
                assert buf[:shift].isnan().all() and buf[shift + n:].isnan().all(), (isa, shift, n)  # no write outside
    big = torch.randn(3 * (1 << 18) + 37, generator=g) * 0.02  # thread ranges that split the vector body unevenly
    sv = float(ternary_scale(big))
    buf = torch.full((big.numel() + 8,), float("nan"))
    for isa, threads in itertools.product(clib.isas_here(), (1, 2, 3)):
        buf.fill_(float("nan"))
        assert c.values(big.data_ptr(), big.numel(), sv, buf[3:].data_ptr(), threads, clib.ISAS[isa])
        assert torch.equal(buf[3:3 + big.numel()], _division_form(big, torch.tensor(sv))), (isa, threads)
    w, out = torch.ones(64), torch.full((64,), 7.0)
    for name, level in clib.ISAS.items():
        if name not in clib.isas_here():
            assert not c.values(w.data_ptr(), 64, 1.0, out.data_ptr(), 1, level) and (out == 7).all(), name


@pytest.mark.parametrize("form", ["c", "numpy"])
def test_scale_is_the_exporters_bit_for_bit(form, threads_on, monkeypatch):
    """Training's scale (the C sum, or numpy's without the C library) is the exporter's float32 bit for bit,
    and the float64 sum itself equal: sizes that are and are not multiples of the lanes and of the block,
    magnitudes over 30 binades (where the order of a float64 sum shows), an all-zero matrix (EPS)."""
    import numpy as np

    from mote_edge import quant
    from mote_edge.exporters import ternary as tern
    from mote_edge.runtime_cpu import clib

    if form == "numpy":
        monkeypatch.setattr(quant, "_C_KERNELS", [None])
    else:
        assert quant._c_kernels() is not None
        isas = clib.isas_here()
        w = torch.ones(64)  # a level this CPU does not run is NaN, not a wrong sum
        absent = [i for n, i in clib.ISAS.items() if n not in isas]
        assert all(math.isnan(quant._c_kernels().abs_sum(64, w.data_ptr(), 1, i)) for i in absent), absent
    rng = np.random.default_rng(0)
    B = tern.SCALE_BLOCK
    for n in (1, 5, 16, 17, B - 1, B, B + 15, 3 * B + 37, 4864 * 896):
        w = rng.standard_normal(n).astype(np.float32) * np.exp2(rng.uniform(-25, 5, n)).astype(np.float32)
        want = tern.ternary_scale(w)
        assert ternary_scale(torch.from_numpy(w)).item() == float(want), n
        if form == "c":  # blocks split over 1-3 threads, added in order, on every ISA path: the same total
            for isa, threads in itertools.product(isas, (1, 2, 3)):
                got = quant._c_kernels().abs_sum(n, torch.from_numpy(w).data_ptr(), threads, clib.ISAS[isa])
                assert got == tern.abs_sum(w), (n, isa, threads)
        exact = np.abs(w.astype(np.float64)).sum()
        assert abs(tern.abs_sum(w) - exact) <= 1e-12 * exact  # a float64 sum: far below a float32 ulp
    assert ternary_scale(torch.zeros(7, 9)).item() == np.float32(tern.EPS)


def _torch_activation_values(x):
    """int8_fake_quant's torch form, the definition: amax per row clamped to EPS, round half to even of
    x * (127 / amax), clamp to int8, times amax / 127 (torch's float32 operations, in this order)."""
    from mote_edge.quant import EPS

    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_(min=EPS)
    return (xf * (QB / amax)).round_().clamp_(-QB - 1, QB).mul_(amax / QB)


def _ties(amax, m):
    """Per row of amax, values x with x * inv exactly m + 1/2 in float32 for torch's inv = 127 / amax (which
    torch computes as reciprocal times 127; one division would round to another float32 in about a quarter
    of the rows and move these off the tie), and amax itself in column 0, so it stays the row's max."""
    inv = QB / amax
    want = (m + 0.5).float()
    x = want / inv
    for _ in range(3):  # walk to a float32 whose product is the tie (within a few ulps of the quotient)
        p = x * inv
        x = torch.where(p < want, torch.nextafter(x, x.new_tensor(float("inf"))),
                        torch.where(p > want, torch.nextafter(x, x.new_tensor(-float("inf"))), x))
    x = torch.where(x * inv == want, x, 0.0)
    x[:, 0] = amax[:, 0]
    return x


def _same_bits(a, b):
    """Equal values, signs of zero and NaN positions (a NaN's payload may differ)."""
    return (torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
            and torch.equal(a.signbit() & ~a.isnan(), b.signbit() & ~b.isnan()))


def test_c_activation_values_are_torchs_on_every_isa_path(threads_on):
    """The C per-token int8 values (csrc/ternary_values.c, what the training forward quantises its activations
    with on CPU) equal torch's operations bit for bit on each ISA path this CPU runs: row lengths around the
    8-wide vector body, half-way ties (round half to even), +-0, rows of zeros (EPS), magnitudes over 60
    binades, a NaN or an inf in a row (the whole row NaN, as torch), outputs off any alignment with
    poisoned ends, rows split over 1-3 threads; a level this CPU does not run writes nothing."""
    from mote_edge import quant
    from mote_edge.runtime_cpu import clib

    c = quant._c_kernels()
    assert c is not None
    g = torch.Generator().manual_seed(2)
    cases = []
    for i, (rows, k) in enumerate(itertools.product((1, 3, 9), (1, 7, 8, 9, 15, 16, 17, 100, 896))):
        x = torch.randn(rows, k, generator=g) * 10 ** (torch.rand(rows, 1, generator=g) * 60 - 30)
        if i % 2:  # exact ties: x * (127 / amax) is m + 1/2 in float32, with each row's max kept in the row
            x = _ties(x.abs().amax(-1, keepdim=True), torch.randint(-127, 127, (rows, k), generator=g))
        x[:, 1::5] = -0.0 if i % 3 else 0.0  # (column 0 holds the ties' amax)
        if i % 4 == 1:
            x[0] = 0.0
        if i % 5 == 2:
            x[-1, k // 2] = float("nan") if i % 2 else float("inf")
        cases.append(x)
    cases.append(torch.randn(700, 1000, generator=g))  # enough for 2-3 threads, rows split unevenly
    for x, isa, threads in itertools.product(cases, clib.isas_here(), (1, 2, 3)):
        rows, k = x.shape
        buf = torch.full((x.numel() + 19,), 7.0)
        out = buf[3:3 + x.numel()]
        assert c.act_fake_quant(x.data_ptr(), rows, k, out.data_ptr(), threads, clib.ISAS[isa])
        assert _same_bits(out.view(rows, k), _torch_activation_values(x)), (isa, threads, rows, k)
        assert (buf[:3] == 7).all() and (buf[3 + x.numel():] == 7).all(), (isa, threads, rows, k)
    x, out = torch.ones(4, 8), torch.full((32,), 7.0)
    for name, level in clib.ISAS.items():
        if name not in clib.isas_here():
            assert not c.act_fake_quant(x.data_ptr(), 4, 8, out.data_ptr(), 1, level) and (out == 7).all(), name


def test_activation_values_take_the_c_form_only_where_it_applies():
    """int8_fake_quant: contiguous float32 CPU tensors through C, anything else through torch, with the same
    values either way (a transposed view, bfloat16, 3-d batches, an empty tensor); no gradient graph."""
    from mote_edge.quant import int8_fake_quant

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 40, generator=g, requires_grad=True)
    y = int8_fake_quant(x)
    assert not y.requires_grad and y.shape == x.shape and y.dtype == x.dtype
    assert _same_bits(y, _torch_activation_values(x.detach()))
    xt = torch.randn(40, 6, generator=g).t()
    assert _same_bits(int8_fake_quant(xt), _torch_activation_values(xt))
    xb = torch.randn(4, 33, generator=g).bfloat16()
    assert torch.equal(int8_fake_quant(xb), _torch_activation_values(xb).bfloat16())
    assert int8_fake_quant(torch.empty(0, 8)).shape == (0, 8)


def test_weight_values_off_the_cpu_make_no_host_read():
    """Off the CPU the ternary values are the division form on the device, with no float(s): on a GPU that
    read would wait for the device once per matrix per step. A meta tensor has no data to read (float()
    of it raises RuntimeError, which fails this test), so the call going through shows that no read happens;
    shapes and dtypes follow w. (No pytest.raises on float() here: under the suite's ASan run, torch's C++
    throw trips ASan's __cxa_throw interceptor.)"""
    from mote_edge.quant import fake_quant_weight

    for dtype in (torch.float32, torch.bfloat16):
        w = torch.empty(48, 32, device="meta", dtype=dtype)
        q = fake_quant_weight(w)
        assert q.device.type == "meta" and q.shape == w.shape and q.dtype == dtype

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

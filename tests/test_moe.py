import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mote_edge.checkpoint import load_model
from mote_edge.config import MoTEConfig
from mote_edge.losses import load_balance_loss, lm_loss_sum
from mote_edge.model import apply_mote_
from mote_edge.moe import Expert, MoTEBlock, moe_blocks
from mote_edge.quant import TernaryLinear
from mote_edge.train import TrainConfig, set_trainable


def test_upcycle_init_ffn_copies_dense_ffn(dense_ckpt, mote_ckpt):
    dense, mote = load_model(dense_ckpt), load_model(mote_ckpt)
    for dl, ml in zip(dense.model.language_model.layers, mote.model.language_model.layers):
        block = ml.mlp
        assert isinstance(block, MoTEBlock) and len(block.experts) == 4 and block.top_k == 1
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(dl.mlp, name).weight
            assert torch.equal(getattr(block.shared_expert, name).weight, w)
            for e in block.experts:
                assert isinstance(getattr(e, name), TernaryLinear)
                assert torch.equal(getattr(e, name).weight, w)
    # everything outside the FFNs is untouched
    d_state, m_state = dense.state_dict(), mote.state_dict()
    for k, v in d_state.items():
        if ".mlp." not in k or "vision_tower" in k:
            assert torch.equal(m_state[k], v), k


def test_upcycle_random_init_and_layer_selection(dense_ckpt):
    model = load_model(dense_ckpt)
    dense_w = model.model.language_model.layers[1].mlp.gate_proj.weight.clone()
    apply_mote_(model, MoTEConfig(layers=[1]), init="random")
    layers = model.model.language_model.layers
    assert not isinstance(layers[0].mlp, MoTEBlock) and isinstance(layers[1].mlp, MoTEBlock)
    e0 = layers[1].mlp.experts[0].gate_proj.weight
    assert not torch.equal(e0, dense_w)
    assert abs(e0.std().item() - model.config.text_config.initializer_range) < 0.005


def test_moe_llava_variant_has_fp_experts_and_no_shared(dense_ckpt):
    model = apply_mote_(load_model(dense_ckpt), MoTEConfig(layers=[0, 1], variant="moe-llava", top_k=2))
    for b in moe_blocks(model):
        assert b.shared_expert is None and b.top_k == 2
        assert type(b.experts[0].gate_proj) is nn.Linear


@pytest.mark.parametrize("top_k", [1, 2])
def test_block_matches_formula_without_renormalisation(top_k):
    torch.manual_seed(1)
    shared = Expert(16, 32, ternary=False)
    block = MoTEBlock(16, 32, MoTEConfig(num_experts=4, top_k=top_k, layers=[0]), shared)
    nn.init.normal_(block.router.weight, std=0.5)
    x = torch.randn(2, 5, 16)
    flat = x.reshape(-1, 16)
    p = F.softmax(block.router(flat), -1)
    ref = shared(flat)
    for t in range(flat.size(0)):
        top_p, top_i = p[t].topk(top_k)
        for pi, ei in zip(top_p, top_i):
            ref[t] += pi * block.experts[int(ei)](flat[t:t + 1])[0]  # raw softmax weight, no renorm
    assert torch.allclose(block(x).reshape(-1, 16), ref, atol=1e-5)


def _block_with_router(weight: torch.Tensor) -> MoTEBlock:
    b = MoTEBlock(8, 16, MoTEConfig(num_experts=4, top_k=1, layers=[0]), None)
    with torch.no_grad():
        b.router.weight.copy_(weight)
    return b


def test_balance_loss_is_one_for_uniform_router_and_grows_with_collapse():
    x = torch.randn(64, 8)
    uniform = _block_with_router(torch.zeros(4, 8))
    uniform(x)
    assert load_balance_loss([uniform]).item() == pytest.approx(1.0, abs=1e-6)

    collapsed_w = torch.zeros(4, 8)
    collapsed_w[0] = 100.0  # expert 0 wins for every token with positive sum
    collapsed = _block_with_router(collapsed_w)
    collapsed(x.abs())
    assert load_balance_loss([collapsed]).item() == pytest.approx(4.0, abs=1e-3)

    partial = _block_with_router(torch.randn(4, 8) * 0.5)
    partial(x)
    assert 1.0 <= load_balance_loss([partial]).item() < 4.0


def test_balance_loss_ignores_padding():
    b = _block_with_router(torch.zeros(4, 8))
    b.router.weight.data[0] = 100.0
    x = torch.cat([torch.randn(8, 8).abs(), -torch.randn(8, 8).abs()])  # pads would go elsewhere
    b(x)
    mask = torch.cat([torch.ones(8), torch.zeros(8)])
    assert load_balance_loss([b], mask).item() == pytest.approx(4.0, abs=1e-3)


def test_moe_stage_freezes_all_but_routers_and_experts(mote_ckpt, batch):
    model = load_model(mote_ckpt)
    trainable = dict(set_trainable(model, TrainConfig(stage="moe")))
    assert trainable and all(".router." in n or ".experts." in n for n in trainable)
    model.train()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"])
    n = (batch["labels"][:, 1:] != -100).sum()
    (lm_loss_sum(out.logits, batch["labels"]) / n + 0.01 * load_balance_loss(moe_blocks(model))).backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None, name
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if "router" in n)
    assert any(p.grad.abs().sum() > 0 for n, p in trainable.items() if "experts" in n)


def test_dense_stage_keeps_vision_frozen_unless_asked(dense_ckpt):
    model = load_model(dense_ckpt)
    names = [n for n, _ in set_trainable(model, TrainConfig(stage="dense"))]
    assert not any("vision_tower" in n for n in names) and any("multi_modal_projector" in n for n in names)
    names = [n for n, _ in set_trainable(copy.deepcopy(model), TrainConfig(stage="dense", train_vision=True))]
    assert any("vision_tower" in n for n in names)

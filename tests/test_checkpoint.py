import json

import numpy as np
import pytest
import torch

from mote_edge.checkpoint import load_model, save_model
from mote_edge.deploy import DeployedTernaryLinear, ternary_experts, use_deployable_

from .conftest import perturb_experts


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits


def test_save_load_round_trip_is_exact(mote_ckpt, batch, tmp_path):
    model = load_model(mote_ckpt)
    perturb_experts(model)
    save_model(model, tmp_path / "rt")
    cfg = json.loads((tmp_path / "rt" / "config.json").read_text())
    assert cfg["mote"]["num_experts"] == 4 and cfg["mote"]["variant"] == "mote"
    again = load_model(tmp_path / "rt")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_logits(model, batch), _logits(again, batch))
    assert again.lm_head.weight.data_ptr() == again.model.language_model.embed_tokens.weight.data_ptr()


def test_deployable_form_codes_and_scales(mote_ckpt):
    model = load_model(mote_ckpt)
    perturb_experts(model)
    dep = ternary_experts(model)
    assert len(dep) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    for name, (codes, scale) in dep.items():
        assert codes.dtype == np.int8 and set(np.unique(codes)) <= {-1, 0, 1}
        assert isinstance(scale, np.float32) and scale > 0
        w = model.get_parameter(name).detach().numpy()
        assert scale == np.float32(np.abs(w.astype(np.float64)).mean())  # fp64 mean: exact in numpy too
        assert np.array_equal(codes, np.clip(np.round(w / scale), -1, 1))


def test_eval_forward_equals_forward_from_deployable_form(mote_ckpt, batch):
    model = load_model(mote_ckpt)
    perturb_experts(model)
    ref = _logits(model, batch)
    deployed = use_deployable_(load_model(mote_ckpt), ternary_experts(model))
    # routers must come along too (they are full precision, not part of the ternary form)
    deployed.load_state_dict({k: v for k, v in model.state_dict().items() if "router" in k}, strict=False)
    assert sum(isinstance(m, DeployedTernaryLinear) for m in deployed.modules()) == 24
    assert not any(n.endswith("experts.0.gate_proj.weight") for n, _ in deployed.named_parameters())
    assert torch.equal(_logits(deployed, batch), ref)


def test_corrupt_weights_are_refused(mote_ckpt, tmp_path):
    import shutil

    from mote_edge.errors import MoteError

    bad = tmp_path / "bad"
    shutil.copytree(mote_ckpt, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MoteError, match="not a readable safetensors"):
        load_model(bad)

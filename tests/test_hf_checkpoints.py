"""Up-cycling checkpoints written by transformers itself (its on-disk key names), tied and untied."""
import pytest
import torch

from mote_edge.checkpoint import load_model
from mote_edge.tiny import build_dense
from mote_edge.upcycle import upcycle

from .conftest import TEXT, VISION


@pytest.mark.parametrize("tied", [True, False])
def test_upcycle_checkpoint_saved_by_transformers(tied, processor, batch, tmp_path):
    model = build_dense(processor.tokenizer, seed=5, vision=VISION, text=TEXT | {"tie_word_embeddings": tied})
    model.config.tie_word_embeddings = tied
    if not tied:
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.02)
    model.save_pretrained(str(tmp_path / "hf"))  # transformers' writer and key names
    processor.save_pretrained(str(tmp_path / "hf"))
    upcycle(tmp_path / "hf", tmp_path / "mote", experts=2, top_k=1, layers="sparse")
    mote = load_model(tmp_path / "mote")
    layers = mote.model.language_model.layers
    assert type(layers[0].mlp).__name__ == "Qwen2MLP" and type(layers[1].mlp).__name__ == "MoTEBlock"
    assert torch.equal(layers[1].mlp.shared_expert.up_proj.weight, model.model.language_model.layers[1].mlp.up_proj.weight)
    assert torch.equal(mote.lm_head.weight, model.lm_head.weight)
    tied_now = mote.lm_head.weight.data_ptr() == mote.model.language_model.embed_tokens.weight.data_ptr()
    assert tied_now == tied
    # the dense layers and embeddings are carried over exactly: logits match a dense forward
    # once the MoE layer's routed experts are silenced
    with torch.no_grad():
        for e in layers[1].mlp.experts:
            e.down_proj.weight.zero_()
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
        assert torch.allclose(mote(**kw).logits, model.eval()(**kw).logits, atol=1e-5)

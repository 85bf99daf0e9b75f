"""The embedded tiny checkpoints: the README's accuracy figures reproduce, MoTE is within 2 points of
dense, and the trained MoTE model's forward equals the forward from its deployable ternary form."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor

from mote_edge.checkpoint import load_model
from mote_edge.data import collate, encode_example, load_records
from mote_edge.deploy import ternary_experts, use_deployable_
from mote_edge.evaluate import accuracy, generate_answers
from mote_edge.synthetic import CHANCE_ACCURACY
from mote_edge.tiny import ASSETS

DATA = ASSETS / "data"
pytestmark = pytest.mark.skipif(not (ASSETS / "results.json").is_file(), reason="embedded checkpoints not built")


@pytest.fixture(scope="module")
def results():
    return json.loads((ASSETS / "results.json").read_text())


@pytest.fixture(scope="module")
def records():
    return load_records(DATA / "test.json")


@pytest.mark.parametrize("name", ["dense", "mote"])
def test_recorded_accuracy_reproduces(name, results, records):
    model = load_model(ASSETS / name)
    processor = AutoProcessor.from_pretrained(str(ASSETS / name))
    acc = accuracy(records, generate_answers(model, processor, records, DATA / "images", progress=False))
    assert acc["n"] == results[name]["n"] == 300
    # greedy decoding is deterministic; allow one question of slack for other CPUs' float rounding
    assert abs(acc["overall"] - results[name]["overall"]) <= 100 / 300 + 1e-9


def test_quality_bar(results):
    chance = 100 * sum(CHANCE_ACCURACY.values()) / len(CHANCE_ACCURACY)
    assert results["dense"]["overall"] >= chance + 30, "dense must clearly beat chance"
    assert results["mote"]["overall"] >= results["dense"]["overall"] - 2, "MoTE within 2 points of dense"


def test_batched_and_single_generation_agree(records):
    model = load_model(ASSETS / "mote")
    processor = AutoProcessor.from_pretrained(str(ASSETS / "mote"))
    recs = records[:12]
    batched = generate_answers(model, processor, recs, DATA / "images", batch_size=12, progress=False)
    single = [generate_answers(model, processor, [r], DATA / "images", batch_size=1, progress=False)[0] for r in recs]
    assert [a.strip() for a in batched] == [a.strip() for a in single]


def test_trained_mote_equals_its_deployable_form(records):
    model = load_model(ASSETS / "mote")
    processor = AutoProcessor.from_pretrained(str(ASSETS / "mote"))
    batch = collate([encode_example(processor, r, DATA / "images") for r in records[:8]],
                    processor.tokenizer.pad_token_id)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    deployable = ternary_experts(model)
    assert len(deployable) == 4 * 4 * 3
    with torch.no_grad():
        ref = model(**kw).logits
        deployed = use_deployable_(load_model(ASSETS / "mote"), deployable)
        assert torch.equal(deployed(**kw).logits, ref)


def test_demo_runs(tmp_path):
    r = subprocess.run([Path(sys.executable).parent / "mote-demo", "--limit", "16"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if "accuracy" in line]
    assert len(lines) == 3 and all("on 16 questions" in line for line in lines)  # dense, MoTE, MoTE in llama.cpp
    assert "answers equal to PyTorch's: 16/16" in r.stdout or "answers equal to PyTorch's: 15/16" in r.stdout
    assert "routed experts: TQ2_0" in r.stdout and "tokens/s" in r.stdout

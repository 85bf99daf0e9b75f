"""The tiny recipe has one source (recipe.json beside the embedded checkpoints): the command's defaults
are it, it agrees with the training logs of what is embedded, and `--install` refuses to replace the
embedded checkpoints with lower-scoring ones unless forced, leaving the destination untouched."""
import hashlib
import inspect
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mote_edge import tiny
from mote_edge.tiny import ASSETS, OPTIONS, RECIPE, RECIPE_FILE, install_assets, make_tiny, parser, resolve_recipe

pytestmark = pytest.mark.skipif(not (ASSETS / "results.json").is_file(), reason="embedded checkpoints not built")

SUBSET = 16  # held-out questions in the fake work dir: one evaluation batch, so installing takes seconds


def test_defaults_are_the_recipe_file():
    assert json.loads((ASSETS / RECIPE_FILE).read_text()) == RECIPE
    assert set(OPTIONS.values()) == set(RECIPE), "every recipe entry has exactly one option"
    args = parser().parse_args(["work"])
    for key, value in RECIPE.items():
        assert getattr(args, key) == value and type(getattr(args, key)) is type(value), key
    assert resolve_recipe() == RECIPE
    # make_tiny has no literal defaults of its own: everything comes from the recipe
    assert [p.kind for p in inspect.signature(make_tiny).parameters.values()] == [
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_KEYWORD]
    assert resolve_recipe(dense_epochs=2, seed=None)["dense_epochs"] == 2.0
    with pytest.raises(tiny.MoteError, match="unknown recipe entries"):
        resolve_recipe(epochs=3)


# the MoE-LLaVA baseline shares MoTE's moe stage (mote-make-tiny --baseline-only)
@pytest.mark.parametrize("stage,prefix", [("dense", "dense"), ("mote", "moe"), ("moe-llava", "moe")])
def test_recipe_matches_the_embedded_train_logs(stage, prefix):
    log = json.loads((ASSETS / stage / "train_log.json").read_text())
    cfg = log["config"]
    assert cfg["stage"] == prefix
    assert cfg["epochs"] == RECIPE[f"{prefix}_epochs"]
    assert cfg["lr"] == RECIPE[f"{prefix}_lr"]
    assert cfg["weight_decay"] == RECIPE[f"{prefix}_weight_decay"]
    assert cfg["batch_size"] == RECIPE["batch_size"] and cfg["grad_accum"] == 1
    assert cfg["seed"] == RECIPE["seed"]
    assert cfg["steps"] is None  # epochs decided the step count
    assert cfg["train_vision"] == (RECIPE["dense_train_vision"] if stage == "dense" else False)
    steps = log["history"][-1]["step"]  # = int(epochs * n_train // batch_size)
    assert steps == int(cfg["epochs"] * RECIPE["n_train"] // cfg["batch_size"])


def test_recipe_matches_the_embedded_test_split():
    results = json.loads((ASSETS / "results.json").read_text())
    test = json.loads((ASSETS / "data" / "test.json").read_text())
    assert len(test) == results["dense"]["n"] == results["mote"]["n"] == results["moe-llava"]["n"] == RECIPE["n_test"]


def test_embedded_baseline_is_moe_llava_from_the_embedded_dense():
    """MoE-LLaVA as the paper compares against: 4 full-precision experts, top-2, every layer, no shared
    expert, experts from the FFN; attention, embeddings and vision exactly the embedded dense model's."""
    from mote_edge.exporters.safetensors_np import SafetensorsFile

    cfg = json.loads((ASSETS / "moe-llava" / "config.json").read_text())["mote"]
    assert {k: cfg[k] for k in ("variant", "num_experts", "top_k", "init")} == {
        "variant": "moe-llava", "num_experts": 4, "top_k": 2, "init": "ffn"}
    assert cfg["layers"] == list(range(json.loads((ASSETS / "dense" / "config.json").read_text())
                                       ["text_config"]["num_hidden_layers"]))
    with SafetensorsFile(ASSETS / "dense" / "model.safetensors") as dense, \
            SafetensorsFile(ASSETS / "moe-llava" / "model.safetensors") as moe:
        assert not [n for n in moe.keys() if "shared_expert" in n]
        decoder_ffn = re.compile(r"language_model\.layers\.\d+\.mlp\.")
        frozen = [n for n in dense.keys() if not decoder_ffn.search(n)]
        assert any("vision_tower" in n for n in frozen) and any("self_attn" in n for n in frozen)
        assert all(np.array_equal(dense.get(n), moe.get(n)) for n in frozen)


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def fake_run(tmp_path):
    """A finished mote-make-tiny work dir built from the embedded checkpoints (no training), with a
    held-out split cut to SUBSET questions, and a destination holding a copy of the embedded assets."""
    work = tmp_path / "work"
    for name in ("dense", "mote"):
        shutil.copytree(ASSETS / name, work / name)
    test = json.loads((ASSETS / "data" / "test.json").read_text())[:SUBSET]
    (work / "data" / "images").mkdir(parents=True)
    (work / "data" / "test.json").write_text(json.dumps(test))
    for r in test:
        shutil.copy2(ASSETS / "data" / "images" / r["image"], work / "data" / "images" / r["image"])
    results = json.loads((ASSETS / "results.json").read_text())
    fp32 = {"dense": results["dense_fp32"], "mote": results["mote_fp32"]}
    (work / "results.json").write_text(json.dumps({"minutes": 0.1, "chance": results["chance"]} | fp32))
    (work / RECIPE_FILE).write_text(json.dumps(RECIPE | {"n_test": SUBSET}))
    dest = tmp_path / "pkg" / "tiny"
    shutil.copytree(ASSETS, dest)
    return work, dest


def _claim(dest: Path, overall: float) -> None:
    results = json.loads((dest / "results.json").read_text())
    for name in ("dense", "mote"):
        results[name]["overall"] = overall
    (dest / "results.json").write_text(json.dumps(results, indent=1))


def _cli(monkeypatch, work: Path, dest: Path, *flags: str) -> None:
    """mote-make-tiny WORK --install FLAGS with the training replaced by the finished fake run and the
    package assets by dest."""
    monkeypatch.setattr(tiny, "make_tiny", lambda w, **recipe: json.loads((w / "results.json").read_text()))
    monkeypatch.setattr(tiny, "ASSETS", dest)
    tiny.main([str(work), "--install", *flags])


def test_install_refuses_a_lower_score_and_force_installs(fake_run, monkeypatch, capsys):
    work, dest = fake_run
    _claim(dest, 100.0)  # the embedded ones claim 100%: the new ones score lower
    before = _tree(dest)
    with pytest.raises(SystemExit) as exit_:
        _cli(monkeypatch, work, dest)
    assert exit_.value.code == 2
    err = capsys.readouterr().err  # also holds transformers' "Loading weights" progress bars
    lines = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err[-2000:]
    line = lines[0]
    assert line.startswith("error: ") and "--force" in line and "vs 100.0%" in line, line
    assert "dense" in line and "MoTE" in line and "unchanged" in line
    assert _tree(dest) == before, "a refused install changes nothing in the destination"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tiny"], "no staging folder left behind"

    _cli(monkeypatch, work, dest, "--force")
    captured = capsys.readouterr()
    assert "warning: the new checkpoints score lower" in captured.err and f"installed into {dest}" in captured.out
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tiny"]
    results = json.loads((dest / "results.json").read_text())
    assert results["dense"]["n"] == results["mote"]["n"] == SUBSET
    assert results["mote_fp32"] == json.loads((work / "results.json").read_text())["mote"]
    assert json.loads((dest / RECIPE_FILE).read_text()) == json.loads((work / RECIPE_FILE).read_text())
    assert len(list((dest / "data" / "images").iterdir())) == SUBSET
    assert (dest / "mote" / "model.safetensors").stat().st_size == (ASSETS / "mote" / "model.safetensors").stat().st_size


def test_only_a_lower_score_is_refused():
    def res(dense, mote):
        return {"dense": {"overall": dense, "n": 300}, "mote": {"overall": mote, "n": 300}}

    embedded = res(73.3, 73.0)
    assert tiny._lower_than_embedded(res(73.3, 73.0), embedded) is None  # equal: a rebuild installs
    assert tiny._lower_than_embedded(res(80.0, 75.0), embedded) is None
    for new in (res(73.0, 80.0), res(80.0, 72.0), res(51.0, 52.0)):
        msg = tiny._lower_than_embedded(new, embedded)
        assert msg and "\n" not in msg and "vs 73.3%" in msg and "vs 73.0%" in msg


def test_install_needs_a_finished_run(fake_run):
    work, dest = fake_run
    (work / RECIPE_FILE).unlink()
    before = _tree(dest)
    with pytest.raises(tiny.MoteError, match="recipe.json' does not exist"):
        install_assets(work, dest)
    assert _tree(dest) == before

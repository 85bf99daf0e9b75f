"""mote-bench --accuracy (benchmarks/accuracy.py): a short ladder on the embedded tiny checkpoints writes
the table, JSON and plot; every size is the expert-tensor bytes of the file on disk (read independently
with gguf-py); every accuracy is the engine's own evaluator's on the same file and questions (and, for
the MoTE file whose weights are the checkpoint's, PyTorch's mote-eval too); exports are reused while up
to date; the large held-out split shares no image with the training data."""
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mote_edge.benchmarks import accuracy, bench
from mote_edge.synthetic import HELDOUT_SPLIT, HELDOUT_SIZE, generate_split
from mote_edge.tiny import ASSETS, BASELINE, RECIPE

SUBSET = 24  # held-out questions per file: six of each type
CKPTS = {"mote": ASSETS / "mote", "moe-llava": ASSETS / BASELINE, "dense": ASSETS / "dense"}
pytestmark = pytest.mark.skipif(not all((p / "model.safetensors").is_file() for p in CKPTS.values()),
                                reason="embedded checkpoints not built")

# Expert tensors by their GGUF names: routed (_exps), shared (_shexp), a dense model's FFN; the routers
# (ffn_gate_inp, ffn_gate_inp_shexp) are not expert weights.
EXPERT_TENSOR = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)(_exps|_shexp)?\.weight$")


def expert_bytes_on_disk(path: Path) -> int:
    """Bytes of the expert tensors in the file, by gguf-py's own reader (not the project's), leaving
    out all-zero tensors (MoE-LLaVA's placeholder shared expert)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(path)
    return sum(int(t.n_bytes) for t in r.tensors
               if EXPERT_TENSOR.match(t.name) and np.any(dequantize(t.data, t.tensor_type)))


def _one_error_line(capsys, run) -> str:
    with pytest.raises(SystemExit) as exit_:
        run()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _python(code: str, *args: str) -> str:
    """Run `code` in a fresh interpreter: this one has imported torch (conftest), whose OpenMP runtime then
    ignores the OMP_WAIT_POLICY the ladder sets for llama.cpp, and spinning makes it ~20x slower here."""
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    """One short ladder run (`mote-bench --accuracy`): MoTE TQ2_0 x {BF16, Q4_K} shared, MoE-LLaVA {F16,
    Q4_K}, dense BF16."""
    root = tmp_path_factory.mktemp("ladder")
    argv = ["--accuracy", "--ternary-types", "tq2_0", "--shared-types", "bf16,q4_k", "--expert-types", "f16,q4_k",
            "--data", str(ASSETS / "data" / "test.json"), "--limit", str(SUBSET), "--cache", str(root / "cache"),
            "--out", str(root / "out"), "--quiet"]
    _python("import sys; from mote_edge.benchmarks.bench import main; main(sys.argv[1:])", *argv)
    return root, json.loads((root / "out" / "accuracy.json").read_text())


def test_writes_table_json_and_plot(ladder):
    root, report = ladder
    names = [p["name"] for p in report["points"]]
    assert names == ["mote-tq2_0-bf16", "mote-tq2_0-q4_k", "moe-llava-f16", "moe-llava-q4_k", "dense-bf16"]
    md = (root / "out" / "accuracy.md").read_text()
    for p in report["points"]:
        lo, hi = p["ci95"]
        assert lo <= p["accuracy"] <= hi and p["n"] == SUBSET
        assert f"| {p['label']} | {p['expert_bytes'] / 2 ** 20:.3f} |" in md and f"**{p['accuracy']:.1f}**" in md
    assert "round-to-nearest" in md and "GPTQ" in md and "expert memory =" in md
    assert [c["moe_llava"] for c in report["comparisons"]] == ["moe-llava-f16", "moe-llava-q4_k"]
    from PIL import Image

    with Image.open(root / "out" / "accuracy.png") as im:
        assert im.format == "PNG" and im.size[0] > 400


def test_sizes_are_the_expert_tensors_of_the_files(ladder):
    _, report = ladder
    for p in report["points"]:
        path = Path(p["path"])
        assert p["expert_bytes"] == expert_bytes_on_disk(path) > 0, p["name"]
        assert p["file_bytes"] == path.stat().st_size
    by = {p["name"]: p["expert_bytes"] for p in report["points"]}
    # MoTE's BF16 shared expert is exactly the dense FFN; Q4_K shrinks only it; PTQ shrinks MoE-LLaVA
    assert by["mote-tq2_0-bf16"] - by["mote-tq2_0-q4_k"] == by["dense-bf16"] - by["dense-bf16"] * 4.5 / 16
    assert by["moe-llava-f16"] == 4 * by["dense-bf16"] and by["moe-llava-q4_k"] == by["moe-llava-f16"] * 4.5 / 16


def test_accuracies_are_the_engines_and_mote_evals(ladder):
    from mote_edge.evaluate import evaluate

    _, report = ladder
    data, images = ASSETS / "data" / "test.json", ASSETS / "data" / "images"
    # llama_engine.evaluate_gguf on every file, in its own process (see _python)
    refs = json.loads(_python(
        "import json, os, sys; os.environ['OMP_WAIT_POLICY'] = 'passive'\n"
        "from mote_edge.runtime_cpu.llama_engine import evaluate_gguf\n"
        "files, data, images, n = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])\n"
        "print(json.dumps([evaluate_gguf(m, data, images, limit=n, mmproj=p, n_threads=1) for m, p in files]))",
        json.dumps([(p["path"], p["mmproj"]) for p in report["points"]]), str(data), str(images), str(SUBSET)))
    for p, ref in zip(report["points"], refs):
        assert (p["accuracy"], p["answers"]) == (ref["overall"], ref["answers"]), p["name"]
        assert p["hits"] == round(ref["overall"] * SUBSET / 100)
    # the MoTE file with the checkpoint's own (bf16) shared expert answers as PyTorch does
    mote = next(p for p in report["points"] if p["name"] == "mote-tq2_0-bf16")
    torch_acc = evaluate(CKPTS["mote"], data, images, limit=SUBSET, progress=False)
    assert mote["accuracy"] == torch_acc["overall"]


def test_exports_are_reused_while_up_to_date(ladder):
    root, report = ladder
    cache = root / "cache"
    specs = accuracy.ladder(["tq2_0"], ["bf16", "q4_k"], ["f16", "q4_k"], "bf16")
    before = {p: p.stat().st_mtime_ns for p in cache.glob("*.gguf")}
    _, _, log = accuracy.export_all(specs, CKPTS, cache, "f16", progress=False)
    assert log == [] and {p: p.stat().st_mtime_ns for p in cache.glob("*.gguf")} == before
    stamp = cache / "moe-llava-q4_k.gguf.json"  # as if exported from another checkpoint
    stamp.write_text(stamp.read_text().replace(json.loads(stamp.read_text())["sha256"], "0" * 64))
    _, _, log = accuracy.export_all(specs, CKPTS, cache, "f16", progress=False)
    assert [j["job"] for j in log] == ["export moe-llava-q4_k"]


def test_mote_engine(tmp_path):
    from mote_edge.runtime_cpu.mote_engine import MoteModel, evaluate
    from mote_edge.runtime_cpu.records import read_records

    out = tmp_path / "out"
    report = accuracy.run(["--engine", "mote", "--ternary-types", "tq1_0", "--shared-types", "q8_0", "--expert-types",
                           "", "--no-dense", "--data", str(ASSETS / "data" / "test.json"), "--limit", str(SUBSET),
                           "--cache", str(tmp_path / "cache"), "--out", str(out), "--plot", str(tmp_path / "l.png"),
                           "--quiet"])
    (p,) = report["points"]
    records = read_records(ASSETS / "data" / "test.json", SUBSET)
    ref = evaluate(MoteModel(p["path"], p["mmproj"], threads=1), records, ASSETS / "data" / "images")
    assert (p["accuracy"], p["answers"]) == (ref["overall"], ref["answers"])
    assert (tmp_path / "l.png").is_file() and not (out / "accuracy.png").exists()


def test_wilson_and_newcombe_match_published_values():
    lo, hi = accuracy.wilson(81, 263)  # Newcombe (1998), Statistics in Medicine 17:857, example: 0.2553-0.3662
    assert (round(lo / 100, 4), round(hi / 100, 4)) == (0.2553, 0.3662)
    lo, hi = accuracy.newcombe(56, 70, 48, 80)  # Newcombe (1998b) example (a): difference 0.2, CI 0.0524-0.3339
    assert (round(lo / 100, 4), round(hi / 100, 4)) == (0.0524, 0.3339)


def test_bad_input_is_one_error_line(capsys, tmp_path):
    common = ["--accuracy", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")]
    line = _one_error_line(capsys, lambda: bench.main(common + ["--moe-llava", str(CKPTS["mote"])]))
    assert "is a mote checkpoint; give a moe-llava one" in line
    assert "accepted: llama.cpp, mote" in _one_error_line(capsys, lambda: bench.main(common + ["--engine", "onnx"]))
    assert "'q9_k'" in _one_error_line(capsys, lambda: bench.main(common + ["--expert-types", "f16,q9_k"]))
    assert "does not exist" in _one_error_line(capsys, lambda: bench.main(common + ["--mote", str(tmp_path / "nope")]))
    assert not (tmp_path / "o").exists()


def _image_hashes(split: str, n: int, seed: int) -> dict[str, tuple[str, str]]:
    """pixel sha256 -> (record id, question) for every record of a split, generated in memory."""
    out = {}
    for record, image in generate_split(split, n, seed):
        out[hashlib.sha256(image.tobytes()).hexdigest()] = (record["id"], record["conversations"][0]["value"])
    return out


def test_the_large_held_out_split_shares_nothing_with_training():
    """The heldout split has its own random stream: none of its images (pixel for pixel), hence no
    (image, question) pair, is in the recipe's train, val or test split; the 300-question test split
    the embedded checkpoints are scored on is still what the generator gives."""
    seed = RECIPE["seed"]
    held = _image_hashes(HELDOUT_SPLIT, HELDOUT_SIZE, seed)
    assert len(held) == HELDOUT_SIZE  # no image twice within it either
    for split in ("train", "val", "test"):
        other = _image_hashes(split, RECIPE[f"n_{split}"], seed)
        assert not held.keys() & other.keys(), split
        assert not {i for i, _ in held.values()} & {i for i, _ in other.values()}
    test = json.loads((ASSETS / "data" / "test.json").read_text())
    assert [r for r, _ in generate_split("test", RECIPE["n_test"], seed)] == test

import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mote_edge import synthetic as S

CELL_INDEX = {"top left": 0, "top right": 1, "bottom left": 2, "bottom right": 3}
RGB = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (240, 200, 20)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    records = S.make_dataset(out, n_train=200, n_val=40, n_test=40, seed=0)
    return out, records


def _file_bytes(out, split):
    return (out / f"{split}.json").read_bytes()


def _image_hashes(out, records):
    return {hashlib.sha256((out / "images" / r["image"]).read_bytes()).hexdigest() for r in records}


def _expected_answer(question: str, shapes: list[dict]) -> str:
    """Independently re-derive the unique answer from the scene metadata."""
    if question == "How many shapes are there?":
        return ["one", "two", "three"][len(shapes) - 1]
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        hits = [o for o in shapes if o["shape"] == m[1]]
        assert len(hits) == 1, "ambiguous colour question"
        return hits[0]["colour"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        hits = [o for o in shapes if o["colour"] == m[1]]
        assert len(hits) == 1, "ambiguous shape question"
        return hits[0]["shape"]
    m = re.fullmatch(r"Where is the (\w+) (\w+)\?", question)
    assert m, f"unknown question {question!r}"
    hits = [o for o in shapes if o["colour"] == m[1] and o["shape"] == m[2]]
    assert len(hits) == 1, "ambiguous position question"
    return hits[0]["cell"]


def test_files_and_record_format(data):
    out, records = data
    for split, n in (("train", 200), ("val", 40), ("test", 40)):
        on_disk = json.loads(_file_bytes(out, split))
        assert on_disk == records[split]
        assert len(on_disk) == n
        assert len({r["id"] for r in on_disk}) == n
        for r in on_disk:
            assert r["id"].startswith(f"{split}_") and r["image"] == f"{r['id']}.png"
            human, gpt = r["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
    assert not list(out.glob("*.tmp"))


def test_answers_correct_by_construction(data):
    _, records = data
    for r in (r for split in records.values() for r in split):
        shapes = r["shapes"]
        assert 1 <= len(shapes) <= 3
        assert len({o["cell"] for o in shapes}) == len(shapes), "two shapes share a cell"
        question = r["conversations"][0]["value"].removeprefix("<image>\n")
        assert r["conversations"][1]["value"] == _expected_answer(question, shapes)
        assert question in S.all_questions()
        assert r["conversations"][1]["value"] in S.all_answers()


def test_question_types_balanced(data):
    _, records = data
    counts = Counter(r["question_type"] for r in records["train"])
    assert set(counts) == set(S.QUESTION_TYPES)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_answers_not_degenerate(data):
    # Every option should show up per type, or a text-only model could beat chance.
    _, records = data
    answers = {t: Counter() for t in S.QUESTION_TYPES}
    for r in records["train"]:
        answers[r["question_type"]][r["conversations"][1]["value"]] += 1
    for qtype, chance in S.CHANCE_ACCURACY.items():
        assert len(answers[qtype]) == round(1 / chance)
        top = max(answers[qtype].values()) / sum(answers[qtype].values())
        assert top < chance + 0.3


def test_images_match_metadata(data):
    out, records = data
    for r in records["val"]:
        img = Image.open(out / "images" / r["image"])
        assert img.size == (48, 48) and img.mode == "RGB"
        px = np.asarray(img).astype(int)
        occupied = set()
        for o in r["shapes"]:
            row, col = divmod(CELL_INDEX[o["cell"]], 2)
            cell = px[row * 24:(row + 1) * 24, col * 24:(col + 1) * 24].reshape(-1, 3)
            near = np.abs(cell - np.array(RGB[o["colour"]])).max(axis=1) <= 20
            # Smallest shape is a 12px triangle, about 70 px of area.
            assert near.sum() >= 50, (r["id"], o)
            occupied.add(CELL_INDEX[o["cell"]])
        for idx in set(range(4)) - occupied:
            row, col = divmod(idx, 2)
            cell = px[row * 24:(row + 1) * 24, col * 24:(col + 1) * 24]
            assert np.abs(cell - 235).max() <= 3, "empty cell is not background"


def test_same_seed_identical(data, tmp_path):
    out, records = data
    again = S.make_dataset(tmp_path, n_train=200, n_val=40, n_test=40, seed=0)
    assert again == records
    for split in S.SPLITS:
        assert _file_bytes(tmp_path, split) == _file_bytes(out, split)
        assert _image_hashes(tmp_path, again[split]) == _image_hashes(out, records[split])


def test_different_seed_differs(data, tmp_path):
    out, records = data
    other = S.make_dataset(tmp_path, n_train=200, n_val=40, n_test=40, seed=1)
    assert _file_bytes(tmp_path, "train") != _file_bytes(out, "train")
    assert not _image_hashes(tmp_path, other["train"]) & _image_hashes(out, records["train"])


def test_splits_disjoint(data):
    out, records = data
    hashes = {split: _image_hashes(out, records[split]) for split in S.SPLITS}
    assert len(hashes["train"]) == 200
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]
    # Not just different noise: the scene/question sequences differ too.
    key = lambda r: (json.dumps(r["shapes"]), r["conversations"][0]["value"])  # noqa: E731
    assert [key(r) for r in records["val"]] != [key(r) for r in records["test"]]


def test_corpus_covers_every_record(data):
    _, records = data
    corpus = set(S.corpus_texts())
    assert len(S.all_questions()) == 3 + 4 + 1 + 12
    for r in records["train"]:
        assert r["conversations"][0]["value"].removeprefix("<image>\n") in corpus
        assert r["conversations"][1]["value"] in corpus


def test_cli(tmp_path, capsys):
    assert S.main([str(tmp_path), "--train", "4", "--val", "2", "--test", "2", "--seed", "3"]) == 0
    assert len(json.loads((tmp_path / "train.json").read_text())) == 4
    assert len(list((tmp_path / "images").glob("*.png"))) == 8
    assert "train" in capsys.readouterr().out

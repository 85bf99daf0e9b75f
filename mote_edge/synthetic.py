"""Seeded synthetic visual-question task whose answers need the image.

Each 48x48 image is a 2x2 grid of 24px cells holding 1-3 coloured shapes.
Questions are only asked when the answer is unique, and every answer is
uniform over its options given the question text alone, so a text-only model
cannot beat ``CHANCE_ACCURACY``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm
from .exporters.errors import ArgumentParser

IMAGE_SIZE = 48
CELL = IMAGE_SIZE // 2
BACKGROUND = (235, 235, 235)

SHAPES = ("square", "circle", "triangle")
# Saturated and far apart in RGB so small jitter never makes a colour ambiguous.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
}
# Cell index -> (row, col) and its answer string; index order is row-major.
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = ("one", "two", "three")
QUESTION_TYPES = ("colour", "shape", "count", "position")

TEMPLATES = {
    "colour": "What colour is the {shape}?",
    "shape": "What shape is the {colour} object?",
    "count": "How many shapes are there?",
    "position": "Where is the {colour} {shape}?",
}

# Answers are uniform over these options by construction (see _ask), so the
# best a model ignoring the image can do is 1 / number of options.
CHANCE_ACCURACY = {
    "colour": 1 / len(COLOURS),
    "shape": 1 / len(SHAPES),
    "count": 1 / len(COUNT_WORDS),
    "position": 1 / len(POSITIONS),
}

SPLITS = ("train", "val", "test")


def all_questions() -> list[str]:
    """Every question text the generator can produce."""
    qs = [TEMPLATES["colour"].format(shape=s) for s in SHAPES]
    qs += [TEMPLATES["shape"].format(colour=c) for c in COLOURS]
    qs += [TEMPLATES["count"]]
    qs += [TEMPLATES["position"].format(colour=c, shape=s) for c in COLOURS for s in SHAPES]
    return qs


def all_answers() -> list[str]:
    """Every answer string, across all question types."""
    return [*COLOURS, *SHAPES, *COUNT_WORDS, *POSITIONS]


def corpus_texts() -> list[str]:
    """Strings a tokenizer for this task should be trained on."""
    return all_questions() + all_answers()


def _random_scene(rng: random.Random) -> list[dict]:
    n = rng.randint(1, 3)
    cells = rng.sample(range(4), n)
    return [
        {"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "cell": POSITIONS[c]}
        for c in cells
    ]


def _ask(qtype: str, shapes: list[dict], rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) for this scene, or None if no unique answer exists.

    The target is drawn uniformly among eligible objects; since shape
    attributes and cells are independent uniform draws, the answer stays
    uniform over its options.
    """
    if qtype == "count":
        return TEMPLATES["count"], COUNT_WORDS[len(shapes) - 1]
    if qtype == "colour":
        key = "shape"
    elif qtype == "shape":
        key = "colour"
    else:
        key = None
    ident = (lambda o: o[key]) if key else (lambda o: (o["colour"], o["shape"]))
    unique = [o for o in shapes if sum(ident(p) == ident(o) for p in shapes) == 1]
    if not unique:
        return None
    target = rng.choice(unique)
    if qtype == "colour":
        return TEMPLATES["colour"].format(shape=target["shape"]), target["colour"]
    if qtype == "shape":
        return TEMPLATES["shape"].format(colour=target["colour"]), target["shape"]
    question = TEMPLATES["position"].format(colour=target["colour"], shape=target["shape"])
    return question, target["cell"]


def _render(shapes: list[dict], rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in shapes:
        row, col = divmod(POSITIONS.index(obj["cell"]), 2)
        size = rng.randint(12, 20)
        # Centre in the cell with a little jitter, keeping a 1px margin so
        # shapes in neighbouring cells never touch.
        centre = (CELL - size) // 2
        lo, hi = max(1, centre - 3), min(CELL - size - 1, centre + 3)
        x0 = col * CELL + rng.randint(lo, hi)
        y0 = row * CELL + rng.randint(lo, hi)
        x1, y1 = x0 + size - 1, y0 + size - 1
        fill = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in COLOURS[obj["colour"]])
        if obj["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon(((x0 + x1) / 2, y0, x0, y1, x1, y1), fill=fill)
    # Faint noise so images are never pixel-identical across splits and the
    # vision tower cannot key on exact RGB values.
    noise = np.random.default_rng(rng.getrandbits(64)).integers(-3, 4, (IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _write_json_atomic(path: Path, records: list[dict]) -> None:
    # One record per line: still a plain JSON list, but compact and greppable.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    os.replace(tmp, path)


def generate_split(split: str, n: int, seed: int = 0):
    """Yield one split's (record, image) pairs in order, without writing anything.

    The random stream is seeded by the split's name, so splits never share a draw."""
    # A string seed is hashed with SHA-512 by random.Random, so this is stable
    # across processes (unlike hash()) and distinct per split.
    rng = random.Random(f"mote-synthetic:{seed}:{split}")
    # Exactly balanced question types, in random order.
    qtypes = [QUESTION_TYPES[i % len(QUESTION_TYPES)] for i in range(n)]
    rng.shuffle(qtypes)
    for i, qtype in enumerate(qtypes):
        while True:
            shapes = _random_scene(rng)
            qa = _ask(qtype, shapes, rng)
            if qa is not None:
                break
        question, answer = qa
        rid = f"{split}_{i:05d}"
        image = _render(shapes, rng)
        yield {
            "id": rid,
            "image": f"{rid}.png",
            "question_type": qtype,
            "shapes": shapes,
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": answer},
            ],
        }, image


def make_split(out_dir, split: str, n: int, seed: int = 0) -> list[dict]:
    """Generate one split's images and JSON; returns its records."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for record, image in tqdm(generate_split(split, n, seed), total=n, desc=f"{split} images", leave=False):
        image.save(image_dir / record["image"])
        records.append(record)
    # JSON last: if it exists, all its images are already on disk.
    _write_json_atomic(out_dir / f"{split}.json", records)
    return records


# The large held-out split for measurements whose differences must clear the noise (the accuracy ladder,
# benchmarks/accuracy.py): its own split name, so its own random stream, disjoint from train / val / test
# (tested); the 300-question "test" split the checkpoints are scored on is unchanged.
HELDOUT_SPLIT = "heldout"
HELDOUT_SIZE = 2000


def make_heldout(out_dir, n: int = HELDOUT_SIZE, seed: int = 0) -> list[dict]:
    """Write ``out_dir/heldout.json`` and its images (ids ``heldout_NNNNN``)."""
    return make_split(out_dir, HELDOUT_SPLIT, n, seed)


def make_dataset(out_dir, n_train: int = 6000, n_val: int = 300, n_test: int = 300,
                 seed: int = 0) -> dict[str, list[dict]]:
    """Write ``out_dir/images/*.png`` and ``out_dir/{train,val,test}.json``.

    Returns ``{split: records}``.
    """
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    return {split: make_split(out_dir, split, sizes[split], seed) for split in SPLITS}


def load_split(data_dir, split: str) -> list[dict]:
    with open(Path(data_dir) / f"{split}.json", encoding="utf-8") as f:
        return json.load(f)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="mote-make-data", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--val", type=int, default=300)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", type=int, default=0,
                        help=f"also write the large held-out split {HELDOUT_SPLIT}.json of N questions (default 0: none)")
    args = parser.parse_args(argv)
    data = make_dataset(args.out_dir, args.train, args.val, args.test, args.seed)
    if args.heldout:
        data[HELDOUT_SPLIT] = make_heldout(args.out_dir, args.heldout, args.seed)
    for split, records in data.items():
        print(f"{split}: {len(records)} records -> {Path(args.out_dir) / (split + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

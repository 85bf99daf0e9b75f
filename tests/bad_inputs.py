"""The catalogue of bad input (issue 12): malformed inputs for every command, as data.

Each case builds its broken input inside a fresh case folder from the shared fixtures (the embedded
checkpoints, one GGUF export, one ONNX export, one recorded routes file) and returns the command's
arguments. tests/test_bad_input_catalogue.py runs every case and asserts exit code 2, one `error:` line,
no traceback and nothing written; benchmarks/catalogue.py prints the README's table from the same list.
Torch-free: only the runner imports the commands.
"""
from __future__ import annotations

import json
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Fixtures:
    dense: Path  # checkpoint folders (the embedded tiny ones: read, never written)
    mote: Path
    moe_llava: Path
    data: Path  # the embedded task: test.json + images/
    gguf: Path  # the embedded MoTE exported with mote-export's defaults; its mmproj beside it
    onnx: Path  # the embedded MoTE exported with --format onnx
    routes: Path  # what mote-run --engine mote --routes recorded for one question

    @property
    def mmproj(self) -> Path:
        return self.gguf.with_name(self.gguf.stem + "-mmproj.gguf")

    @property
    def image(self) -> Path:
        return self.data / "images" / "test_00000.png"


@dataclass(frozen=True)
class Case:
    id: str
    command: str  # program (and engine), as the README's table names it
    klass: str
    example: str  # what is wrong, in a few words
    message: str  # a piece of the expected error line
    build: Callable[[Fixtures, Path], list[str]] = field(repr=False)  # (fixtures, case folder) -> argv
    subprocess: bool = False  # run through the installed console script (a fresh process)
    xfail: str | None = None  # the fix it waits for, in a file this catalogue's author may not edit

    @property
    def program(self) -> str:
        return self.command.split()[0]


CASES: list[Case] = []

def case(command: str, klass: str, example: str, message: str, subprocess: bool = False, xfail: str | None = None):
    def add(build):
        CASES.append(Case(build.__name__, command, klass, example, message, build, subprocess, xfail))
        return build
    return add


# ---- building broken inputs ---------------------------------------------------------------------------------


def copy(src: Path, dst: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def edit_json(path: Path, edit: Callable[[dict], object]) -> Path:
    """Change a JSON file in place: `edit` mutates the parsed object (its return value is ignored)."""
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))
    return path


def cut(path: Path, keep: int) -> Path:
    """Truncate a file to its first `keep` bytes (negative: drop that many from the end)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


def safetensors_header(path: Path, length: int | None = None, header: bytes | None = None) -> Path:
    """Rewrite a safetensors file's 8-byte header length and/or its JSON header (the tensor bytes kept)."""
    data = path.read_bytes()
    old = int.from_bytes(data[:8], "little")
    body = data[8 + old:]
    header = data[8:8 + old] if header is None else header
    path.write_bytes((len(header) if length is None else length).to_bytes(8, "little") + header + body)
    return path


def st_header(path: Path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8:8 + int.from_bytes(data[:8], "little")])


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and a valid IHDR (8-bit RGB) claiming width x height, then no pixel data."""
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def png_1x1() -> bytes:
    raw = zlib.compress(b"\x00\xff\x00\x00")  # one filter byte, one red pixel
    return png_header_only(1, 1) + png_chunk(b"IDAT", raw) + png_chunk(b"IEND", b"")


def gguf_u64_at(path: Path, offset: int, value: int) -> Path:
    data = bytearray(path.read_bytes())
    data[offset:offset + 8] = value.to_bytes(8, "little")
    path.write_bytes(bytes(data))
    return path


def file_under_file(d: Path, *parts: str) -> Path:
    """A path below a regular file: unwritable even for root (the tests run as root, so a read-only
    folder would not stop them)."""
    (d / "file.txt").write_text("a regular file\n")
    return d.joinpath("file.txt", *parts)


def run_args(model: Path, image: Path, *extra: str, engine: str | None = None) -> list[str]:
    return [str(model), "--image", str(image), "--prompt", "What colour is the square?", "--max-tokens", "4",
            *(["--engine", engine] if engine else []), *extra]


def gguf_pair(fx: Fixtures, d: Path) -> Path:
    """A private copy of the GGUF export (model + mmproj) to break."""
    copy(fx.mmproj, d / "m-mmproj.gguf")
    return copy(fx.gguf, d / "m.gguf")


# ---- mote-upcycle ---------------------------------------------------------------------------------------------


@case("mote-upcycle", "corrupt checkpoint", "config.json cut in half", "is not valid JSON")
def upcycle_config_cut(fx, d):
    ck = copy(fx.dense, d / "ck")
    cut(ck / "config.json", (ck / "config.json").stat().st_size // 2)
    return [str(ck), "-o", str(d / "out")]


@case("mote-upcycle", "corrupt checkpoint", "config.json is a JSON list", "holds a JSON list; expected an object")
def upcycle_config_list(fx, d):
    ck = copy(fx.dense, d / "ck")
    (ck / "config.json").write_text(json.dumps([json.loads((fx.dense / "config.json").read_text())]))
    return [str(ck), "-o", str(d / "out")]


@case("mote-upcycle", "corrupt checkpoint", "safetensors header length 2^62", "not a readable safetensors")
def upcycle_st_huge_header(fx, d):
    ck = copy(fx.dense, d / "ck")
    safetensors_header(ck / "model.safetensors", length=2 ** 62)
    return [str(ck), "-o", str(d / "out")]


@case("mote-upcycle", "corrupt checkpoint", "safetensors header is not JSON", "not a readable safetensors")
def upcycle_st_header_garbage(fx, d):
    ck = copy(fx.dense, d / "ck")
    safetensors_header(ck / "model.safetensors", header=b"{" + b"\xfe" * 200)
    return [str(ck), "-o", str(d / "out")]


@case("mote-upcycle", "corrupt checkpoint", "tensor offsets past the end of the file", "not a readable safetensors")
def upcycle_st_offsets_past_end(fx, d):
    ck = copy(fx.dense, d / "ck")
    h = st_header(ck / "model.safetensors")
    name = next(k for k in h if k != "__metadata__")
    h[name]["data_offsets"] = [h[name]["data_offsets"][0], 2 ** 40]
    safetensors_header(ck / "model.safetensors", header=json.dumps(h).encode())
    return [str(ck), "-o", str(d / "out")]


@case("mote-upcycle", "wrong architecture", "config.json says intermediate_size 256, the weights hold 512",
      "weights do not match config.json")
def upcycle_shapes_disagree(fx, d):
    ck = copy(fx.dense, d / "ck")
    edit_json(ck / "config.json", lambda c: c["text_config"].update(intermediate_size=256))
    return [str(ck), "-o", str(d / "out")]


@case("mote-upcycle", "wrong architecture", "a CLIP vision tower, not SigLIP",
      "unsupported vision tower 'clip_vision_model'")
def upcycle_clip_tower(fx, d):
    ck = copy(fx.dense, d / "ck")
    edit_json(ck / "config.json", lambda c: c["vision_config"].update(model_type="clip_vision_model"))
    return [str(ck), "-o", str(d / "out")]


@case("mote-upcycle", "missing file", "no model.safetensors", "has no model.safetensors")
def upcycle_no_weights(fx, d):
    ck = copy(fx.dense, d / "ck")
    (ck / "model.safetensors").unlink()
    return [str(ck), "-o", str(d / "out")]


@case("mote-upcycle", "missing file", "no config.json", "has no config.json")
def upcycle_no_config(fx, d):
    ck = copy(fx.dense, d / "ck")
    (ck / "config.json").unlink()
    return [str(ck), "-o", str(d / "out")]


@case("mote-upcycle", "bad option value", "--top-k 0", "--top-k must be between 1 and")
def upcycle_top_k_zero(fx, d):
    return [str(fx.dense), "-o", str(d / "out"), "--top-k", "0"]


@case("mote-upcycle", "bad option value", "--experts -3", "--experts must be at least 1")
def upcycle_negative_experts(fx, d):
    return [str(fx.dense), "-o", str(d / "out"), "--experts", "-3"]


@case("mote-upcycle", "output exists", "-o names an existing file", "is a file, not a folder", subprocess=True)
def upcycle_output_is_a_file(fx, d):
    (d / "out").write_text("someone's notes\n")
    return [str(fx.dense), "-o", str(d / "out")]


@case("mote-upcycle", "unwritable output", "-o below a regular file", "output folder's parent")
def upcycle_output_under_file(fx, d):
    return [str(fx.dense), "-o", str(file_under_file(d, "out"))]


# ---- mote-train -----------------------------------------------------------------------------------------------


def train_args(fx, d, *extra, ckpt=None, data=None, images=None, out=None) -> list[str]:
    return [str(ckpt or fx.mote), "--data", str(data or fx.data / "test.json"),
            "--images", str(images or fx.data / "images"), "-o", str(out or d / "out"), "--steps", "1",
            "--batch-size", "2", *extra]


@case("mote-train", "corrupt checkpoint", "model.safetensors cut to its header", "not a readable safetensors")
def train_ckpt_cut(fx, d):
    ck = copy(fx.mote, d / "ck")
    st = ck / "model.safetensors"
    cut(st, 8 + int.from_bytes(st.read_bytes()[:8], "little"))
    return train_args(fx, d, ckpt=ck)


@case("mote-train", "corrupt data", "--data is not JSON", "is not valid JSON")
def train_data_not_json(fx, d):
    (d / "train.json").write_text('[{"image": "a.png", "conversations": [')
    return train_args(fx, d, data=d / "train.json")


@case("mote-train", "corrupt data", "--data holds an object, not a list of records", "expected a list of records")
def train_data_wrong_shape(fx, d):
    (d / "train.json").write_text(json.dumps({"records": []}))
    return train_args(fx, d, data=d / "train.json")


@case("mote-train", "corrupt data", "a turn from an unknown role", "unknown or missing field")
def train_data_unknown_role(fx, d):
    recs = json.loads((fx.data / "test.json").read_text())[:2]
    for r in recs:
        r["conversations"][0]["from"] = "narrator"
    (d / "train.json").write_text(json.dumps(recs))
    return train_args(fx, d, data=d / "train.json")


@case("mote-train", "missing file", "--images folder does not exist", "image folder")
def train_no_images(fx, d):
    return train_args(fx, d, images=d / "no-images")


@case("mote-train", "missing file", "a record's image is not in --images", "does not exist")
def train_record_image_missing(fx, d):
    recs = json.loads((fx.data / "test.json").read_text())[:2]
    for r in recs:
        r["image"] = "gone.png"
    (d / "train.json").write_text(json.dumps(recs))
    return train_args(fx, d, data=d / "train.json")


@case("mote-train", "not an image", "a record's .png is a text file", "cannot read image")
def train_image_is_text(fx, d):
    recs = json.loads((fx.data / "test.json").read_text())[:2]
    (d / "images").mkdir()
    for r in recs:
        (d / "images" / r["image"]).write_text("not a picture\n")
    (d / "train.json").write_text(json.dumps(recs))
    return train_args(fx, d, data=d / "train.json", images=d / "images")


@case("mote-train", "zero size", "--batch-size 0", "--batch-size must be at least 1")
def train_batch_zero(fx, d):
    return train_args(fx, d)[:-2] + ["--batch-size", "0"]


@case("mote-train", "zero size", "--grad-accum 0", "--grad-accum must be at least 1")
def train_grad_accum_zero(fx, d):
    return train_args(fx, d, "--grad-accum", "0")


@case("mote-train", "bad option value", "--lr -0.1", "--lr must be > 0")
def train_negative_lr(fx, d):
    return train_args(fx, d, "--lr", "-0.1")


@case("mote-train", "bad option value", "--save-every -1", "--save-every must be at least 0")
def train_negative_save_every(fx, d):
    return train_args(fx, d, "--save-every", "-1")


@case("mote-train", "output exists", "-o names an existing file", "is a file, not a folder")
def train_output_is_a_file(fx, d):
    (d / "out").write_text("someone's notes\n")
    return train_args(fx, d)


@case("mote-train", "unwritable output", "-o below a regular file", "output folder's parent")
def train_output_under_file(fx, d):
    return train_args(fx, d, out=file_under_file(d, "out"))


# ---- mote-export (GGUF) ---------------------------------------------------------------------------------------


@case("mote-export gguf", "corrupt checkpoint", "config.json is not JSON", "is not valid JSON")
def export_config_garbage(fx, d):
    ck = copy(fx.mote, d / "ck")
    (ck / "config.json").write_bytes(b"\x00\x01 not json")
    return [str(ck), "-o", str(d / "m.gguf"), "--quiet"]


@case("mote-export gguf", "corrupt checkpoint", "safetensors header length 2^62",
      "header length 4611686018427387904 does not fit")
def export_st_huge_header(fx, d):
    ck = copy(fx.mote, d / "ck")
    safetensors_header(ck / "model.safetensors", length=2 ** 62)
    return [str(ck), "-o", str(d / "m.gguf"), "--quiet"]


@case("mote-export gguf", "corrupt checkpoint", "two tensors' bytes overlap", "not a readable safetensors")
def export_st_overlap(fx, d):
    ck = copy(fx.mote, d / "ck")
    h = st_header(ck / "model.safetensors")
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    a, b = h[names[0]], h[names[1]]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + b["data_offsets"][1] - b["data_offsets"][0]]
    safetensors_header(ck / "model.safetensors", header=json.dumps(h).encode())
    return [str(ck), "-o", str(d / "m.gguf"), "--quiet"]


@case("mote-export gguf", "corrupt checkpoint", "a norm's BF16 bytes labelled I16 (integers)", "I16")
def export_st_wrong_dtype(fx, d):
    ck = copy(fx.mote, d / "ck")
    h = st_header(ck / "model.safetensors")
    name = "model.language_model.layers.0.input_layernorm.weight"
    assert h[name]["dtype"] == "BF16", h[name]  # the embedded checkpoints are bf16: same bytes, read as int16
    h[name]["dtype"] = "I16"
    safetensors_header(ck / "model.safetensors", header=json.dumps(h).encode())
    return [str(ck), "-o", str(d / "m.gguf"), "--quiet"]


@case("mote-export gguf", "corrupt checkpoint", "tokenizer.json cut in half", "not a readable tokenizer.json")
def export_tokenizer_cut(fx, d):
    ck = copy(fx.mote, d / "ck")
    cut(ck / "tokenizer.json", (ck / "tokenizer.json").stat().st_size // 2)
    return [str(ck), "-o", str(d / "m.gguf"), "--quiet"]


@case("mote-export gguf", "wrong architecture", "top_k above the number of experts",
      "top_k 9 must be between 1 and num_experts 4")
def export_top_k_above_experts(fx, d):
    ck = copy(fx.mote, d / "ck")
    edit_json(ck / "config.json", lambda c: c["mote"].update(top_k=9))
    return [str(ck), "-o", str(d / "m.gguf"), "--quiet"]


@case("mote-export gguf", "missing file", "the checkpoint has no model.safetensors", "has no model.safetensors")
def export_no_weights(fx, d):
    ck = copy(fx.mote, d / "ck")
    (ck / "model.safetensors").unlink()
    return [str(ck), "-o", str(d / "m.gguf"), "--quiet"]


@case("mote-export gguf", "bad option value", "--ternary-type tq3_0", "--ternary-type 'tq3_0'; accepted: tq2_0")
def export_bad_ternary_type(fx, d):
    return [str(fx.mote), "-o", str(d / "m.gguf"), "--quiet", "--ternary-type", "tq3_0"]


@case("mote-export gguf", "bad option value", "--shared-type f8", "--shared-type 'f8' is not a known type")
def export_bad_shared_type(fx, d):
    return [str(fx.mote), "-o", str(d / "m.gguf"), "--quiet", "--shared-type", "f8"]


@case("mote-export gguf", "bad option value", "--format safetensors", "accepted: gguf, onnx")
def export_bad_format(fx, d):
    return [str(fx.mote), "-o", str(d / "m.gguf"), "--format", "safetensors"]


@case("mote-export gguf", "bad option value", "--mmproj-type q9", "q9")
def export_bad_mmproj_type(fx, d):
    return [str(fx.mote), "-o", str(d / "m.gguf"), "--quiet", "--mmproj-type", "q9"]


@case("mote-export gguf", "bad option value", "-o without its value", "expected one argument")
def export_output_without_value(fx, d):
    return [str(fx.mote), "--quiet", "-o"]


@case("mote-export gguf", "impossible budget", "--memory-budget 0", "must be a positive size")
def export_budget_zero(fx, d):
    return [str(fx.mote), "-o", str(d / "m.gguf"), "--quiet", "--memory-budget", "0"]


@case("mote-export gguf", "impossible budget", "--memory-budget=-2GB", "is not a size")
def export_budget_negative(fx, d):
    return [str(fx.mote), "-o", str(d / "m.gguf"), "--quiet", "--memory-budget=-2GB"]


@case("mote-export gguf", "output exists", "bad checkpoint, existing model.gguf + mmproj left as they were",
      "not a readable safetensors")
def export_existing_output_kept(fx, d):
    copy(fx.gguf, d / "m.gguf")
    copy(fx.mmproj, d / "m-mmproj.gguf")
    ck = copy(fx.mote, d / "ck")
    cut(ck / "model.safetensors", (ck / "model.safetensors").stat().st_size - 100)
    return [str(ck), "-o", str(d / "m.gguf"), "--quiet"]


@case("mote-export gguf", "unwritable output", "-o below a regular file",
      "file.txt/sub' does not exist", subprocess=True)
def export_output_under_file(fx, d):
    return [str(fx.mote), "-o", str(file_under_file(d, "sub", "m.gguf")), "--quiet"]


# ---- mote-export (ONNX) ---------------------------------------------------------------------------------------


@case("mote-export onnx", "corrupt checkpoint", "model.safetensors cut short", "file is truncated")
def onnx_export_st_cut(fx, d):
    ck = copy(fx.mote, d / "ck")
    cut(ck / "model.safetensors", (ck / "model.safetensors").stat().st_size // 3)
    return [str(ck), "--format", "onnx", "-o", str(d / "onnx"), "--quiet"]


@case("mote-export onnx", "corrupt checkpoint", "config.json cut in half", "config.json is not valid JSON")
def onnx_export_config_cut(fx, d):
    ck = copy(fx.mote, d / "ck")
    cut(ck / "config.json", 40)
    return [str(ck), "--format", "onnx", "-o", str(d / "onnx"), "--quiet"]


@case("mote-export onnx", "wrong architecture", "a MoE-LLaVA config whose experts are missing from the weights",
      "lacks model.language_model.layers.0.mlp.experts.4")
def onnx_export_experts_missing(fx, d):
    ck = copy(fx.moe_llava, d / "ck")
    edit_json(ck / "config.json", lambda c: c["mote"].update(num_experts=6))
    return [str(ck), "--format", "onnx", "-o", str(d / "onnx"), "--quiet"]


@case("mote-export onnx", "missing file", "the checkpoint folder does not exist", "does not exist")
def onnx_export_missing_ckpt(fx, d):
    return [str(d / "nope"), "--format", "onnx", "-o", str(d / "onnx"), "--quiet"]


@case("mote-export onnx", "output exists", "-o names an existing file",
      "already exists; --format onnx writes a new folder")
def onnx_export_output_is_file(fx, d):
    (d / "onnx").write_text("keep me\n")
    return [str(fx.mote), "--format", "onnx", "-o", str(d / "onnx"), "--quiet"]


@case("mote-export onnx", "unwritable output", "-o below a regular file", "file.txt' does not exist")
def onnx_export_output_under_file(fx, d):
    return [str(fx.mote), "--format", "onnx", "-o", str(file_under_file(d, "onnx")), "--quiet"]


# ---- mote-run --engine llama.cpp (the default) -----------------------------------------------------------------


@case("mote-run llama.cpp", "not an image", "a text file named .png", "cannot read image", subprocess=True)
def run_llama_text_png(fx, d):
    (d / "cat.png").write_text("this is not a picture\n")
    return run_args(fx.gguf, d / "cat.png")


@case("mote-run llama.cpp", "not an image", "a zero-byte .png", "cannot read image")
def run_llama_empty_png(fx, d):
    (d / "cat.png").write_bytes(b"")
    return run_args(fx.gguf, d / "cat.png")


@case("mote-run llama.cpp", "not an image", "a PNG cut in half", "cannot read image")
def run_llama_truncated_png(fx, d):
    cut(copy(fx.image, d / "cat.png"), fx.image.stat().st_size // 2)
    return run_args(fx.gguf, d / "cat.png")


@case("mote-run llama.cpp", "not an image", "a PNG header claiming 100000 x 100000 pixels", "cannot read image")
def run_llama_huge_png(fx, d):
    (d / "cat.png").write_bytes(png_header_only(100_000, 100_000))
    return run_args(fx.gguf, d / "cat.png")


@case("mote-run llama.cpp", "not an image", "the image path is a folder", "is a folder, not an image file")
def run_llama_image_folder(fx, d):
    (d / "pics").mkdir()
    return run_args(fx.gguf, d / "pics")


@case("mote-run llama.cpp", "corrupt model", "random bytes named .gguf", "is not a GGUF file")
def run_llama_garbage_gguf(fx, d):
    (d / "m.gguf").write_bytes(bytes(range(256)) * 64)
    copy(fx.mmproj, d / "m-mmproj.gguf")
    return run_args(d / "m.gguf", fx.image)


@case("mote-run llama.cpp", "corrupt model", "GGUF cut at 4 KiB", "is truncated: not a complete GGUF header")
def run_llama_gguf_cut(fx, d):
    m = gguf_pair(fx, d)
    cut(m, 4096)
    return run_args(m, fx.image)


@case("mote-run llama.cpp", "wrong architecture", "the LLM file given as --mmproj", "not an mmproj file")
def run_llama_llm_as_mmproj(fx, d):
    return run_args(fx.gguf, fx.image, "--mmproj", str(fx.gguf))


@case("mote-run llama.cpp", "wrong architecture", "the mmproj (CLIP) given as the model",
      "CLIP cannot be used as main model")
def run_llama_mmproj_as_model(fx, d):
    return run_args(fx.mmproj, fx.image, "--mmproj", str(fx.mmproj))


@case("mote-run llama.cpp", "bad option value", "--threads 0", "--threads must be at least 1")
def run_llama_threads_zero(fx, d):
    return run_args(fx.gguf, fx.image, "--threads", "0")


@case("mote-run llama.cpp", "bad option value", "--threads -4", "--threads must be at least 1")
def run_llama_threads_negative(fx, d):
    return run_args(fx.gguf, fx.image, "--threads", "-4")


@case("mote-run llama.cpp", "bad option value", "--threads two", "invalid int value")
def run_threads_not_a_number(fx, d):
    return run_args(fx.gguf, fx.image, "--threads", "two")


@case("mote-run llama.cpp", "zero size", "--n-ctx 0", "--n-ctx must be at least 1")
def run_llama_n_ctx_zero(fx, d):
    return run_args(fx.gguf, fx.image, "--n-ctx", "0")


@case("mote-run llama.cpp", "zero size", "--max-tokens 0", "--max-tokens must be at least 1")
def run_llama_max_tokens_zero(fx, d):
    return run_args(fx.gguf, fx.image, "--max-tokens", "0")


@case("mote-run llama.cpp", "bad option value", "--top-p 2", "--top-p must be in (0, 1]")
def run_llama_top_p_two(fx, d):
    return run_args(fx.gguf, fx.image, "--top-p", "2")


@case("mote-run llama.cpp", "bad option value", "--temperature -1", "--temperature must be >= 0")
def run_llama_negative_temperature(fx, d):
    return run_args(fx.gguf, fx.image, "--temperature", "-1")


@case("mote-run llama.cpp", "bad option value", "--top-k -5", "--top-k must be >= 0")
def run_llama_negative_top_k(fx, d):
    return run_args(fx.gguf, fx.image, "--top-k", "-5")


@case("mote-run llama.cpp", "bad option value", "--engine tensorrt", "accepted: llama.cpp")
def run_unknown_engine(fx, d):
    return run_args(fx.gguf, fx.image, engine="tensorrt")


@case("mote-run llama.cpp", "bad option value", "--kernel lut (a mote-engine option)", "not an option of --engine")
def run_llama_foreign_option(fx, d):
    return run_args(fx.gguf, fx.image, "--kernel", "lut")


@case("mote-run llama.cpp", "impossible budget", "--memory-limit 1MiB", "exceeds --memory-limit")
def run_llama_memory_limit(fx, d):
    return run_args(fx.gguf, fx.image, "--memory-limit", "1MiB")


@case("mote-run llama.cpp", "impossible budget", "--memory-limit 0", "--memory-limit")
def run_llama_memory_limit_zero(fx, d):
    return run_args(fx.gguf, fx.image, "--memory-limit", "0")


# ---- mote-run --engine mote -----------------------------------------------------------------------------------


@case("mote-run mote", "corrupt model", "a zero-byte .gguf", "is not a GGUF file")
def run_mote_empty_gguf(fx, d):
    m = gguf_pair(fx, d)
    m.write_bytes(b"")
    return run_args(m, fx.image, engine="mote")


@case("mote-run mote", "corrupt model", "wrong magic (a GGML file)", "is not a GGUF file")
def run_mote_bad_magic(fx, d):
    m = gguf_pair(fx, d)
    data = bytearray(m.read_bytes())
    data[:4] = b"GGML"
    m.write_bytes(bytes(data))
    return run_args(m, fx.image, engine="mote")


@case("mote-run mote", "huge size", "tensor count 2^60 in the header", "is truncated: not a complete GGUF header")
def run_mote_huge_tensor_count(fx, d):
    m = gguf_pair(fx, d)
    gguf_u64_at(m, 8, 2 ** 60)  # magic, version (u32), then n_tensors (u64)
    return run_args(m, fx.image, engine="mote")


@case("mote-run mote", "huge size", "key-value count 2^60 in the header", "is truncated: not a complete GGUF header")
def run_mote_huge_kv_count(fx, d):
    m = gguf_pair(fx, d)
    gguf_u64_at(m, 16, 2 ** 60)
    return run_args(m, fx.image, engine="mote")


@case("mote-run mote", "corrupt model", "mmproj cut in half", "the file is truncated or the tensor offset is wrong")
def run_mote_mmproj_cut(fx, d):
    m = gguf_pair(fx, d)
    cut(d / "m-mmproj.gguf", (d / "m-mmproj.gguf").stat().st_size // 2)
    return run_args(m, fx.image, engine="mote")


@case("mote-run mote", "not an image", "a 1x1 PNG header with no pixel data", "cannot read image")
def run_mote_png_no_pixels(fx, d):
    (d / "cat.png").write_bytes(png_header_only(1, 1))
    return run_args(fx.gguf, d / "cat.png", engine="mote")


@case("mote-run mote", "huge size", "--n-ctx 10^12 (a KV cache of 3.6 PiB)", "not enough memory to load")
def run_mote_huge_n_ctx(fx, d):
    return run_args(fx.gguf, fx.image, "--kernel", "numpy", "--n-ctx", str(10 ** 12), engine="mote")


@case("mote-run mote", "bad option value", "--device cpu (a cuda-engine option)", "not an option of --engine mote")
def run_mote_foreign_device(fx, d):
    return run_args(fx.gguf, fx.image, "--device", "cpu", engine="mote")


@case("mote-run mote", "bad option value", "--kernel triton (a cuda-engine kernel)",
      "kernel 'triton'; accepted: auto, mad, lut, numpy")
def run_mote_triton_kernel(fx, d):
    return run_args(fx.gguf, fx.image, "--kernel", "triton", engine="mote")


@case("mote-run mote", "impossible budget", "--memory-limit 1MiB", "exceeds --memory-limit")
def run_mote_memory_limit(fx, d):
    return run_args(fx.gguf, fx.image, "--memory-limit", "1MiB", engine="mote")


@case("mote-run mote", "unwritable output", "--routes below a regular file", "which is not a folder")
def run_mote_routes_under_file(fx, d):
    return run_args(fx.gguf, fx.image, "--routes", str(file_under_file(d, "r.json")), engine="mote")


@case("mote-run mote", "unwritable output", "--routes names a folder", "is a folder; give a file name like routes.json")
def run_mote_routes_is_folder(fx, d):
    (d / "routes").mkdir()
    return run_args(fx.gguf, fx.image, "--routes", str(d / "routes"), engine="mote")


# ---- mote-run --engine onnxruntime ----------------------------------------------------------------------------


@case("mote-run onnxruntime", "corrupt model", "the folder's config.json is not JSON", "not readable JSON")
def run_onnx_config_garbage(fx, d):
    f = copy(fx.onnx, d / "onnx")
    (f / "config.json").write_text("{ nope")
    return run_args(f, fx.image, engine="onnxruntime")


@case("mote-run onnxruntime", "missing file", "no tokenizer.json in the folder", "lacks tokenizer.json")
def run_onnx_no_tokenizer(fx, d):
    f = copy(fx.onnx, d / "onnx")
    (f / "tokenizer.json").unlink()
    return run_args(f, fx.image, engine="onnxruntime")


@case("mote-run onnxruntime", "missing file", "no processor_config.json in the folder", "image processor settings")
def run_onnx_no_processor(fx, d):
    f = copy(fx.onnx, d / "onnx")
    (f / "processor_config.json").unlink()
    return run_args(f, fx.image, engine="onnxruntime")


@case("mote-run onnxruntime", "corrupt model", "tokenizer.json cut in half", "is not a readable tokenizer")
def run_onnx_tokenizer_cut(fx, d):
    f = copy(fx.onnx, d / "onnx")
    cut(f / "tokenizer.json", (f / "tokenizer.json").stat().st_size // 2)
    return run_args(f, fx.image, engine="onnxruntime")


@case("mote-run onnxruntime", "corrupt model", "chat_template.jinja is not UTF-8", "not readable UTF-8")
def run_onnx_template_binary(fx, d):
    f = copy(fx.onnx, d / "onnx")
    (f / "chat_template.jinja").write_bytes(b"\xff\xfe\x00{{ bad")
    return run_args(f, fx.image, engine="onnxruntime")


@case("mote-run onnxruntime", "not an image", "a zero-byte .png", "cannot read image")
def run_onnx_empty_png(fx, d):
    (d / "cat.png").write_bytes(b"")
    return run_args(fx.onnx, d / "cat.png", engine="onnxruntime")


@case("mote-run onnxruntime", "impossible budget", "--memory-limit 1MiB", "exceeds --memory-limit")
def run_onnx_memory_limit(fx, d):
    return run_args(fx.onnx, fx.image, "--memory-limit", "1MiB", engine="onnxruntime")


@case("mote-run onnxruntime", "wrong architecture", "a GGUF file given to --engine onnxruntime",
      "is a GGUF model: run it with --engine llama.cpp")
def run_onnx_given_gguf(fx, d):
    return run_args(fx.gguf, fx.image, engine="onnxruntime")


# ---- mote-run --engine cuda --device cpu ----------------------------------------------------------------------


def cuda_args(model: Path, image: Path, *extra: str) -> list[str]:
    return run_args(model, image, "--device", "cpu", "--kernel", "torch", *extra, engine="cuda")


@case("mote-run cuda", "corrupt model", "GGUF magic, then random bytes", "is truncated: not a complete GGUF header")
def run_cuda_garbage_gguf(fx, d):
    (d / "m.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 16)
    copy(fx.mmproj, d / "m-mmproj.gguf")
    return cuda_args(d / "m.gguf", fx.image)


@case("mote-run cuda", "not an image", "a PNG cut in half", "cannot read image")
def run_cuda_truncated_png(fx, d):
    cut(copy(fx.image, d / "cat.png"), fx.image.stat().st_size // 2)
    return cuda_args(fx.gguf, d / "cat.png")


@case("mote-run cuda", "impossible budget", "--n-ctx 8: the image alone needs more", "does not fit n_ctx 8")
def run_cuda_n_ctx_small(fx, d):
    return cuda_args(fx.gguf, fx.image, "--n-ctx", "8")


@case("mote-run cuda", "impossible budget", "--memory-limit 1MiB", "exceeds --memory-limit")
def run_cuda_memory_limit(fx, d):
    return cuda_args(fx.gguf, fx.image, "--memory-limit", "1MiB")


@case("mote-run cuda", "bad option value", "--routes (a mote-engine option)",
      "--routes: not an option of --engine cuda")
def run_cuda_foreign_routes(fx, d):
    return cuda_args(fx.gguf, fx.image, "--routes", str(d / "r.json"))


# ---- mote-plan ------------------------------------------------------------------------------------------------


@case("mote-plan", "missing file", "the config path does not exist", "does not exist", subprocess=True)
def plan_missing(fx, d):
    return [str(d / "nope" / "config.json")]


@case("mote-plan", "corrupt checkpoint", "config.json is not JSON", "config.json is not valid JSON")
def plan_config_garbage(fx, d):
    (d / "config.json").write_text("{'python': 'dict'}")
    return [str(d / "config.json")]


@case("mote-plan", "wrong architecture", "a Llama config", "unsupported architecture")
def plan_llama(fx, d):
    copy(fx.mote / "config.json", d / "config.json")
    edit_json(d / "config.json", lambda c: c.update(model_type="llama"))
    return [str(d / "config.json")]


@case("mote-plan", "wrong architecture", "a config with no text_config", "unsupported language model None")
def plan_no_text_config(fx, d):
    copy(fx.mote / "config.json", d / "config.json")
    edit_json(d / "config.json", lambda c: c.pop("text_config"))
    return [str(d / "config.json")]


@case("mote-plan", "bad option value", "--preset qwen2.5-70b", "--preset 'qwen2.5-70b'; accepted: tiny")
def plan_unknown_preset(fx, d):
    return ["--preset", "qwen2.5-70b"]


@case("mote-plan", "zero size", "--experts 0", "--experts must be at least 1")
def plan_zero_experts(fx, d):
    return ["--preset", "qwen2.5-0.5b", "--experts", "0"]


@case("mote-plan", "bad option value", "--n-ctx -1", "--n-ctx must be >= 0")
def plan_negative_n_ctx(fx, d):
    return ["--preset", "qwen2.5-0.5b", "--n-ctx", "-1"]


@case("mote-plan", "impossible budget", "--memory-budget 1MiB for Qwen2.5-3B", "cannot be met")
def plan_budget_too_small(fx, d):
    return ["--preset", "qwen2.5-3b", "--memory-budget", "1MiB"]


@case("mote-plan", "bad option value", "--top-k 9 with 4 experts",
      "--top-k must be between 1 and the number of experts 4")
def plan_top_k_above_experts(fx, d):
    return ["--preset", "qwen2.5-0.5b", "--experts", "4", "--top-k", "9"]


@case("mote-plan", "bad option value", "--shared-type q9_9", "--shared-type 'q9_9' is not a known type")
def plan_bad_type(fx, d):
    return ["--preset", "qwen2.5-0.5b", "--shared-type", "q9_9"]


# ---- mote-bench -----------------------------------------------------------------------------------------------


@case("mote-bench", "corrupt model", "zero bytes named .gguf", "is not a GGUF file")
def bench_garbage_gguf(fx, d):
    (d / "m.gguf").write_bytes(b"\x00" * 4096)
    (d / "m-mmproj.gguf").write_bytes(b"\x00" * 4096)
    return [str(d / "m.gguf"), "--out", str(d / "report"), "--cache", str(d / "cache")]


@case("mote-bench", "unwritable output", "--out below a regular file", "output folder's parent")
def bench_out_under_file(fx, d):
    return [str(fx.gguf), "--out", str(file_under_file(d, "report")), "--cache", str(d / "cache")]


@case("mote-bench", "bad option value", "--threads 0", "--threads must be at least 1")
def bench_threads_zero(fx, d):
    return [str(fx.gguf), "--threads", "0", "--out", str(d / "report"), "--cache", str(d / "cache")]


@case("mote-bench", "zero size", "--n-gen 0", "--n-gen must be at least 1")
def bench_n_gen_zero(fx, d):
    return [str(fx.gguf), "--n-gen", "0", "--out", str(d / "report"), "--cache", str(d / "cache")]


@case("mote-bench", "missing file", "--image does not exist", "does not exist")
def bench_missing_image(fx, d):
    return [str(fx.gguf), "--image", str(d / "none.png"), "--out", str(d / "report"), "--cache", str(d / "cache")]


@case("mote-bench --accuracy", "missing file", "--mote folder does not exist", "does not exist")
def bench_accuracy_missing_ckpt(fx, d):
    return ["--accuracy", "--mote", str(d / "nope"), "--limit", "2", "--out", str(d / "acc"),
            "--cache", str(d / "cache")]


@case("mote-bench --accuracy", "zero size", "--limit 0", "--limit must be at least 1")
def bench_accuracy_limit_zero(fx, d):
    return ["--accuracy", "--limit", "0", "--out", str(d / "acc"), "--cache", str(d / "cache")]


@case("mote-bench --accuracy", "corrupt data", "--data is not JSON", "cannot read LLaVA records")
def bench_accuracy_data_garbage(fx, d):
    (d / "q.json").write_text("[{")
    return ["--accuracy", "--data", str(d / "q.json"), "--images", str(fx.data / "images"), "--limit", "2",
            "--out", str(d / "acc"), "--cache", str(d / "cache")]


# ---- mote-routes ----------------------------------------------------------------------------------------------


@case("mote-routes", "corrupt data", "the routes file is not JSON", "not a routes JSON file", subprocess=True)
def routes_not_json(fx, d):
    (d / "r.json").write_text('{"format": "mote-rou')
    return [str(d / "r.json"), "-o", str(d / "r.png")]


@case("mote-routes", "corrupt data", "JSON of another kind", "not a mote-routes/1 file")
def routes_other_json(fx, d):
    (d / "r.json").write_text(json.dumps({"layers": [1, 2]}))
    return [str(d / "r.json"), "-o", str(d / "r.png")]


@case("mote-routes", "corrupt data", "an expert id above the number of experts",
      "chose expert 11; expected ids below 4")
def routes_expert_out_of_range(fx, d):
    def edit(r):
        layer = next(iter(r["layers"]))
        r["layers"][layer][0][0] = r["experts"] + 7
    edit_json(copy(fx.routes, d / "r.json"), edit)
    return [str(d / "r.json"), "-o", str(d / "r.png")]


@case("mote-routes", "corrupt data", "no 'kinds' list", "'kinds' must be a list")
def routes_no_kinds(fx, d):
    edit_json(copy(fx.routes, d / "r.json"), lambda r: r.pop("kinds"))
    return [str(d / "r.json"), "-o", str(d / "r.png")]


@case("mote-routes", "corrupt data", "'experts' is a word", "'experts' and 'top_k' must be whole numbers")
def routes_experts_word(fx, d):
    edit_json(copy(fx.routes, d / "r.json"), lambda r: r.update(experts="four"))
    return [str(d / "r.json"), "-o", str(d / "r.png")]


@case("mote-routes", "zero size", "no layer recorded any token", "no MoE layer recorded")
def routes_no_layers(fx, d):
    edit_json(copy(fx.routes, d / "r.json"), lambda r: r.update(layers={}))
    return [str(d / "r.json"), "-o", str(d / "r.png")]


@case("mote-routes", "missing file", "the routes file does not exist", "does not exist")
def routes_missing(fx, d):
    return [str(d / "none.json")]


@case("mote-routes", "unwritable output", "-o below a regular file", "is a file, not a folder")
def routes_output_under_file(fx, d):
    return [str(fx.routes), "-o", str(file_under_file(d, "r.png"))]


# ---- the README's table -----------------------------------------------------------------------------------------


def markdown_table() -> str:
    """Classes with their counts, the commands they cover and a few examples; then the count per command."""
    by_class: dict[str, list[Case]] = {}
    for c in CASES:
        by_class.setdefault(c.klass, []).append(c)
    rows = ["| class | cases | commands | examples |", "|---|---:|---|---|"]
    for klass, cases in sorted(by_class.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        commands = ", ".join(dict.fromkeys(c.command for c in cases))
        examples = "; ".join(dict.fromkeys(c.example for c in cases[:: max(1, len(cases) // 3)][:3]))
        rows.append(f"| {klass} | {len(cases)} | {commands} | {examples} |")
    waiting = sum(bool(c.xfail) for c in CASES)
    rows.append(f"| **all** | **{len(CASES)}** | | " + (f"{waiting} marked xfail, waiting for a fix named in the case"
                                                       if waiting else "every case passes") + " |")
    per_command = ["| command | cases |", "|---|---:|"]
    counts: dict[str, int] = {}
    for c in CASES:
        counts[c.command] = counts.get(c.command, 0) + 1
    per_command += [f"| {cmd} | {n} |" for cmd, n in counts.items()]
    return "\n".join(rows) + "\n\n" + "\n".join(per_command)


if __name__ == "__main__":  # python -m tests.bad_inputs
    print(markdown_table())

"""Fuzzing the readers of files from strangers: structure-aware mutations of real files the project writes.

    python -m mote_edge.benchmarks.fuzz --cases 100000 --reader gguf|safetensors|onnx|image|model|all -o OUT
           [--jobs N] [--seed S] [--minutes M] [--memory-limit-mb M] [--timeout S] [--kill-trials 20]
    python -m mote_edge.benchmarks.fuzz --reader onnx --sweep int-attrs -o OUT [--jobs N]

The corpus is made once per run: the embedded tiny MoTE checkpoint exported with mote-export (model.gguf +
model-mmproj.gguf, and the ONNX folder), its model.safetensors, and the tiny task's PNG pictures (plus the
same picture in the other formats PIL writes). hypothesis draws a mutation plan per case from each file's
parsed layout (GGUF: header counts, key/string/array lengths, value and tensor type ids, dims, tensor
offsets, ternary scales, key bytes; safetensors: the header length, every JSON entry's dtype / shape /
offsets, the metadata, raw JSON text; ONNX: config/tokenizer/processor JSON trees, the protobufs'
external-data locations / offsets / lengths, dims, data types, nodes, opsets; PNG: IHDR fields, chunk
lengths, CRCs, chunk order) plus flipped bytes and truncation at every section boundary.

Each case runs in a worker subprocess (a crash is a finding, not a dead driver) under RLIMIT_AS, with an
alarm in the worker and a kill in the driver bounding its time. The property: a case loads (the model and
ONNX readers also answer a question) or raises MoteExportError with a one-line message. Anything else is
a finding: another exception type, a multi-line message, MemoryError, a crash (signal), a hang. OUT gets
fuzz.json, fuzz.md and findings/<reader>-<n>/ (the input files and the worker's report) for each
finding signature (first 3 examples).

--sweep int-attrs runs, instead of drawn cases, every int attribute of the three ONNX graphs set to every
value of INTS, one case each: a random run reaches a given attribute only by chance, and an attribute value
ONNX's shape inference does not check can abort onnxruntime's loader (onnx/onnx#8255, a Split).

--kill-trials N also runs mote-export (GGUF, then ONNX) N times each, killed with SIGKILL at seeded random
points (kill_trials), and checks that no destination path holds anything but nothing, the previous export
or the complete new one, and that the re-run succeeds with no stale temporary left.

tests/test_fuzz.py runs the same plans and workers for a minute with derandomize=True; tests/test_interrupted.py
a few kill trials.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import math
import os
import pickle
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from ..exporters.errors import ArgumentParser

READERS = ("gguf", "safetensors", "onnx", "image", "model")
QUESTION = "What colour is the square?"
IMAGE_SIZE = 48  # the tiny tower's image_size: what load_rgb is asked for
DEFAULT_TIMEOUT = {"gguf": 20, "safetensors": 30, "image": 20, "model": 60, "onnx": 60}  # per case, seconds
DEFAULT_MEMORY_MB = 3072  # RLIMIT_AS of a worker: the tiny model loads in ~300 MiB of address space
KERNELS = ("mad", "lut", "numpy")  # the mote engine's families, drawn per model case


def _assets() -> Path:
    return Path(__file__).resolve().parent.parent / "mote_edge" / "assets" / "tiny"


# ============================================================================================================
# The corpus: real files the project writes
# ============================================================================================================


@dataclasses.dataclass
class Corpus:
    root: Path
    llm: Path
    mmproj: Path
    onnx: Path
    safetensors: Path
    images: list  # [(name, path)]
    question_image: Path  # the picture the model and ONNX cases answer about

    def files(self) -> dict:
        return {"llm": self.llm, "mmproj": self.mmproj, "onnx": self.onnx, "safetensors": self.safetensors}

    def to_json(self) -> dict:
        d = {k: str(v) for k, v in dataclasses.asdict(self).items() if k != "images"}
        return dict(d, images=[[n, str(p)] for n, p in self.images])

    @classmethod
    def from_json(cls, d: dict) -> "Corpus":
        return cls(**{k: Path(v) for k, v in d.items() if k != "images"}, images=[(n, Path(p)) for n, p in d["images"]])


def make_corpus(root: str | Path, ckpt: str | Path | None = None) -> Corpus:
    """Export the tiny MoTE checkpoint (GGUF pair + ONNX folder) into root, with the pictures."""
    from PIL import Image

    from ..exporters.gguf_file import mmproj_path
    from ..exporters.gguf_llm import write_llm_gguf
    from ..exporters.gguf_mmproj import write_mmproj
    from ..exporters.onnx_folder import write_onnx_folder

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ckpt = Path(ckpt) if ckpt else _assets() / "mote"
    llm = root / "model.gguf"
    if not llm.is_file() or not mmproj_path(llm).is_file():
        write_llm_gguf(ckpt, llm, progress=False)
        write_mmproj(ckpt, mmproj_path(llm))
    onnx = root / "onnx"
    if not onnx.is_dir():
        write_onnx_folder(ckpt, onnx, progress=False)
    pngs = sorted((_assets() / "data" / "images").glob("*.png"))[:3]
    images = [(p.name, p) for p in pngs]
    im = Image.open(pngs[0]).convert("RGB")
    for fmt, ext, kw in (("JPEG", "jpg", {"quality": 90}), ("GIF", "gif", {}), ("BMP", "bmp", {}),
                         ("TIFF", "tiff", {}), ("WEBP", "webp", {}), ("PPM", "ppm", {}), ("ICO", "ico", {})):
        out = root / f"picture.{ext}"
        if not out.is_file():
            im.save(out, fmt, **kw)
        images.append((out.name, out))
    return Corpus(root, llm, mmproj_path(llm), onnx, ckpt / "model.safetensors", images, pngs[0])


# ============================================================================================================
# GGUF: a layout of where every field sits (our own walk, independent of the reader under test)
# ============================================================================================================

_GG_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GG_STRING, _GG_ARRAY = 8, 9


@dataclasses.dataclass
class GGUFLayout:
    size: int
    u64: list  # positions of counts, lengths, dims, offsets (u64)
    u32: list  # positions of value type ids, array item types, n_dims, tensor type ids (u32)
    tensor_types: list
    offsets: list  # positions of tensor offsets
    tensor_spans: list  # (data position, nbytes) of each tensor's data
    names: list  # (pos, len) of key and tensor-name bytes
    scalars: list  # (pos, fmt) of scalar values
    floats: list  # positions of f32 array items (mote.ternary_scales, clip.vision.image_mean/std)
    kv_spans: list  # (start, end) of every key-value entry
    ti_spans: list  # (start, end) of every tensor info
    boundaries: list  # section starts: truncation points
    data_start: int


def gguf_layout(data: bytes) -> GGUFLayout:
    from ..exporters.ternary import QUANT_SIZES, ggml_type

    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    L = GGUFLayout(len(data), [8, 16], [], [], [], [], [], [], [], [], [], [0, 4, 8, 16, 24], 0)
    take("I"), take("I")
    n_tensors, n_kv = take("Q"), take("Q")
    align = 32

    def string_at():
        L.u64.append(pos)
        n = take("Q")
        return n

    for _ in range(n_kv):
        start = pos
        n = string_at()
        L.names.append((pos, n))
        key = data[pos:pos + n].decode()
        pos += n
        L.u32.append(pos)
        vt = take("I")
        if vt == _GG_STRING:
            n = string_at()
            pos += n
        elif vt == _GG_ARRAY:
            L.u32.append(pos)
            it = take("I")
            L.u64.append(pos)
            n = take("Q")
            if it == _GG_STRING:
                for i in range(n):
                    if i < 16:  # a few item lengths per array: the vocabulary has thousands
                        L.u64.append(pos)
                    m = take("Q")
                    pos += m
            else:
                size = struct.calcsize(_GG_SCALAR[it])
                if it == 6:
                    L.floats += [pos + i * 4 for i in range(n)]
                pos += n * size
        else:
            L.scalars.append((pos, _GG_SCALAR[vt]))
            v = take(_GG_SCALAR[vt])
            if key == "general.alignment":
                align = v
        L.kv_spans.append((start, pos))
        L.boundaries.append(pos)
    ti_meta = []
    for _ in range(n_tensors):
        start = pos
        n = string_at()
        L.names.append((pos, n))
        pos += n
        L.u32.append(pos)
        nd = take("I")
        dims = []
        for _ in range(nd):
            L.u64.append(pos)
            dims.append(take("Q"))
        L.u32.append(pos)
        L.tensor_types.append(pos)
        qt = ggml_type(take("I"))
        L.offsets.append(pos)
        L.u64.append(pos)
        off = take("Q")
        block, bsize = QUANT_SIZES[qt]
        ti_meta.append((off, math.prod(dims) // block * bsize))
        L.ti_spans.append((start, pos))
        L.boundaries.append(pos)
    L.data_start = -(-pos // align) * align
    L.tensor_spans = [(L.data_start + off, nb) for off, nb in ti_meta]
    for p, nb in L.tensor_spans:
        L.boundaries += [p, p + nb // 2, p + nb]
    L.boundaries = sorted(set(b for b in L.boundaries if 0 <= b <= len(data)))
    return L


U64_VALUES = (0, 1, 2, 3, 255, 256, 4096, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40, 2**48,
              2**62, 2**63 - 1, 2**63, 2**64 - 1)
U32_VALUES = (0, 1, 2, 5, 8, 9, 12, 13, 14, 15, 16, 17, 24, 30, 31, 34, 35, 36, 39, 40, 41, 42, 99, 255, 2**16,
              2**31 - 1, 2**31, 2**32 - 1)
REL = ("+1", "-1", "*2", "//2", "+2**32", "+4096", "+size")  # relative to the field's value
F32_VALUES = (float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0, 1e-45, 1e-38, 3.4e38, 65520.0, 1.0)
BAD_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\x00", b"\xe2\x82")


def _rel(v: int, how: str, size: int, bits: int) -> int:
    new = {"+1": v + 1, "-1": v - 1, "*2": v * 2, "//2": v // 2, "+2**32": v + 2**32, "+4096": v + 4096,
           "+size": v + size}[how]
    return new % (1 << bits)


def gguf_plans(L: GGUFLayout):
    """hypothesis strategy: (in-place ops, one structural op or None), never empty."""
    from hypothesis import strategies as st

    pos_any = st.integers(0, L.size - 1)
    pos_head = st.integers(0, L.data_start - 1)
    xor = st.integers(1, 255)
    u64v = st.one_of(st.sampled_from(U64_VALUES).map(lambda v: ("abs", v)), st.sampled_from(REL).map(lambda r: ("rel", r)))
    u32v = st.one_of(st.sampled_from(U32_VALUES).map(lambda v: ("abs", v)), st.sampled_from(REL).map(lambda r: ("rel", r)))
    n_ti = len(L.offsets)
    ops = [
        st.tuples(st.just("flip"), st.one_of(pos_head, pos_any), xor),
        st.tuples(st.just("u64"), st.sampled_from(L.u64), u64v),
        st.tuples(st.just("u32"), st.sampled_from(L.u32), u32v),
        st.tuples(st.just("ttype"), st.integers(0, n_ti - 1), st.sampled_from(U32_VALUES[:24])),
        st.tuples(st.just("offset"), st.integers(0, n_ti - 1), st.integers(0, n_ti - 1),
                  st.sampled_from((0, 1, 16, 32, -32, 4096))),
        st.tuples(st.just("name"), st.integers(0, len(L.names) - 1), st.floats(0, 1), st.sampled_from(BAD_UTF8)),
        st.tuples(st.just("tflip"), st.integers(0, n_ti - 1), st.floats(0, 1, exclude_max=True), xor),
    ]
    if L.scalars:
        ops.append(st.tuples(st.just("scalar"), st.integers(0, len(L.scalars) - 1),
                             st.sampled_from((0, 1, -1, 2, 3, 7, 255, 2**15, 2**31 - 1, 2**62))))
    if L.floats:
        ops.append(st.tuples(st.just("f32"), st.sampled_from(L.floats), st.sampled_from(F32_VALUES)))
    structural = st.one_of(
        st.tuples(st.just("truncate"), st.sampled_from(L.boundaries), st.sampled_from((0, 0, 0, -1, 1, -8, 8))),
        st.tuples(st.just("dup_kv"), st.integers(0, len(L.kv_spans) - 1)),
        st.tuples(st.just("drop_kv"), st.integers(0, len(L.kv_spans) - 1)),
        st.tuples(st.just("dup_ti"), st.integers(0, n_ti - 1)),
        st.tuples(st.just("drop_ti"), st.integers(0, n_ti - 1)),
        st.tuples(st.just("insert"), st.one_of(pos_head, pos_any), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), st.one_of(pos_head, pos_any), st.integers(1, 64)),
    )
    inplace = st.one_of(*ops)
    return st.one_of(st.tuples(st.lists(inplace, min_size=1, max_size=3), st.one_of(st.none(), structural)),
                     st.tuples(st.just([]), structural))


def apply_gguf(data: bytes, L: GGUFLayout, plan) -> bytes:
    inplace, structural = plan
    b = bytearray(data)

    def put(pos, fmt, v):
        struct.pack_into("<" + fmt, b, pos, v)

    def value(pos, fmt, spec):
        bits = struct.calcsize(fmt) * 8
        if spec[0] == "abs":
            return spec[1] % (1 << bits)
        return _rel(struct.unpack_from("<" + fmt, b, pos)[0], spec[1], L.size, bits)

    for op in inplace:
        kind = op[0]
        if kind == "flip":
            b[op[1]] ^= op[2]
        elif kind == "u64":
            put(op[1], "Q", value(op[1], "Q", op[2]))
        elif kind == "u32":
            put(op[1], "I", value(op[1], "I", op[2]))
        elif kind == "ttype":
            put(L.tensor_types[op[1]], "I", op[2])
        elif kind == "offset":  # another tensor's offset (+ delta): overlap, misalignment, past the end
            other = struct.unpack_from("<Q", b, L.offsets[op[2]])[0]
            put(L.offsets[op[1]], "Q", (other + op[3]) % 2**64)
        elif kind == "name":
            pos, n = L.names[op[1]]
            if n:
                at = pos + min(n - 1, int(op[2] * n))
                bad = op[3][:pos + n - at]
                b[at:at + len(bad)] = bad
        elif kind == "tflip":
            p, nb = L.tensor_spans[op[1]]
            if nb:
                b[p + int(op[2] * nb)] ^= op[3]
        elif kind == "scalar":
            pos, fmt = L.scalars[op[1]]
            v = op[2]
            if fmt in "fd":
                v = float(v)
            elif fmt == "?":
                v = bool(v)
            else:
                bits = struct.calcsize(fmt) * 8
                v = v % (1 << bits)
                if fmt.islower() and v >= 1 << (bits - 1):
                    v -= 1 << bits
            put(pos, fmt, v)
        elif kind == "f32":
            put(op[1], "f", op[2])
    if structural is None:
        return bytes(b)
    kind = structural[0]
    if kind == "truncate":
        return bytes(b[:max(0, structural[1] + structural[2])])
    if kind in ("dup_kv", "drop_kv", "dup_ti", "drop_ti"):
        spans, count_at = (L.kv_spans, 16) if kind.endswith("kv") else (L.ti_spans, 8)
        s, e = spans[structural[1]]
        n = struct.unpack_from("<Q", b, count_at)[0]
        if kind.startswith("dup"):
            b[e:e] = b[s:e]
            put(count_at, "Q", (n + 1) % 2**64)
        else:
            del b[s:e]
            put(count_at, "Q", (n - 1) % 2**64)
        return bytes(b)
    if kind == "insert":
        b[structural[1]:structural[1]] = structural[2]
    elif kind == "delete":
        del b[structural[1]:structural[1] + structural[2]]
    return bytes(b)


# ============================================================================================================
# safetensors: the header as JSON, the data block kept
# ============================================================================================================


@dataclasses.dataclass
class STLayout:
    n: int
    header: dict
    names: list
    data: bytes
    boundaries: list


def st_layout(raw: bytes) -> STLayout:
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    bounds = [0, 4, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n]
    for k in names:
        b0, e0 = header[k]["data_offsets"]
        bounds += [8 + n + b0, 8 + n + (b0 + e0) // 2, 8 + n + e0]
    return STLayout(n, header, names, raw[8 + n:], sorted(set(bounds)))


ST_DTYPES = ("F32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "I64", "I32", "F8_E4M3", "Q4_0", "", None, 3, ["F32"])
ST_SHAPES = ([], [0], [-1], [1], [2**31], [2**32, 2**32], [2**62, 4], ["a"], [1.5], None, "3", [True], {"a": 1},
             "@@LIT:[1e400]", "@@LIT:[100000000000000000000000000000]", "@@LIT:[NaN]", "@@LIT:[-0]",
             "rev", "first+1", "double", "drop_last")
ST_OFFSETS = ([0, 0], [0, 2**63], [-1, 0], [0], [0, 0, 0], "x", None, [1.5, 2.5], "@@LIT:[0, 1e400]",
              "@@LIT:[0, 100000000000000000000000000000]", "swap", "other", "shift-1", "shift+1", "shift+8",
              "past", "grow")
ST_ENTRIES = (None, 1, "x", [], {}, {"dtype": "F32"}, {"dtype": "F32", "shape": [1]})
ST_META = (None, 1, "x", [1], {"a": 1}, {"format": 5}, {"a": None}, {"format": "pt", "x": ["y"]})


def st_plans(L: STLayout):
    from hypothesis import strategies as st

    idx = st.integers(0, len(L.names) - 1)
    total = 8 + L.n + len(L.data)
    json_ops = st.one_of(
        st.tuples(st.just("dtype"), idx, st.sampled_from(ST_DTYPES)),
        st.tuples(st.just("shape"), idx, st.sampled_from(ST_SHAPES)),
        st.tuples(st.just("offsets"), idx, st.sampled_from(ST_OFFSETS), idx),
        st.tuples(st.just("entry"), idx, st.sampled_from(ST_ENTRIES)),
        st.tuples(st.just("drop"), idx),
        st.tuples(st.just("meta"), st.sampled_from(ST_META)),
        st.tuples(st.just("add"), st.sampled_from(("", "x" * 300, "a\u0000b", "\ud800"))),
    )
    raw_ops = st.one_of(
        st.tuples(st.just("hlen"), st.sampled_from((0, 1, 2, 7, 8, "n-1", "n+1", "size-8", "size", 2**63,
                                                    2**64 - 1, 100 * 2**20 + 1))),
        st.tuples(st.just("flip"), st.integers(0, 8 + L.n - 1), st.integers(1, 255)),
        st.tuples(st.just("flip"), st.integers(0, total - 1), st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.sampled_from(L.boundaries), st.sampled_from((0, 0, -1, 1))),
        st.tuples(st.just("nonutf8"), idx, st.sampled_from(BAD_UTF8)),
        st.tuples(st.just("nest"), st.sampled_from((2, 100, 1000, 100000))),
        st.tuples(st.just("garbage"), st.binary(max_size=64)),
    )
    return st.one_of(st.tuples(st.lists(json_ops, min_size=1, max_size=3), st.one_of(st.none(), raw_ops)),
                     st.tuples(st.just([]), raw_ops))


def apply_st(L: STLayout, plan) -> bytearray:
    json_ops, raw = plan
    h = json.loads(json.dumps(L.header))  # a deep copy, in file order
    lits = []

    def lit(v):
        if isinstance(v, str) and v.startswith("@@LIT:"):
            lits.append(v[6:])
            return f"@@LIT{len(lits) - 1}@@"
        return v

    for op in json_ops:
        kind, name = op[0], (L.names[op[1]] if len(op) > 1 and isinstance(op[1], int) else None)
        e = h.get(name) if name else None
        if kind in ("dtype", "shape", "offsets") and not isinstance(e, dict):
            continue
        if kind == "dtype":
            e["dtype"] = op[2]
        elif kind == "shape":
            s, v = e.get("shape"), op[2]
            if v in ("rev", "first+1", "double", "drop_last"):  # relative to the shape it has now
                s = s if isinstance(s, list) and all(type(d) is int for d in s) else [1]
                v = {"rev": s[::-1], "first+1": [s[0] + 1] + s[1:] if s else [1], "double": [d * 2 for d in s],
                     "drop_last": s[:-1]}[v]
            e["shape"] = lit(v)
        elif kind == "offsets":
            b0, e0 = e["data_offsets"] if isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2 else (0, 0)
            other = h.get(L.names[op[3]])
            v = op[2]
            if isinstance(b0, int) and isinstance(e0, int):
                v = {"swap": [e0, b0], "shift-1": [b0 - 1, e0 - 1], "shift+1": [b0 + 1, e0 + 1],
                     "shift+8": [b0 + 8, e0 + 8], "past": [b0 + len(L.data), e0 + len(L.data)],
                     "grow": [b0, e0 + 4],
                     "other": other.get("data_offsets") if isinstance(other, dict) else [0, 0]}.get(v, v) \
                    if isinstance(v, str) and not v.startswith("@@") else v
            e["data_offsets"] = lit(v)
        elif kind == "entry":
            h[name] = op[2]
        elif kind == "drop":
            h.pop(name, None)
        elif kind == "meta":
            h["__metadata__"] = op[1]
        elif kind == "add":
            h[op[1]] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
    text = json.dumps(h, separators=(",", ":"))
    for i, t in enumerate(lits):
        text = text.replace(f'"@@LIT{i}@@"', t)
    head = text.encode("utf-8", "surrogatepass")
    if raw and raw[0] == "nonutf8":
        key = json.dumps(L.names[raw[1]]).encode()
        head = head.replace(key, b'"' + raw[2] + key[1:], 1)
    if raw and raw[0] == "nest":
        head = b"[" * raw[1] + b"]" * raw[1]
    if raw and raw[0] == "garbage":
        head = raw[1]
    head += b" " * (-len(head) % 8)
    n = len(head)
    out = bytearray(8 + n + len(L.data))  # one copy of the data block (the file is 18 MB; this is the case's cost)
    out[:8], out[8:8 + n], out[8 + n:] = n.to_bytes(8, "little"), head, L.data
    if raw is None or raw[0] in ("nonutf8", "nest", "garbage"):
        return out
    kind = raw[0]
    if kind == "hlen":
        v = raw[1]
        v = {"n-1": n - 1, "n+1": n + 1, "size-8": len(out) - 8, "size": len(out)}.get(v, v)
        out[:8] = (v % 2**64).to_bytes(8, "little")
    elif kind == "flip":
        if raw[1] < len(out):
            out[raw[1]] ^= raw[2]
    elif kind == "truncate":
        cut = raw[1] + raw[2] + (n - L.n if raw[1] > 8 else 0)  # boundaries move with the new header length
        del out[max(0, cut):]
    return out


# ============================================================================================================
# ONNX export folder: JSON trees, protobuf fields, raw bytes, the weights file
# ============================================================================================================

JSON_FILES = ("config.json", "processor_config.json", "tokenizer_config.json", "generation_config.json",
              "tokenizer.json", "genai_config.json")
GRAPHS = ("vision.onnx", "embedding.onnx", "decoder.onnx")
JSON_VALUES = (None, "", "x", [], {}, 0, -1, 1, 2**31, 2**63, 10**30, 1.5, 1e308, True, "@@NaN", "@@Inf", [1, 2],
               {"a": 1}, "\u0000", "x" * 5000)
PROTO_KINDS = ("ext_location", "ext_offset", "ext_length", "ext_drop", "init_dims", "init_dtype", "input_dims",
               "node_op", "node_drop", "node_input", "opset", "ir_version", "function_drop", "attr_int")
EXT_LOCATIONS = ("../../etc/passwd", "/etc/passwd", "missing.data", "", "vision.onnx", ".", "x" * 300,
                 "model.onnx.data/../model.onnx.data", "tokenizer.json")
EXT_NUMBERS = ("0", "1", "-1", "abc", "", str(2**63), str(2**64), "1e9", "data", "data-1", "data+4096")
DIMS = ((0,), (2**31,), (-1,), (1,), (), (2**62, 2**62), "+1", "drop")
DTYPES = (0, 1, 2, 3, 6, 7, 10, 11, 16, 17, 23, 99, 2**20)
OPS = ("NoSuchOp", "", "Add", "MatMul", "Identity", "Loop", "TernaryMatMul")
INTS = (0, 1, -1, 2, 99, 10**6, 2**40, -(2**62))


def _json_paths(obj, prefix=(), out=None, limit=400):
    """Every path into a JSON tree (container keys / indices), breadth-limited for tokenizer.json."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for i, (k, v) in enumerate(items):
        if isinstance(obj, list) and i > 8:
            break
        out.append(prefix + (k,))
        _json_paths(v, prefix + (k,), out, limit)
    return out


@dataclasses.dataclass
class OnnxLayout:
    files: dict  # name -> bytes
    json_paths: dict  # json file -> [paths]
    inits: dict  # graph -> number of initializers with external data
    nodes: dict  # graph -> number of nodes
    data_bounds: list


def onnx_layout(folder: Path) -> OnnxLayout:
    import onnx

    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    paths = {n: _json_paths(json.loads(files[n])) for n in JSON_FILES if n in files}
    inits, nodes, bounds = {}, {}, {0, len(files.get("model.onnx.data", b""))}
    for g in GRAPHS:
        m = onnx.load_model_from_string(files[g])
        ext = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        inits[g], nodes[g] = len(ext), len(m.graph.node)
        for t in ext:
            kv = {e.key: e.value for e in t.external_data}
            off, ln = int(kv.get("offset", 0)), int(kv.get("length", 0))
            bounds |= {off, off + ln // 2, off + ln}
    return OnnxLayout(files, paths, inits, nodes, sorted(bounds))


def onnx_plans(L: OnnxLayout):
    from hypothesis import strategies as st

    jfiles = sorted(L.json_paths)
    json_op = st.tuples(st.just("json"), st.sampled_from(jfiles), st.integers(0, 10**6),
                        st.sampled_from(("delete", "set", "set", "wrongtop")), st.sampled_from(JSON_VALUES))
    text_op = st.tuples(st.just("text"), st.sampled_from(jfiles + ["chat_template.jinja"]),
                        st.sampled_from(("empty", "flip", "truncate", "nonutf8", "jinja")),
                        st.floats(0, 1, exclude_max=True), st.integers(1, 255))
    proto_op = st.tuples(st.just("proto"), st.sampled_from(GRAPHS), st.sampled_from(PROTO_KINDS),
                         st.integers(0, 10**6), st.integers(0, 10**6))
    raw_op = st.tuples(st.just("protoraw"), st.sampled_from(GRAPHS), st.sampled_from(("flip", "truncate")),
                       st.floats(0, 1, exclude_max=True), st.integers(1, 255))
    data_op = st.one_of(st.tuples(st.just("data"), st.just("truncate"), st.sampled_from(L.data_bounds),
                                  st.sampled_from((0, -1, 1))),
                        st.tuples(st.just("data"), st.just("flip"), st.floats(0, 1, exclude_max=True),
                                  st.integers(1, 255)))
    remove_op = st.tuples(st.just("remove"), st.sampled_from(sorted(L.files)))
    return st.lists(st.one_of(json_op, json_op, proto_op, proto_op, text_op, raw_op, data_op, remove_op),
                    min_size=1, max_size=3)


def _json_value(v):
    if v == "@@NaN":
        return float("nan")
    if v == "@@Inf":
        return float("inf")
    return v


def _mutate_proto(raw: bytes, kind: str, i: int, j: int, data_size: int) -> bytes:
    import onnx

    m = onnx.load_model_from_string(raw)
    g = m.graph
    ext = [t for t in g.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if kind.startswith("ext_") and ext:
        t = ext[i % len(ext)]
        if kind == "ext_drop":
            del t.external_data[:]
        else:
            key = kind[4:]
            v = EXT_LOCATIONS[j % len(EXT_LOCATIONS)] if key == "location" else EXT_NUMBERS[j % len(EXT_NUMBERS)]
            if key != "location":
                v = {"data": str(data_size), "data-1": str(data_size - 1), "data+4096": str(data_size + 4096)}.get(v, v)
            hit = [e for e in t.external_data if e.key == key]
            if hit:
                hit[0].value = v
            else:
                t.external_data.add(key=key, value=v)
    elif kind in ("init_dims", "init_dtype") and g.initializer:
        t = g.initializer[i % len(g.initializer)]
        if kind == "init_dtype":
            t.data_type = DTYPES[j % len(DTYPES)]
        else:
            d = DIMS[j % len(DIMS)]
            dims = list(t.dims)
            dims = [x + 1 for x in dims] if d == "+1" else dims[:-1] if d == "drop" else list(d)
            del t.dims[:]
            t.dims.extend(dims)
    elif kind == "input_dims" and g.input:
        dims = g.input[i % len(g.input)].type.tensor_type.shape.dim
        if dims:
            dims[j % len(dims)].dim_value = (0, 1, 2, 7, 2**31)[j % 5]
    elif kind in ("node_op", "node_drop", "node_input") and g.node:
        n = g.node[i % len(g.node)]
        if kind == "node_op":
            n.op_type = OPS[j % len(OPS)]
        elif kind == "node_drop":
            g.node.remove(n)
        elif n.input:
            n.input[j % len(n.input)] = "no_such_value"
    elif kind == "opset" and m.opset_import:
        m.opset_import[i % len(m.opset_import)].version = INTS[j % len(INTS)]
    elif kind == "ir_version":
        m.ir_version = INTS[j % len(INTS)] % 2**63
    elif kind == "function_drop" and m.functions:
        m.functions.remove(m.functions[i % len(m.functions)])
    elif kind == "attr_int":
        attrs = [a for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.INT]
        if attrs:
            attrs[i % len(attrs)].i = INTS[j % len(INTS)]
    return m.SerializeToString()


def int_attr_plans(L: OnnxLayout) -> list:
    """--sweep int-attrs: one plan per (int attribute of a graph, value of INTS), in graph and node order."""
    import onnx

    plans = []
    for g in GRAPHS:
        m = onnx.load_model_from_string(L.files[g])
        n = sum(a.type == onnx.AttributeProto.INT for node in m.graph.node for a in node.attribute)
        plans += [[("proto", g, "attr_int", i, j)] for i in range(n) for j in range(len(INTS))]
    return plans


def apply_onnx(L: OnnxLayout, plan) -> dict:
    """name -> new bytes (None: remove the file); unchanged files are not listed."""
    out: dict = {}

    def cur(name):
        return out[name] if name in out else L.files.get(name)

    for op in plan:
        kind = op[0]
        if kind == "json":
            name, k, action, v = op[1], op[2], op[3], _json_value(op[4])
            if cur(name) is None:
                continue
            try:
                obj = json.loads(cur(name))
            except (ValueError, UnicodeDecodeError):
                continue
            paths = _json_paths(obj)
            if action == "wrongtop" or not paths:
                obj = v if action == "wrongtop" else obj
            else:
                path = paths[k % len(paths)]
                parent = obj
                for p in path[:-1]:
                    parent = parent[p]
                if action == "delete":
                    del parent[path[-1]]
                else:
                    parent[path[-1]] = v
            out[name] = json.dumps(obj).encode()
        elif kind == "text":
            name, how, frac, x = op[1:]
            b = bytearray(cur(name) or b"")
            if how == "empty":
                b = bytearray()
            elif how == "flip" and b:
                b[int(frac * len(b))] ^= x
            elif how == "truncate":
                b = b[:int(frac * len(b))]
            elif how == "nonutf8":
                at = int(frac * len(b))
                b[at:at] = BAD_UTF8[x % len(BAD_UTF8)]
            elif how == "jinja":
                b = bytearray(("{% if %}", "{{ 1 + 'a' }}", "{{ raise_exception('no') }}", "{{ messages[99] }}",
                               "{% for m in messages %}{{ m.content[0].text.x.y }}{% endfor %}",
                               "{{ ''.__class__ }}", "{% for i in range(99999999) %}x{% endfor %}")[x % 7].encode())
            out[name] = bytes(b)
        elif kind == "proto":
            name = op[1]
            try:
                out[name] = _mutate_proto(cur(name), op[2], op[3], op[4], len(L.files["model.onnx.data"]))
            except Exception:  # an earlier raw mutation left it unparsable: keep those bytes
                pass
        elif kind == "protoraw":
            name, how, frac, x = op[1:]
            if cur(name) is None:  # removed by an earlier op
                continue
            b = bytearray(cur(name))
            if how == "flip":
                if b:  # an earlier truncation may have left nothing to flip
                    b[int(frac * len(b))] ^= x
            else:
                b = b[:int(frac * len(b))]
            out[name] = bytes(b)
        elif kind == "data":
            b = cur("model.onnx.data")
            if b is None:
                continue
            if op[1] == "truncate":
                out["model.onnx.data"] = b[:max(0, op[2] + op[3])]
            elif b:
                bb = bytearray(b)
                bb[int(op[2] * len(bb))] ^= op[3]
                out["model.onnx.data"] = bytes(bb)
        elif kind == "remove":
            out[op[1]] = None
    return out


# ============================================================================================================
# Images: PNG chunk layout; other formats mutated by bytes
# ============================================================================================================


def png_chunks(data: bytes) -> list:
    """[(start, length, type)] of every chunk (start = the length field's position)."""
    out, pos = [], 8
    while pos + 8 <= len(data):
        n, t = struct.unpack_from(">I4s", data, pos)
        out.append((pos, n, t))
        pos += 12 + n
    return out


IHDR_FIELDS = {"width": (0, ">I"), "height": (4, ">I"), "depth": (8, "B"), "color": (9, "B"),
               "compress": (10, "B"), "filter": (11, "B"), "interlace": (12, "B")}
IHDR_VALUES = (0, 1, 2, 3, 4, 6, 7, 8, 16, 255, 3000, 30000, 65535, 100000, 2**31 - 1, 2**32 - 1)
EXTRA_CHUNKS = (b"IHDR", b"PLTE", b"tRNS", b"zTXt", b"iCCP", b"acTL", b"fcTL", b"IDAT", b"IEND", b"eXIf", b"sBIT")


def image_plans(sources: list):
    from hypothesis import strategies as st

    n = len(sources)
    pngs = [i for i, (_, d) in enumerate(sources) if d[:8] == b"\x89PNG\r\n\x1a\n"]
    others = [i for i in range(n) if i not in pngs]
    generic = st.one_of(
        st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
        st.tuples(st.just("headflip"), st.integers(0, 63), st.integers(1, 255)),
        st.tuples(st.just("word"), st.integers(0, 60), st.sampled_from(IHDR_VALUES), st.sampled_from(("<I", ">I", "<H", ">H"))),
    )
    cut = st.one_of(st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
                    st.tuples(st.just("replace"), st.sampled_from(("empty", "text", "random", "gguf")),
                              st.binary(max_size=256)))
    png_inplace = st.one_of(
        st.tuples(st.just("ihdr"), st.sampled_from(sorted(IHDR_FIELDS)), st.sampled_from(IHDR_VALUES), st.booleans()),
        st.tuples(st.just("chunk_len"), st.integers(0, 20), st.sampled_from(IHDR_VALUES)),
        st.tuples(st.just("chunk_flip"), st.integers(0, 20), st.floats(0, 1, exclude_max=True), st.integers(1, 255),
                  st.booleans()),
        generic)
    png_struct = st.one_of(
        st.tuples(st.just("truncate_chunk"), st.integers(0, 20), st.sampled_from((0, 0, 4, 8, -1, 1, 12))),
        st.tuples(st.just("drop_chunk"), st.integers(0, 20)),
        st.tuples(st.just("dup_chunk"), st.integers(0, 20)),
        st.tuples(st.just("insert_chunk"), st.integers(0, 20), st.sampled_from(EXTRA_CHUNKS), st.binary(max_size=40),
                  st.booleans()),
        cut)
    plan = lambda idx, inplace, structural: st.one_of(  # noqa: E731
        st.tuples(st.sampled_from(idx), st.lists(inplace, min_size=1, max_size=3), st.one_of(st.none(), structural)),
        st.tuples(st.sampled_from(idx), st.just([]), structural))
    return st.one_of(plan(pngs, png_inplace, png_struct), plan(others, generic, cut)) if others else \
        plan(pngs, png_inplace, png_struct)


def _crc(b: bytearray, start: int) -> None:
    n = struct.unpack_from(">I", b, start)[0]
    if start + 12 + n <= len(b):
        struct.pack_into(">I", b, start + 8 + n, zlib.crc32(bytes(b[start + 4:start + 8 + n])))


def apply_image(sources: list, plan) -> bytes:
    idx, inplace, structural = plan
    data = sources[idx][1]
    b = bytearray(data)
    chunks = png_chunks(data) if data[:8] == b"\x89PNG\r\n\x1a\n" else []
    for op in inplace:
        kind = op[0]
        if kind == "flip" and b:
            b[int(op[1] * len(b))] ^= op[2]
        elif kind == "headflip" and op[1] < len(b):
            b[op[1]] ^= op[2]
        elif kind == "word" and op[1] + 4 <= len(b):
            bits = 16 if op[3][1] == "H" else 32
            struct.pack_into(op[3], b, op[1], op[2] % (1 << bits))
        elif kind == "ihdr" and chunks:
            off, fmt = IHDR_FIELDS[op[1]]
            bits = 8 * struct.calcsize(fmt)
            struct.pack_into(fmt, b, 16 + off, op[2] % (1 << bits))
            if op[3]:
                _crc(b, 8)
        elif kind == "chunk_len" and chunks:
            s = chunks[op[1] % len(chunks)][0]
            struct.pack_into(">I", b, s, op[2])
        elif kind == "chunk_flip" and chunks:
            s, n, _ = chunks[op[1] % len(chunks)]
            if n:
                b[s + 8 + int(op[2] * n)] ^= op[3]
                if op[4]:
                    _crc(b, s)
    if structural is None:
        return bytes(b)
    kind = structural[0]
    if kind == "truncate":
        return bytes(b[:int(structural[1] * len(b))])
    if kind == "replace":
        return {"empty": b"", "text": b"not an image\n", "random": structural[2],
                "gguf": b"GGUF\x03\x00\x00\x00" + structural[2]}[structural[1]]
    if not chunks:
        return bytes(b)
    s, n, _ = chunks[structural[1] % len(chunks)]
    if kind == "truncate_chunk":
        return bytes(b[:max(0, s + structural[2])])
    if kind == "drop_chunk":
        del b[s:s + 12 + n]
    elif kind == "dup_chunk":
        b[s:s] = b[s:s + 12 + n]
    elif kind == "insert_chunk":
        body = structural[3]
        c = struct.pack(">I", len(body)) + structural[2] + body
        c += struct.pack(">I", zlib.crc32(c[4:]) if structural[4] else 0)
        b[s:s] = c
    return bytes(b)


# ============================================================================================================
# Materialising a case and running it in a worker
# ============================================================================================================


class Fuzzer:
    """The corpus' layouts, the hypothesis strategy per reader, and `build(reader, plan, dir)` -> a case."""

    def __init__(self, corpus: Corpus):
        self.c = corpus
        self.llm_bytes, self.mm_bytes = corpus.llm.read_bytes(), corpus.mmproj.read_bytes()
        self.llm_layout, self.mm_layout = gguf_layout(self.llm_bytes), gguf_layout(self.mm_bytes)
        self.st = st_layout(corpus.safetensors.read_bytes())
        self.onnx = onnx_layout(corpus.onnx)
        self.images = [(n, p.read_bytes()) for n, p in corpus.images]

    def strategy(self, reader: str):
        from hypothesis import strategies as st

        if reader in ("gguf", "model"):
            pair = st.one_of(st.tuples(st.just("llm"), gguf_plans(self.llm_layout)),
                             st.tuples(st.just("llm"), gguf_plans(self.llm_layout)),
                             st.tuples(st.just("mmproj"), gguf_plans(self.mm_layout)))
            return st.tuples(pair, st.sampled_from(KERNELS)) if reader == "model" else pair
        if reader == "safetensors":
            return st_plans(self.st)
        if reader == "onnx":
            return onnx_plans(self.onnx)
        if reader == "image":
            return image_plans(self.images)
        raise ValueError(reader)

    def build(self, reader: str, plan, d: Path) -> dict:
        """Write the case's files into d; the worker's request."""
        d.mkdir(parents=True, exist_ok=True)
        if reader in ("gguf", "model"):
            (which, gplan), kernel = (plan, None) if reader == "gguf" else plan
            llm, mm = d / "model.gguf", d / "model-mmproj.gguf"
            if which == "llm":
                llm.write_bytes(apply_gguf(self.llm_bytes, self.llm_layout, gplan))
                _link(self.c.mmproj, mm)
            else:
                _link(self.c.llm, llm)
                mm.write_bytes(apply_gguf(self.mm_bytes, self.mm_layout, gplan))
            target = llm if which == "llm" else mm
            return {"reader": reader, "path": str(target), "model": str(llm), "mmproj": str(mm), "kernel": kernel,
                    "image": str(self.c.question_image)}
        if reader == "safetensors":
            p = d / "model.safetensors"
            p.write_bytes(apply_st(self.st, plan))
            return {"reader": reader, "path": str(p)}
        if reader == "image":
            name = self.images[plan[0]][0]
            p = d / name
            p.write_bytes(apply_image(self.images, plan))
            return {"reader": reader, "path": str(p)}
        if reader == "onnx":
            folder = d / "onnx"
            folder.mkdir()
            changed = apply_onnx(self.onnx, plan)
            for name in self.onnx.files:
                if name in changed:
                    if changed[name] is not None:
                        (folder / name).write_bytes(changed[name])
                else:
                    _link(self.c.onnx / name, folder / name)
            return {"reader": reader, "path": str(folder), "image": str(self.c.question_image)}
        raise ValueError(reader)


def _link(src: Path, dst: Path) -> None:
    """Unchanged inputs are hard links (read only by the worker), a copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# ---- the worker (a subprocess: `python -m mote_edge.benchmarks.fuzz --worker`) ----------------------------


class CaseTimeout(BaseException):
    """The worker's own alarm: the case ran past its time (a hang, with a traceback of where)."""


def _run_case(case: dict):
    reader = case["reader"]
    if reader == "gguf":
        from ..exporters.gguf_header import read_gguf_header
        from ..runtime_cpu.gguf_model import GGUFModel

        read_gguf_header(case["path"])
        g = GGUFModel(case["path"])
        for name in g.infos:  # every tensor's bytes, first and last
            raw = g.raw(name)
            if raw.size:
                int(raw[0]) + int(raw[-1])
        return f"{len(g.infos)} tensors"
    if reader == "model":
        from ..runtime_cpu.mote_engine import MoteModel
        from ..runtime_cpu.mote_memory import plan_resident

        plan_resident(case["model"], case["mmproj"], None, kernel=case["kernel"])
        m = MoteModel(case["model"], case["mmproj"], threads=1, kernel=case["kernel"])
        return repr(m.answer(case["image"], QUESTION, max_tokens=2))
    if reader == "safetensors":
        from ..exporters.safetensors_np import SafetensorsFile

        with SafetensorsFile(case["path"]) as f:
            for k in f.keys():
                f.shape(k), f.dtype(k)
                f.get(k)
            return f"{len(f.keys())} tensors"
    if reader == "image":
        from ..runtime_cpu.images import load_rgb

        return str(load_rgb(case["path"], IMAGE_SIZE).shape)
    if reader == "onnx":
        from ..runtime_cpu.onnx_engine import Session

        s = Session(case["path"], threads=1)
        return repr(s.answer(case["image"], QUESTION, 2))
    if reader == "selftest":  # the harness's own checks (tests/test_fuzz.py): what a finding looks like
        if case["do"] == "segfault":
            import ctypes

            ctypes.string_at(0)
        elif case["do"] == "loop":
            while True:
                pass
        elif case["do"] == "c-loop":  # as a C call that never returns: the alarm cannot reach Python
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(3600)
        elif case["do"] == "allocate":
            return len(bytearray(64 * 2**30))
    raise ValueError(reader)


def _frames(tb) -> list[str]:
    import traceback

    return [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_tb(tb)][-6:]


def run_one(case: dict) -> dict:
    """One case in this process: the outcome and what it said."""
    from ..exporters.errors import MoteExportError

    t0 = time.perf_counter()
    timeout = int(case.get("timeout") or 0)
    if timeout:
        signal.alarm(timeout)
    try:
        said = _run_case(case)
        res = {"outcome": "ok", "message": str(said)[:200]}
    except MoteExportError as exc:
        msg = str(exc)
        res = {"outcome": "rejected" if msg.strip() and "\n" not in msg else "multiline", "message": msg[:2000]}
    except CaseTimeout:
        res = {"outcome": "hang", "type": "timeout", "message": f"over {timeout} s", "frames": _frames(sys.exc_info()[2])}
    except MemoryError:
        res = {"outcome": "memory", "type": "MemoryError", "message": "", "frames": _frames(sys.exc_info()[2])}
    except Exception as exc:  # noqa: BLE001 - the finding: any other exception type
        res = {"outcome": "error", "type": type(exc).__name__, "message": str(exc)[:500],
               "frames": _frames(sys.exc_info()[2])}
    finally:
        signal.alarm(0)
    res["seconds"] = round(time.perf_counter() - t0, 4)
    return res


_FUZZERS: dict = {}  # corpus root -> Fuzzer, made once per worker


def build_request(fz: "Fuzzer", reader: str, plan, d: Path, timeout: float) -> dict:
    """A case the worker writes itself: the driver only draws plans, so building (copying and mutating
    files of megabytes) runs on every job, not in the one driver process."""
    plan_b = base64.b64encode(pickle.dumps(plan)).decode()
    return {"build": {"corpus": fz.c.to_json(), "reader": reader, "plan": plan_b, "dir": str(d)}, "timeout": timeout}


def materialise(msg: dict) -> dict:
    """The worker's side of build_request (a plain case passes through); a re-run starts from an empty dir."""
    b = msg.get("build")
    if b is None:
        return msg
    root = b["corpus"]["root"]
    if root not in _FUZZERS:
        _FUZZERS[root] = Fuzzer(Corpus.from_json(b["corpus"]))
    d = Path(b["dir"])
    shutil.rmtree(d, ignore_errors=True)
    case = _FUZZERS[root].build(b["reader"], pickle.loads(base64.b64decode(b["plan"])), d)
    return dict(case, timeout=msg.get("timeout"))


def worker_main(memory_mb: int) -> None:
    import faulthandler
    import gc
    import resource

    faulthandler.enable()  # a segfault prints the Python stack to stderr, which the driver keeps

    def alarm(signum, frame):
        raise CaseTimeout()

    signal.signal(signal.SIGALRM, alarm)
    if memory_mb:
        lim = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    # import what the readers need before the first case (its time is not the case's)
    from ..runtime_cpu import mote_engine, onnx_engine  # noqa: F401
    from ..exporters import safetensors_np  # noqa: F401
    import PIL.Image  # noqa: F401

    out = sys.stdout
    sys.stdout = sys.stderr  # whatever a reader prints stays out of the protocol
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            case = materialise(json.loads(line))
        except Exception as exc:  # noqa: BLE001 - the harness's own failure is a finding too, not a dead worker
            res = {"outcome": "error", "type": f"harness {type(exc).__name__}", "message": str(exc)[:500],
                   "frames": _frames(sys.exc_info()[2])}
        else:
            res = dict(run_one(case), case=case)
        gc.collect()
        out.write(json.dumps(res) + "\n")
        out.flush()


class Worker:
    """One worker subprocess; `start(case)` then `poll()` -> result or None; a death or a kill is a result."""

    def __init__(self, memory_mb: int = DEFAULT_MEMORY_MB, env: dict | None = None):
        self.memory_mb, self.env = memory_mb, env
        self.proc = None
        self.case = None
        self._spawn()

    def _spawn(self) -> None:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
        env["PYTHONFAULTHANDLER"] = "1"
        env["TQDM_DISABLE"] = "1"
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "mote_edge.benchmarks.fuzz", "--worker",
                                      "--memory-limit-mb", str(self.memory_mb)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, env=env, bufsize=0)
        line = self._readline(300)
        if line != "ready":
            raise RuntimeError(f"fuzz worker did not start: {line!r}; stderr: {self._stderr()[-2000:]}")

    def _readline(self, timeout: float) -> str | None:
        buf = b""
        end = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return "" if not buf else buf.decode(errors="replace")
            buf += chunk
        return buf.decode(errors="replace").strip()

    def _stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")

    def start(self, case: dict, timeout: float) -> None:
        self.case, self.timeout = case, timeout
        self.err.seek(0)
        self.err.truncate()
        self.t0 = time.monotonic()
        try:
            self.proc.stdin.write((json.dumps(dict(case, timeout=int(timeout))) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:  # it died after its last answer: finish() reports the death
            pass

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def finish(self, wait: float) -> dict:
        """The running case's result (waiting up to `wait` s beyond its own alarm), a crash or a hang."""
        line = self._readline(max(0.0, self.timeout + wait - (time.monotonic() - self.t0)))
        if line:
            self.case = None
            return json.loads(line)
        if line is None:  # no answer in time: killed, a hang
            self.proc.kill()
            self.proc.wait()
            res = {"outcome": "hang", "type": "killed", "message": f"no answer in {self.timeout + wait:.0f} s",
                   "stderr": self._stderr()[-3000:]}
        else:  # the worker died: a crash
            rc = self.proc.wait()
            why = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
            res = {"outcome": "crash", "type": why, "message": why, "stderr": self._stderr()[-3000:]}
        self.case = None
        self._spawn()
        return res

    def run(self, case: dict, timeout: float, wait: float = 10.0) -> dict:
        self.start(case, timeout)
        return self.finish(wait)

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ============================================================================================================
# Interrupted exports: mote-export killed with SIGKILL at seeded random points
# ============================================================================================================

KILL_FORMATS = ("gguf", "onnx")


def _export_args(fmt: str, ckpt: Path, dest: Path, variant: str) -> list[str]:
    """mote-export as a user runs it; variant "a" / "b" give different bytes (the previous file / the new one)."""
    args = [sys.executable, "-c", "from mote_edge.exporters.cli import main; main()", str(ckpt), "-o", str(dest),
            "--quiet"]
    if fmt == "onnx":
        return args + ["--format", "onnx"] + (["--onnx-kernels", "fast"] if variant == "b" else [])
    return args + (["--ternary-type", "tq1_0"] if variant == "b" else [])


def _outputs(fmt: str, dest: Path) -> list[Path]:
    from ..exporters.gguf_file import mmproj_path

    return [dest, mmproj_path(dest)] if fmt == "gguf" else [dest]


def _digest(p: Path) -> str | None:
    """A file's or a folder's content hash (None: absent)."""
    import hashlib

    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.iterdir()):
            h.update(f.name.encode() + b"\0" + (_digest(f) or "").encode())
        return h.hexdigest()
    if not p.exists():
        return None
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def _size(p: Path) -> int:
    """Bytes of a file or a folder's files; 0 for one that vanished meanwhile (a temporary renamed)."""
    try:
        if p.is_dir():
            return sum(_size(f) for f in p.iterdir())
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def _timed_export(args: list[str], folder: Path) -> tuple[float, float]:
    """Run an export to completion: (seconds until its first temporary appeared, seconds to exit)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = None
    while proc.poll() is None:
        if first is None and _temporaries(folder):
            first = time.monotonic() - t0
        time.sleep(0.002)
    end = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[3:])} failed: {proc.stderr.read().decode()[-2000:]}")
    return (first if first is not None else end * 0.5), end


def kill_trials(fmt: str, trials: int, seed: int, work: Path, ckpt: Path | None = None) -> dict:
    """`trials` exports (fmt gguf or onnx) of the tiny checkpoint killed with SIGKILL: half at a uniformly drawn
    time of the whole run, half while the output is being written. After each kill every destination path is
    absent, the previous complete file (gguf: a destination that held the "a" export) or the complete new one,
    never anything else; then the same export re-run must succeed and give the new file exactly."""
    import random

    ckpt = Path(ckpt) if ckpt else _assets() / "mote"
    work = Path(work)
    refs = {}
    for variant in ("a", "b"):  # the uninterrupted exports: their bytes, and how long a run takes
        d = work / f"ref-{variant}"
        d.mkdir(parents=True, exist_ok=True)
        dest = d / ("model.gguf" if fmt == "gguf" else "onnx")
        timing = _timed_export(_export_args(fmt, ckpt, dest, variant), d)
        refs[variant] = ([_digest(p) for p in _outputs(fmt, dest)], timing)
    (_, (first, end)) = refs["b"]
    sizes = [_size(p) for p in _outputs(fmt, work / "ref-b" / ("model.gguf" if fmt == "gguf" else "onnx"))]
    results = []
    for i in range(trials):
        rng = random.Random(seed * 100003 + i)
        d = work / f"trial-{i}"
        d.mkdir(parents=True)
        dest = d / ("model.gguf" if fmt == "gguf" else "onnx")
        previous = fmt == "gguf" and rng.random() < 0.5  # a complete earlier export at the destination
        if previous:
            for src, dst in zip(_outputs(fmt, work / "ref-a" / dest.name), _outputs(fmt, dest)):
                shutil.copyfile(src, dst)
        mode = rng.choice(("anytime", "writing", "writing"))
        # "writing": when the temporaries beside the destination hold a drawn share of the bytes (robust to a
        # loaded machine's timing); gguf: of the LLM file, or of the LLM + the mmproj written after it
        total = sizes[0] + (sizes[1] if fmt == "gguf" and rng.random() < 0.5 else 0)
        share = rng.uniform(0, 1)
        at = rng.uniform(0, first * 1.2)
        proc = subprocess.Popen(_export_args(fmt, ckpt, dest, "b"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        seen: dict = {}  # temporary -> the most bytes seen in it (renamed ones stay counted)
        while proc.poll() is None:
            if mode == "anytime" and time.monotonic() - t0 >= at:
                break
            if mode == "writing":
                for n in _temporaries(d):
                    seen[n] = max(seen.get(n, 0), _size(d / n))
                if sum(seen.values()) >= share * total:
                    break
            time.sleep(0.0005)
        finished = proc.poll() is not None
        writing = bool(_temporaries(d))  # its temporary exists: the kill lands inside the write
        if not finished:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = time.monotonic() - t0
        states = []
        for k, p in enumerate(_outputs(fmt, dest)):
            h = _digest(p)
            ok = {None: "absent", refs["b"][0][k]: "new"}
            if previous:
                ok[refs["a"][0][k]] = "previous"
            states.append(ok.get(h, "INCOMPLETE"))
        stale = _temporaries(d)
        rerun = None
        if fmt == "gguf" or states[0] == "absent":  # an ONNX export refuses an existing folder, by design
            r = subprocess.run(_export_args(fmt, ckpt, dest, "b"), capture_output=True, text=True)
            same = [_digest(p) for p in _outputs(fmt, dest)] == refs["b"][0]
            rerun = "ok" if r.returncode == 0 and same else f"FAILED (exit {r.returncode}, same bytes {same}): " \
                                                              f"{r.stderr.strip()[-300:]}"
        results.append({"trial": i, "mode": mode, "previous": previous, "kill_s": round(killed_at, 3),
                        "finished_before_kill": finished, "temporary_at_kill": writing, "states": states, "stale_after_kill": stale,
                        "stale_after_rerun": _temporaries(d), "rerun": rerun})
        shutil.rmtree(d, ignore_errors=True)
    bad = [r for r in results if "INCOMPLETE" in r["states"] or (r["rerun"] or "ok") != "ok"]
    pairs = [r for r in results if fmt == "gguf" and len(set(r["states"])) > 1]
    return {"format": fmt, "trials": trials, "seed": seed, "export_s": round(end, 2), "first_temporary_s": round(first, 2),
            "killed": sum(not r["finished_before_kill"] for r in results),
            "killed_while_writing": sum(not r["finished_before_kill"] and r["temporary_at_kill"] for r in results),
            "violations": len(bad), "reruns_failed": sum((r["rerun"] or "ok") != "ok" for r in results),
            "stale_left_after_rerun": sum(bool(r["stale_after_rerun"]) for r in results),
            "mixed_pairs": len(pairs), "results": results}


# ============================================================================================================
# The program: N cases per reader, in parallel workers, a JSON + markdown summary
# ============================================================================================================

_NUM = re.compile(r"-?\b\d[\d_.e+]*\b")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def message_class(msg: str, root: str) -> str:
    """A rejection message with its paths, quoted names, numbers and lists folded: the error's class."""
    m = msg.replace(root + "/", "").replace(root, "<case>")
    m = re.sub(r"/\S+", "<path>", m)
    m = _QUOTED.sub("<s>", m)
    m = re.sub(r"\[[^\]]*\]", "[..]", m)
    m = re.sub(r"\{[^}]*\}", "{..}", m)
    m = re.sub(r"(not a readable GGUF file|cannot read image <s>) \((\w+)[^)]*\)", r"\1 (\2 ..)", m)
    m = re.sub(r"\b0x[0-9a-fA-F]+\b", "0xN", m)  # the byte a decoder stopped at
    m = _NUM.sub("N", m)
    return m[:130]


def signature(res: dict) -> str:
    tail = (res.get("frames") or [""])[-1]
    if res["outcome"] == "crash":
        stack = [ln.strip() for ln in (res.get("stderr") or "").splitlines() if ln.strip().startswith("File ")]
        tail = stack[0] if stack else ""
    return f"{res['outcome']}: {res.get('type', '')} {tail}".strip()


class Stats:
    def __init__(self, reader: str, out: Path, root: str):
        self.reader, self.out, self.root = reader, out, root
        self.cases = 0
        self.outcomes: dict = {}
        self.classes: dict = {}
        self.findings: dict = {}
        self.seconds = []

    def add(self, res: dict, case: dict, case_dir: Path, plan) -> None:
        self.cases += 1
        o = res["outcome"]
        self.outcomes[o] = self.outcomes.get(o, 0) + 1
        if "seconds" in res:
            self.seconds.append(res["seconds"])
        if o == "rejected":
            k = message_class(res["message"], str(case_dir))
            self.classes[k] = self.classes.get(k, 0) + 1
        elif o != "ok":
            sig = signature(res)
            f = self.findings.setdefault(sig, {"count": 0, "examples": []})
            f["count"] += 1
            if len(f["examples"]) < 3:
                dest = self.out / "findings" / f"{self.reader}-{len(self.findings)}-{len(f['examples'])}"
                shutil.copytree(case_dir, dest, dirs_exist_ok=True, symlinks=False)
                (dest / "report.json").write_text(json.dumps({"result": res, "case": case, "plan": repr(plan)},
                                                             indent=1, default=str))
                f["examples"].append({"dir": str(dest), "message": res.get("message", "")[:300],
                                      "frames": res.get("frames"), "plan": repr(plan)[:600]})

    def summary(self, wall: float) -> dict:
        s = sorted(self.seconds)
        return {"reader": self.reader, "cases": self.cases, "wall_s": round(wall, 1),
                "case_s_median": s[len(s) // 2] if s else None, "case_s_max": s[-1] if s else None,
                "outcomes": self.outcomes, "crashes": self.outcomes.get("crash", 0),
                "hangs": self.outcomes.get("hang", 0),
                "other_exceptions": sum(self.outcomes.get(k, 0) for k in ("error", "memory", "multiline")),
                "rejections_by_class": dict(sorted(self.classes.items(), key=lambda kv: -kv[1])),
                "findings": self.findings}


def fuzz_reader(fz: Fuzzer, reader: str, cases: int, out: Path, jobs: int, seed: int, timeout: float,
                memory_mb: int, work: Path, progress: bool = True, deadline: float | None = None,
                plans: list | None = None) -> dict:
    """Run `cases` hypothesis-drawn cases of one reader on `jobs` workers (or the given plans, each once);
    the summary dict."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from tqdm import tqdm

    stats = Stats(reader, out, str(work))
    workers = [Worker(memory_mb) for _ in range(jobs)]
    pending: dict = {}  # worker -> (case, dir, plan)
    bar = tqdm(total=cases if plans is None else len(plans), desc=f"fuzz {reader}", unit="case",
               disable=not progress, smoothing=0.05)
    n = [0]

    def collect(w: Worker) -> None:
        case, d, plan = pending.pop(w)
        res = w.finish(10)
        if res["outcome"] == "hang":  # once more, alone, with twice the time: a loaded machine is not a hang
            res = w.run(case, 2 * timeout)
        stats.add(res, res.pop("case", case), d, plan)
        shutil.rmtree(d, ignore_errors=True)
        bar.update(1)

    def wait_one() -> None:
        ready = select.select(list(pending), [], [], 1.0)[0]
        for w in ready:
            collect(w)
        for w in list(pending):  # overdue ones: finish() kills them
            if time.monotonic() - w.t0 > w.timeout + 10:
                collect(w)

    t0 = time.monotonic()

    class _Stop(Exception):
        pass

    def submit(plan):
        if deadline is not None and time.monotonic() > deadline:
            raise _Stop()  # no shrink phase: hypothesis re-raises it at once
        while len(pending) >= len(workers):
            wait_one()
        w = next(x for x in workers if x not in pending)
        n[0] += 1
        d = work / f"{reader}-{n[0]}"
        case = build_request(fz, reader, plan, d, timeout)
        w.start(case, timeout)
        pending[w] = (case, d, plan)

    def drawn():
        @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), derandomize=False)
        @hseed(seed)
        @given(fz.strategy(reader))
        def one(plan):
            submit(plan)

        one()

    try:
        try:
            if plans is None:
                drawn()
            else:
                for plan in plans:
                    submit(plan)
        except _Stop:
            pass
        while pending:
            wait_one()
    finally:
        bar.close()
        for w in workers:
            w.close()
    return stats.summary(time.monotonic() - t0)


def markdown(results: list[dict], args) -> str:
    what = f"--sweep {args.sweep}" if getattr(args, "sweep", None) else f"--cases {args.cases}"
    lines = [f"# Fuzzing the readers ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"`python -m mote_edge.benchmarks.fuzz {what} --reader {args.reader} --jobs {args.jobs} "
             f"--seed {args.seed}`; each case in a worker under RLIMIT_AS {args.memory_limit_mb} MiB, "
             "an alarm and a kill bounding its time.", "",
             "| reader | cases | wall s | loaded | rejected (one line) | other exceptions | crashes | hangs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        o = r["outcomes"]
        lines.append(f"| {r['reader']} | {r['cases']} | {r['wall_s']} | {o.get('ok', 0)} | {o.get('rejected', 0)} | "
                     f"{r['other_exceptions']} | {r['crashes']} | {r['hangs']} |")
    for r in results:
        lines += ["", f"## {r['reader']}: rejections by message class", "", "| count | message class |", "|---:|---|"]
        lines += [f"| {v} | `{k}` |" for k, v in list(r["rejections_by_class"].items())[:40]]
        if r["findings"]:
            lines += ["", f"### {r['reader']}: findings", "", "| count | signature | example |", "|---:|---|---|"]
            lines += [f"| {f['count']} | `{sig}` | {f['examples'][0]['dir']} |" for sig, f in r["findings"].items()]
    return "\n".join(lines) + "\n"


def _write(out: Path, a, results: list, kills: list) -> None:
    (out / "fuzz.json").write_text(json.dumps({"args": vars(a), "readers": results, "kill_trials": kills}, indent=1,
                                              default=str))
    text = markdown(results, a) if results else f"# Interrupted exports ({time.strftime('%Y-%m-%d %H:%M')})\n"
    if kills:
        text += ("\n## Interrupted exports (SIGKILL)\n\n| format | trials | killed | while writing | violations | "
                 "failed re-runs | mixed LLM/mmproj pairs | stale temporaries left |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
        text += "".join(f"| {k['format']} | {k['trials']} | {k['killed']} | {k['killed_while_writing']} | {k['violations']} | "
                        f"{k['reruns_failed']} | {k['mixed_pairs']} | {k['stale_left_after_rerun']} |\n" for k in kills)
    (out / "fuzz.md").write_text(text)


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m mote_edge.benchmarks.fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=1000, help="cases per reader (default 1000)")
    p.add_argument("--reader", default="all", choices=READERS + ("all",))
    p.add_argument("-o", "--out", default="fuzz-out", help="folder for fuzz.json, fuzz.md, findings/")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None, help="seconds per case (default: per reader)")
    p.add_argument("--minutes", type=float, default=None, help="stop each reader after this many minutes")
    p.add_argument("--memory-limit-mb", type=int, default=DEFAULT_MEMORY_MB, help="RLIMIT_AS of each worker")
    p.add_argument("--corpus", default=None, help="folder for the exported corpus (default: a temporary one)")
    p.add_argument("--kill-trials", type=int, default=0, metavar="N",
                   help="also kill N mote-export runs per format (gguf, onnx) with SIGKILL and check the destination")
    p.add_argument("--sweep", choices=("int-attrs",), default=None,
                   help="instead of --cases drawn cases: every int attribute of the ONNX graphs x every value (--reader onnx)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.sweep and a.reader != "onnx":
        p.error(f"--sweep {a.sweep} sweeps the ONNX folder reader: give --reader onnx")
    if a.worker:
        worker_main(a.memory_limit_mb)
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="mote-fuzz-", dir=shm))
    try:
        readers = () if a.cases <= 0 else READERS if a.reader == "all" else (a.reader,)
        fz = Fuzzer(make_corpus(a.corpus or work / "corpus")) if readers else None
        results, kills = [], []
        for r in readers:
            deadline = time.monotonic() + 60 * a.minutes if a.minutes else None
            res = fuzz_reader(fz, r, a.cases, out, a.jobs, a.seed, a.timeout or DEFAULT_TIMEOUT[r], a.memory_limit_mb,
                              work, deadline=deadline, plans=int_attr_plans(fz.onnx) if a.sweep else None)
            results.append(res)
            _write(out, a, results, kills)
            print(f"{r}: {res['cases']} cases in {res['wall_s']} s: {res['outcomes']}", flush=True)
        for fmt in KILL_FORMATS if a.kill_trials > 0 else ():
            t0 = time.monotonic()
            k = kill_trials(fmt, a.kill_trials, a.seed, work / f"kill-{fmt}")
            k["wall_s"] = round(time.monotonic() - t0, 1)
            kills.append(k)
            _write(out, a, results, kills)
            print(f"kill {fmt}: {k['trials']} trials, {k['killed']} killed ({k['killed_while_writing']} while writing), "
                  f"{k['violations']} violations, {k['reruns_failed']} failed re-runs, {k['mixed_pairs']} mixed "
                  f"pairs, {k['stale_left_after_rerun']} with stale temporaries left", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bad = sum(r["crashes"] + r["hangs"] + r["other_exceptions"] for r in results) + sum(k["violations"] for k in kills)
    print(f"wrote {out / 'fuzz.json'} and {out / 'fuzz.md'}; findings: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

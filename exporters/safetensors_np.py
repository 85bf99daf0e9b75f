"""A torch-free safetensors reader that hands out one tensor at a time.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the data block (offsets relative to it).
The whole header is validated on open, so a truncated or corrupt file fails before anything is
written. Each tensor is read with a plain positioned read when asked for, not memory-mapped: a map's
touched pages count in the process's resident memory until the map closes, so exporting a 12 GB
checkpoint through a map showed a peak RSS of the whole checkpoint; reads keep it at about one tensor.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .errors import MoteExportError

# numpy has no bfloat16: BF16 is read as uint16 and widened to float32 (see `get`).
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


class SafetensorsFile:
    """`with SafetensorsFile(path) as f: f.get(name)`; `keys()`, `shape(name)`, `dtype(name)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise MoteExportError(f"{self.path} does not exist; expected a safetensors file")
        size = self.path.stat().st_size
        self._entries = self._read_header(size)
        data_end = max((e["data_offsets"][1] for e in self._entries.values()), default=0)
        if self._data_start + data_end > size:
            self._fail(f"file is truncated ({size} bytes, header says {self._data_start + data_end})")
        self._fh = open(self.path, "rb")

    def _fail(self, why: str):
        raise MoteExportError(f"{self.path} is not a readable safetensors file ({why})")

    def _read_header(self, size: int) -> dict:
        if size < 8:
            self._fail(f"only {size} bytes")
        with open(self.path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= min(_MAX_HEADER, size - 8):
                self._fail(f"header length {n} does not fit a {size}-byte file")
            raw = fh.read(n)
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: "[[[[..."
            self._fail(f"header is not JSON: {str(exc)[:200]}")
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        self._data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        for name, e in header.items():
            self._check_entry(name, e)
        pos = 0  # as the safetensors library: the tensors tile the data, no overlap and no hole
        for name, e in sorted(header.items(), key=lambda kv: tuple(int(o) for o in kv[1]["data_offsets"])):
            begin, end = (int(o) for o in e["data_offsets"])
            if begin != pos:
                self._fail(f"{name!r} occupies bytes {begin}-{end} of the data, expected to start at {pos} "
                           "(tensors overlap or leave a hole)")
            pos = end
        return header

    def _check_entry(self, name: str, e) -> None:
        try:
            dtype = np.dtype(_DTYPES[e["dtype"]])
            shape = [int(d) for d in e["shape"]]
            begin, end = (int(o) for o in e["data_offsets"])
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: a JSON 1e400 is inf
            self._fail(f"bad header entry for {name!r}: {e!r}"[:300])
        if any(d < 0 for d in shape) or not 0 <= begin <= end:
            self._fail(f"bad shape or offsets for {name!r}")
        if math.prod(shape) * dtype.itemsize != end - begin:  # Python ints: an int64 product wraps, e.g. to 0
            self._fail(f"{name!r}: shape {shape} x {e['dtype']} does not match its {end - begin} bytes")

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> str:
        """The safetensors dtype name (F32, F16, BF16, ...)."""
        return self._entries[name]["dtype"]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a fresh array; BF16 comes back as exactly widened float32."""
        e = self._entries[name]
        begin, end = e["data_offsets"]
        dtype = np.dtype(_DTYPES[e["dtype"]])
        self._fh.seek(self._data_start + begin)
        arr = np.fromfile(self._fh, dtype=dtype, count=(end - begin) // dtype.itemsize).reshape(e["shape"])
        if e["dtype"] == "BF16":  # bf16 is the top half of an fp32: widening is exact
            wide = arr.astype(np.uint32)
            wide <<= 16  # in place: one float32-sized temporary, not two
            return wide.view(np.float32)
        return arr

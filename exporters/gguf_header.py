"""A GGUF file's header (keys, tensor infos, where the data starts) without reading its arrays.

gguf.GGUFReader would do, but it builds a Python object for every array item: on a 151936-token
vocabulary that is 3-6 s and ~300 MiB, paid by mote-run's memory check, its context lookup and
mote-bench, for keys none of them need. Arrays are skipped here (their length is kept as
"<key>#len"). Used by plan.gguf_resident, llama_run and bench_measure.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from .errors import MoteExportError
from .ternary import QUANT_SIZES, ggml_type

_FMT = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i", V.FLOAT32: "f",
        V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the row width
    qtype: T
    nbytes: int
    offset: int  # from GGUFHeader.data_start

    @property
    def rows(self) -> int:
        return math.prod(self.dims[1:])


@dataclass(frozen=True)
class GGUFHeader:
    fields: dict  # scalar and string keys; arrays as "<key>#len"
    tensors: list[TensorInfo]
    data_start: int  # file offset of the tensor data (the header rounded up to the alignment)

    def arch_key(self, name: str, default=None):
        """`<general.architecture>.<name>`, e.g. arch_key("context_length")."""
        return self.fields.get(f"{self.fields.get('general.architecture')}.{name}", default)


def read_gguf_header(path: str | Path, arrays=()) -> GGUFHeader:
    """The header of a GGUF file; MoteExportError (one line) when it is missing, truncated or not GGUF.
    The array keys named in `arrays` (e.g. "tokenizer.ggml.tokens") are read too, as lists."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise MoteExportError(f"{path} is not a readable GGUF file ({exc})") from None
    with f:
        def read(fm):
            size = struct.calcsize("<" + fm)
            data = f.read(size)
            if len(data) != size:
                raise MoteExportError(f"{path} is truncated: not a complete GGUF header")
            return struct.unpack("<" + fm, data)[0]

        def length() -> int:
            """A string's byte length, refused when it runs past the end of the file (a corrupt length
            would otherwise ask f.read for up to 2^64 bytes)."""
            n = read("Q")
            if n > size_of_file - f.tell():
                raise MoteExportError(f"{path} is truncated: not a complete GGUF header")
            return n

        def string() -> str:
            return f.read(length()).decode("utf-8", "replace")

        def skip(vtype) -> None:
            if vtype == V.STRING:
                f.seek(length(), 1)
            elif vtype == V.ARRAY:
                item, n = V(read("I")), read("Q")
                if item in _FMT:
                    f.seek(n * struct.calcsize(_FMT[item]), 1)
                else:
                    for _ in range(n):
                        skip(item)
            else:
                f.seek(struct.calcsize(_FMT[vtype]), 1)

        def array(item, n: int) -> list:
            if item == V.STRING:
                return [string() for _ in range(n)]
            if item not in _FMT:
                raise ValueError(f"array of {item.name} is not read")
            size = struct.calcsize(_FMT[item])
            data = f.read(n * size) if n * size <= size_of_file else b""
            if len(data) != n * size:
                raise MoteExportError(f"{path} is truncated: not a complete GGUF header")
            return list(struct.unpack(f"<{n}{_FMT[item]}", data))

        size_of_file = Path(path).stat().st_size
        if f.read(4) != b"GGUF":
            raise MoteExportError(f"{path} is not a GGUF file")
        try:
            read("I")  # version
            n_tensors, n_kv = read("Q"), read("Q")
            fields = {}
            for _ in range(n_kv):
                key, vtype = string(), V(read("I"))
                if vtype == V.STRING:
                    fields[key] = string()
                elif vtype == V.ARRAY and key in arrays:
                    item, n = V(read("I")), read("Q")
                    fields[key + "#len"] = n
                    fields[key] = array(item, n)
                elif vtype == V.ARRAY:
                    pos = f.tell()
                    read("I")
                    fields[key + "#len"] = read("Q")
                    f.seek(pos)
                    skip(vtype)
                else:
                    fields[key] = read(_FMT[vtype])
            tensors = []
            for _ in range(n_tensors):
                name = string()
                dims = tuple(read("Q") for _ in range(read("I")))
                qtype = ggml_type(read("I"))  # also Q2_0, which gguf-py 0.19 lacks
                block, size = QUANT_SIZES[qtype]
                tensors.append(TensorInfo(name, dims, qtype, math.prod(dims) // block * size, read("Q")))
            align = int(fields.get("general.alignment") or 32)
            data_start = -(-f.tell() // align) * align
        except (ValueError, KeyError, UnicodeDecodeError, MemoryError, OverflowError) as exc:
            raise MoteExportError(f"{path} is not a readable GGUF file ({exc})") from None
    return GGUFHeader(fields, tensors, data_start)

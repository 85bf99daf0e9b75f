"""A GGUF file memory-mapped for the mote engine: the project's header reader for the keys and tensor
infos, np.memmap for the data, and every tensor's type, shape, offset and size checked against the file
before anything reads it (a truncated or corrupt file is one error line, never a wild read).

`raw(name)` is the tensor's bytes as a read-only view of the mapping (no copy); `release(name)` tells the
kernel it may drop those pages from this process (after a repack, so two copies are never resident).
"""
from __future__ import annotations

import math
import mmap
from pathlib import Path

import numpy as np

from ..exporters.errors import MoteExportError
from ..exporters.gguf_header import TensorInfo, read_gguf_header
from ..exporters.ternary import QUANT_SIZES

# the arrays the engine reads (tokenizer, MoTE facts, image normalisation); other arrays stay skipped
ARRAY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
              "mote.moe_layers", "mote.layer_has_shared_expert", "mote.ternary_scales",
              "clip.vision.image_mean", "clip.vision.image_std", "clip.vision.feature_layer")


class GGUFModel:
    """Keys, tensor infos and mapped tensor bytes of one GGUF file (checked at open)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header = read_gguf_header(self.path, arrays=ARRAY_KEYS)
        self.fields = self.header.fields
        self.size = self.path.stat().st_size
        self.infos: dict[str, TensorInfo] = {}
        align = int(self.fields.get("general.alignment") or 32)
        for t in self.header.tensors:
            self._check(t, align)
            if t.name in self.infos:
                raise MoteExportError(f"{self.path}: tensor {t.name!r} appears twice; a corrupt GGUF file")
            self.infos[t.name] = t
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.infos.values() if t.nbytes)
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise MoteExportError(f"{self.path}: tensors {a!r} and {b!r} overlap; a corrupt GGUF file")
        self.mapping = np.memmap(self.path, dtype=np.uint8, mode="r") if self.size > self.header.data_start else None
        self.data = None if self.mapping is None else self.mapping.view(np.ndarray)  # plain views, no subclass

    def _check(self, t: TensorInfo, align: int) -> None:
        where = f"{self.path}: tensor {t.name!r}"
        block, size = QUANT_SIZES[t.qtype]
        if not t.dims or any(d <= 0 for d in t.dims) or t.dims[0] % block:
            raise MoteExportError(f"{where} has shape {list(t.dims)}, which {t.qtype.name} blocks of {block} "
                                  "do not tile; a corrupt GGUF file")
        if t.nbytes != math.prod(t.dims) // block * size:
            raise MoteExportError(f"{where}: size disagrees with its shape and type; a corrupt GGUF file")
        if t.offset % align:
            raise MoteExportError(f"{where}: offset {t.offset} is not aligned to {align}; a corrupt GGUF file")
        end = self.header.data_start + t.offset + t.nbytes
        if end > self.size:
            raise MoteExportError(f"{where} needs bytes up to {end} but the file has {self.size}: the file is "
                                  "truncated or the tensor offset is wrong")

    # ---- keys ------------------------------------------------------------------------------------------------

    @property
    def arch(self) -> str:
        return str(self.fields.get("general.architecture", ""))

    def key(self, name: str, default=None, required: bool = True):
        """A key's value; `required` keys missing are one error line."""
        v = self.fields.get(name, default)
        if v is None and required:
            raise MoteExportError(f"{self.path}: no key {name!r}; not a file this engine runs (written by mote-export?)")
        return v

    def arch_key(self, name: str, default=None, required: bool = True):
        return self.key(f"{self.arch}.{name}", default, required)

    # ---- tensors ---------------------------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def info(self, name: str) -> TensorInfo:
        t = self.infos.get(name)
        if t is None:
            raise MoteExportError(f"{self.path}: tensor {name!r} is missing")
        return t

    def shape(self, name: str) -> tuple[int, ...]:
        """numpy order (outer first): ggml's dims reversed."""
        return tuple(reversed(self.info(name).dims))

    def require(self, name: str, shape: tuple[int, ...]) -> TensorInfo:
        if self.shape(name) != tuple(shape):
            raise MoteExportError(f"{self.path}: tensor {name!r} has shape {list(self.shape(name))}, expected "
                                  f"{list(shape)} from the file's keys; a corrupt or foreign GGUF file")
        return self.info(name)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, a read-only view of the mapping."""
        t = self.info(name)
        start = self.header.data_start + t.offset
        return self.data[start:start + t.nbytes]

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process (they stay in the page cache); only whole pages
        inside the tensor, so a neighbour still in use is never touched."""
        t = self.info(name)
        mm = getattr(self.mapping, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = -(-(self.header.data_start + t.offset) // page) * page
        end = (self.header.data_start + t.offset + t.nbytes) // page * page
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.infos.values())

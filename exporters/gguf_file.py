"""Writing one GGUF file: temporary name, tensor infos first, data one tensor at a time, rename.

Shared by the LLM and the mmproj writers, so both stream (memory stays about one tensor) and
both leave nothing at the destination when anything fails.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from tqdm import tqdm

from .errors import MoteExportError


def check_output(out: Path, example: str) -> None:
    if not out.parent.is_dir():
        raise MoteExportError(f"output folder {str(out.parent)!r} does not exist")
    if out.is_dir():
        raise MoteExportError(f"output {str(out)!r} is a folder; give a file name like {example}")


@contextlib.contextmanager
def gguf_writer(out: Path, arch: str) -> Iterator[GGUFWriter]:
    """A GGUFWriter on a temporary file beside `out`, renamed to `out` when the block completes."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    wr = GGUFWriter(tmp, arch)
    try:
        yield wr
        wr.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a model file is not
        os.replace(tmp, out)
    except BaseException:
        wr.close()
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tensors(wr: GGUFWriter, infos: Iterable[tuple[str, tuple[int, ...], GGMLQuantizationType, int]],
                  data: Iterable[Callable[[], np.ndarray]], progress: bool = False, total: int | None = None) -> None:
    """Header and tensor infos (name, numpy shape, type, bytes), then each tensor's data as made."""
    for name, shape, qtype, nbytes in infos:
        wr.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_ti_data_to_file()
    for make in tqdm(data, desc="gguf", unit="tensor", total=total, disable=not progress):
        wr.write_tensor_data(np.ascontiguousarray(make()))


def mmproj_path(model: str | Path) -> Path:
    """Where mote-export writes a model's vision projector, and where every engine looks for it:
    model.gguf -> model-mmproj.gguf beside it."""
    p = Path(model)
    return p.with_name(f"{p.stem}-mmproj{p.suffix or '.gguf'}")

"""Writing one GGUF file: temporary name, tensor infos first, data one tensor at a time, rename.

Shared by the LLM and the mmproj writers, so both stream (memory stays about one tensor) and
both leave nothing at the destination when anything fails.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
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


def temporary_prefix(out: Path) -> str:
    """Name prefix of this process's temporaries for `out`: the host and pid say whose they are, so a later
    writer can remove the ones a killed writer left (remove_stale_temporaries)."""
    return f".{out.name}.{socket.gethostname()}-{os.getpid()}."


def remove_stale_temporaries(out: Path) -> None:
    """Temporaries beside `out` left by a writer of `out` on this host whose process is gone (SIGKILL, OOM
    kill): without this, each killed export leaves a hidden copy of (part of) the model behind. A live
    writer's (or another host's) are left alone."""
    # one leading dot, or more: mote-export stages the LLM under a temporary name, whose own writer's
    # temporaries then start with two
    pattern = re.compile(rf"\.+{re.escape(out.name)}\.{re.escape(socket.gethostname())}-(\d+)\..*\.tmp")
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and not _alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def gguf_writer(out: Path, arch: str) -> Iterator[GGUFWriter]:
    """A GGUFWriter on a temporary file beside `out`, renamed to `out` when the block completes."""
    remove_stale_temporaries(out)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(out), suffix=".tmp", dir=out.parent)
    os.close(fd)
    wr = GGUFWriter(tmp, arch)
    try:
        yield wr
        wr.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a model file is not
        os.replace(tmp, out)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # on a full disk, flushing what is buffered fails again
            wr.close()
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_failed(out, exc) from None
        raise


def write_failed(out: Path, exc: Exception) -> MoteExportError:
    """The one error line for a write that the file system stopped half-way (a full disk, a file-size limit,
    a vanished folder): an OSError, or a library's own error wrapping one (safetensors'). The writer has
    removed what it had written. It names the folder: `out` may be a staged temporary's name."""
    why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return MoteExportError(f"writing in {str(out.parent)!r} failed ({why}); nothing was written: free space there "
                           "(or raise the file-size limit) and run the command again")


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

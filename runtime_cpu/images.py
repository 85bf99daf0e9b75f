"""Reading an image the way the HF SigLIP processor does, for every engine: PIL, RGB, stretched to
the tower's size with bicubic resampling (no letterbox, no crop)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..exporters.errors import MoteExportError

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the processors' default "resample"


def load_rgb(path: str | Path, size: int | None, resample: int = BICUBIC) -> np.ndarray:
    """RGB uint8 [size, size, 3] (size None: as stored); an unreadable file is one clear error."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL's decoders raise OSError, SyntaxError ("broken PNG file"),
        # DecompressionBombError, EOFError, struct.error, ... for malformed files (fuzzed): each is this one line
        why = (str(exc).strip().splitlines() or [""])[0][:300]
        raise MoteExportError(f"cannot read image {str(path)!r} ({type(exc).__name__}: {why})") from None
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling(resample))
    return np.asarray(img, dtype=np.uint8)

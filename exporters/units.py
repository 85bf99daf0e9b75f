"""Sizes: one convention everywhere in this project, shared by the planner, every engine's
--memory-limit and mote-bench.

"GB", "G" and "GiB" all mean 2^30 bytes (likewise K/M/T = 2^10/2^20/2^40): the MoTE paper's "GB" are
GiB (DESIGN.md section 1), and RAM is sized in binary units. Give a plain byte count (e.g.
3400000000) for a decimal size. Output is in GiB / MiB.
"""
from __future__ import annotations

import re

from .errors import MoteExportError

GIB, MIB = 2 ** 30, 2 ** 20


_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _UNITS.update({_p: 1024 ** _i, _p + "b": 1024 ** _i, _p + "ib": 1024 ** _i})
SIZE_HELP = ("e.g. 3.4GB, 900MiB, 2GiB, 512M; GB = G = GiB = 2^30 bytes (binary, as the MoTE paper's GB "
             "and RAM sizes; give plain bytes for decimal)")


def parse_size(text: str, option: str = "size") -> int:
    """'3.4GB' / '900MiB' / '2GiB' / '512M' / '123456' -> bytes. All prefixes are binary (GB = GiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(3).lower()
    if not m or unit not in _UNITS:
        raise MoteExportError(f"{option} {text!r} is not a size; {SIZE_HELP}")
    value = float(m.group(1)) * 10 ** int(m.group(2) or 0) * _UNITS[unit]
    if not 0 < value < 2 ** 62:
        raise MoteExportError(f"{option} {text!r} must be a positive size; {SIZE_HELP}")
    return int(value)


def human(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / MIB:.2f} MiB"

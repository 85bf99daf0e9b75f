"""Memory readings of this process, the same for every engine."""
from __future__ import annotations

import resource
import sys
from pathlib import Path


def process_memory() -> dict:
    """VmHWM (peak RSS) / VmRSS / RssAnon / RssFile of this process in bytes, from /proc/self/status
    (Linux); elsewhere ru_maxrss as the peak. VmHWM, unlike ru_maxrss, starts afresh at exec: a run
    started from a large parent (pytest, mote-bench) reports its own peak, not the parent's."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        out = {k: int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile") if k in fields}
        if "VmHWM" in out:
            return out
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"VmHWM": peak if sys.platform == "darwin" else peak * 1024}  # bytes on macOS, KiB on Linux


def peak_rss_mib() -> float:
    return process_memory()["VmHWM"] / 2**20

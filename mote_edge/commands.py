"""Console entry points of the torch-side commands.

The base install (`pip install mote-edge`) has no torch: these commands then say in one line which
extra to install, instead of an ImportError traceback from deep inside. Importing this module
imports nothing heavy; the command's own module is imported only once its libraries are there.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

# extra -> the libraries it brings that the commands below need
EXTRAS = {"train": ("torch", "transformers", "safetensors"), "llama": ("llama_cpp",)}


def missing_extras(*extras: str) -> list[str]:
    return [e for e in extras if any(importlib.util.find_spec(m) is None for m in EXTRAS[e])]


def _run(prog: str, module: str, *extras: str):
    missing = missing_extras(*extras)
    if missing:
        libs = [m for e in missing for m in EXTRAS[e] if importlib.util.find_spec(m) is None]
        print(f"error: {prog} needs {', '.join(libs)}, which this install lacks; "
              f"pip install 'mote-edge[{','.join(missing)}]' (the README's command pins the versions)", file=sys.stderr)
        raise SystemExit(2)
    return importlib.import_module(module).main()


def upcycle():
    return _run("mote-upcycle", "mote_edge.upcycle", "train")


def train():
    return _run("mote-train", "mote_edge.train", "train")


def make_tiny():
    return _run("mote-make-tiny", "mote_edge.tiny", "train")


def evaluate():
    return _run("mote-eval", "mote_edge.evaluate", "train")


def demo():
    return _run("mote-demo", "mote_edge.demo", "train")  # llama.cpp only for its GGUF part (--no-gguf skips it)

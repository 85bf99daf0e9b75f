"""Check once that Hugging Face optimum's ORTModelForCausalLM runs the decoder of an ONNX export folder
(mote-export --format onnx) and generates PyTorch's greedy tokens. Not a test of the suite: optimum-onnx
pins transformers<4.58 (this project runs transformers 5), so it lives in its own virtual environment,
installed here from the package index (outside the project's lock).

    python tools/optimum_check.py [--ckpt mote_edge/assets/tiny/mote] [--folder DIR]
                                  [--venv /tmp/mote-optimum-venv] [--max-new-tokens 12]

In this (the project's) environment: export the checkpoint to a temporary folder (unless --folder is
given), compute PyTorch's greedy tokens and prompt logits for a few text prompts (the checkpoint's own
chat template), write them to a JSON file; make the venv (optimum-onnx + torch==2.13.0) if it is not
there; run this file inside it (--inner), which lays out the sibling folder optimum reads (model.onnx ->
decoder.onnx, model.onnx.data, config.json, generation_config.json, tokenizer files, as symlinks; the
export is not changed), loads it with ORTModelForCausalLM, generates greedily and compares. Prints one
JSON summary line; exit 0 when every prompt's tokens are equal, 1 when not, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["optimum-onnx[onnxruntime]", "torch==2.13.0"]  # optimum~=2.1, transformers<4.58, onnxruntime
LINKED = ("model.onnx.data", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "chat_template.jinja")
QUESTIONS = ["How many shapes are there?", "What colour is the square?", "Where is the circle?",
             "What shape is the red object?"]


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# ---- the project's side -------------------------------------------------------------------------------------


def reference(ckpt: Path, max_new: int) -> list[dict]:
    """PyTorch's greedy continuation (eos ignored, so every prompt runs max_new decode steps through the KV
    cache) and logits for each text prompt."""
    import torch
    from transformers import AutoTokenizer

    from mote_edge.checkpoint import load_model

    model, tok = load_model(ckpt), AutoTokenizer.from_pretrained(str(ckpt))
    out = []
    for q in QUESTIONS:
        text = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        with torch.no_grad():
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0]
            gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append({"question": q, "ids": ids, "tokens": gen[0, len(ids):].tolist(), "logits": logits.tolist()})
    return out


def make_venv(venv_dir: Path) -> Path:
    py = venv_dir / "bin" / "python"
    probe = [str(py), "-c", "from optimum.onnxruntime import ORTModelForCausalLM"]
    if py.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    print(f"optimum-check: creating {venv_dir} ({' '.join(PACKAGES)}) ...", file=sys.stderr, flush=True)
    if not py.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", *PACKAGES], check=True)
    return py


def outer(a) -> int:
    ckpt = Path(a.ckpt)
    if not (ckpt / "config.json").is_file():
        _fail(f"{ckpt} is not a checkpoint folder (no config.json)")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mote-optimum-") as tmp:
        folder = Path(a.folder) if a.folder else Path(tmp) / "onnx"
        if not a.folder:
            from mote_edge.exporters.onnx_folder import write_onnx_folder

            write_onnx_folder(ckpt, folder, progress=False)
        elif not (folder / "decoder.onnx").is_file():
            _fail(f"{folder} has no decoder.onnx; give a folder written by mote-export --format onnx")
        ref = Path(tmp) / "reference.json"
        ref.write_text(json.dumps(reference(ckpt, a.max_new_tokens)))
        py = make_venv(Path(a.venv))
        r = subprocess.run([str(py), __file__, "--inner", "--folder", str(folder), "--reference", str(ref),
                            "--max-new-tokens", str(a.max_new_tokens)], env=os.environ | {"PYTHONPATH": ""})
    print(f"optimum-check: {time.perf_counter() - t0:.1f} s in all", file=sys.stderr)
    return r.returncode


# ---- inside the optimum venv ----------------------------------------------------------------------------------


def inner(a) -> int:
    from importlib.metadata import version

    import numpy as np
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM

    folder, refs = Path(a.folder), json.loads(Path(a.reference).read_text())
    with tempfile.TemporaryDirectory(prefix="mote-optimum-model-") as tmp:
        view = Path(tmp)  # optimum's names, pointing at the export's files
        (view / "model.onnx").symlink_to((folder / "decoder.onnx").resolve())
        for name in LINKED:
            if (folder / name).is_file():
                (view / name).symlink_to((folder / name).resolve())
        model = ORTModelForCausalLM.from_pretrained(str(view), use_cache=True, use_io_binding=False,
                                                    provider="CPUExecutionProvider")
        rows = []
        for r in refs:
            x = torch.tensor([r["ids"]])
            with torch.no_grad():
                logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].numpy()
                gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=a.max_new_tokens,
                                     min_new_tokens=a.max_new_tokens, do_sample=False,
                                     pad_token_id=model.config.pad_token_id)
            got = gen[0, len(r["ids"]):].tolist()
            rows.append({"question": r["question"], "equal": got == r["tokens"], "optimum": got, "pytorch": r["tokens"],
                         "max_abs_logit_diff": float(np.abs(logits - np.asarray(r["logits"], np.float32)).max())})
    ok = all(row["equal"] for row in rows)
    print(json.dumps({"optimum-onnx": version("optimum-onnx"), "optimum": version("optimum"),
                      "onnxruntime": version("onnxruntime"), "transformers": transformers.__version__,
                      "torch": torch.__version__,
                      "equal": f"{sum(r['equal'] for r in rows)}/{len(rows)}",
                      "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows), "prompts": rows}))
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=str(ROOT / "mote_edge" / "assets" / "tiny" / "mote"))
    p.add_argument("--folder", default=None, help="an existing export folder (default: export --ckpt to a temporary one)")
    p.add_argument("--venv", default="/tmp/mote-optimum-venv")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    return inner(a) if a.inner else outer(a)


if __name__ == "__main__":
    raise SystemExit(main())

"""The mote engine (`mote-run --engine mote`): our own torch-free CPU runtime for the two GGUF files
mote-export writes, computing what MoTE was trained to compute (per-token int8 activations, integer
ternary dot products; runtime_cpu/kernels.py), in numpy.

Python API:
    m = MoteModel("model.gguf")                    # loads once (mmproj: <stem>-mmproj.gguf beside it)
    for piece in m.ask("cat.png", "What colour is the square?"):   # streamed answer (greedy by default)
        print(piece, end="")
    m.answer(image, question) -> str
    m.logits(ids) -> [T, vocab] teacher-forced logits of token ids (text only)
    m.image_embeddings(image) -> [n_image_tokens, hidden]
    m.report -> what was mapped, repacked and never touched, in bytes, with notices

Engine interface of the mote-run front: NAME, plan_memory, format_memory, Engine(...).stream(...).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..exporters.errors import MoteExportError
from ..exporters.gguf_file import mmproj_path
from ..exporters.units import human
from . import clib
from .gguf_model import GGUFModel
from .kernels import set_threads
from .llama_memory import default_n_ctx
from .llm import LLM, MoE, read_config
from .mote_memory import format_resident, plan_resident
from .records import evaluate_records
from .sampling import sample
from .generate import Answering, generate
from .tokenize import GGUFTokenizer
from .vision import Vision

IMAGE_PLACEHOLDER = "<image>"
# numpy's OpenBLAS threads (F32 matrices, attention) without --threads: one, since its spinning threads lose badly on a shared or
# oversubscribed machine (measured here under load: a [57, 256] x [256, 512] product 27 ms on 2 threads, 0.45 ms on 1)
DEFAULT_THREADS = 1


def _open(path: Path, what: str) -> GGUFModel:
    if not Path(path).is_file():
        hint = " (pass --mmproj, or export with mote-export, which writes <stem>-mmproj.gguf)" if what == "mmproj" else ""
        raise MoteExportError(f"{what} file {str(path)!r} does not exist{hint}")
    return GGUFModel(path)


class MoteModel(Answering):
    """An LLM GGUF + its mmproj, loaded once; answers many questions."""

    def __init__(self, model: str | Path, mmproj: str | Path | None = None, n_ctx: int | None = None,
                 threads: int | None = None, codes: str = "int8", vision: bool = True, kernel: str = "auto"):
        if codes not in ("int8", "f32"):
            raise MoteExportError(f"codes {codes!r}; accepted: int8, f32")
        set_threads(threads or DEFAULT_THREADS)
        if clib.available():  # the C kernels' pool: one thread per CPU unless told (as llama.cpp)
            clib.set_threads(threads or 0)
        model = Path(model)
        if model.is_dir():
            raise MoteExportError(f"model {str(model)!r} is a folder; the mote engine takes a model file")
        self.gguf = _open(model, "model")
        proj = Path(mmproj) if mmproj else mmproj_path(model)
        self.proj = _open(proj, "mmproj") if vision else None
        self.n_ctx = int(n_ctx or default_n_ctx(self.gguf.header))
        read_config(self.gguf)  # what the file is, before anything is decoded
        self.tokenizer = GGUFTokenizer(self.gguf)
        try:
            self.llm = LLM(self.gguf, codes, kernel)
            self.vision = Vision(self.proj, self.llm.loader.kernel) if self.proj is not None else None
            self.cache = self.llm.new_cache(self.n_ctx)
        except MemoryError:
            raise MoteExportError(f"not enough memory to load {model} with n_ctx {self.n_ctx}; see its plan with "
                                  "--memory-limit, lower --n-ctx or export smaller types") from None
        if self.vision is not None and self.vision.out_dim != self.llm.c.hidden:
            raise MoteExportError(f"{proj}: the projector gives {self.vision.out_dim}-wide embeddings; the LLM is "
                                  f"{self.llm.c.hidden} wide (not this model's mmproj)")
        self.report = self._report()
        self.kinds: list[str] = []  # the latest prompt's token kinds (text / image)
        self.route_kinds: list[str] = []  # kinds of the tokens whose routes are being recorded
        self.tracing = False  # route_kinds grows only while routes are traced (else a soak sees it as a leak)

    def _report(self) -> dict:
        loaders = [self.llm.loader] + ([self.vision.loader] if self.vision else [])
        by = {}
        for ld in loaders:
            for k, v in ld.repacked_by.items():
                by[k] = by.get(k, 0) + v
        return {"mapped_bytes": sum(ld.mapped for ld in loaders), "repacked_bytes": sum(ld.repacked for ld in loaders),
                "repacked_by": by, "untouched_bytes": self.llm.unused_bytes, "kv_cache_bytes": self.cache.nbytes,
                "notices": [n for ld in loaders for n in ld.notices], "variant": self.llm.c.variant,
                "kernel": self.llm.loader.kernel, "families": dict(self.llm.loader.families)}

    def format_report(self) -> str:
        r = self.report
        parts = ", ".join(f"{k} {human(v)}" for k, v in sorted(r["repacked_by"].items()))
        fams = ", ".join(f"{f} {shape}" for shape, f in sorted(r["families"].items()))
        kern = f"{r['kernel']} kernels" + (f" (ternary: {fams})" if fams else "")
        lines = [f"mote engine: {r['variant']}, {kern}; mapped in place {human(r['mapped_bytes'])}, repacked at load "
                 f"{human(r['repacked_bytes'])} ({parts or 'nothing'}), zero padding never read "
                 f"{human(r['untouched_bytes'])}, KV cache {human(r['kv_cache_bytes'])}"]
        return "\n".join(lines + [f"notice: {n}" for n in r["notices"]])

    # ---- the API --------------------------------------------------------------------------------------------

    def image_embeddings(self, image: str | Path) -> np.ndarray:
        if self.vision is None:
            raise MoteExportError("this model was loaded without its mmproj (vision=False)")
        return self.vision.encode(image)

    def logits(self, ids) -> np.ndarray:
        """Teacher-forced logits [T, vocab] of token ids from a fresh context (text only)."""
        h = self.llm.embed(ids)
        return self.llm.forward(h, self.llm.new_cache(max(len(h), 1)), 0, logits="all")

    def prompt(self, question: str) -> str:
        """The chat template's text for one user turn with an image before the question."""
        question = question.removeprefix(IMAGE_PLACEHOLDER).lstrip("\n")
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.tokenizer.render(msgs, add_generation_prompt=True)

    def prompt_embeddings(self, image: str | Path | None, question: str) -> np.ndarray:
        """Token embeddings of the rendered prompt with the image's embeddings where the template put
        its placeholder (as HF LLaVA's processor expands it and the model scatters the features)."""
        text = self.prompt(question)
        pieces = text.split(IMAGE_PLACEHOLDER)
        if image is None:
            if len(pieces) != 1:
                text = text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
            h = self.llm.embed(self.tokenizer.encode(text))
            self.kinds = ["text"] * len(h)
            return h
        if len(pieces) != 2:
            raise MoteExportError(f"the GGUF's chat template placed {len(pieces) - 1} '{IMAGE_PLACEHOLDER}' for one "
                                  "image; expected a LLaVA template that prints it for the image part")
        img = self.image_embeddings(image)
        before, after = (self.llm.embed(self.tokenizer.encode(p)) for p in pieces)
        self.kinds = ["text"] * len(before) + ["image"] * len(img) + ["text"] * len(after)
        return np.concatenate([before, img, after])

    # ---- routing maps (mote-run --routes) ---------------------------------------------------------------------

    def trace_routes(self, on: bool = True) -> None:
        """Record (on) or stop recording which experts every token chooses in every MoE layer."""
        self.route_kinds, self.tracing = [], on
        for layer in self.llm.layers:
            if isinstance(layer.ffn, MoE) and layer.ffn.router is not None:
                layer.ffn.trace = [] if on else None

    def routes(self) -> dict:
        """The choices recorded by stream() since trace_routes(): per MoE layer, per token (prompt, image
        and generated, in order) the top-k expert ids; with each token's kind (text / image; generated
        tokens are text)."""
        layers = {i: np.concatenate(l.ffn.trace) for i, l in enumerate(self.llm.layers)
                  if isinstance(l.ffn, MoE) and l.ffn.trace}
        kinds = self.route_kinds
        assert all(len(c) == len(kinds) for c in layers.values()), "routes recorded outside stream()"
        return {"format": "mote-routes/1", "experts": self.llm.c.experts, "top_k": self.llm.c.top_k,
                "variant": self.llm.c.variant, "kinds": kinds,
                "layers": {str(i): c.tolist() for i, c in layers.items()}}

    def stream(self, image: str | Path | None, question: str, max_tokens: int = 128, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0):
        """Yields (text piece, None) per generated token, then ("", "stop" | "length")."""
        rng = np.random.default_rng(seed)
        h = self.prompt_embeddings(image, question)
        if len(h) >= self.n_ctx:
            raise MoteExportError(f"the prompt ({len(h)} tokens with the image) does not fit n_ctx {self.n_ctx}")
        logits = self.llm.forward(h, self.cache, 0)
        if self.tracing:
            self.route_kinds += self.kinds

        def feed(tok: int, pos: int):
            if self.tracing:
                self.route_kinds.append("text")
            return self.llm.forward(self.llm.embed([tok]), self.cache, pos)

        yield from generate(logits, feed, lambda lg: sample(lg, temperature, top_k, top_p, rng), self.tokenizer,
                            len(h), self.n_ctx, max_tokens)


def evaluate(model: MoteModel, records: list[dict], images_dir: str | Path, max_tokens: int = 8,
             progress: bool = False) -> dict:
    """Held-out exact-match accuracy (%) with the greedy answers (as llama_engine.evaluate_gguf)."""
    return evaluate_records(lambda image, question: model.answer(image, question, max_tokens), records, images_dir,
                            progress)


# ---- the engine interface of the mote-run front --------------------------------------------------------------

NAME = "mote"


OPTIONS = ("kernel", "routes")  # mote-run flags only this engine takes


def plan_memory(model: Path, mmproj: Path, n_ctx: int | None, kernel: str = "auto", routes=None) -> dict:
    """This engine's resident estimate from the two headers (mote_memory.plan_resident); nothing is mapped."""
    return plan_resident(model, mmproj, n_ctx, kernel=kernel)


format_memory = format_resident


class Engine:
    """mote-run's view: one loaded model pair, answering a question about an image, streamed."""

    def __init__(self, model: Path, mmproj: Path, n_ctx: int | None = None, threads: int | None = None, seed: int = 0,
                 kernel: str = "auto", routes: str | None = None):
        if routes is not None:  # checked before loading: it is written only after the answer
            where = Path(routes)
            if not where.parent.is_dir() or where.is_dir():
                why = ("is a folder" if where.is_dir()
                       else f"names a file in {str(where.parent)!r}, which is not a folder")
                raise MoteExportError(f"--routes {str(routes)!r} {why}; give a file name like routes.json")
        self.model = MoteModel(model, mmproj, n_ctx=n_ctx, threads=threads, kernel=kernel)
        self.reported = False
        self.routes_path = routes
        if routes is not None:
            if self.model.llm.c.variant == "dense":
                raise MoteExportError(f"--routes: {model} is a dense model; it has no experts to route to")
            self.model.trace_routes()

    def stream(self, image: Path, prompt: str, max_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0):
        """The model's stream; the load report goes to stderr once the image and prompt were accepted (so
        bad input stays one error line)."""
        tokens = self.model.stream(image, prompt, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   seed=seed)
        first = next(tokens)
        if not self.reported:  # once per loaded model, not per question
            print(self.model.format_report(), file=sys.stderr)
            self.reported = True
        yield first
        yield from tokens
        if self.routes_path is not None:
            write_json(self.routes_path, self.model.routes())
            print(f"routes: {self.routes_path} (plot: mote-routes {self.routes_path} -o routes.png)", file=sys.stderr)


def write_json(path, obj) -> None:
    """Written to a temporary name and renamed: never a half-written file."""
    import json
    import os

    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def decode_tokens_per_s(model: MoteModel, n_tokens: int = 64, prompt: str = "How many shapes are there?") -> float:
    """Greedy decode speed with the KV cache filling up, one token per forward (text only), as
    llama_engine.decode_tokens_per_s measures llama.cpp: the tiny model's answers are too short to time."""
    import time

    ids = model.tokenizer.encode(prompt)
    cache = model.llm.new_cache(len(ids) + n_tokens + 1)
    logits = model.llm.forward(model.llm.embed(ids), cache, 0)
    t0 = time.perf_counter()
    for i in range(n_tokens):
        logits = model.llm.forward(model.llm.embed([int(np.argmax(logits))]), cache, len(ids) + i)
    return n_tokens / (time.perf_counter() - t0)

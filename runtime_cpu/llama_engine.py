"""The llama.cpp engine of mote-run (`--engine llama.cpp`): exported GGUF files (LLM + mmproj) run
through llama-cpp-python's multimodal (mtmd) chat handler on the CPU. No torch.

Library: `load`, `answer`, `image_embeddings`, `evaluate_gguf` (held-out LLaVA records), and the
engine interface the mote-run front uses (`Engine`, `plan_memory`, `format_memory`).
"""
from __future__ import annotations

import base64
import contextlib
import ctypes
import io
import time
from pathlib import Path

import numpy as np

from ..exporters.errors import MoteExportError
from ..exporters.gguf_file import mmproj_path
from ..exporters.gguf_header import read_gguf_header
from .images import load_rgb
from .records import IMAGE_PLACEHOLDER, evaluate_records, read_records
from .llama_memory import amx_in_build, default_n_ctx, format_resident, gguf_resident

# Greedy decoding exactly as transformers' generate(do_sample=False): llama-cpp-python's chat
# default repeat_penalty is 1.1, which would change answers.
GREEDY = dict(temperature=0.0, repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0)


def _llama_cpp():
    try:
        import llama_cpp
        from llama_cpp.llama_chat_format import MTMDChatHandler
    except ImportError:
        raise MoteExportError("the llama.cpp engine needs llama-cpp-python, which this install lacks; "
                              "pip install 'mote-edge[llama]'") from None
    return llama_cpp, MTMDChatHandler


# llama-cpp-python's log callback maps ggml's levels by an old enum (NONE, INFO, WARN, ERROR, DEBUG; ggml.h now
# has NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5), so with verbose=False it prints llama.cpp's warnings
# (e.g. "n_ctx_seq > n_ctx_train") and hides its errors. This engine installs its own when not verbose: nothing
# printed, warnings and errors kept, so a failed load's one error line can say what llama.cpp said.
_GGML_LOG_WARN, _GGML_LOG_ERROR, _GGML_LOG_CONT = 3, 4, 5
_logged: list[tuple[int, str]] = []  # (level, message) since the last load began
_quiet_log = None  # the ctypes callback, referenced here for as long as llama.cpp may call it


def _install_quiet_log(llama_cpp):
    global _quiet_log
    if _quiet_log is None:
        @llama_cpp.llama_log_callback
        def _quiet_log(level, text, user_data):
            if _GGML_LOG_WARN <= level < _GGML_LOG_CONT and text.strip() and len(_logged) < 100:
                _logged.append((level, text.decode("utf-8", "replace").strip()))
    llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))
    return _quiet_log


def _handler_class():
    _, MTMDChatHandler = _llama_cpp()

    class LlavaChatHandler(MTMDChatHandler):
        """MTMDChatHandler rendering images the way the model was trained.

        The stock handler turns an image part into a text part holding mtmd's media marker, so a
        template that prints "<image>\\n" for {"type": "image"} parts (HF LLaVA style, ours) renders
        "<__media__>question": the newline after the image is lost. Here image parts stay image
        parts and the template's placeholder becomes the marker, giving "<__media__>\\nquestion"."""

        def __init__(self, clip_model_path: str, verbose: bool = False):
            super().__init__(clip_model_path=clip_model_path, verbose=verbose)
            self.image_size = mmproj_image_size(clip_model_path)

        @staticmethod
        def _convert_content_part_for_template(part, media_marker):
            if isinstance(part, dict) and part.get("type") == "image_url":
                return {"type": "image"}
            return part

        def _postprocess_template_text(self, text, image_urls, media_marker):
            text = text.replace(IMAGE_PLACEHOLDER, media_marker)
            if text.count(media_marker) != len(image_urls):
                raise MoteExportError(f"the GGUF's chat template placed {text.count(media_marker)} "
                                      f"'{IMAGE_PLACEHOLDER}' for {len(image_urls)} image(s); expected a "
                                      "LLaVA template that prints it for each image part")
            return text

    return LlavaChatHandler


def mmproj_image_size(path: str | Path) -> int:
    """clip.vision.image_size of an mmproj file: images are resized to it here, exactly as the
    HF SigLIP processor does, so llama.cpp's own (letterboxing) resize never runs."""
    size = read_gguf_header(path).fields.get("clip.vision.image_size")
    if size is None:
        raise MoteExportError(f"{path} is not an mmproj file (no clip.vision.image_size); "
                              "expected the <stem>-mmproj.gguf written by mote-export")
    return int(size)


def load(model_path: str | Path, mmproj: str | Path | None = None, n_ctx: int | None = None,
         n_threads: int | None = None, seed: int = 0):
    """A llama_cpp.Llama with the multimodal handler for the model's mmproj file.

    n_ctx defaults to default_n_ctx: the trained context, at most 2048."""
    llama_cpp, _ = _llama_cpp()
    model, proj = Path(model_path), Path(mmproj) if mmproj else mmproj_path(model_path)
    for p, what in ((model, "model"), (proj, "mmproj")):
        if not p.is_file():
            hint = " (pass --mmproj, or export with mote-export, which writes <stem>-mmproj.gguf)" if p is proj else ""
            raise MoteExportError(f"{what} file {str(p)!r} does not exist{hint}")
    if n_ctx is None:
        n_ctx = default_n_ctx(read_gguf_header(model))
    handler = _handler_class()(clip_model_path=str(proj))
    # mtmd logs every image and text chunk to stderr through its own logger: route it to the quiet one
    from llama_cpp import mtmd_cpp

    quiet = _install_quiet_log(llama_cpp)
    mtmd_cpp.mtmd_log_set(quiet, None)
    mtmd_cpp.mtmd_helper_log_set(quiet, None)
    return llama(model, chat_handler=handler, n_ctx=n_ctx, n_threads=n_threads, seed=seed)


def llama(model_path: str | Path, **kwargs):
    """llama_cpp.Llama(model_path, verbose=False, **kwargs), loaded the way this engine always loads
    (see _no_extra_buffers_if_amx): every direct use of llama-cpp-python goes through here."""
    llama_cpp, _ = _llama_cpp()
    kwargs = {"verbose": False} | kwargs
    if not kwargs["verbose"]:
        _install_quiet_log(llama_cpp)
    _logged.clear()
    try:
        with _no_extra_buffers_if_amx(llama_cpp):
            return llama_cpp.Llama(model_path=str(model_path), **kwargs)
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file", "Failed to create llama_context"
        # the first error says why (later ones say "failed to load model"); else the last warning
        said = next((m for lvl, m in _logged if lvl == _GGML_LOG_ERROR), _logged[-1][1] if _logged else None)
        said = f" (llama.cpp: {said[:300]})" if said else ""
        raise MoteExportError(f"llama.cpp could not load {model_path}: {exc}{said}") from None


@contextlib.contextmanager
def _no_extra_buffers_if_amx(llama_cpp):
    """On a CPU with AMX (Intel Sapphire Rapids and later), llama-cpp-python's native build includes
    ggml's AMX backend, which repacks Q4_0/Q4_K/Q8_0/... weights into its own buffer and then segfaults
    in ggml_backend_amx_mul_mat on Q4_K (measured here on the tiny model; llama.cpp issue #20824, open).
    There the model loads without extra buffer types (llama.cpp's --no-repack, `use_extra_bufts`):
    weights are used as stored. llama-cpp-python does not expose the flag, so its default-params
    function is wrapped for the one load. llama_memory.repackable_types counts no copy in that case."""
    if not amx_in_build(llama_cpp.llama_print_system_info().decode()):
        yield
        return
    lib = llama_cpp.llama_cpp
    defaults = lib.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = defaults


def image_data_uri(path: str | Path, size: int) -> str:
    """The image as an RGB PNG data URI, stretched to size x size with bicubic resampling (SigLIP's
    processor); decoded by PIL so what llama.cpp sees equals what transformers saw."""
    from PIL import Image

    img = Image.fromarray(load_rgb(path, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages_for(llm, image_path: str | Path, question: str) -> list[dict]:
    """One user turn, the image before the text (a leading "<image>\\n" in `question` is dropped)."""
    question = question.removeprefix(IMAGE_PLACEHOLDER).lstrip("\n")
    uri = image_data_uri(image_path, llm.chat_handler.image_size)
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": question}]}]


def answer(llm, image_path: str | Path, question: str, max_tokens: int = 8) -> str:
    """Greedy answer to one question about one image."""
    out = llm.create_chat_completion(messages=messages_for(llm, image_path, question),
                                     max_tokens=max_tokens, **GREEDY)
    return out["choices"][0]["message"]["content"] or ""


def image_embeddings(llm, image_path: str | Path) -> np.ndarray:
    """The projector's output for one image, [n_image_tokens, n_embd], read back through mtmd
    (for parity checks against transformers' get_image_features)."""
    from llama_cpp._utils import suppress_stdout_stderr  # what the handler itself uses to keep mtmd quiet

    h = llm.chat_handler
    h._init_mtmd_context(llm)
    mt, ctx = h._mtmd_cpp, h.mtmd_ctx
    png = base64.b64decode(image_data_uri(image_path, h.image_size).split(",", 1)[1])
    bitmap = h._create_bitmap_from_bytes(png)
    chunks = mt.mtmd_input_chunks_init()
    try:
        with suppress_stdout_stderr(disable=llm.verbose):
            marker = mt.mtmd_default_marker()
            text = mt.mtmd_input_text()
            text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
            if mt.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mt.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) != 0:
                raise RuntimeError("mtmd_tokenize failed")
            image = [c for c in (mt.mtmd_input_chunks_get(chunks, i) for i in range(mt.mtmd_input_chunks_size(chunks)))
                     if mt.mtmd_input_chunk_get_type(c) == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            if len(image) != 1 or mt.mtmd_encode_chunk(ctx, image[0]) != 0:
                raise RuntimeError("mtmd could not encode the image")
            n = mt.mtmd_input_chunk_get_n_tokens(image[0])
        ptr = mt.mtmd_get_output_embd(ctx)
        return np.ctypeslib.as_array(ptr, shape=(n * llm.n_embd(),)).reshape(n, -1).copy()
    finally:
        mt.mtmd_input_chunks_free(chunks)
        mt.mtmd_bitmap_free(bitmap)


def evaluate_gguf(gguf_path: str | Path, data_json: str | Path, images_dir: str | Path,
                  limit: int | None = None, mmproj: str | Path | None = None,
                  n_threads: int | None = None, max_tokens: int = 8, progress: bool = False) -> dict:
    """Held-out exact-match accuracy (%) of an exported model, overall and per question_type, with
    the answers; the same scoring as mote_edge.evaluate.accuracy."""
    records = read_records(data_json, limit)
    llm = load(gguf_path, mmproj, n_threads=n_threads)
    return evaluate_records(lambda image, question: answer(llm, image, question, max_tokens), records, images_dir,
                            progress)


def decode_tokens_per_s(llm, n_tokens: int = 64, prompt: str = "How many shapes are there?") -> float:
    """Greedy decode speed with the KV cache filling up, one token per llama.cpp eval (text only):
    the tiny model ends its answers after a token or two, too few to time."""
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return n_tokens / (time.perf_counter() - t0)


# ---- the engine interface of the mote-run front --------------------------------------------------------------

NAME = "llama.cpp"


def plan_memory(model: Path, mmproj: Path, n_ctx: int | None) -> dict:
    """Planned resident memory of this engine for these files (llama_memory.gguf_resident), with the CPU
    flags of the installed llama.cpp build deciding what it repacks."""
    llama_cpp, _ = _llama_cpp()
    return gguf_resident(model, mmproj, n_ctx, llama_cpp.llama_print_system_info().decode())


format_memory = format_resident


class Engine:
    """One loaded model pair, answering questions about images, streamed."""

    def __init__(self, model: Path, mmproj: Path, n_ctx: int | None = None, threads: int | None = None, seed: int = 0):
        self.llm = load(model, mmproj, n_ctx=n_ctx, n_threads=threads, seed=seed)

    def stream(self, image: Path, prompt: str, max_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0):
        """Yields (text piece, finish reason or None); greedy at temperature 0. top_k 0 = all tokens."""
        sampling = GREEDY | {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        for chunk in self.llm.create_chat_completion(messages=messages_for(self.llm, image, prompt),
                                                     max_tokens=max_tokens, stream=True, seed=seed, **sampling):
            choice = chunk["choices"][0]
            yield choice["delta"].get("content") or "", choice.get("finish_reason")

"""The onnxruntime engine of mote-run (`--engine onnxruntime`): an ONNX export folder (mote-export --format
onnx) run with stock onnxruntime on the CPU. No torch.

  image  -> PIL, RGB, bicubic stretch to image_size, rescale, normalise (as the HF SigLIP processor)
         -> vision.onnx -> image features
  prompt -> the checkpoint's chat template (jinja2; the image part first, then the text: "<image>\\n"
            + question), "<image>" expanded to image_seq_length image tokens (as LlavaProcessor),
            tokenizer.json (tokenizers) -> ids -> embedding.onnx (image features in place) -> decoder.onnx
  decode -> greedy by default (or temperature / top-k / top-p sampling), one token per decoder call
            with the KV cache (present.* fed back as past_key_values.*), token ids straight into the
            decoder's input_ids, until an end-of-turn token, --max-tokens or n_ctx.

Library: `Session` (load + answer + stream), `evaluate_onnx` (held-out LLaVA records), and the engine
interface of the mote-run front (`resolve_inputs`, `plan_memory`, `format_memory`, `Engine`).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..exporters.errors import MoteExportError
from ..exporters.onnx_files import DEFAULT_FILES, count, folder_config, image_processor, read_json
from .chat_template import render_chat
from .images import BICUBIC, load_rgb
from .records import IMAGE_PLACEHOLDER, evaluate_records, read_records
from .sampling import sample

NAME = "onnxruntime"
MODELS = ("vision", "embedding", "decoder")
RUNTIME_BYTES = 160 * 2 ** 20  # python + onnxruntime + numpy + tokenizers + PIL, measured ~120 MiB


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MoteExportError("the onnxruntime engine needs onnxruntime, which this install lacks; "
                              "pip install 'mote-edge[onnx]'") from None
    return onnxruntime


def _nodes(graph):
    """Every node of a graph and of the graphs in its nodes' attributes (If / Loop / Scan bodies)."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _nodes(g)


def check_graph(path: Path) -> None:
    """Refuse, before onnxruntime parses it, a graph that makes onnxruntime's loader abort the process (a C++
    assertion, no exception to catch): a Split whose num_outputs is below its outputs' count indexes past its
    split sizes in ONNX's shape inference (onnx 1.23 and the copy in onnxruntime 1.32; onnx/onnx#8255 fixes
    it upstream). Found by the fuzz program (a changed int attribute). A file onnx cannot parse is left to
    onnxruntime, whose error says why."""
    try:
        import onnx
    except ImportError:
        raise MoteExportError("the onnxruntime engine needs onnx (to check a graph before onnxruntime loads it), "
                              "which this install lacks; pip install 'mote-edge[onnx]'") from None
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and onnx's own; onnxruntime reports the file next
        return
    for node in [*_nodes(model.graph), *(n for f in model.functions for n in f.node)]:
        n_out = next((a.i for a in node.attribute if a.name == "num_outputs"), None)
        if node.op_type == "Split" and n_out is not None and n_out < len(node.output):
            raise MoteExportError(f"{path}: Split node {node.name!r} has num_outputs {n_out} for {len(node.output)} "
                                  "outputs (onnxruntime would abort on it); export the folder again with "
                                  "mote-export --format onnx")


def _run(session, what: str, feed: dict) -> list:
    """session.run; onnxruntime's own exception types (a graph that loads but does not run) are one line."""
    try:
        return session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types; all mean a broken export
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MoteExportError(f"onnxruntime could not run {what} ({first[:300]}); export the folder again with "
                              "mote-export --format onnx") from None


def _shaped(a, shape: tuple, what: str) -> np.ndarray:
    """An output of a graph that ran, checked against the shape the engine reads (None: any size): a graph whose
    attributes were changed may run and give another shape, which would fail later as an IndexError."""
    if not isinstance(a, np.ndarray) or a.ndim != len(shape) or any(w is not None and d != w for d, w in zip(a.shape, shape)):
        got = list(getattr(a, "shape", []))
        raise MoteExportError(f"{what} gave an output of shape {got}; expected {[d if d is not None else 'N' for d in shape]}; "
                              "export the folder again with mote-export --format onnx")
    return a


def resolve_inputs(model_arg: str | Path, mmproj_arg: str | Path | None) -> tuple[Path, None]:
    """The export folder mote-run was pointed at (the folder, or any file inside it), checked."""
    if mmproj_arg is not None:
        raise MoteExportError("--mmproj is for GGUF models; an ONNX export folder holds its own vision.onnx")
    p = Path(model_arg)
    folder = p.parent if p.is_file() else p
    if not folder.is_dir():
        raise MoteExportError(f"ONNX export folder {str(p)!r} does not exist; expected the folder written by "
                              "mote-export --format onnx")
    if not (folder / "config.json").is_file():
        hint = (f"; {p.name} is a GGUF model: run it with --engine llama.cpp, mote or cuda" if p.suffix == ".gguf"
                else "; expected the folder written by mote-export --format onnx")
        raise MoteExportError(f"{folder} is not an ONNX export folder (no config.json){hint}")
    info = folder_config(folder)["mote_onnx"]
    files = DEFAULT_FILES | (info.get("files") or {})
    for key in (*MODELS, "data"):
        if not (folder / files[key]).is_file():
            raise MoteExportError(f"{folder} lacks {files[key]}; export the folder again with "
                                  "mote-export --format onnx")
    if not (folder / "tokenizer.json").is_file():
        raise MoteExportError(f"{folder} lacks tokenizer.json; export the folder again with mote-export --format onnx")
    return folder, None


def default_n_ctx(cfg: dict) -> int:
    """The trained context, at most 2048 (the llama.cpp engine's rule)."""
    return min(int(cfg.get("max_position_embeddings") or 2048), 2048)  # null: Qwen2's config allows it


# ---- memory plan ---------------------------------------------------------------------------------------------


def plan_memory(model: Path, mmproj: Path | None, n_ctx: int | None) -> dict:
    """Resident memory this engine plans for the folder, before anything is loaded:
      weights  the external-data file + a second copy of the token embedding (embedding.onnx and
               decoder.onnx each load it) + the graphs, x 1.1 for onnxruntime's arenas and packing
               (measured at the Qwen2.5-0.5B shape: RSS after loading = data file + embedding + 64 MiB);
               an export that records `loaded_bytes` (the initializers of each model as onnxruntime holds
               them: f16 weights widened to fp32 by their folded Cast, a quantized embedding once per
               model, exporters/onnx_graph.loaded_bytes) counts those instead of the file + embedding;
      KV       fp32 for n_ctx, twice (each step concatenates past and new into a fresh present);
      compute  a prefill of n_ctx tokens: hidden / FFN widths of every expert, the attention scores,
               one row of logits;
      runtime  python, onnxruntime, numpy, tokenizers, PIL."""
    folder = Path(model)
    cfg = folder_config(folder)
    info = cfg["mote_onnx"]
    files = DEFAULT_FILES | (info.get("files") or {})
    n_ctx = n_ctx or default_n_ctx(cfg)
    data = (folder / files["data"]).stat().st_size
    protos = sum((folder / files[k]).stat().st_size for k in MODELS)
    H, L, V = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["vocab_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads, D = int(cfg.get("num_key_value_heads") or heads), H // heads
    F = int(cfg["intermediate_size"])
    E = int((cfg.get("mote") or {}).get("num_experts", 1) or 1)
    loaded = info.get("loaded_bytes")
    weights = 1.1 * ((sum(loaded.values()) if isinstance(loaded, dict) else data + V * H * 4) + protos)
    kv = 2 * (2 * L * kv_heads * D * n_ctx * 4)
    compute = 4 * n_ctx * (8 * H + 3 * (E + 1) * F) + 2 * 4 * heads * n_ctx * n_ctx + 4 * V
    total = weights + kv + compute + RUNTIME_BYTES
    return {"total_bytes": int(total), "n_ctx": int(n_ctx), "weights_bytes": int(weights), "file_bytes": data + protos,
            "kv_bytes": int(kv), "compute_bytes": int(compute), "runtime_bytes": RUNTIME_BYTES}


def format_memory(plan: dict) -> str:
    mib = 2 ** 20
    return (f"{plan['total_bytes'] / mib:.0f} MiB = weights {plan['weights_bytes'] / mib:.0f} (files "
            f"{plan['file_bytes'] / mib:.0f}, the embedding twice, x 1.1) + KV cache "
            f"{plan['kv_bytes'] / mib:.0f} + compute {plan['compute_bytes'] / mib:.0f} + runtime "
            f"{plan['runtime_bytes'] / mib:.0f}, n_ctx {plan['n_ctx']}")


# ---- text and image front end ---------------------------------------------------------------------------------


def _chat_template(folder: Path) -> str:
    if (folder / "chat_template.jinja").is_file():
        try:
            return (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MoteExportError(f"{folder}/chat_template.jinja is not readable UTF-8 text ({exc})") from None
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            t = read_json(folder / name).get("chat_template")
            if isinstance(t, str):
                return t
    raise MoteExportError(f"{folder} has no chat template (chat_template.jinja, or 'chat_template' in "
                          "tokenizer_config.json); export the folder again from a checkpoint that has one")


def pixel_values(path: str | Path, proc: dict, size: int) -> np.ndarray:
    """[1, 3, size, size] float32 exactly as transformers' (PIL-based) SiglipImageProcessor makes it:
    bicubic resize, rescale in float64 then float32, (x - mean) / std in float32."""
    x = load_rgb(path, size if proc.get("do_resize", True) else None, int(proc.get("resample", BICUBIC)))
    if proc.get("do_rescale", True):
        x = (x.astype(np.float64) * float(proc.get("rescale_factor", 1 / 255))).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if proc.get("do_normalize", True):
        mean, std = (np.asarray(proc.get(k, [0.5] * 3), dtype=np.float32) for k in ("image_mean", "image_std"))
        x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


class Session:
    """One loaded export folder: three onnxruntime sessions, the tokenizer, the chat template, the processor."""

    def __init__(self, folder: str | Path, n_ctx: int | None = None, threads: int | None = None,
                 profile_prefix: str | None = None):
        """profile_prefix: run the decoder under onnxruntime's profiler, its trace written to
        PREFIX_<time>.json by `sessions["decoder"].end_profiling()` (mote-bench --ort-profile)."""
        ort = _ort()
        from tokenizers import Tokenizer

        self.folder, _ = resolve_inputs(folder, None)
        cfg = folder_config(self.folder)
        info = cfg["mote_onnx"]
        files = DEFAULT_FILES | (info.get("files") or {})
        self.n_ctx = n_ctx or default_n_ctx(cfg)
        self.layers, self.hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
        self.vocab = int(cfg["vocab_size"])
        heads = int(cfg["num_attention_heads"])
        self.kv_heads, self.head_dim = int(cfg.get("num_key_value_heads") or heads), self.hidden // heads
        self.image_size, self.n_image = int(info["image_size"]), int(info["image_seq_length"])
        self.image_token_id = int(info["image_token_index"])
        self.sessions = {}
        for key in MODELS:
            path = self.folder / files[key]
            so = ort.SessionOptions()
            so.log_severity_level = 3
            if threads:
                so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            if profile_prefix and key == "decoder":  # the decoder alone: the report times decode steps
                so.enable_profiling, so.profile_file_prefix = True, str(profile_prefix)
            check_graph(path)
            try:
                self.sessions[key] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own exception types; all mean a broken file
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise MoteExportError(f"onnxruntime could not load {path} ({first[:300]}); export the folder "
                                      "again with mote-export --format onnx") from None
        inputs = self.sessions["vision"].get_inputs()  # pixel_values' sides are static in an export; a symbol: any
        side = list(getattr(inputs[0], "shape", None) or [])[-2:] if inputs else []
        if any(isinstance(d, int) and d != self.image_size for d in side):
            raise MoteExportError(f"{self.folder}: config.json's image_size {self.image_size} is not the size "
                                  f"vision.onnx takes ({side}); export the folder again with mote-export --format onnx")
        try:
            self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        except Exception as exc:
            raise MoteExportError(f"{self.folder}/tokenizer.json is not a readable tokenizer ({exc})") from None
        self.template = _chat_template(self.folder)
        self.proc = image_processor(self.folder)
        self.image_token = self.proc.get("image_token") or self.tokenizer.id_to_token(self.image_token_id)
        tok_cfg = read_json(self.folder / "tokenizer_config.json") if (self.folder / "tokenizer_config.json").is_file() else {}
        self.special = {k: tok_cfg.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                        if isinstance(tok_cfg.get(k), str)}
        gen = read_json(self.folder / "generation_config.json") if (self.folder / "generation_config.json").is_file() else {}
        eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if not all(count(e, 0) for e in eos):
            raise MoteExportError(f"{self.folder}: eos_token_id {eos!r} is not a token id or a list of them")
        self.eos = set(eos)

    # -- pieces -----------------------------------------------------------------------------------------------------

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of one user turn (image first, then the question) with the assistant prompt, the image
        placeholder expanded to the image tokens."""
        if self.n_image >= self.n_ctx:  # before the placeholder is expanded to that many tokens
            raise MoteExportError(f"the image takes {self.n_image} tokens (image_seq_length), more than n_ctx "
                                  f"{self.n_ctx} allows; raise --n-ctx")
        question = question.removeprefix(IMAGE_PLACEHOLDER).lstrip("\n")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = render_chat(self.template, messages, **self.special)
        if text.count(self.image_token) != 1:
            raise MoteExportError(f"the chat template placed {text.count(self.image_token)} '{self.image_token}' for "
                                  "1 image; expected a LLaVA template that prints it for each image part")
        text = text.replace(self.image_token, self.image_token * self.n_image)
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def image_features(self, image: str | Path) -> np.ndarray:
        pix = pixel_values(image, self.proc, self.image_size)
        return _shaped(_run(self.sessions["vision"], "vision.onnx", {"pixel_values": pix})[0], (None, self.hidden),
                       "vision.onnx (image features)")

    def _empty_past(self) -> list[np.ndarray]:
        z = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        return [z] * (2 * self.layers)

    def _decode(self, past: list[np.ndarray], total: int, positions: np.ndarray, **x) -> tuple[np.ndarray, list]:
        feed = {"attention_mask": np.ones((1, total), np.int64), "position_ids": positions[None]} | x
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        out = _run(self.sessions["decoder"], "decoder.onnx", feed)
        if len(out) != 1 + 2 * self.layers:
            raise MoteExportError(f"decoder.onnx gave {len(out)} outputs; expected logits and {2 * self.layers} KV "
                                  "tensors; export the folder again with mote-export --format onnx")
        kv = (1, self.kv_heads, total, self.head_dim)
        return (_shaped(out[0], (1, None, self.vocab), "decoder.onnx (logits)"),
                [_shaped(t, kv, "decoder.onnx (present key / value)") for t in out[1:]])

    def prefill(self, ids: list[int], feats: np.ndarray) -> tuple[np.ndarray, list]:
        """One decoder call over a whole prompt (embedding.onnx puts `feats` in place of its image tokens): the
        last position's logits [1, 1, vocab] and the KV cache (generate_ids; mote-bench times it apart)."""
        if feats.shape[0] != ids.count(self.image_token_id):
            raise MoteExportError(f"vision.onnx gave {feats.shape[0]} image features for "
                                  f"{ids.count(self.image_token_id)} image tokens")
        embeds = _shaped(_run(self.sessions["embedding"], "embedding.onnx", {"input_ids": np.asarray([ids], np.int64),
                                                                             "image_features": feats})[0],
                         (1, len(ids), self.hidden), "embedding.onnx (inputs_embeds)")
        return self._decode(self._empty_past(), len(ids), np.arange(len(ids), dtype=np.int64), inputs_embeds=embeds,
                            input_ids=np.zeros((1, 0), np.int64), logits_to_keep=np.array(1, np.int64))

    def step(self, past: list, total: int, token: int) -> tuple[np.ndarray, list]:
        """One decode step: `token` at position `total` (the KV cache holds `total` positions before it)."""
        return self._decode(past, total + 1, np.array([total], np.int64), input_ids=np.array([[token]], np.int64))

    def generate_ids(self, image: str | Path, question: str, max_tokens: int, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int = 0):
        """Yields (token id, finish reason or None) per generated token; a final (None, reason) at the end."""
        ids = self.prompt_ids(question)
        if len(ids) >= self.n_ctx:
            raise MoteExportError(f"the prompt takes {len(ids)} tokens, more than n_ctx {self.n_ctx} allows; "
                                  "raise --n-ctx")
        logits, past = self.prefill(ids, self.image_features(image))
        total = len(ids)
        rng = np.random.default_rng(seed)
        for n in range(max_tokens):
            tok = sample(logits[0, -1], temperature, top_k, top_p, rng)
            if tok in self.eos:
                yield None, "stop"
                return
            yield tok, None
            if n + 1 == max_tokens or total >= self.n_ctx:
                break
            logits, past = self.step(past, total, tok)
            total += 1
        yield None, "length"

    def stream(self, image: str | Path, question: str, max_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0):
        """Yields (text piece, finish reason or None), the text decoded incrementally (special tokens skipped)."""
        out, shown = [], ""
        for tok, why in self.generate_ids(image, question, max_tokens, temperature, top_k, top_p, seed):
            if tok is None:
                yield "", why
                return
            out.append(tok)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
                continue
            yield text[len(shown):], None
            shown = text

    def answer(self, image: str | Path, question: str, max_tokens: int = 8) -> str:
        return "".join(piece for piece, _ in self.stream(image, question, max_tokens))

    def decode_tokens_per_s(self, n_tokens: int = 64, prompt: str = "How many shapes are there?") -> float:
        """Greedy decode speed with the KV cache filling up, one token per decoder call (text only: the tiny
        model ends its answers after a token or two, too few to time)."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        n_tokens = min(n_tokens, self.n_ctx - len(ids) - 1)
        logits, past = self._decode(self._empty_past(), len(ids), np.arange(len(ids), dtype=np.int64),
                                    input_ids=np.asarray([ids], np.int64), logits_to_keep=np.array(1, np.int64))
        total = len(ids)
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            tok = int(np.argmax(logits[0, -1]))
            logits, past = self._decode(past, total + 1, np.array([total], np.int64),
                                        input_ids=np.array([[tok]], np.int64))
            total += 1
        return n_tokens / (time.perf_counter() - t0)


def evaluate_onnx(folder: str | Path, data_json: str | Path, images_dir: str | Path, limit: int | None = None,
                  threads: int | None = None, max_tokens: int = 8, progress: bool = False) -> dict:
    """Held-out exact-match accuracy (%) of an ONNX export, overall and per question_type, with the answers;
    the same scoring as mote_edge.evaluate.accuracy."""
    records = read_records(data_json, limit)
    s = Session(folder, threads=threads)
    return evaluate_records(lambda image, question: s.answer(image, question, max_tokens), records, images_dir,
                            progress)


# ---- the engine interface of the mote-run front ---------------------------------------------------------------


class Engine:
    """One loaded export folder answering questions about images, streamed (mote-run's interface)."""

    def __init__(self, model: Path, mmproj: Path | None = None, n_ctx: int | None = None, threads: int | None = None,
                 seed: int = 0):
        self.session = Session(model, n_ctx=n_ctx, threads=threads)

    def stream(self, image: Path, prompt: str, max_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0):
        yield from self.session.stream(image, prompt, max_tokens, temperature, top_k, top_p, seed)

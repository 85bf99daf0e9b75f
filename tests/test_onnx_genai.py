"""onnxruntime-genai runs an ONNX export folder as a vision-language model (exporters/onnx_genai.py): the
genai decoder form, genai's image preprocessing against the HF processor, and greedy tokens with an image
(and text only) equal to our onnxruntime engine's and PyTorch's on held-out questions of the tiny task."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

og = pytest.importorskip("onnxruntime_genai")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from PIL import Image  # noqa: E402

from mote_edge.checkpoint import load_model  # noqa: E402
from mote_edge.evaluate import split_record  # noqa: E402
from mote_edge.exporters.errors import MoteExportError  # noqa: E402
from mote_edge.exporters.onnx_folder import write_onnx_folder  # noqa: E402
from mote_edge.exporters.onnx_genai import (CONFIG_FILE, DECODER_FILE, GENAI_TYPE, PROCESSOR_FILE,  # noqa: E402
                                             processor_config, write_genai_files)
from mote_edge.runtime_cpu import onnx_engine  # noqa: E402
from mote_edge.tiny import ASSETS  # noqa: E402

TINY = ASSETS / "mote"
DATA = ASSETS / "data"
# genai's Rescale multiplies in float32, the HF processor in float64 and rounds: one float32 ulp near 1
PIXEL_TOL = 2.4e-7
N_QUESTIONS = 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    if not (TINY / "model.safetensors").is_file():
        pytest.skip("embedded tiny checkpoint not built")
    out = tmp_path_factory.mktemp("genai") / "tiny"
    write_onnx_folder(TINY, out, progress=False)
    made = write_genai_files(out)  # idempotent: the folder writer may already have written them
    assert made["mode"] == f"vision-language ({GENAI_TYPE})"
    return out


@pytest.fixture(scope="module")
def genai(folder):
    m = og.Model(str(folder))
    return m, m.create_multimodal_processor(), og.Tokenizer(m)


@pytest.fixture(scope="module")
def torch_side():
    from transformers import AutoProcessor

    return load_model(TINY), AutoProcessor.from_pretrained(str(TINY))


def _eos(folder: Path) -> set[int]:
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    return set(eos if isinstance(eos, list) else [eos])


def genai_pixels(proc, path) -> np.ndarray:
    """pixel_values from genai's processor; the prompt only has to hold one gemma3 image marker."""
    return proc("<start_of_image>", images=og.Images.open(str(path)))["pixel_values"].as_numpy()


def genai_inputs(tokenizer, folder: Path, prompt: str, pixels: np.ndarray):
    """LLaVA's prompt for genai: the rendered chat prompt with its one image token ("<image>", the folder's
    processor_config.json) repeated image_seq_length times (config.json), tokenised by genai's own
    tokenizer, and the image as pixel_values."""
    info = json.loads((folder / "config.json").read_text())["mote_onnx"]
    image = json.loads((folder / "processor_config.json").read_text())["image_token"]
    assert prompt.count(image) == 1
    ids = list(tokenizer.encode(prompt.replace(image, image * info["image_seq_length"])))
    inputs = og.NamedTensors()
    inputs["input_ids"] = np.asarray([ids], np.int32)
    inputs["pixel_values"] = pixels
    inputs["num_image_tokens"] = np.array([ids.count(info["image_token_index"])], np.int64)
    return ids, inputs


def genai_generate(model, eos: set[int], n_prompt: int, max_new: int, inputs=None, ids=None) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=n_prompt + max_new, do_sample=False)
    gen = og.Generator(model, params)
    if inputs is not None:
        gen.set_inputs(inputs)
    else:
        gen.append_tokens(np.asarray(ids, np.int32))
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    return _strip(got, eos)


def _strip(tokens: list[int], eos: set[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


# ---- the files ------------------------------------------------------------------------------------------------


def test_genai_files_and_decoder_form(folder):
    cfg = json.loads((folder / CONFIG_FILE).read_text())["model"]
    assert cfg["type"] == GENAI_TYPE and cfg["decoder"]["filename"] == DECODER_FILE
    assert cfg["vision"]["config_filename"] == PROCESSOR_FILE and (folder / PROCESSOR_FILE).is_file()
    onnx.checker.check_model(str(folder / DECODER_FILE), full_check=True)
    ours = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    g = onnx.load(str(folder / DECODER_FILE), load_external_data=False)
    assert [n.op_type for n in g.graph.node] == [n.op_type for n in ours.graph.node]
    external = {t.name for t in g.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert external == {t.name for t in ours.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert {e.value for t in g.graph.initializer for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    assert (folder / DECODER_FILE).stat().st_size < 2 * (folder / "decoder.onnx").stat().st_size  # no weights
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = {k: ort.InferenceSession(str(folder / f), so) for k, f in (("ours", "decoder.onnx"), ("genai", DECODER_FILE))}
    assert "inputs_embeds" in [i.name for i in s["genai"].get_inputs()]
    assert "input_ids" not in [i.name for i in s["genai"].get_inputs()]
    info = json.loads((folder / "config.json").read_text())
    layers, kvh = info["num_hidden_layers"], info["num_key_value_heads"]
    d = info["hidden_size"] // info["num_attention_heads"]
    x = np.random.default_rng(0).standard_normal((1, 5, info["hidden_size"])).astype(np.float32)
    feed = {"inputs_embeds": x, "attention_mask": np.ones((1, 5), np.int64), "position_ids": np.arange(5)[None]}
    feed |= {f"past_key_values.{i}.{kv}": np.zeros((1, kvh, 0, d), np.float32) for i in range(layers)
             for kv in ("key", "value")}
    want = s["ours"].run(None, feed | {"input_ids": np.zeros((1, 0), np.int64)})
    got = s["genai"].run(None, feed)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))  # the same graph, bit for bit


# ---- preprocessing ---------------------------------------------------------------------------------------------


def _images(tmp: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    src = Image.open(DATA / "images" / "test_00000.png").convert("RGB")
    smooth = np.stack([*np.meshgrid(np.linspace(0, 255, 120), np.linspace(0, 255, 90)), np.full((90, 120), 128.0)], -1)
    made = {"noise_200x150.png": Image.fromarray(rng.integers(0, 256, (150, 200, 3), np.uint8)),
            "noise_31x40.png": Image.fromarray(rng.integers(0, 256, (40, 31, 3), np.uint8)),
            "shapes_97x61.png": src.resize((97, 61)), "shapes_480.png": src.resize((480, 480)),
            "gray.png": src.convert("L"), "rgba.png": src.convert("RGBA"), "palette.png": src.convert("P"),
            "smooth_444.jpg": Image.fromarray(smooth.astype(np.uint8)), "gray.jpg": src.resize((64, 80)).convert("L")}
    out = {"test_00000.png": DATA / "images" / "test_00000.png"}
    for name, im in made.items():
        out[name] = tmp / name
        im.save(out[name], **({"subsampling": 0, "quality": 95} if name.endswith(".jpg") else {}))
    return out


def test_pixel_values_equal_the_hf_processor(genai, torch_side, tmp_path):
    """PNG (any size, grey, RGBA, palette): genai's pixel_values are the HF SigLIP processor's within one
    float32 ulp (onnxruntime-extensions' Resize is PIL's resampling code). JPEG is decoded by a different
    decoder than PIL's: without chroma subsampling a few pixels differ by one grey level (2/255 after the
    0.5/0.5 normalisation); a colour JPEG with 4:2:0 subsampling (PIL's default) more (chroma upsampled
    otherwise): printed, not asserted."""
    _, proc, _ = genai
    hf = torch_side[1].image_processor
    worst = {}
    for name, path in _images(tmp_path).items():
        want = hf(images=[Image.open(path).convert("RGB")], return_tensors="np")["pixel_values"]
        got = genai_pixels(proc, path)
        assert got.shape == want.shape == (1, 3, 48, 48) and got.dtype == np.float32
        worst[name] = float(np.abs(got - want).max())
    subsampled = tmp_path / "smooth_420.jpg"
    Image.open(tmp_path / "smooth_444.jpg").save(subsampled)
    d420 = np.abs(genai_pixels(proc, subsampled) - hf(images=[Image.open(subsampled).convert("RGB")],
                                                      return_tensors="np")["pixel_values"])
    print(f"genai vs HF pixel_values max |d| per image: {worst}; colour JPEG 4:2:0: max {d420.max():.3g} "
          f"mean {d420.mean():.3g}")
    assert max(v for k, v in worst.items() if k.endswith(".png")) <= PIXEL_TOL, worst
    assert max(v for k, v in worst.items() if k.endswith(".jpg")) <= 2 / 255 + PIXEL_TOL, worst


@pytest.mark.parametrize("resample", [1, 2, 3])
def test_every_pil_resample_mode_maps_to_the_same_resize(resample, folder, tmp_path):
    """LANCZOS, BILINEAR, BICUBIC (PIL codes 1-3): the checkpoint's resample setting is honoured."""
    from transformers import SiglipImageProcessor

    d = tmp_path / "f"
    d.mkdir()
    for p in folder.iterdir():
        if p.name != PROCESSOR_FILE:
            (d / p.name).symlink_to(p)
    settings = json.loads((TINY / "processor_config.json").read_text())["image_processor"] | {"resample": resample}
    (d / PROCESSOR_FILE).write_text(json.dumps(processor_config(settings, 48)))
    proc = og.Model(str(d)).create_multimodal_processor()
    hf = SiglipImageProcessor(**{k: v for k, v in settings.items() if k != "image_processor_type"})
    images = _images(tmp_path)
    for name in ("noise_200x150.png", "shapes_97x61.png"):
        path = images[name]
        want = hf(images=[Image.open(path).convert("RGB")], return_tensors="np")["pixel_values"]
        assert np.abs(genai_pixels(proc, path) - want).max() <= PIXEL_TOL, name


@pytest.mark.parametrize("resample", [0, 4, 5])
def test_resample_without_an_ortx_resize_is_one_error(resample):
    with pytest.raises(MoteExportError, match=f"resample {resample} has no onnxruntime-extensions Resize"):
        processor_config({"resample": resample}, 48)


# ---- generation ------------------------------------------------------------------------------------------------


def test_greedy_tokens_with_an_image_equal_the_engine_and_pytorch(folder, genai, torch_side):
    """Held-out questions: genai (its processor's pixel_values, its tokenizer, our LLaVA prompt) generates
    the onnxruntime engine's greedy tokens, whose text is PyTorch's answer (mote_edge.evaluate, batched);
    its prompt ids are the HF processor's."""
    from mote_edge.evaluate import generate_answers

    model, proc, tok = genai
    torch_model, hf = torch_side
    eos = _eos(folder)
    engine = onnx_engine.Session(folder, threads=2)
    records = json.loads((DATA / "test.json").read_text())[:N_QUESTIONS]
    ref = generate_answers(torch_model, hf, records, DATA / "images", progress=False)
    rows = []
    for r, want in zip(records, ref):
        path = DATA / "images" / r["image"]
        prompt = hf.tokenizer.apply_chat_template(split_record(r)[0], add_generation_prompt=True, tokenize=False)
        ids, inputs = genai_inputs(tok, folder, prompt, genai_pixels(proc, path))
        assert ids == hf(images=[Image.open(path).convert("RGB")], text=[prompt])["input_ids"][0]
        got = genai_generate(model, eos, len(ids), 8, inputs=inputs)
        mine = [t for t, _ in engine.generate_ids(path, r["conversations"][0]["value"], 8) if t is not None]
        rows.append((got, mine, hf.tokenizer.decode(got, skip_special_tokens=True), want))
    assert len({tuple(g) for g, *_ in rows}) > 1  # the answers depend on the image
    same = sum(g == m and text == want for g, m, text, want in rows)
    print(f"onnxruntime-genai ({GENAI_TYPE}) with the image: {same}/{len(rows)} greedy answers equal to the engine's "
          f"tokens and PyTorch's text; first {rows[:3]}")
    assert same == len(rows), rows


def test_text_only_prompt_through_the_vlm_folder(folder, genai, torch_side):
    model, _, tok = genai
    torch_model, hf = torch_side
    eos = _eos(folder)
    for q in ("How many shapes are there?", "What colour is the square?"):
        prompt = f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
        ids = list(tok.encode(prompt))
        assert ids == hf.tokenizer.encode(prompt, add_special_tokens=False)
        got = genai_generate(model, eos, len(ids), 6, ids=ids)
        with torch.no_grad():
            ref = torch_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                       eos_token_id=sorted(eos), pad_token_id=hf.tokenizer.pad_token_id)
        assert got == _strip(ref[0, len(ids):].tolist(), eos), (q, got)


def test_unreproducible_preprocessing_falls_back_to_text_only(folder, genai, tmp_path):
    """resample NEAREST (no onnxruntime-extensions Resize runs it): the text-only form, which generates what
    the vision-language form does on a text prompt."""
    d = tmp_path / "f"
    shutil.copytree(folder, d)
    proc = json.loads((d / "processor_config.json").read_text())
    proc["image_processor"]["resample"] = 0
    (d / "processor_config.json").write_text(json.dumps(proc))
    made = write_genai_files(d)
    assert made["mode"].startswith("text only (image processor resample 0") and set(made["files"]) == {CONFIG_FILE}
    assert not (d / DECODER_FILE).exists() and not (d / PROCESSOR_FILE).exists()
    cfg = json.loads((d / CONFIG_FILE).read_text())["model"]
    assert cfg["type"] == "qwen2" and cfg["decoder"]["filename"] == "decoder.onnx" and "vision" not in cfg
    m = og.Model(str(d))
    with pytest.raises(Exception, match="not a registered multi-modal model type"):
        m.create_multimodal_processor()
    tok, eos = og.Tokenizer(m), _eos(d)
    ids = list(tok.encode("<|im_start|>user\nWhere is the circle?<|im_end|>\n<|im_start|>assistant\n"))
    assert genai_generate(m, eos, len(ids), 6, ids=ids) == genai_generate(genai[0], eos, len(ids), 6, ids=ids)


def test_folder_without_the_overridable_embeds_is_one_error(folder, tmp_path):
    d = tmp_path / "f"
    shutil.copytree(folder, d)
    shutil.copy2(d / DECODER_FILE, d / "decoder.onnx")  # already the genai form: no overridable inputs_embeds
    with pytest.raises(MoteExportError, match="no overridable inputs_embeds"):
        write_genai_files(d)

"""Fuzzed readers (issue 12), the quick run: hypothesis draws structure-aware mutations of the real files the
project writes (benchmarks/fuzz.py: the tiny checkpoint exported to GGUF + mmproj and to an ONNX folder, its
model.safetensors, the tiny task's pictures) and each case runs in a worker subprocess bounded in time
(alarm + kill) and memory (RLIMIT_AS). The property: the reader loads it (the model and ONNX readers also
answer a question) or raises MoteExportError with one line; another exception type, a crash, a hang or a
MemoryError fails the test with the case hypothesis shrank it to. derandomize=True: the same cases every run.

The long run is a program: python -m mote_edge.benchmarks.fuzz --cases 100000 --reader all -o OUT."""
from __future__ import annotations

import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from mote_edge.benchmarks import fuzz

CASES = {"gguf": 250, "image": 200, "safetensors": 120, "model": 150, "onnx": 50}  # about 50 s in all here


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory) -> fuzz.Fuzzer:
    return fuzz.Fuzzer(fuzz.make_corpus(tmp_path_factory.mktemp("fuzz-corpus")))


@pytest.fixture(scope="module")
def worker():
    w = fuzz.Worker()
    yield w
    w.close()


def _run(fuzzer, worker, reader: str, plan, where: Path) -> dict:
    d = Path(tempfile.mkdtemp(dir=where))
    try:
        case = fuzzer.build(reader, plan, d)
        return worker.run(case, fuzz.DEFAULT_TIMEOUT[reader])
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("reader", fuzz.READERS)
def test_every_mutated_file_loads_or_is_one_error_line(reader, fuzzer, worker, tmp_path):
    seen = {"ok": 0, "rejected": 0}

    @settings(max_examples=CASES[reader], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(fuzzer.strategy(reader))
    def case(plan):
        res = _run(fuzzer, worker, reader, plan, tmp_path)
        assert res["outcome"] in ("ok", "rejected"), f"{reader}: {res}"
        seen[res["outcome"]] += 1

    case()
    # the mutations are neither all harmless nor all fatal: both outcomes occur
    assert seen["rejected"] > 0 and seen["ok"] > 0, seen


def test_unmutated_files_load_and_answer(fuzzer, worker):
    """The corpus itself passes every reader: a rejection in the fuzz run is the mutation's doing."""
    c = fuzzer.c
    cases = [{"reader": "gguf", "path": str(c.llm)}, {"reader": "gguf", "path": str(c.mmproj)},
             {"reader": "safetensors", "path": str(c.safetensors)},
             {"reader": "onnx", "path": str(c.onnx), "image": str(c.question_image)}]
    cases += [{"reader": "image", "path": str(p)} for _, p in c.images]
    cases += [{"reader": "model", "model": str(c.llm), "mmproj": str(c.mmproj), "kernel": k,
               "image": str(c.question_image)} for k in fuzz.KERNELS]
    for case in cases:
        res = worker.run(case, 60)
        assert res["outcome"] == "ok", (case, res)
    assert res["message"] == "'red'"  # the tiny model's answer about its first test picture


def test_the_worker_reports_crashes_hangs_and_memory(tmp_path):
    """The harness can fail: a segfault, a loop and a huge allocation in a case are each reported as such
    (not as a pass, not as a dead driver), and the worker comes back for the next case."""
    w = fuzz.Worker(memory_mb=1024)
    try:
        crash = w.run({"reader": "selftest", "do": "segfault"}, 20)
        assert crash["outcome"] == "crash" and "SIGSEGV" in crash["type"], crash
        hang = w.run({"reader": "selftest", "do": "loop"}, 2, wait=5)
        assert hang["outcome"] == "hang", hang
        hang = w.run({"reader": "selftest", "do": "c-loop"}, 2, wait=3)  # a C call no alarm interrupts: killed
        assert hang["outcome"] == "hang" and hang["type"] == "killed", hang
        mem = w.run({"reader": "selftest", "do": "allocate"}, 20)
        assert mem["outcome"] == "memory", mem
        ok = w.run({"reader": "image", "path": str(fuzz._assets() / "data" / "images" / "test_00000.png")}, 20)
        assert ok["outcome"] == "ok", ok
    finally:
        w.close()


# Findings of the long runs, fixed in the readers: each input class stays one error line.
def _png_with(chunk_type: bytes, body: bytes) -> bytes:
    png = (fuzz._assets() / "data" / "images" / "test_00000.png").read_bytes()
    c = struct.pack(">I", len(body)) + chunk_type + body
    import zlib

    return png[:33] + c + struct.pack(">I", zlib.crc32(c[4:])) + png[33:]


FIXED = [
    # safetensors_np: a header nested 100000 deep (json's RecursionError)
    ("safetensors", ([], ("nest", 100000))),
    # safetensors_np: a dimension past int64 (np.prod's OverflowError), and one whose int64 product wraps to 0
    ("safetensors", ([("shape", 0, "@@LIT:[100000000000000000000000000000]")], None)),
    ("safetensors", ([("shape", 0, [2**32, 2**32]), ("offsets", 0, [0, 0], 0)], None)),
    # safetensors_np: an offset of 1e400 (inf: int()'s OverflowError)
    ("safetensors", ([("offsets", 0, "@@LIT:[0, 1e400]", 0)], None)),
]


@pytest.mark.parametrize("reader,plan", FIXED)
def test_fixed_findings_stay_one_error_line(reader, plan, fuzzer, worker, tmp_path):
    res = _run(fuzzer, worker, reader, plan, tmp_path)
    assert res["outcome"] == "rejected", res


@pytest.mark.parametrize("chunk,body", [(b"iCCP", b"x\x00\xe1\xb3"), (b"IHDR", b"\x00" * 13)])
def test_broken_png_chunks_are_one_error_line(chunk, body, worker, tmp_path):
    """images.load_rgb: PIL raises SyntaxError for a broken chunk; DecompressionBombError for a huge IHDR."""
    p = tmp_path / "bad.png"
    p.write_bytes(_png_with(chunk, body))
    res = worker.run({"reader": "image", "path": str(p)}, 20)
    assert res["outcome"] == "rejected" and "cannot read image" in res["message"], res
    bomb = bytearray((fuzz._assets() / "data" / "images" / "test_00000.png").read_bytes())
    struct.pack_into(">II", bomb, 16, 2**20, 2**20)
    fuzz._crc(bomb, 8)  # a valid IHDR chunk: PIL reads the size
    p.write_bytes(bytes(bomb))
    res = worker.run({"reader": "image", "path": str(p)}, 20)
    assert res["outcome"] == "rejected" and "DecompressionBomb" in res["message"], res


def _onnx_case(fuzzer, tmp_path, edit) -> dict:
    """The corpus' ONNX folder (hard links) with one file replaced by edit(name -> bytes) -> {name: bytes}."""
    folder = tmp_path / "onnx"
    folder.mkdir()
    changed = edit({n: b for n, b in fuzzer.onnx.files.items()})
    for name, data in fuzzer.onnx.files.items():
        if name in changed:
            (folder / name).write_bytes(changed[name])
        else:
            fuzz._link(fuzzer.c.onnx / name, folder / name)
    return {"reader": "onnx", "path": str(folder), "image": str(fuzzer.c.question_image)}


def _json_edit(name: str, change):
    def edit(files):
        import json

        obj = json.loads(files[name])
        change(obj)
        return {name: json.dumps(obj).encode()}

    return edit


ONNX_FIXED = {
    # onnx_files.folder_config: a size missing (KeyError) or a list where file names go (TypeError)
    "no hidden_size": _json_edit("config.json", lambda c: c.pop("hidden_size")),
    "files not names": _json_edit("config.json", lambda c: c["mote_onnx"].update(files=[1, 2])),
    "string size": _json_edit("config.json", lambda c: c.update(num_hidden_layers="4")),
    # onnx_files._check_processor / onnx_engine eos: values pixel_values and the sampler read
    "zero std": _json_edit("processor_config.json", lambda c: c["image_processor"].update(image_std=[0, 0, 0])),
    "eos list of lists": _json_edit("generation_config.json", lambda c: c.update(eos_token_id=[[1]])),
    # onnx_engine._chat_template: a template that is not UTF-8 (UnicodeDecodeError)
    "template bytes": lambda files: {"chat_template.jinja": b"\xff" + files["chat_template.jinja"]},
}


@pytest.mark.parametrize("name", sorted(ONNX_FIXED))
def test_fixed_onnx_folder_findings_are_one_error_line(name, fuzzer, worker, tmp_path):
    res = worker.run(_onnx_case(fuzzer, tmp_path, ONNX_FIXED[name]), 60)
    assert res["outcome"] == "rejected", res


def test_a_graph_that_loads_but_does_not_run_is_one_error_line(fuzzer, worker, tmp_path):
    """onnx_engine._run: embedding.onnx with an input dimension changed loads, then onnxruntime's run raises
    its own InvalidArgument: one line naming the graph."""
    plan = [("proto", "embedding.onnx", "input_dims", 386, 2829)]
    res = _run(fuzzer, worker, "onnx", plan, tmp_path)
    assert res["outcome"] == "rejected" and "could not run embedding.onnx" in res["message"], res


@pytest.mark.parametrize("plan, says", [
    # the long run, seed 17: config.json / processor_config.json values the folder loader passed on unchecked
    ([("json", "config.json", 714, "set", 2**63)], "image_seq_length"),  # '<image>' * 2**63: OverflowError
    # an int std or mean: np.isfinite's TypeError; float32 holds 1e30, so these now answer (None: "ok")
    ([("json", "processor_config.json", 3346, "set", 10**30)], None),
    ([("json", "processor_config.json", 942, "set", 10**30), ("json", "genai_config.json", 362879, "set", True)],
     None),
    ([("json", "config.json", 13, "set", None)], None),  # max_position_embeddings null (Qwen2 allows it): int(None)
    ([("json", "config.json", 2812, "set", "x" * 5000)], "file names"),  # a data file name: ENAMETOOLONG in stat
    ([("json", "config.json", 18, "set", 2**63), ("proto", "embedding.onnx", "function_drop", 413, 471406)],
     "num_key_value_heads"),  # 2**63 KV heads: np.zeros' ValueError
    ([("json", "config.json", 127, "set", 10**30), ("text", "genai_config.json", "nonutf8", 0.07764260032390013, 49)],
     "image_size"),  # a 10**30-pixel side: PIL's OverflowError in resize
])
def test_fixed_onnx_config_findings_are_one_error_line(plan, says, fuzzer, worker, tmp_path):
    res = _run(fuzzer, worker, "onnx", plan, tmp_path)
    assert res["outcome"] == ("ok" if says is None else "rejected"), res
    assert says is None or says in res["message"], res


def test_a_split_that_aborts_onnxruntime_is_one_error_line(fuzzer, worker, tmp_path):
    """onnx_engine.check_graph: decoder.onnx with a Split's num_outputs changed to 1 for its 2 outputs (seed 18)
    made onnxruntime's loader abort the process (SIGABRT in ONNX's shape inference); now refused first."""
    plan = [("json", "generation_config.json", 72, "wrongtop", 0), ("proto", "decoder.onnx", "attr_int", 999999, 8249)]
    res = _run(fuzzer, worker, "onnx", plan, tmp_path)
    assert res["outcome"] == "rejected" and "Split node" in res["message"] and "decoder.onnx" in res["message"], res


@pytest.mark.parametrize("std, outcome", [(1, "ok"), (10**38, "ok"), (10**39, "rejected"), (-(10**400), "rejected")],
                         ids=["1", "1e38", "1e39", "-1e400"])
def test_an_int_std_runs_where_float32_holds_it(std, outcome, fuzzer, worker, tmp_path):
    """The int std fix: an int is a number (float32 takes it), past float32's range it is one error line."""
    res = worker.run(_onnx_case(fuzzer, tmp_path, _json_edit(
        "processor_config.json", lambda c: c["image_processor"].update(image_std=std))), 60)
    assert res["outcome"] == outcome, res


def test_onnx_mutation_flip_after_truncation_to_nothing():
    """A plan that truncates decoder.onnx to 0 bytes and then flips a byte of it (a case the fuzz program drew)
    leaves the empty file, rather than failing in the harness."""
    from types import SimpleNamespace

    L = SimpleNamespace(files={"decoder.onnx": b"\x08\x07onnx-bytes"})
    plan = [("protoraw", "decoder.onnx", "truncate", 1e-9, 53), ("protoraw", "decoder.onnx", "flip", 0.05, 122)]
    assert fuzz.apply_onnx(L, plan) == {"decoder.onnx": b""}
    assert fuzz.apply_onnx(L, plan[1:]) == {"decoder.onnx": bytes([0x08 ^ 122]) + b"\x07onnx-bytes"}


def test_a_graph_that_runs_with_the_wrong_output_shape_is_one_error_line(fuzzer, worker, tmp_path):
    """onnx_engine._shaped: decoder.onnx with an int attribute changed (a case the fuzz program drew, seed 16)
    loads and runs but gives logits of another rank; one line naming the graph, not an IndexError."""
    plan = [("remove", "genai_processor_config.json"), ("proto", "decoder.onnx", "attr_int", 3957, 1000000),
            ("proto", "vision.onnx", "attr_int", 1000000, 273)]
    res = _run(fuzzer, worker, "onnx", plan, tmp_path)
    assert res["outcome"] == "rejected" and "decoder.onnx" in res["message"], res


@pytest.mark.parametrize("plan, says", [
    # mote_memory.plan_resident: a routed-expert tensor's dims rewritten to fewer than 3 (IndexError)
    ((("llm", ([("u64", 10039, ("rel", "*2")), ("u64", 12233, ("abs", 4294967295)), ("offset", 54, 5, 4096)],
               ("truncate", 460928, 0))), "mad"), "has shape []"),  # (now caught as no dims at all)
    # tokenize.GGUFTokenizer: a special token id past the vocabulary (IndexError)
    ((("llm", ([("scalar", 22, 32768), ("scalar", 22, 32768), ("u32", 11855, ("rel", "*2"))], None)), "mad"),
     "expected a token id"),
    # seed 17, 100,000 cases: mote_memory.plan_resident on a tensor whose dims are [] (IndexError) or hold a
    # 0 (ZeroDivisionError, two places), and an architecture name with a newline in it (a two-line message)
    ((("llm", ([("scalar", 17, 255), ("scalar", 21, 2147483647), ("f32", 2049, 3.4e+38)], ("delete", 12209, 24))),
      "numpy"), "has shape []"),
    ((("llm", ([("u64", 11199, ("abs", 0)), ("ttype", 64, 15), ("u64", 11199, ("abs", 0))], None)), "lut"),
     "needs every dimension at least 1"),
    ((("llm", ([("f32", 1957, float("inf")), ("u64", 12087, ("abs", 0)), ("f32", 1861, float("nan"))], None)), "mad"),
     "needs every dimension at least 1"),
    ((("llm", ([("flip", 68, 57), ("flip", 68, 1)], ("drop_kv", 20))), "lut"), "'qwen\\nmoe'"),
], ids=["expert dims", "token id", "no dims", "zero dim", "zero K", "newline in arch"])
def test_fixed_model_findings_are_one_error_line(plan, says, fuzzer, worker, tmp_path):
    """Cases the fuzz program drew (reader model; seeds 16 and 17) that raised IndexError / ZeroDivisionError
    or gave a two-line message: now one error line."""
    res = _run(fuzzer, worker, "model", plan, tmp_path)
    assert res["outcome"] == "rejected" and says in res["message"], res


def test_a_case_built_by_the_worker_equals_one_built_by_the_driver(fuzzer, worker, tmp_path):
    """The long run sends plans and the worker writes the files (build_request): the same plan gives the same
    files and the same outcome either way, and a plan the harness cannot apply is a finding, not a dead worker."""
    plan = ("llm", ([], ("truncate", fuzzer.llm_layout.boundaries[3], 0)))
    driver = _run(fuzzer, worker, "gguf", plan, tmp_path)
    d = tmp_path / "by-worker"
    res = worker.run(fuzz.build_request(fuzzer, "gguf", plan, d, 20), 20)
    assert res["outcome"] == driver["outcome"] == "rejected", (res, driver)
    assert res["case"]["path"] == str(d / "model.gguf")
    assert Path(res["message"].split()[0]).name == Path(driver["message"].split()[0]).name == "model.gguf"
    assert res["message"].split(maxsplit=1)[1] == driver["message"].split(maxsplit=1)[1], (res, driver)
    assert (d / "model.gguf").read_bytes() == fuzz.apply_gguf(fuzzer.llm_bytes, fuzzer.llm_layout, plan[1])
    bad = worker.run(fuzz.build_request(fuzzer, "gguf", ("llm", "not a plan"), tmp_path / "bad", 20), 20)
    assert bad["outcome"] == "error" and bad["type"].startswith("harness"), bad
    assert worker.run(fuzz.build_request(fuzzer, "gguf", plan, d, 20), 20)["outcome"] == "rejected"  # still serving


def test_the_int_attribute_sweep_sets_each_attribute_to_each_value(fuzzer, tmp_path):
    """--sweep int-attrs: one plan per (int attribute, INTS value) of each graph; a plan sets exactly that
    attribute to that value and leaves every other one as exported; the plans run through the same workers
    (a slice of them here: the whole sweep is 1,056 cases, about 3 minutes on 2 workers)."""
    import onnx

    def ints(raw):
        m = onnx.load_model_from_string(raw)
        return [a.i for n in m.graph.node for a in n.attribute if a.type == onnx.AttributeProto.INT]

    plans = fuzz.int_attr_plans(fuzzer.onnx)
    counts = {g: len(ints(fuzzer.onnx.files[g])) for g in fuzz.GRAPHS}
    assert len(plans) == sum(counts.values()) * len(fuzz.INTS) and all(counts.values()), counts
    assert len({repr(p) for p in plans}) == len(plans)
    for plan in plans[:: 37]:
        (_, g, _, i, j), = plan
        before, after = ints(fuzzer.onnx.files[g]), ints(fuzz.apply_onnx(fuzzer.onnx, plan)[g])
        assert after[i] == fuzz.INTS[j] and after[:i] + after[i + 1:] == before[:i] + before[i + 1:], (g, i, j)
    res = fuzz.fuzz_reader(fuzzer, "onnx", 0, tmp_path / "out", 1, 0, 60, fuzz.DEFAULT_MEMORY_MB, tmp_path,
                           progress=False, plans=plans[:6])
    assert res["cases"] == 6 and res["crashes"] + res["hangs"] + res["other_exceptions"] == 0, res

"""mote-plan, mote-export --memory-budget and mote-run --memory-limit: planner arithmetic by hand, planner
bytes == the exported GGUF's bytes tensor by tensor, the paper's expert-memory figures, the budget search,
size parsing, and the resident-memory refusal / peak-RSS check on the embedded tiny model."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from mote_edge.exporters import cli
from mote_edge.exporters import plan as P
from mote_edge.runtime_cpu import llama_engine, llama_memory as M, run, plan_cli
from mote_edge.exporters.errors import MoteExportError
from mote_edge.exporters.gguf_header import read_gguf_header
from mote_edge.exporters.gguf_llm import write_llm_gguf
from mote_edge.exporters.gguf_mmproj import write_mmproj
from mote_edge.exporters.ternary import TERNARY_TYPES

from mote_edge.tiny import ASSETS

GIB, MIB = 2 ** 30, 2 ** 20
TINY = ASSETS / "mote"
BIN = Path(sys.executable).parent
needs_tiny = pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="embedded tiny checkpoint not built")


def _has_ggml() -> bool:
    try:
        from mote_edge.exporters.quantize import ggml_lib

        ggml_lib()
        return True
    except MoteExportError:
        return False


needs_ggml = pytest.mark.skipif(not _has_ggml(), reason="K-quants need llama-cpp-python's libggml")


# ---- sizes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [("3.4GB", int(3.4 * GIB)), ("900MiB", 900 * MIB), ("2GiB", 2 * GIB),
                                        ("512M", 512 * MIB), ("1g", GIB), ("64 KiB", 64 * 1024), ("123456", 123456),
                                        ("3400000000", 3400000000), ("1.5e9", 1500000000), ("1T", 2 ** 40)])
def test_parse_size_binary_units(text, want):
    assert P.parse_size(text) == want


@pytest.mark.parametrize("text", ["", "GB", "3.4XB", "-1GB", "0", "0MiB", "1e30", "3,4GB", "1.2.3G"])
def test_parse_size_refuses_garbage(text):
    with pytest.raises(MoteExportError, match="GB = G = GiB = 2\\^30"):
        P.parse_size(text, "--memory-budget")


# ---- arithmetic by hand ----------------------------------------------------------------------------------


def _tiny_cfg():
    return P.with_moe(P.preset_config("tiny"), None, None, None)


def _by_hand(types):
    """Bytes per group of the embedded tiny MoTE, from its shapes and the types' bits per weight."""
    t = json.loads((TINY / "config.json").read_text()) if (TINY / "config.json").is_file() else _tiny_cfg()
    txt, vis = t["text_config"], t["vision_config"]
    H, F, L, V = txt["hidden_size"], txt["intermediate_size"], txt["num_hidden_layers"], txt["vocab_size"]
    heads, kvh, E = txt["num_attention_heads"], txt["num_key_value_heads"], t["mote"]["num_experts"]
    assert (H, F, L, V, heads, kvh, E) == (256, 512, 4, 356, 4, 2, 4)  # what the hand figures below assume
    kv = H // heads * kvh
    bpw = {"tq2_0": 2.0625, "tq1_0": 1.6875, "f16": 16, "q8_0": 8.5, "q6_k": 6.5625, "q4_k": 4.5, "q4_0": 4.5}
    b = lambda n, ty: int(n * bpw[ty] / 8)
    d, ff, nb, n_pos = vis["hidden_size"], vis["intermediate_size"], vis["num_hidden_layers"], \
        (vis["image_size"] // vis["patch_size"]) ** 2
    return {
        "routed": b(L * 3 * E * F * H, types["routed"]),
        "shared": b(L * 3 * F * H, types["shared"]),
        "attention": b(L * (2 * H * H + 2 * kv * H), types["attention"]) + L * (H + 2 * kv) * 4,  # + f32 biases
        "embedding": b(2 * V * H, types["embedding"]),  # tied, written twice (qwen2moe needs `output`)
        "fixed": (2 * L + 1) * H * 4 + L * (E * H + H) * 4,  # norms; router + the shared-expert gate vector
        "vision": nb * (4 * d * d + 2 * d * ff) * 2 + nb * (4 * d + 4 * d + ff + d) * 4  # blocks: f16 matrices, f32 rest
        + d * 3 * vis["patch_size"] ** 2 * 2 + d * 4 + n_pos * d * 4  # patch kernel f16, bias, positions f32
        + (H * d * 2 + H * 4) + (H * H * 2 + H * 4),  # connector 128 -> 256 -> 256
    }


@pytest.mark.parametrize("types", [dict(routed="tq2_0", shared="f16", attention="f16", embedding="f16"),
                                   dict(routed="tq1_0", shared="q8_0", attention="q6_k", embedding="q4_k"),
                                   dict(routed="tq2_0", shared="q4_0", attention="q8_0", embedding="q6_k")])
def test_tiny_plan_matches_hand_computed_sizes(types):
    plan = P.make_plan(_tiny_cfg(), "tiny", types)
    want = _by_hand(types)
    assert {g: r.bytes for g, r in plan.rows.items()} == want
    if types["routed"] == "tq2_0" and types["shared"] == "f16":
        assert want["routed"] == 1622016 and want["shared"] == 3145728  # as mote-export's summary reports
    assert plan.expert_memory_bytes == want["routed"] + want["shared"]
    assert plan.total_bytes == sum(want.values())
    # paper convention: 2 bits per ternary weight, nominal bits of the asked type, no scales
    nominal = {"f16": 16, "q8_0": 8, "q6_k": 6, "q4_k": 4, "q4_0": 4}
    assert plan.rows["routed"].paper_bytes == 4 * 3 * 4 * 512 * 256 * 2 / 8
    assert plan.rows["shared"].paper_bytes == 4 * 3 * 512 * 256 * nominal[types["shared"]] / 8


def test_paper_convention_by_hand_for_3b():
    """DESIGN.md section 1: 3B FFN params 36 x 3 x 2048 x 11008; BF16 shared + 4 x 2-bit experts = 6.80 GiB."""
    plan = P.make_plan(P.with_moe(P.preset_config("qwen2.5-3b"), 4, "mote", None), "3b", {"shared": "bf16"},
                       mmproj=False)
    ffn = 36 * 3 * 2048 * 11008
    assert plan.rows["shared"].params == ffn and plan.rows["routed"].params == 4 * ffn
    assert plan.paper_expert_bytes == ffn * 2 + 4 * ffn / 4
    assert plan.paper_expert_bytes / GIB == pytest.approx(6.80, abs=0.005)
    assert plan.expert_memory_bytes == ffn * 2 + 4 * ffn // 256 * 66  # real: TQ2_0 66 bytes per 256 weights


# ---- the paper's figures ---------------------------------------------------------------------------------


def test_paper_figures_within_5_percent():
    rows = P.paper_reproduction()
    assert len(rows) == 10
    for r in rows:
        assert abs(r["paper_convention_diff_pct"]) < 5, r
        assert r["paper_convention_gib"] == pytest.approx(r["paper_gb"], rel=0.05), r
    by = {(r["preset"], r["variant"], r["shared_or_expert_bits"]): r for r in rows}
    # where the real GGUF bytes part from the paper, the reason is named
    why = by[("qwen2.5-0.5b", "mote", 16)]["why"]  # 896-wide ternary rows: exact Q2_0 fallback
    assert "routed Q2_0 2.25 bpw vs 2 bits (exact fallback: rows not a multiple of 256)" in why and "Q4_0" not in why
    assert "Q8_0 8.5 bpw" in by[("qwen2.5-3b", "mote", 8)]["why"]
    assert by[("qwen2.5-3b", "moe-llava", 16)]["real_diff_pct"] == pytest.approx(
        by[("qwen2.5-3b", "moe-llava", 16)]["paper_convention_diff_pct"])  # f16 experts: no scales at all


def test_qwen05b_expert_memory_with_q2_0_fallback():
    """0.5B MoTE, BF16 shared: gate/up (896 = 14 x 64) take Q2_0 (18 bytes per 64), down (4864 = 19 x 256)
    TQ2_0 (66 per 256): 0.904 GiB expert memory against the paper's 0.9 (it was 1.123 with the Q4_0 fallback)."""
    cfg = P.with_moe(P.preset_config("qwen2.5-0.5b"), 4, "mote", None)
    plan = P.make_plan(cfg, "0.5b", {"shared": "bf16"}, mmproj=False)
    L, H, F, E = 24, 896, 4864, 4
    routed = L * E * (2 * F * H // 64 * 18 + H * F // 256 * 66)
    assert plan.rows["routed"].bytes == routed and plan.rows["shared"].bytes == L * 3 * F * H * 2
    assert plan.expert_memory_bytes == routed + L * 3 * F * H * 2 == 970776576
    assert plan.expert_memory_bytes <= 0.95 * GIB
    assert plan.fallbacks == ["48 x TQ2_0 -> Q2_0 (row width 896)"]
    q2 = P.make_plan(cfg, "0.5b", {"routed": "q2_0", "shared": "bf16"}, mmproj=False)  # every routed matrix Q2_0
    assert q2.rows["routed"].written == {"Q2_0": 72} and not q2.fallbacks and q2.loss == plan.loss == 0
    assert q2.rows["routed"].bytes == L * E * 3 * F * H // 64 * 18
    assert "Q2_0 2.25 bpw vs 2 bits" in P.why_different(q2) and "fallback" not in P.why_different(q2)


def test_qwen_presets_have_the_stated_shapes():
    for name, (layers, hidden, ffn, heads, kv) in P.QWEN25.items():
        t = P.preset_config(name)["text_config"]
        assert (t["num_hidden_layers"], t["hidden_size"], t["intermediate_size"], t["num_attention_heads"],
                t["num_key_value_heads"], t["vocab_size"], t["tie_word_embeddings"]) == \
            (layers, hidden, ffn, heads, kv, 151936, True)
    plan = P.make_plan(P.with_moe(P.preset_config("qwen2.5-0.5b"), 4, "mote", None), "0.5b", {"shared": "bf16"})
    assert plan.rows["routed"].written == {"Q2_0": 48, "TQ2_0": 24}  # gate/up 896 wide: exact Q2_0 fallback
    # so400m: 384 px / patch 14 -> 27 x 27 patches (integer division, as HF's conv and clip.cpp)
    pos = [shape for name, shape, *_ in P._mmproj_items(plan.cfg, "0.5b", "f16") if name == "v.position_embd.weight"]
    assert pos and 729 in pos[0]


# ---- planner == exporter, tensor by tensor -------------------------------------------------------------------


def _file_groups(path: Path, mmproj: Path, cfg: dict) -> tuple[dict, dict]:
    """{group: bytes} of written files, grouped by tensor name (independently of the planner), and
    {name: (type, bytes)}."""
    mote = cfg.get("mote") or {}
    moe_layers, variant = set(mote.get("layers") or []), mote.get("variant", "dense") if mote else "dense"
    groups, tensors = {}, {}
    # gguf.GGUFReader cannot open files with Q2_0 (ggml type 42, unknown to gguf-py 0.19): the header reader
    # can; its sizes are checked against the bytes really in the file (each tensor's data, padded to 32,
    # runs to the next one's offset, the last one to the end of the file)
    h = read_gguf_header(path)
    ends = [t.offset + t.nbytes for t in h.tensors]
    assert [t.offset for t in h.tensors[1:]] == [-(-e // 32) * 32 for e in ends[:-1]]
    assert path.stat().st_size == h.data_start + -(-ends[-1] // 32) * 32
    for t in h.tensors:
        n, layer = t.name, int(t.name.split(".")[1]) if t.name.startswith("blk.") else None
        if n.endswith("_exps.weight"):
            g = "routed" if layer in moe_layers else "padding"
        elif "_shexp.weight" in n and "gate_inp" not in n:
            g = "padding" if variant == "moe-llava" and layer in moe_layers else "shared"
        elif ".ffn_" in n and "gate_inp" not in n and "norm" not in n:
            g = "ffn"
        elif ".attn_" in n and "norm" not in n:
            g = "attention"
        elif n in ("token_embd.weight", "output.weight"):
            g = "embedding"
        else:
            g = "fixed"  # norms, router, shared-expert gate
        groups[g] = groups.get(g, 0) + t.nbytes
        tensors[n] = (t.qtype, t.nbytes)
    groups["vision"] = sum(int(t.n_bytes) for t in GGUFReader(mmproj).tensors)
    return groups, tensors


def _export(ckpt: Path, out: Path, types: dict) -> Path:
    ternary = types.get("routed", "tq2_0") in TERNARY_TYPES
    write_llm_gguf(ckpt, out, ternary_type=types.get("routed") if ternary else None,
                   expert_type=None if ternary else types["routed"],
                   shared_type=types.get("shared", "f16"), other_type=types.get("attention", "f16"),
                   embedding_type=types.get("embedding"), progress=False)
    write_mmproj(ckpt, out.with_name(out.stem + "-mmproj.gguf"), ftype=types.get("mmproj", "f16"))
    return out


def _check_plan_equals_file(ckpt: Path, out: Path, types: dict):
    cfg = P.load_config(ckpt)
    plan = P.make_plan(cfg, str(ckpt), types, types.get("mmproj", "f16"))  # from config.json alone
    _export(ckpt, out, types)
    groups, tensors = _file_groups(out, out.with_name(out.stem + "-mmproj.gguf"), cfg)
    assert {g: r.bytes for g, r in plan.rows.items()} == groups
    _, planned = P._tensors(cfg, str(ckpt), types)
    assert {p.name: (p.qtype, p.nbytes) for p in planned} == tensors  # every tensor: same type, same bytes
    assert plan.total_bytes == sum(groups.values())
    return plan


@needs_tiny
@pytest.mark.parametrize("types", [{}, pytest.param(dict(routed="tq1_0", shared="q4_k", attention="q8_0",
                                                         embedding="q6_k", mmproj="q8_0"), marks=needs_ggml)])
def test_planner_bytes_equal_exported_tiny_gguf(types, tmp_path):
    _check_plan_equals_file(TINY, tmp_path / "m.gguf", types)


@pytest.fixture(scope="module")
def small_ckpts(dense_ckpt, tmp_path_factory):
    """64-wide LLMs (conftest): every ternary row (64 / 128 wide) falls back to Q2_0 and every K-quant to F16."""
    from mote_edge.upcycle import upcycle

    root = tmp_path_factory.mktemp("plan_ckpts")
    upcycle(dense_ckpt, root / "mote", experts=4, layers="all")
    upcycle(dense_ckpt, root / "sparse", experts=3, layers="sparse")
    upcycle(dense_ckpt, root / "moe", experts=4, variant="moe-llava", layers="all")
    return {"dense": dense_ckpt, **{k: root / k for k in ("mote", "sparse", "moe")}}


@pytest.mark.parametrize("name, types", [
    ("mote", {}),
    ("mote", dict(routed="q2_0")),
    pytest.param("mote", dict(shared="q4_k", attention="q8_0", embedding="q6_k"), marks=needs_ggml),
    ("sparse", dict(routed="tq1_0", shared="q8_0")),
    ("moe", dict(routed="q8_0", embedding="q4_0")),
    ("dense", dict(shared="q4_0")),
])
def test_planner_bytes_equal_exported_gguf_with_fallbacks(name, types, small_ckpts, tmp_path):
    plan = _check_plan_equals_file(small_ckpts[name], tmp_path / "m.gguf", types)
    if name in ("mote", "sparse"):  # 64 / 128-wide rows: no 256-weight blocks, exact Q2_0 (64-weight blocks)
        assert set(plan.rows["routed"].written) == {"Q2_0"}
        fell_back = any("TQ" in f and "-> Q2_0" in f for f in plan.fallbacks)
        assert fell_back == (types.get("routed") != "q2_0")
    if types.get("shared") == "q4_k":
        assert plan.rows["shared"].written == {"F16": 6} and plan.fallbacks


# ---- the budget search -----------------------------------------------------------------------------------------


def _brute_force(cfg, budget, fixed):
    """Every combination of candidates through make_plan: (best by the documented rule, smallest total)."""
    cands = P.candidates(P._llm(cfg, "x").variant, fixed)
    best = smallest = None
    for combo in itertools.product(*(range(len(v)) for v in cands.values())):
        types = {g: v[i] for (g, v), i in zip(cands.items(), combo)}
        plan = P.make_plan(cfg, "x", types)
        smallest = min(smallest or plan.total_bytes, plan.total_bytes)
        key = (plan.loss, sum(combo), plan.total_bytes)
        if plan.total_bytes <= budget and (best is None or key < best[0]):
            best = (key, types)
    return best, smallest


def test_budget_search_is_the_documented_optimum():
    cfg, fixed = _tiny_cfg(), {"attention": "f16"}
    for budget in (5 * MIB, int(4.4 * MIB)):
        plan = P.budget_search(cfg, budget, "model", fixed, "x")
        (key, types), _ = _brute_force(cfg, budget, fixed)
        assert {g: plan.types[g] for g in types} == types and plan.loss == key[0]
        assert plan.total_bytes <= budget


def test_smaller_budget_smaller_plan_and_fixed_types_kept():
    cfg = _tiny_cfg()
    big = P.budget_search(cfg, 8 * MIB)
    assert big.loss == 0 and big.types["routed"] == "tq2_0" and big.types["shared"] == "f16"  # all fits: nothing lost
    plans = [P.budget_search(cfg, b) for b in (6 * MIB, 5 * MIB, 4 * MIB, int(3.5 * MIB))]
    sizes = [p.total_bytes for p in plans]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]
    assert all(p.total_bytes <= b for p, b in zip(plans, (6 * MIB, 5 * MIB, 4 * MIB, int(3.5 * MIB))))
    assert [p.loss for p in plans] == sorted(p.loss for p in plans)
    fixed = P.budget_search(cfg, 6 * MIB, fixed={"shared": "f16"})
    assert fixed.types["shared"] == "f16" and fixed.rows["shared"].written == {"F16": 12}
    assert fixed.total_bytes <= 6 * MIB and fixed.types["routed"] == "tq1_0"
    # experts scope: only shared + routed count, so attention and embeddings keep f16
    ex = P.budget_search(cfg, 3 * MIB, "experts")
    assert ex.expert_memory_bytes <= 3 * MIB and ex.types["attention"] == ex.types["embedding"] == "f16"


def test_budget_search_3b_paper_budget():
    """The paper's 3.4 GB (GiB) MoTE-3B point: in real GGUF types TQ2_0 + Q4_K is 3.61 GiB, over; the least
    precision lost that fits is TQ1_0 (as exact as TQ2_0 for ternary weights) + Q4_K."""
    cfg = P.with_moe(P.preset_config("qwen2.5-3b"), 4, "mote", None)
    plan = P.budget_search(cfg, P.parse_size("3.4GB"), "experts")
    assert (plan.types["routed"], plan.types["shared"]) == ("tq1_0", "q4_k")
    assert plan.expert_memory_bytes <= 3.4 * GIB
    with pytest.raises(MoteExportError, match="smallest reachable size is"):
        P.budget_search(cfg, P.parse_size("3.4GB"), "experts", fixed={"routed": "tq2_0", "shared": "q8_0"})


def test_impossible_budget_is_one_error_naming_the_smallest_size(tmp_path, capsys):
    cfg = _tiny_cfg()
    _, smallest = _brute_force(cfg, 0, {})
    with pytest.raises(MoteExportError) as exc:
        P.budget_search(cfg, 2 * MIB)
    assert f"smallest reachable size is {P.human(smallest)} ({smallest} bytes)" in str(exc.value)


# ---- mote-export --memory-budget ----------------------------------------------------------------------------


@needs_tiny
def test_export_with_budget_writes_the_printed_plan(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    cli.main([str(TINY), "-o", str(out), "--memory-budget", "5MiB", "--quiet"])
    printed = capsys.readouterr().out
    assert "budget 5.00 MiB" in printed and "routed experts" in printed and "embeddings/output" in printed
    plan = P.budget_search(P.load_config(TINY), 5 * MIB, where=str(TINY))
    groups, _ = _file_groups(out, tmp_path / "m-mmproj.gguf", P.load_config(TINY))
    assert {g: r.bytes for g, r in plan.rows.items()} == groups and sum(groups.values()) <= 5 * MIB
    for r in plan.rows.values():  # the table prints each group's type and bytes
        assert any(r.group in line and f"{r.bytes:,}" in line for line in printed.splitlines())


@needs_tiny
def test_export_budget_keeps_explicit_types_fixed(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    cli.main([str(TINY), "-o", str(out), "--memory-budget", "5MiB", "--shared-type", "q8_0", "--no-mmproj", "--quiet"])
    assert "fixed: shared q8_0" in capsys.readouterr().out
    t = {x.name: x for x in GGUFReader(out).tensors}
    assert all(t[f"blk.{i}.ffn_{p}_shexp.weight"].tensor_type == T.Q8_0 for i in range(4) for p in ("gate", "up", "down"))
    assert not (tmp_path / "m-mmproj.gguf").exists()


@needs_tiny
@pytest.mark.parametrize("args, message", [
    (["--memory-budget", "1MiB"], "cannot be met; the smallest reachable size is 3.23 MiB"),
    (["--memory-budget", "3MiB", "--ternary-type", "tq2_0", "--other-type", "f16"], "(fixed: routed tq2_0"),
    (["--memory-budget", "1MiB", "--budget-scope", "experts"], "scope experts"),
    (["--memory-budget", "lots"], "is not a size"),
    (["--budget-scope", "experts"], "--budget-scope needs --memory-budget"),
])
def test_export_impossible_budget_exit_2_nothing_written(args, message, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as exc:
        cli.main([str(TINY), "-o", str(tmp_path / "out" / "m.gguf"), "--quiet", *args])
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list((tmp_path / "out").iterdir()) == [] and not cap.out


# ---- mote-plan ----------------------------------------------------------------------------------------------


def test_mote_plan_json_for_presets(capsys):
    plan_cli.main(["--preset", "qwen2.5-3b", "--experts", "4", "--shared-type", "bf16", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["expert_memory_bytes"] == out["groups"]["routed"]["bytes"] + out["groups"]["shared"]["bytes"]
    assert out["total_bytes"] == sum(g["bytes"] for g in out["groups"].values())
    assert out["types"]["shared"] == "bf16" and out["groups"]["routed"]["written"] == {"TQ2_0": 108}
    assert out["paper_convention"]["expert_memory_gib"] == pytest.approx(6.8, rel=0.05)
    assert out["paper_figure"]["gb"] == 6.8 and abs(out["paper_figure"]["paper_convention_diff_pct"]) < 5
    assert out["resident"]["total_bytes"] > out["total_bytes"]
    plan_cli.main(["--preset", "qwen2.5-0.5b", "--variant", "moe-llava", "--json", "--n-ctx", "0"])
    out = json.loads(capsys.readouterr().out)
    assert out["top_k"] == 2 and out["expert_memory_bytes"] / GIB == pytest.approx(2.3, rel=0.05)


def test_ternary_type_q2_0_in_mote_plan_and_mote_export(tmp_path, capsys):
    plan_cli.main(["--preset", "tiny", "--ternary-type", "q2_0", "--json", "--n-ctx", "0"])
    out = json.loads(capsys.readouterr().out)
    assert out["types"]["routed"] == "q2_0" and out["groups"]["routed"]["written"] == {"Q2_0": 12}
    assert out["groups"]["routed"]["bpw"] == 2.25 and not out["fallbacks"]
    if not (TINY / "model.safetensors").is_file():
        return
    # mote-export: the type stays fixed in a budget search, and the file is the plan
    cli.main([str(TINY), "-o", str(tmp_path / "m.gguf"), "--ternary-type", "q2_0", "--memory-budget", "8MiB", "--quiet"])
    printed = capsys.readouterr().out
    assert "fixed: routed q2_0" in printed and "routed experts: Q2_0, 2.2500 bits per weight" in printed
    plan = P.make_plan(P.load_config(TINY), str(TINY), {"routed": "q2_0"})
    groups, tensors = _file_groups(tmp_path / "m.gguf", tmp_path / "m-mmproj.gguf", P.load_config(TINY))
    assert {g: r.bytes for g, r in plan.rows.items()} == groups
    assert {n for n, (q, _) in tensors.items() if q.name == "Q2_0"} == \
        {f"blk.{i}.ffn_{p}_exps.weight" for i in range(4) for p in ("gate", "up", "down")}


def test_mote_plan_table_config_and_checkpoint_folder(capsys):
    plan_cli.main([str(TINY.parent / "dense" / "config.json"), "--experts", "4"])
    table = capsys.readouterr().out
    assert "mote, 4 experts top-1" in table and "routed experts" in table and "paper MiB" in table
    plan_cli.main([str(TINY), "--memory-budget", "5MiB", "--n-ctx", "0"])
    assert "budget 5.00 MiB" in capsys.readouterr().out
    plan_cli.main(["--paper"])
    assert capsys.readouterr().out.count("qwen2.5-") == 10


@pytest.mark.parametrize("args, message", [
    ([], "give a config.json"),
    (["--preset", "llama-7b"], "accepted: tiny, qwen2.5-0.5b"),
    (["--preset", "tiny", "--experts", "0"], "--experts must be at least 1"),
    (["--preset", "tiny", "--shared-type", "tq2_0"], "only for MoTE routed experts"),
    (["--preset", "tiny", "--variant", "dense", "--ternary-type", "tq1_0"], "this plan is dense"),
    (["--preset", "tiny", "--ternary-type", "q4_0"], "accepted: tq2_0, tq1_0"),
    (["--preset", "tiny", "--memory-budget", "1MiB"], "smallest reachable size is"),
    (["/nonexistent/config.json"], "does not exist"),
])
def test_mote_plan_bad_input(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        plan_cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and message in err[0], err


def test_mote_plan_console_script_without_torch():
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('torch is blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from mote_edge.runtime_cpu.plan_cli import main\n"
            "main(['--preset', 'qwen2.5-1.5b', '--shared-type', 'q8_0', '--json'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["paper_figure"]["gb"] == 2.2
    r = subprocess.run([BIN / "mote-plan", "--preset", "tiny", "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["variant"] == "mote"


# ---- mote-run --memory-limit ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    if not (TINY / "model.safetensors").is_file():
        pytest.skip("embedded tiny checkpoint not built")
    return _export(TINY, tmp_path_factory.mktemp("plan_run") / "tiny.gguf", {})


def test_header_reader_agrees_with_gguf_reader(tiny_gguf):
    for path in (tiny_gguf, tiny_gguf.with_name("tiny-mmproj.gguf")):
        h = read_gguf_header(path)
        fields, r = h.fields, GGUFReader(path)
        assert [(t.name, t.dims, t.qtype, t.nbytes, h.data_start + t.offset) for t in h.tensors] == \
            [(t.name, tuple(int(x) for x in t.shape), T(t.tensor_type), int(t.n_bytes), int(t.data_offset))
             for t in r.tensors]
        for k, v in r.fields.items():
            if k.startswith("GGUF."):
                continue
            if len(v.types) > 1 or v.types[0].name == "ARRAY":
                assert fields[k + "#len"] == len(v.data), k
            else:
                assert fields[k] == pytest.approx(v.contents()) if isinstance(fields[k], float) else fields[k] == v.contents()
    bad = tiny_gguf.with_name("bad.gguf")
    bad.write_bytes(tiny_gguf.read_bytes()[:300])
    with pytest.raises(MoteExportError, match="truncated|not a readable"):
        read_gguf_header(bad)


def test_resident_estimate_terms(tiny_gguf):
    e = M.gguf_resident(tiny_gguf, tiny_gguf.with_name("tiny-mmproj.gguf"))
    assert e["n_ctx"] == 512  # the trained context (512) capped at 2048, as mote-run's load() picks
    assert e["kv_cache_bytes"] == 2 * 4 * 512 * 2 * 64 * 2  # 2 x layers x n_ctx x kv_heads x head_dim x f16
    files = [tiny_gguf, tiny_gguf.with_name("tiny-mmproj.gguf")]
    assert e["file_tensor_bytes"] == sum(int(t.n_bytes) for f in files for t in GGUFReader(f).tensors)
    assert e["total_bytes"] == e["weights_bytes"] + e["kv_cache_bytes"] + e["compute_bytes"] + e["runtime_bytes"]
    longer = M.gguf_resident(tiny_gguf, None, 4096)
    assert longer["kv_cache_bytes"] == 8 * e["kv_cache_bytes"] and longer["compute_bytes"] > e["compute_bytes"]


X86_AVX2 = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 0 | OPENMP = 1 | REPACK = 1 |"
ARM = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | MATMUL_INT8 = 1 | OPENMP = 1 | REPACK = 1 |"


def test_repacked_types_follow_the_cpu_flags():
    assert M.repackable_types(X86_AVX2) == {T.Q4_0, T.Q4_K, T.IQ4_NL, T.MXFP4}
    assert M.repackable_types(X86_AVX2.replace("AVX512 = 0", "AVX512 = 1")) == {T.Q4_0, T.Q4_K, T.IQ4_NL, T.MXFP4, T.Q2_K}
    assert M.repackable_types(X86_AVX2.replace("AVX2 = 1", "AVX2 = 0")) == set()
    assert M.repackable_types(ARM) == M.repackable_types(None) == M.REPACKABLE  # not x86: every type that may be
    amx = X86_AVX2.replace("AVX512 = 0", "AVX512 = 1 | AMX_INT8 = 1")
    assert M.amx_in_build(amx) and not M.amx_in_build(X86_AVX2)
    assert M.repackable_types(amx) == set()  # loaded without extra buffers there (the AMX backend crashes)


def test_amx_builds_load_without_extra_buffers(monkeypatch):
    """Where llama.cpp's AMX backend is built in, the engine's loads ask for no extra buffer types."""
    pytest.importorskip("llama_cpp")
    import llama_cpp

    seen = {}
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: b"CPU : AVX2 = 1 | AMX_INT8 = 1 |")

    def fake_llama(model_path, **kw):
        seen["use_extra_bufts"] = llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts
        raise ValueError("stop here")
    monkeypatch.setattr(llama_cpp, "Llama", fake_llama)
    with pytest.raises(MoteExportError, match="could not load"):
        llama_engine.llama("x.gguf")
    assert seen == {"use_extra_bufts": False}
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts  # restored after the load
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: b"CPU : AVX2 = 1 | AMX_INT8 = 0 |")
    with pytest.raises(MoteExportError):
        llama_engine.llama("x.gguf")
    assert seen == {"use_extra_bufts": True}


def test_resident_repack_term_counts_matmul_weights_of_repacked_types(tmp_path):
    if not (TINY / "model.safetensors").is_file():
        pytest.skip("embedded tiny checkpoint not built")
    out = _export(TINY, tmp_path / "q.gguf", {"attention": "q4_0", "shared": "q8_0"})
    proj = out.with_name("q-mmproj.gguf")
    tensors = read_gguf_header(out).tensors
    q4 = sum(t.nbytes for t in tensors if t.qtype == T.Q4_0 and t.name != "token_embd.weight")
    q8 = sum(t.nbytes for t in tensors if t.qtype == T.Q8_0)
    assert q4 > 0 and q8 > 0 and any(t.name == "token_embd.weight" and t.qtype == T.Q4_0 for t in tensors)
    x86, arm = M.gguf_resident(out, proj, system_info=X86_AVX2), M.gguf_resident(out, proj, system_info=ARM)
    assert x86["repack_bytes"] == q4  # token_embd is read by GET_ROWS, never repacked; Q8_0 is not on x86
    assert arm["repack_bytes"] == q4 + q8
    assert arm["total_bytes"] - x86["total_bytes"] == q8


def test_memory_limit_refuses_before_loading(tiny_gguf, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("load() must not run")
    monkeypatch.setattr(llama_engine, "load", no_load)
    image = next((ASSETS / "data" / "images").iterdir())
    with pytest.raises(SystemExit) as exc:
        run.main([str(tiny_gguf), "--image", str(image), "--prompt", "q", "--memory-limit", "64MiB"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: planned resident memory") and "exceeds --memory-limit 64.00 MiB" in err[0]
    with pytest.raises(SystemExit) as exc:
        run.main([str(tiny_gguf), "--image", str(image), "--prompt", "q", "--memory-limit", "1.5 bananas"])
    assert exc.value.code == 2 and "is not a size" in capsys.readouterr().err


MEASURE = """import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stdout.write(r.stdout); sys.stderr.write(r.stderr)
print("CHILD_MAXRSS_KIB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(r.returncode)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's convention")
def test_peak_rss_stays_under_the_accepted_limit(tiny_gguf):
    pytest.importorskip("llama_cpp")
    rec = json.loads((ASSETS / "data" / "test.json").read_text())[0]
    import llama_cpp

    planned = M.gguf_resident(tiny_gguf, tiny_gguf.with_name("tiny-mmproj.gguf"),
                              system_info=llama_cpp.llama_print_system_info().decode())["total_bytes"]
    run = [str(BIN / "mote-run"), str(tiny_gguf), "--image", str(ASSETS / "data" / "images" / rec["image"]),
           "--prompt", rec["conversations"][0]["value"].removeprefix("<image>\n"), "--threads", "2", "--max-tokens", "4"]
    # a fresh parent whose only child is mote-run: RUSAGE_CHILDREN's ru_maxrss is that child's peak RSS
    r = subprocess.run([sys.executable, "-c", MEASURE, *run, "--memory-limit", str(planned)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "planned resident memory" in r.stderr and r.stdout.strip()
    peak = int(r.stdout.rsplit("CHILD_MAXRSS_KIB", 1)[1]) * 1024
    print(f"tiny mote-run: peak RSS {peak / MIB:.1f} MiB, accepted limit (planned) {planned / MIB:.1f} MiB")
    assert 0 < peak < planned
    r = subprocess.run([sys.executable, "-c", MEASURE, *run, "--memory-limit", str(planned - 1)],
                       capture_output=True, text=True, timeout=300)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(err) == 1 and "exceeds --memory-limit" in err[0]
    assert "time to first token" not in r.stderr

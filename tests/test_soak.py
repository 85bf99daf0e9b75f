"""The soak program (benchmarks/soak.py, issue 12 "Load") on a short run: 40 questions through one loaded
tiny MoTE in each of the three CPU engines (mote, llama.cpp, onnxruntime), every 20th answered again by a
fresh mote-run process. At 40 questions the warm-up is 4 answers, so the RSS bound here is 2% (the
program's default, for its 1000-question run, is 1%); descriptors must not grow and the fresh answers must
be identical, as in the full run. The checks themselves are shown to fail on a leak, a descriptor growth
and a changed answer."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mote_edge.benchmarks import soak
from mote_edge.tiny import ASSETS

QUESTIONS, CHECK_EVERY, RSS_BOUND_PCT = 40, 20, 2.0


@pytest.fixture(scope="module")
def soaked(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    if not (ASSETS / "mote" / "model.safetensors").is_file():
        pytest.skip("embedded tiny checkpoint not built")
    work = tmp_path_factory.mktemp("soak")
    r = subprocess.run([sys.executable, "-m", "mote_edge.benchmarks.soak", "--questions", str(QUESTIONS),
                        "--check-every", str(CHECK_EVERY), "--max-rss-growth", str(RSS_BOUND_PCT),
                        "--cache", str(work / "cache"), "-o", str(work / "out"), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    return r, work / "out"


def test_soak_passes_for_every_engine_and_writes_its_report(soaked):
    r, out = soaked
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    report = json.loads((out / "soak.json").read_text())
    assert list(report["engines"]) == list(soak.ENGINES)
    for engine, e in report["engines"].items():
        a = e["analysis"]
        print(f"{engine}: RSS {a['rss_at_warmup_mib']:.1f} MiB after warm-up, growth {a['rss_growth_pct']:+.3f}%, "
              f"RssAnon {a['anon_growth_pct']:+.3f}%, fds {a['fds_at_warmup']} ({a['fd_growth']:+d}), "
              f"{a['seconds_per_question']:.3f} s/question")
        assert len(e["samples"]) == QUESTIONS + 1 and len(e["answers"]) == QUESTIONS
        assert all(s["rss"] > 0 and s["anon"] > 0 and s["fds"] > 2 for s in e["samples"])
        assert a["rss_growth_pct"] < RSS_BOUND_PCT and a["fd_growth"] <= 0, a
        assert a["fresh_checked"] == QUESTIONS // CHECK_EVERY and a["mismatches"] == [], a
        assert any(ans.strip() for ans in e["answers"])  # the model answered something
        assert a["pass"]
    md = (out / "soak.md").read_text()
    assert md.count("PASS") >= 3 * len(soak.ENGINES) and "FAIL" not in md
    assert (out / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASS mote: RSS growth after warm-up" in r.stdout


def _run(rss, fds, answers):
    return {"samples": [{"rss": x, "anon": x // 2, "fds": f} for x, f in zip(rss, fds)], "answers": answers,
            "load_s": 0.1, "answer_s": 1.0}


def test_the_checks_fail_on_a_leak_a_descriptor_and_a_changed_answer():
    n = 20
    steady = _run([100 << 20] * (n + 1), [10] * (n + 1), ["red"] * n)
    assert soak.analyse(steady, {0: "red", 10: "red"}, 1.0)["pass"]
    leak = _run([(100 << 20) + i * (100 << 10) for i in range(n + 1)], [10] * (n + 1), ["red"] * n)  # +100 KiB / q
    a = soak.analyse(leak, {}, 1.0)
    assert not a["checks"]["rss"] and a["rss_growth_pct"] > 1.0 and a["checks"]["fds"]
    fd = _run([100 << 20] * (n + 1), [10] * (n - 1) + [11, 11], ["red"] * n)
    assert soak.analyse(fd, {}, 1.0)["checks"] == {"rss": True, "fds": False, "answers": True}
    blip = _run([100 << 20] * (n + 1), [10] * (n - 2) + [14, 10, 10], ["red"] * n)  # opened, closed again
    a = soak.analyse(blip, {}, 1.0)
    assert a["checks"]["fds"] and a["fd_transient_max"] == 4 and a["fd_growth"] == 0
    changed = soak.analyse(steady, {0: "red", 10: "blue"}, 1.0)
    assert not changed["pass"] and changed["mismatches"] == [{"question": 10, "soaked": "red", "fresh": "blue"}]
    assert any(line.startswith("FAIL mote:") for line in soak.verdict_lines("mote", changed))


@pytest.mark.parametrize("args, message", [
    (["--engine", "tensorrt"], "--engine 'tensorrt'"),
    (["--questions", "0"], "--questions must be at least 1"),
    (["--model", "m.gguf"], "--model names one model"),
    (["--engine", "mote", "--model", "/nonexistent.gguf"], "does not exist"),
])
def test_bad_input_is_one_error_line(args, message, tmp_path):
    r = subprocess.run([sys.executable, "-m", "mote_edge.benchmarks.soak", *args, "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=60)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], r.stderr

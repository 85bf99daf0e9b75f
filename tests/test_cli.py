"""CLI smoke tests and bad input: one clear `error:` line, exit code 2, nothing written."""
import json
import shutil
import subprocess
import sys

import pytest

from mote_edge import train, upcycle


def _run_main(main, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith(("Loading weights", "Writing"))]
    return exc.value.code, err


def test_upcycle_cli_writes_a_mote_checkpoint(dense_ckpt, tmp_path, capsys):
    upcycle.main([str(dense_ckpt), "-o", str(tmp_path / "m"), "--experts", "2", "--layers", "1",
                  "--variant", "moe-llava"])
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())["mote"]
    assert cfg == cfg | {"num_experts": 2, "top_k": 2, "layers": [1], "variant": "moe-llava", "init": "ffn"}
    assert (tmp_path / "m" / "tokenizer.json").is_file() and (tmp_path / "m" / "processor_config.json").is_file()
    assert "wrote" in capsys.readouterr().out


def _corrupt(src, dst):
    shutil.copytree(src, dst)
    p = dst / "model.safetensors"
    p.write_bytes(p.read_bytes()[:1000])
    return dst


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if "." in k:
            outer, inner = k.split(".")
            cfg[outer][inner] = v
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("case, args, message", [
    ("missing", ["--experts", "4"], "does not exist"),
    ("llama", ["--experts", "4"], "unsupported architecture"),
    ("not_qwen2", ["--experts", "4"], "unsupported language model"),
    ("corrupt", ["--experts", "4"], "not a readable safetensors"),
    ("ok", ["--experts", "0"], "--experts must be at least 1"),
    ("ok", ["--experts", "4", "--top-k", "5"], "--top-k must be between 1 and"),
    ("ok", ["--layers", "0,9"], "out of range"),
    ("ok", ["--layers", "first"], "not understood"),
])
def test_upcycle_bad_input(case, args, message, dense_ckpt, tmp_path, capsys):
    base = {
        "missing": tmp_path / "nope",
        "llama": lambda: _edit_config(dense_ckpt, tmp_path / "b", model_type="llama"),
        "not_qwen2": lambda: _edit_config(dense_ckpt, tmp_path / "b", **{"text_config.model_type": "llama"}),
        "corrupt": lambda: _corrupt(dense_ckpt, tmp_path / "b"),
        "ok": dense_ckpt,
    }[case]
    base = base() if callable(base) else base
    out = tmp_path / "out"
    code, err = _run_main(upcycle.main, [str(base), "-o", str(out), *args], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*.tmp")), "no half-written temporary folder left behind"


def test_upcycle_refuses_existing_output_and_moe_input(dense_ckpt, mote_ckpt, tmp_path, capsys):
    code, err = _run_main(upcycle.main, [str(dense_ckpt), "-o", str(mote_ckpt)], capsys)
    assert code == 2 and "exists and is not empty" in err[0]
    code, err = _run_main(upcycle.main, [str(mote_ckpt), "-o", str(tmp_path / "x")], capsys)
    assert code == 2 and "already a MoE checkpoint" in err[0]


def test_train_cli_bad_input(mote_ckpt, dense_ckpt, data_dir, tmp_path, capsys):
    common = ["--images", str(data_dir / "images"), "-o", str(tmp_path / "o"), "--steps", "1"]
    code, err = _run_main(train.main, [str(mote_ckpt), "--data", str(tmp_path / "none.json"), *common], capsys)
    assert code == 2 and len(err) == 1 and "data file" in err[0]
    code, err = _run_main(train.main, [str(dense_ckpt), "--data", str(data_dir / "train.json"), *common,
                                       "--stage", "moe"], capsys)
    assert code == 2 and "run mote-upcycle first" in err[0]
    code, err = _run_main(train.main, [str(mote_ckpt), "--data", str(data_dir / "train.json"), *common,
                                       "--batch-size", "6", "--grad-accum", "4"], capsys)
    assert code == 2 and "divisible" in err[0]
    assert not (tmp_path / "o").exists()


def test_console_scripts_run(mote_ckpt, data_dir, tmp_path):
    """The installed entry points themselves (a fresh process, as a user runs them)."""
    bindir = __import__("pathlib").Path(sys.executable).parent
    r = subprocess.run([bindir / "mote-train", mote_ckpt, "--data", data_dir / "train.json", "--images",
                        data_dir / "images", "-o", tmp_path / "t", "--steps", "2", "--batch-size", "4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 steps" in r.stdout
    r = subprocess.run([bindir / "mote-eval", tmp_path / "t", "--data", data_dir / "test.json", "--images",
                        data_dir / "images", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    acc = json.loads(r.stdout.strip().splitlines()[-1])
    assert acc["n"] == 24 and 0.0 <= acc["overall"] <= 100.0
    r = subprocess.run([bindir / "mote-upcycle", tmp_path / "missing", "-o", tmp_path / "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr

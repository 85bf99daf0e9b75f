"""The C kernels under AddressSanitizer + UBSan (issue 12): runtime_cpu/csrc/*.c built with
`-fsanitize=address,undefined` into a temporary library, which runtime_cpu/clib.py loads instead of the
installed one (MOTE_KERNELS_LIB); the kernel tests and a tiny-model load + answer (both ternary families
and the float kernels, fed from a real export's mapping) then run in a subprocess with the ASan runtime
preloaded. Any over-read, over-write or undefined behaviour halts that subprocess with a report.

The kernel test files run in full (about 25 s under ASan here: the instrumented part is the kernels;
the numpy references they are checked against are not)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "runtime_cpu" / "csrc"
KERNEL_TESTS = ["tests/test_kernels_mad.py", "tests/test_kernels_lut.py", "tests/test_kernels_float.py",
                "tests/test_kernels_batch.py",
                "tests/test_quant.py"]  # training's scale sum and values (ternary_values.c), torch under ASan too
# float-cast-overflow is not in gcc's "undefined" group: a NaN or huge float cast to an integer (a corrupt
# file's NaN weights reach the activation quantiser) is undefined behaviour too
SANITIZED = ["-fsanitize=address,undefined,float-cast-overflow", "-fno-omit-frame-pointer"]
ENV = {"ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
FINDINGS = ("runtime error", "ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "UndefinedBehaviorSanitizer")

MODEL_SCRIPT = r"""
import sys
from mote_edge.exporters.gguf_file import mmproj_path
from mote_edge.exporters.gguf_llm import write_llm_gguf
from mote_edge.exporters.gguf_mmproj import write_mmproj
from mote_edge.runtime_cpu import clib
from mote_edge.runtime_cpu.mote_engine import MoteModel

ckpt, out, image = sys.argv[1:4]
assert clib.lib()._name == sys.argv[4], clib.lib()._name  # the sanitized build, not the installed one
write_llm_gguf(ckpt, out, progress=False)
write_mmproj(ckpt, mmproj_path(out))
answers = []
for kernel in ("mad", "lut"):
    for threads in (1, 2):
        m = MoteModel(out, threads=threads, kernel=kernel)
        answers.append(m.answer(image, "What colour is the square?", max_tokens=4))
        assert m.logits(m.tokenizer.encode("How many shapes are there?" * 3)).shape[0] > 1
assert len(set(answers)) == 1, answers
# a file whose weights hold NaN (one norm vector: every activation after it is NaN) still only answers
import numpy as np, shutil
from mote_edge.runtime_cpu.gguf_model import GGUFModel
g = GGUFModel(out)
t = g.info("blk.0.attn_norm.weight")
start = g.header.data_start + t.offset
poisoned = out.replace(".gguf", "-nan.gguf")
shutil.copyfile(out, poisoned)
shutil.copyfile(mmproj_path(out), mmproj_path(poisoned))
with open(poisoned, "r+b") as f:
    f.seek(start)
    f.write(np.full(t.nbytes // 4, np.nan, np.float32).tobytes())
for kernel in ("mad", "lut"):
    MoteModel(poisoned, threads=1, kernel=kernel).answer(image, "What colour is the square?", max_tokens=2)
print("answers", answers)
"""


def _gcc() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed to build the sanitized kernels (the package install builds them with it too)")
    return gcc


@pytest.fixture(scope="module")
def sanitized_lib(tmp_path_factory) -> tuple[Path, str]:
    """The kernels built with ASan + UBSan, and the ASan runtime to preload."""
    gcc = _gcc()
    out = tmp_path_factory.mktemp("asan") / "libmote_kernels_asan.so"
    cmd = [gcc, *SANITIZED, "-O1", "-g", "-std=gnu11", "-fno-strict-aliasing", "-shared", "-fPIC", "-pthread",
           *map(str, sorted(CSRC.glob("*.c"))), "-o", str(out), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-4000:]}"
    asan = subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    assert os.path.isfile(asan), f"gcc has no ASan runtime ({asan!r})"
    return out, asan


def _run(args: list[str], lib: Path, asan: str, timeout: int) -> str:
    env = dict(os.environ, MOTE_KERNELS_LIB=str(lib), LD_PRELOAD=asan, OPENBLAS_NUM_THREADS="1", **ENV)
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    text = r.stdout + r.stderr
    found = [f for f in FINDINGS if f in text]
    assert r.returncode == 0 and not found, f"exit {r.returncode}, {found or 'no sanitizer report'}:\n{_report(text)}"
    return text


def _report(text: str) -> str:
    """The sanitizer's lines that say what and where in our C (the Python interpreter's frames left out)."""
    keep = [ln for ln in text.splitlines() if any(k in ln for k in ("runtime error", "ERROR:", "SUMMARY:", "csrc/",
                                                                    "Error", "error:", "FAILED", "passed"))]
    return "\n".join(keep[:60]) or text[-4000:]


def test_the_sanitized_build_is_the_one_loaded(sanitized_lib):
    """The subprocesses below must run the sanitized library, or they test the installed one: an
    out-of-bounds read from it is reported (a check that the instrumentation is really there)."""
    lib, asan = sanitized_lib
    probe = ("import ctypes, numpy as np\n"
             "from mote_edge.runtime_cpu import clib, ternary_kernels as tk\n"
             f"assert clib.lib()._name == {str(lib)!r}\n"
             "L = tk._lib()\n"
             "x = np.ones(100, np.float32)\n"  # 100 floats, but K = 256 is claimed: a heap over-read
             "q = np.empty(256, np.int8); s = np.empty(1, np.int32); st = np.empty(1, np.float32)\n"
             "L.mote_quant_act(x.ctypes.data, 256, 1, 256, 256, 1e-5, q.ctypes.data, 256, s.ctypes.data,"
             " st.ctypes.data, 0)\n")
    env = dict(os.environ, MOTE_KERNELS_LIB=str(lib), LD_PRELOAD=asan, **ENV)
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "ERROR: AddressSanitizer" in r.stderr, r.stdout + r.stderr[-3000:]


def test_kernel_tests_pass_under_asan_and_ubsan(sanitized_lib):
    lib, asan = sanitized_lib
    text = _run([sys.executable, "-m", "pytest", "-q", "-x", "-s", "--noconftest", "-p", "no:cacheprovider", *KERNEL_TESTS],
         lib, asan, timeout=600)
    assert " passed" in text and " failed" not in text, text[-3000:]


def test_model_loads_and_answers_under_asan_and_ubsan(sanitized_lib, tmp_path):
    lib, asan = sanitized_lib
    image = ROOT / "mote_edge" / "assets" / "tiny" / "data" / "images" / "test_00000.png"
    text = _run([sys.executable, "-c", MODEL_SCRIPT, str(ROOT / "mote_edge" / "assets" / "tiny" / "mote"),
                 str(tmp_path / "model.gguf"), str(image), str(lib)], lib, asan, timeout=600)
    assert "answers" in text

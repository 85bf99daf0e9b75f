"""Re-resolve constraints.txt, the project's lock: every direct and transitive dependency of every
extra, pinned to one version.

    make lock        (the same as: python3 tools/lock.py)

pip's own resolver picks the versions a fresh machine would get today, for exactly what the README
installs (`torch==2.13.0` and the `all` extra), in a throw-away virtual environment with an empty
site-packages: `pip install --dry-run --ignore-installed --report`, nothing installed. Then run
`make test` (which installs from the new lock) and commit constraints.txt only if the suite passes:
the lock records versions the suite passed with.

The lock is resolved on Linux x86_64 with the CPython the README's venv uses; local version labels
(torch's "+cpu") are dropped, so an installed CUDA build of the same torch version still satisfies it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
WANTED = ["torch==2.13.0", f"{ROOT}[all]"]


def resolve() -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="mote-lock-") as tmp:
        venv.create(tmp, with_pip=True)
        py, report = Path(tmp) / "bin" / "python", Path(tmp) / "report.json"
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--report", str(report), *WANTED], check=True)
        items = json.loads(report.read_text())["install"]
    pins = {}
    for it in items:
        meta = it["metadata"]
        if meta["name"].lower().replace("_", "-") == "mote-edge":
            continue
        pins[meta["name"]] = meta["version"].split("+")[0]
    return pins


def main() -> None:
    pins = resolve()
    body = "".join(f"{name}=={version}\n" for name, version in sorted(pins.items(), key=lambda kv: kv[0].lower()))
    LOCK.write_text("# The lock: every dependency of mote-edge and its extras, pinned (pip constraints file).\n"
                    "# The README's commands install with `-c constraints.txt`. Regenerate: make lock\n"
                    f"# (tools/lock.py: pip's resolver for {' '.join(w.replace(str(ROOT), '.') for w in WANTED)},"
                    f" Python {sys.version_info.major}.{sys.version_info.minor}, Linux x86_64).\n" + body)
    print(f"wrote {LOCK} ({len(pins)} packages); now run `make test` before committing it")


if __name__ == "__main__":
    main()

# The README's commands; every install comes from the lock (constraints.txt).
.PHONY: demo test tiny bench lock
demo:
	python3 -m venv .venv && .venv/bin/pip install -c constraints.txt torch==2.13.0 -e ".[demo]" && .venv/bin/mote-demo
test:
	python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt torch==2.13.0 -e ".[test]" && .venv/bin/python -m pytest -q
tiny:
	.venv/bin/mote-make-tiny runs/tiny --install
bench:
	.venv/bin/python -m mote_edge.benchmarks.train_step --shape all
# re-resolve the lock with pip's resolver (tools/lock.py); then `make test` before committing it
lock:
	python3 tools/lock.py

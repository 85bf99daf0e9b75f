.PHONY: demo test tiny bench
demo:
	python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e . && .venv/bin/mote-demo
test:
	python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e ".[test]" && .venv/bin/python -m pytest -q
tiny:
	.venv/bin/mote-make-tiny runs/tiny --install
bench:
	.venv/bin/python benchmarks/train_step.py --shape all

#!/usr/bin/env bash
# The one prepared GPU run of issue 11 (cuda_kernels/device_check.py), as sent through the device tool.
#
# Here, once per checkout: the H200 image lacks gguf (the engine section reads GGUF files); it travels as
# the lock's wheel (pure Python; its needs numpy, pyyaml, requests, tqdm are on the image):
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
#         "gguf==$(sed -n 's/^gguf==//p' constraints.txt)"
# Then one device call: command "bash tools/device_run.sh", carry [".whl"], timeout_s 560. It writes
# $OUT/device_check.json, $OUT/device_check.md and $OUT/device_check.log; the sweeps are left out
# (--skip-sweeps) when a first run's log shows Triton compiling past the time.
set -uo pipefail
: "${OUT:?OUT: the output folder the device tool sets}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || { echo "error: no .whl/gguf wheel carried (see the top of $0)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.csv"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
PYTHONUNBUFFERED=1 timeout 540 python3 cuda_kernels/device_check.py -o "$OUT" "$@" 2>&1 | tee "$OUT/device_check.log"

#!/usr/bin/env bash
# GPU checks and benchmarks of this project in one command each, for a bare CUDA machine without
# network (megatron-core comes as a wheel in .whl/ when it is not installed):
#
#   bash benchmarks/gpu_session.sh tests                  # tests/test_gpu.py
#   bash benchmarks/gpu_session.sh overhead               # benchmarks/overhead.py, 1.3B shape, bf16
#   bash benchmarks/gpu_session.sh step-time [ARGS...]    # benchmarks/step_time.py (e.g. --shapes 1.3b)
#
# Results go to $OUT when set (the device tool's output folder), else benchmarks/results/.
# step-time stops starting new processes after STEP_TIME_BUDGET seconds (default 540: one shape
# fits a 10-minute command; what was measured by then is written).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out_dir=${OUT:-benchmarks/results}
mkdir -p "$out_dir"
if ! python3 -c "import megatron.core" 2>/dev/null; then
    compgen -G ".whl/*.whl" >/dev/null || { echo "error: megatron-core is not installed and .whl/ holds no wheels; carry a cp312 megatron-core wheel in .whl/" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || { echo "error: no CUDA device here" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
stage=${1:-}
shift || true
case $stage in
    tests)
        # the CPU suites feed CPU tensors to models that build_model puts on the GPU: GPU file only
        python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py "$@" 2>&1 \
            | tee "$out_dir/gpu-tests-$(date +%F).log" ;;
    overhead) python3 benchmarks/overhead.py --out "$out_dir" "$@" ;;
    step-time) python3 benchmarks/step_time.py --out "$out_dir" --budget "${STEP_TIME_BUDGET:-540}" "$@" ;;
    *) echo "usage: bash benchmarks/gpu_session.sh {tests|overhead|step-time} [ARGS...]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# The GPU check of this project: one command, under 9 minutes, on a bare CUDA machine without network.
#
#   bash benchmarks/gpu/check.sh           # on the GPU machine (prepare.sh prints the exact call)
#   TOY=1 bash benchmarks/gpu/check.sh     # rehearsal on a CPU machine: the same stages at toy size
#
# Stages, in order of value per minute; each writes its results to $OUT (else benchmarks/results/)
# as it goes, so a stage cut off by the time limit still leaves what it measured:
#   a. env_probe.py: GPU, driver, torch/CUDA/triton/megatron-core versions, matmul rate, which SDPA
#      kernel runs the 1.3B GQA layout
#   b. tests/test_gpu.py (Transformer Engine tests skip: TE cannot be brought to the device)
#   c. driver_resume.py: the driver at ~125M, bf16, ProRes+GPAS; its sync step-20 checkpoint resumed,
#      and an --async-save run killed with -9 after step 20, resumed; losses vs the uninterrupted run
#   r. rope.py: megatron-core's eager RoPE against the fused one (shared cos/sin tables since
#      2026-11-30), forward + backward, 1.3B layout
#   d. step_time.py at the 1.3B shape (megatron / prores_mid / prores_done / hf; micro batch 8 x 2, hf
#      4 x 4: the same global batch of 16, hf at micro batch 8 needs ~89 GiB), then the 48x512
#      shape while the budget lasts (a variant starts only when the time left covers it); the driver
#      variants print a profile of two steps into the log (torch profiler: kernels and ops) and a
#      cProfile of two more (the host's time by Python function); each target ratio comes with a 95%
#      bootstrap interval from the timed steps
# CHECK_BUDGET (seconds, default 530) bounds the whole command. CHECK_STAGES picks stages (default
# "env tests driver-resume rope step-time"); STEP_TIME_ARGS adds step_time.py flags, which override the
# ones above, e.g. a check spent on one ratio, once the other stages have passed on a GPU:
#   CHECK_STAGES="env step-time" STEP_TIME_ARGS="--shapes 1.3b --variants megatron prores_done --rounds 4"
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
start=$SECONDS
budget=${CHECK_BUDGET:-530}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
log="$out/check.log"
left() { echo $(( budget - (SECONDS - start) )); }
say() { echo "[check $(( SECONDS - start ))s] $*" | tee -a "$log"; }

if ! python3 -c "import megatron.core" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { say "error: installing .whl/*.whl failed"; exit 1; }
        export PYTHONPATH=/tmp/site
    else
        say "error: megatron-core is not installed and .whl/ holds no wheel; run bash benchmarks/gpu/prepare.sh first"
        exit 1
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache  # compiled kernels shared by the stages' processes
if [[ -n ${TOY:-} ]]; then toy=(--toy); shapes=(cpu); st=(--micro-batch-size 2 --accumulation 2 --hf-micro-batch-size 1 --steps 3 --warmup 1)
else
    toy=(); shapes=(1.3b 48x512); st=(--micro-batch-size 8 --accumulation 2 --hf-micro-batch-size 4 --steps 20 --warmup 3)
    python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || { say "error: no CUDA device here (TOY=1 for a CPU rehearsal)"; exit 1; }
fi
stages=${CHECK_STAGES:-env tests driver-resume rope step-time}
for name in $stages; do
    [[ " env tests driver-resume rope step-time " == *" $name "* ]] \
        || { say "error: CHECK_STAGES holds '$name'; the stages are: env tests driver-resume rope step-time"; exit 1; }
done
status=0
stage() {  # stage NAME SECONDS CMD...: run with a time limit, keep going whatever it returns
    local name=$1 limit=$2; shift 2
    if [[ " $stages " != *" $name "* ]]; then say "$name: not in CHECK_STAGES"; return; fi
    (( limit > $(left) - 5 )) && limit=$(( $(left) - 5 ))
    if (( limit < 20 )); then say "$name: skipped, time budget used up"; status=1; return; fi
    say "$name: start (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    say "$name: exit $rc"
    (( rc == 0 )) || status=1
}

stage env 60 python3 benchmarks/gpu/env_probe.py --out "$out" "${toy[@]}"
stage tests 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py --junitxml="$out/gpu-tests.xml"
stage driver-resume 200 python3 benchmarks/gpu/driver_resume.py --out "$out" "${toy[@]}"
stage rope 60 python3 benchmarks/rope.py --out /tmp/rope-results  # its table goes to check.log
export STEP_TIME_PROFILE=1
stage step-time 600 python3 benchmarks/step_time.py --out "$out" --budget $(( $(left) - 15 )) \
    --shapes "${shapes[@]}" "${st[@]}" ${STEP_TIME_ARGS:-}
say "done: every stage exit 0: $(( status == 0 ))"
exit $status

#!/usr/bin/env bash
# Preparation of the GPU check, on the CPU machine: fetches the cp312 wheels the GPU machine lacks
# (megatron-core, in the version the Python 3.12 CI leg tests) into .whl/ (git-ignored; it travels
# to the device with `carry`), checks that nothing else is missing, and prints the command to run.
#
#   bash benchmarks/gpu/prepare.sh            # MCORE_VERSION=0.19.2 by default
#   TOY=1 bash benchmarks/gpu/check.sh        # then rehearse the check end to end on CPU
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
version=${MCORE_VERSION:-0.19.2}
py=${PYTHON:-python3}
mkdir -p .whl
rm -f .whl/megatron_core-*.whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "megatron-core==$version"
# megatron-core needs torch, numpy and packaging; this project also einops, psutil, safetensors,
# sentencepiece, tensorboard, tqdm, matplotlib, transformers: the device image has all of them
# (the device tool's KINDS.md package list). Anything else goes into .whl/ the same way.
ls -l .whl
echo
echo "run on the device (one call, carry .whl, timeout_s 600):"
echo "  bash benchmarks/gpu/check.sh"

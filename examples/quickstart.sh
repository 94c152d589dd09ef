#!/usr/bin/env bash
# Quickstart on a fresh CPU machine: corpus -> tokenizer -> dataset -> train a small ProRes+GPAS
# model on 2 gloo processes (tensor parallel) -> stop at iteration 150 with a checkpoint -> resume
# to 300 -> validation perplexity, TensorBoard logs. RUN_DIR (default runs/quickstart) holds it all.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/quickstart}
NPROC=${NPROC:-2}
DATA=$RUN_DIR/data
mkdir -p "$DATA"
export PYTHONWARNINGS=ignore

python tools/build_corpus.py --output "$DATA/stdlib.jsonl" --max-bytes 6000000
python tools/train_tokenizer.py --input "$DATA/stdlib.jsonl" --model-prefix "$DATA/tok" --vocab-size 4000
python tools/preprocess_data.py --input "$DATA/stdlib.jsonl" --tokenizer-model "$DATA/tok.model" \
    --output-prefix "$DATA/stdlib" --workers "$NPROC"

# shellcheck disable=SC2054  # the commas are --split's, not array separators
ARGS=(
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 352 --seq-length 128
    --micro-batch-size 8 --global-batch-size 16 --train-iters 300
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.1 --clip-grad 1.0
    --norm-type pre --prores-schedule linear --prores-warmup-steps 200 --gpas
    --tensor-model-parallel-size "$NPROC"
    --data-path "$DATA/stdlib_text_document" --split 95,5,0
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tok.model"
    --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" --save-interval 100
    --log-interval 25 --eval-interval 150 --eval-iters 5
    --tensorboard-dir "$RUN_DIR/tensorboard"
)
# first leg: stops (and saves) at iteration 150, as a preempted job would
torchrun --nproc-per-node "$NPROC" -m megatron_prores.train "${ARGS[@]}" --exit-interval 150
# second leg: resumes from the checkpoint and finishes
torchrun --nproc-per-node "$NPROC" -m megatron_prores.train "${ARGS[@]}"
python tools/plot_run.py "$RUN_DIR/tensorboard" --labels quickstart --output "$RUN_DIR/plots"
echo "checkpoints: $RUN_DIR/checkpoints   plots: $RUN_DIR/plots   TensorBoard: tensorboard --logdir $RUN_DIR/tensorboard"

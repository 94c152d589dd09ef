#!/usr/bin/env bash
# "Your own data" (README): Parquet shards + a Hugging Face tokenizer directory -> a running job -> an HF model.
# Usage: bash examples/your_own_data.sh [WORK_DIR]  (after pip install -e ".[data,test]"; CPU, about 2 minutes;
# step 0 builds local stand-ins for a downloaded corpus and tokenizer)
set -euo pipefail
WORK=${1:-your-own-data}; mkdir -p "$WORK" && cd "$WORK" && rm -rf my-corpus my-tokenizer data ckpt hf raw.jsonl
export PYTHONWARNINGS=ignore
# 0. stand-ins for downloads (no hub here): two Parquet shards with a text column, a byte-level BPE tokenizer dir
megatron-prores-build-corpus --source /usr/share/doc --extensions .txt .md NEWS README --max-bytes 4000000 --output raw.jsonl
python - <<'PY'
import json, os, pyarrow as pa, pyarrow.parquet as pq
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
docs = [json.loads(l)["text"] for l in open("raw.jsonl")]
os.makedirs("my-corpus"); os.makedirs("my-tokenizer")
for i in range(2):
    part = docs[i::2]
    pq.write_table(pa.table({"id": list(range(len(part))), "text": part}), f"my-corpus/train-{i:05d}-of-00002.parquet", row_group_size=10)
tok = Tokenizer(models.BPE()); tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False); tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=8000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tok.save("my-tokenizer/tokenizer.json")
json.dump({"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}, open("my-tokenizer/tokenizer_config.json", "w"))
PY
# 1. tokenize the whole folder (sorted), 2 workers
megatron-prores-preprocess-data --input my-corpus/ --json-keys text --tokenizer-type HuggingFaceTokenizer \
    --tokenizer-model my-tokenizer/ --output-prefix data/my --workers 2
# 2. train (CPU here: a tiny model; on GPUs take a recipe from slurm/)
megatron-prores-train --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 256 \
    --micro-batch-size 4 --global-batch-size 8 --train-iters 30 --lr 1e-3 --lr-warmup-iters 3 \
    --norm-type pre --prores-schedule linear --prores-warmup-steps 20 --gpas \
    --data-path data/my_text_document --split 98,2,0 \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model my-tokenizer/ \
    --save ckpt --save-interval 30 --log-interval 10 --eval-interval 30 --eval-iters 2
# 3. export and load with transformers
megatron-prores-convert-to-hf --load ckpt --output hf
python - <<'PY'
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("hf"); model = AutoModelForCausalLM.from_pretrained("hf")
ids = tok("The package includes", return_tensors="pt")
print(type(model).__name__, "loss on a sentence:", model(**ids, labels=ids["input_ids"]).loss.item())
PY

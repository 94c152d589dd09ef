"""Run under torchrun with 2 processes: build a tied model at PP=2 (fresh, no checkpoint) with the
flags given and print whether the last stage's copy of the embedding matrix equals the first
stage's. Used by tests/test_driver_layouts.py."""

import sys

import torch
import torch.distributed as dist

from megatron_prores import parallel
from megatron_prores.arguments import model_config, parse_args
from megatron_prores.model import build_model

args = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
                   "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-3",
                   "--mock-data", "--vocab-size", "64", "--tie-embeddings-and-output-weights",
                   "--pipeline-model-parallel-size", "2"] + sys.argv[1:])
parallel.initialize(pipeline_parallel=2)
(chunk,) = build_model(model_config(args, 64))
mine = (chunk.embedding.word_embeddings.weight if chunk.pre_process else chunk.output_layer.weight).detach().clone()
copies = [torch.empty_like(mine) for _ in range(2)]
dist.all_gather(copies, mine)
if dist.get_rank() == 0:
    print(f"copies equal: {torch.equal(copies[0], copies[1])}, std {copies[0].std():.4f} and {copies[1].std():.4f}")
dist.destroy_process_group()

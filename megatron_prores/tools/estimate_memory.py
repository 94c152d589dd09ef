"""Estimate GPU memory per device and tokens per step of a training recipe (bf16 with --bf16, else fp32).

    megatron-prores-estimate-memory --world-size 16 -- --num-layers 24 --hidden-size 2048 ...
    megatron-prores-estimate-memory --world-size 16 -- @recipe.txt

An ESTIMATE from the model's shapes, written out below, for the worst pipeline stage; not a
measurement (what the allocator really holds can be 10-30% more). What the driver keeps:
  weights bf16 (2 B/param), gradients fp32 (grad_reduce_in_fp32: 4 B/param), optimizer fp32 main
  weights + Adam moments (12 B/param, divided over data x context parallel ranks with
  --use-distributed-optimizer);
  activations of one micro batch per block, in bytes (bf16, s = seq, b = micro batch, h = hidden,
  f = ffn, kv = key/value width): s*b*(10h + 2(h + 2kv) + 6f) (GPAS adds nothing: the fused
  residual op recomputes its input from its output), plus 4*s*b*h for Sandwich-LN's branch norms,
  plus 2*a*s*s*b for unfused attention (--attention-backend unfused/local: megatron-core's
  DotProductAttention or TE's unfused kernel; the default SDPA / TE flash attention keeps none); the stream-sized parts are split
  over TP only with sequence parallelism, everything over CP, except that under CP > 1 each rank
  also keeps the whole sequence's all-gathered K/V (4*s*b*kv/TP); --recompute-granularity full keeps
  2*s*b*h per recomputed unit (uniform: every block, in units of --recompute-num-layers n; block:
  n blocks per model chunk, the others keep everything) for each micro batch in flight, and once
  the activations of the unit being recomputed (backward recomputes one micro batch at a time);
  selective drops what its --recompute-modules recompute: core_attn the unfused attention
  probabilities, layernorm the two pre-norm outputs (4*s*b*h), mlp the MLP's inner 6*s*b*f;
  micro batches in flight on the first pipeline stage: min(PP, microbatches), times
  (1 + (PP-1)/(PP*VPP)) for the interleaved schedule;
  logits and the fp32 cross entropy on the last stage: 10 bytes x s*b*vocab / (TP x CP);
  plus 3 GiB for the CUDA context, NCCL buffers and allocator slack.
Without --bf16 the driver trains in fp32: weights fp32 (4 B/param), gradients fp32 (4 B/param),
optimizer the Adam moments only (8 B/param, divided as above; the fp32 weights are the main
weights), activations twice the bytes above (4 B a value), logits + loss 8 bytes x s*b*vocab /
(TP x CP) (the logits are fp32 already: the cross entropy makes no fp32 copy of them).
"""

from __future__ import annotations

import argparse
import sys

from megatron_prores.config import ConfigError
from megatron_prores.tools import run

GIB = 1024 ** 3


def estimate(args, cfg, dp: int, num_micro: int) -> dict:
    """Bytes per GPU of the worst pipeline stage, by part, and tokens per step."""
    L, h, f, s = cfg.num_layers, cfg.hidden_size, cfg.ffn_size, cfg.seq_length
    tp, pp, cp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.context_parallel_size
    vp = cfg.virtual_pipeline_size or 1  # model chunks per pipeline rank
    kv = cfg.query_groups * (h // cfg.num_attention_heads)
    m = cfg.method
    vocab = cfg.padded_vocab_size
    bf16 = cfg.bf16  # the driver's precision: --bf16, else fp32 throughout
    sandwich = m.norm_type == "sandwich"

    norms = (4 if sandwich else 2) * h
    layer_params = (h * (h + 2 * kv) + h * h + 3 * h * f) / tp + norms + (2 if m.gpas else 0)
    per_stage = L // pp
    embedding = vocab * h / tp  # input embedding and output layer: one matrix each (one in all when
    # tied on one stage; under PP the last stage keeps its own copy of a tied matrix)
    if pp == 1:
        params = per_stage * layer_params + (1 if cfg.tie_embeddings else 2) * embedding + h
    else:  # the first stage holds the embedding, the last the output layer and final norm
        params = per_stage * layer_params + embedding + h
    shard = dp * cp if args.use_distributed_optimizer else 1

    b = args.micro_batch_size
    sp_cp = (tp if cfg.sequence_parallel else 1) * cp
    stream = 10 * h + (4 * h if sandwich else 0)
    split = 2 * (h + 2 * kv) + 6 * f
    unfused = cfg.attention_backend in ("unfused", "local")  # probabilities kept: s x s per head
    attn = 2 * cfg.num_attention_heads * s * s * b / (tp * cp) if unfused else 0
    gathered_kv = 4 * s * b * kv / tp if cp > 1 else 0  # the whole sequence's K/V, saved for backward
    if cfg.recompute_granularity == "selective":
        modules = cfg.recompute_modules or ("core_attn",)
        if "core_attn" in modules:
            attn = 0
        if "layernorm" in modules:
            stream -= 4 * h  # the two pre-norm outputs
        if "mlp" in modules:
            split -= 6 * f  # the MLP's inner activations (its input is the kept norm output)
    block = s * b * stream / sp_cp + s * b * split / (tp * cp) + attn + gathered_kv
    unit_input = 2 * s * b * h / sp_cp  # what full recompute keeps of a recomputed unit
    method, n = cfg.recompute_unit()
    working = 0  # one unit's activations while backward recomputes it: one micro batch at a time
    if method == "uniform":  # every unit's input
        kept, working = unit_input * per_stage / n, block * n
    elif method == "block":  # n blocks of each model chunk recomputed, the others keep theirs
        recomputed = min(n * vp, per_stage)
        kept, working = unit_input * recomputed + block * (per_stage - recomputed), block
    else:
        kept = block * per_stage
    in_flight = min(pp, num_micro) * (1 + (pp - 1) / (pp * vp) if vp > 1 else 1)
    activations = kept * in_flight + working  # bf16 bytes
    if bf16:
        parts = {
            "weights (bf16)": 2 * params,
            "gradients (fp32)": 4 * params,
            "optimizer (fp32 main + Adam)": 12 * params / shard,
            "activations": activations,
            "logits + loss": 10 * s * b * vocab / (tp * cp),
        }
    else:  # fp32: no main copy (the optimizer updates the weights themselves), 4-byte activations
        parts = {
            "weights (fp32)": 4 * params,
            "gradients (fp32)": 4 * params,
            "optimizer (Adam, fp32)": 8 * params / shard,
            "activations": 2 * activations,
            "logits + loss": 8 * s * b * vocab / (tp * cp),
        }
    parts["CUDA context, NCCL, slack"] = 3 * GIB
    parts["total"] = sum(parts.values())
    return {"bytes": parts, "tokens_per_step": args.global_batch_size * s, "params_per_gpu": params,
            "dp": dp, "microbatches": num_micro, "precision": "bf16" if bf16 else "fp32"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Training flags without the ``--`` before them: one line saying so (not argparse's usage)."""
        if message.startswith("unrecognized arguments: "):
            first = message.split(": ", 1)[1].split()[0]
            raise ConfigError(f"{first} is not a flag of this tool; put -- before the training flags "
                              f"(estimate_memory.py --world-size N -- --num-layers ...)")
        super().error(message)


def main(argv=None):
    from megatron_prores.arguments import check_recipe

    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, required=True, help="GPUs of the job (nodes x GPUs per node)")
    p.add_argument("--vocab-size", type=int, default=32000, help="tokenizer size when the flags give none")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="-- then the training flags (or @recipe.txt)")
    a = p.parse_args(argv)
    for flag, value, what in (("--world-size", a.world_size, "the job's GPUs, nodes x GPUs per node"),
                              ("--vocab-size", a.vocab_size, "the tokenizer's size")):
        if value < 1:
            raise ConfigError(f"{flag} {value} is not valid; give a positive integer ({what})")
    flags = a.flags[1:] if a.flags[:1] == ["--"] else a.flags
    flags = flags + ["--save", "<not used>"]  # recipes save (the launcher adds --save); nothing is written here
    vocab, source = vocabulary(flags, a.vocab_size)
    flags = flags + ["--vocab-size", str(vocab)]  # the size found, which --mock-data needs stated
    args, cfg, dp, num_micro = check_recipe(flags, a.world_size, vocab)
    r = estimate(args, cfg, dp, num_micro)
    print("precision: " + ("bf16 (--bf16)" if args.bf16 else "fp32 (no --bf16: the driver trains in fp32)"))
    for name, v in r["bytes"].items():
        print(f"{name:32s} {v / GIB:8.1f} GiB")
    print(f"parameters per GPU (worst stage)  {r['params_per_gpu'] / 1e9:.3f} B; data parallel {dp}, "
          f"{num_micro} micro batches per step; tokens per step {r['tokens_per_step']:,}")
    print(f"vocabulary {cfg.vocab_size:,} ({source}), padded to {cfg.padded_vocab_size:,}")
    return r


def vocabulary(flags, default: int) -> tuple:
    """(vocabulary size, where it comes from) as the driver takes it: --vocab-size of the flags, else
    the size of their --tokenizer-model where that is on this machine, else this tool's --vocab-size;
    a --vocab-size below that tokenizer's size is refused, as the driver refuses it."""
    import os

    from megatron_prores.arguments import build_parser
    from megatron_prores.tokenizer import build_tokenizer, model_vocab_size

    args = build_parser().parse_args(flags)
    path = args.tokenizer_model
    if path and args.tokenizer_type != "NullTokenizer" and os.path.exists(path):
        vocab = model_vocab_size(build_tokenizer(args.tokenizer_type, path).vocab_size, args.vocab_size)
        return vocab, "--vocab-size of the flags" if args.vocab_size else f"the tokenizer {path}"
    if args.vocab_size:
        return args.vocab_size, "--vocab-size of the flags"
    why = f"the tokenizer {path} is not a file or folder here" if path else "the flags give no tokenizer"
    return default, f"this tool's --vocab-size: {why}"


def cli():
    sys.exit(run(main))


if __name__ == "__main__":
    cli()

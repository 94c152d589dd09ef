"""Command-line flags of the training driver, with Megatron-LM's names where the concept exists.

A recipe can be kept in a file of flags and passed as ``@recipe.txt`` (one or more flags per line;
lines starting with # are comments). Bad values end in one line naming the flag and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import shlex

import torch

from megatron_prores.config import (
    ATTENTION_BACKENDS,
    DEEPNORM_INITS,
    EMBEDDING_INITS,
    FP8_FORMATS,
    FP8_RECIPES,
    GATE_CLIP_ORDERS,
    GPAS_GATES,
    INIT_METHODS,
    LNS_GAINS,
    NORM_TYPES,
    NORMALIZATIONS,
    RECOMPUTE_GRANULARITIES,
    RECOMPUTE_METHODS,
    RECOMPUTE_MODULES,
    TRANSFORMER_IMPLS,
    WEIGHT_DECAY_GROUPS,
    ConfigError,
    MethodConfig,
    ModelConfig,
)
from megatron_prores.schedules import SCHEDULES, WARMUP_SPACINGS
from megatron_prores.tokenizer import TOKENIZER_TYPES


def _uncommented(line: str) -> str:
    """``line`` up to a ``#`` that starts a word outside quotes (a shell comment): ``--norm-type lns
    # LNS`` drops the comment, ``--data-path a#b`` and ``"# x"`` keep theirs."""
    quote, escaped = None, False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


# Megatron-LM flags this project does not have, with what to give instead (appended to argparse's
# "unrecognized arguments" line)
_MEGATRON_ONLY = {
    "--fp16": "fp16 with loss scaling is not supported: train in bf16 (--bf16, GPUs) or fp32",
    "--loss-scale": "fp16 loss scaling is not supported: train in bf16 (--bf16, GPUs) or fp32",
    "--initial-loss-scale": "fp16 loss scaling is not supported: train in bf16 (--bf16, GPUs) or fp32",
    "--recompute-activations": "Megatron-LM's old name: give --recompute-granularity selective",
    "--vocab-file": "GPT-2 BPE files are not read: give --tokenizer-type HuggingFaceTokenizer --tokenizer-model "
                    "tokenizer.json (or its directory)",
    "--merge-file": "GPT-2 BPE files are not read: give --tokenizer-type HuggingFaceTokenizer --tokenizer-model "
                    "tokenizer.json (or its directory)",
    "--apply-residual-connection-post-layernorm": "where norms and residuals go is --norm-type "
                                                  "(pre, post, sandwich, deepnorm, lns, mix)",
}


class _Parser(argparse.ArgumentParser):
    def convert_arg_line_to_args(self, line):  # an @file line: shell words, # comments anywhere
        return shlex.split(_uncommented(line))

    def error(self, message):  # one line, exit 2 (argparse's own usage dump is long)
        if message.startswith("unrecognized arguments:"):
            hints = {h for word in message.split()[2:] for flag, h in _MEGATRON_ONLY.items()
                     if word.split("=")[0] == flag}
            message += "".join(f" ({h})" for h in sorted(hints))
        raise ConfigError(message)


# argparse reads "-1e-3" as an option (its negative-number pattern has no exponent): accept any
# number here, so that a negative value reaches the range checks below and gets their message.
_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)


class _Stated(argparse.Action):
    """A plain value flag that also records that the command gave it (``args._stated``): for
    defaults that differ from Megatron-LM's, which a Megatron-LM recipe must then state."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.__dict__.setdefault("_stated", set()).add(self.dest)


def stated(args, dest: str) -> bool:
    return dest in getattr(args, "_stated", ())


# The method flags' defaults are MethodConfig's (one place); their names are its field names.
_METHOD = {f.name: f.default for f in dataclasses.fields(MethodConfig)}
_MODEL = ModelConfig()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="megatron-prores-train", fromfile_prefix_chars="@", allow_abbrev=False,
                description="Pretrain a GPT with ProRes/GPAS on megatron-core. Flags may come "
                            "from a file: megatron-prores-train @recipe.txt")
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden")
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--num-query-groups", type=int, default=None, help="GQA groups (default: heads)")
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="accepted for Megatron compatibility; RoPE needs none (must be >= seq length)")
    g.add_argument("--normalization", choices=NORMALIZATIONS, default=None, help=f"default {_MODEL.normalization}")
    g.add_argument("--norm-epsilon", type=float, default=_MODEL.norm_epsilon)
    g.add_argument("--rotary-base", type=float, default=_MODEL.rotary_base,
                   help="RoPE theta (Llama 2: 10000, Llama 3: 500000)")
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama 3.x RoPE scaling (low/high frequency factors 1/4, original context 8192)")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0, action=_Stated,
                   help="with --use-rope-scaling (Llama 3.1: 8, Llama 3.2: 32)")
    g.add_argument("--tie-embeddings-and-output-weights", action="store_true",
                   help="the output layer is the word embedding matrix (Megatron-LM's default, e.g. Llama 3.2 "
                        "1B/3B); default here: an output layer of its own")
    g.add_argument("--init-method-std", type=float, default=_MODEL.init_method_std)
    g.add_argument("--hidden-dropout", type=float, default=_MODEL.hidden_dropout, action=_Stated)
    g.add_argument("--attention-dropout", type=float, default=_MODEL.attention_dropout, action=_Stated)

    g = p.add_argument_group("ProRes / GPAS (this project)")
    g.add_argument("--norm-type", choices=NORM_TYPES, default=_METHOD["norm_type"])
    g.add_argument("--prores-schedule", choices=SCHEDULES, default=_METHOD["prores_schedule"])
    g.add_argument("--prores-warmup-steps", type=float, default=_METHOD["prores_warmup_steps"],
                   help="TOTAL warmup: steps until every block reaches its final value")
    g.add_argument("--gpas", action="store_true", help="gradient-preserving activation scaling")
    g.add_argument("--gpas-gate", choices=GPAS_GATES, default=_METHOD["gpas_gate"])
    g.add_argument("--clip-gate-grad", type=float, default=0.0,
                   help="separate gradient-norm clip over all GPAS gates (0: off)")
    g.add_argument("--mix-post-layers", type=int, default=_METHOD["mix_post_layers"],
                   help="Mix-LN: Post-LN blocks (default L/4)")
    g.add_argument("--init-method", choices=INIT_METHODS, default=_METHOD["init_method"])

    g = p.add_argument_group("choices of the official ProRes / GPAS code (defaults: the papers' text)")
    g.add_argument("--prores-warmup-spacing", choices=WARMUP_SPACINGS, default=_METHOD["prores_warmup_spacing"],
                   help="block l reaches its final ProRes value at W*l/L (even), or at linspace(floor(W/L), W, "
                        "L)[l] (official: the official ProRes code; the same when L divides W)")
    g.add_argument("--post-final-norm", action="store_true",
                   help="Post-LN/DeepNorm: one more norm before the output layer (the other norm types "
                        "have one already)")
    g.add_argument("--lns-gain", choices=LNS_GAINS, default=_METHOD["lns_gain"],
                   help="LNS: a fixed 1/sqrt(l) scale on the pre-norm output, or learnable norm gains "
                        "initialized to 1/sqrt(l) (the official code); no effect on other norm types")
    g.add_argument("--weight-decay-groups", choices=WEIGHT_DECAY_GROUPS, default=WEIGHT_DECAY_GROUPS[0],
                   help="no weight decay for 1-D parameters and biases (megatron), or also none for the word "
                        "embeddings but decay for the final norm's gain (official: the official ProRes code)")
    g.add_argument("--clip-gate-grad-order", choices=GATE_CLIP_ORDERS, default=GATE_CLIP_ORDERS[0],
                   help="the --clip-gate-grad clip before the global --clip-grad (its norm then counts the clipped "
                        "gates), or after it, on the globally clipped gate gradients (after: the official GPAS code)")
    g.add_argument("--embedding-init", choices=EMBEDDING_INITS, default=_METHOD["embedding_init"],
                   help="word embedding std: --init-method-std (normal), --init-method-std*sqrt(hidden) "
                        "(prores-code) or sqrt(2/5) (gpas-code)")
    g.add_argument("--deepnorm-init", choices=DEEPNORM_INITS, default=_METHOD["deepnorm_init"],
                   help="DeepNorm: normal init with v, out-proj and MLP times (8L)^-1/4 (scaled-normal), or the "
                        "official code's xavier-normal init, for plain DeepNorm only (official)")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, required=True)
    g.add_argument("--train-iters", type=int, default=None, help="training length in steps (or --train-samples)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="training length in samples (Megatron-LM's): --train-samples // --global-batch-size steps; "
                        "the LR schedule is then given in samples (--lr-warmup-samples, --lr-decay-samples, "
                        "--lr-wsd-decay-samples)")
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "WSD"], default="cosine",
                   action=_Stated)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="the LR the warmup starts from")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup as a fraction of the LR decay length (instead of --lr-warmup-iters)")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None, help="WSD: final decay length")
    g.add_argument("--lr-warmup-samples", type=int, default=0, help="with --train-samples")
    g.add_argument("--lr-decay-samples", type=int, default=None, help="with --train-samples (default: it)")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None, help="with --train-samples: WSD's final decay")
    g.add_argument("--lr-wsd-decay-style", choices=["linear", "cosine", "exponential", "minus_sqrt"],
                   default="linear")
    g.add_argument("--weight-decay", type=float, default=0.1, action=_Stated)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95, action=_Stated)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--max-nonfinite-iters", type=int, default=10,
                   help="stop after this many consecutive steps with a non-finite loss or grad norm")
    g.add_argument("--recompute-granularity", choices=RECOMPUTE_GRANULARITIES, default=None,
                   help="recompute activations in backward: full (whole blocks; see --recompute-method) or "
                        "selective (the --recompute-modules of each block)")
    g.add_argument("--recompute-method", choices=RECOMPUTE_METHODS, default=None,
                   help="full recompute: uniform (every block, in units of --recompute-num-layers; the default) "
                        "or block (the first --recompute-num-layers blocks of each model chunk)")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="full recompute: blocks per recomputed unit (uniform) or recomputed blocks per model "
                        "chunk (block); default 1")
    g.add_argument("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES, default=None,
                   help="selective recompute: which parts of each block (default: core_attn)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce each bucket's gradients over data-parallel ranks while backward goes on")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="all-gather the distributed optimizer's updated parameters during the next forward "
                        "(needs --use-distributed-optimizer and --overlap-grad-reduce)")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="elements per gradient bucket under --overlap-grad-reduce (default: megatron-core's, "
                        "max(40M, 1M x data-parallel size))")
    g.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default=_MODEL.transformer_impl)
    g.add_argument("--fp8-format", choices=FP8_FORMATS, default=_MODEL.fp8_format,
                   help="FP8 GEMMs through Transformer Engine (needs --transformer-impl transformer_engine "
                        "and --bf16); ProRes/GPAS math stays in bf16/fp32")
    g.add_argument("--fp8-recipe", choices=FP8_RECIPES, default=_MODEL.fp8_recipe,
                   help="FP8 scaling: delayed (amax history) or tensorwise (current scaling); mxfp8 and "
                        "blockwise need Blackwell / TE support")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default=_MODEL.attention_backend,
                   help="local spec: auto/flash/fused use PyTorch's scaled_dot_product_attention (any kernel / "
                        "flash only / memory-efficient only), unfused/local megatron-core's DotProductAttention; "
                        "TE spec: Transformer Engine's choice, local = megatron-core's DotProductAttention")
    g.add_argument("--no-bias-dropout-fusion", dest="bias_dropout_fusion", action="store_false",
                   help="run the residual ops eagerly instead of through torch.compile (GPU)")
    g.add_argument("--no-rope-fusion", dest="rope_fusion", action="store_false",
                   help="apply RoPE with megatron-core's eager ops instead of a fused kernel (GPU: Transformer "
                        "Engine's, else a torch.compile'd one)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="PREFIX or WEIGHT PREFIX [WEIGHT PREFIX ...] (a weighted blend)")
    g.add_argument("--split", default="969,30,1", help="train,valid,test weights")
    g.add_argument("--mock-data", action="store_true", help="synthetic tokens (benchmarks)")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="SentencePieceTokenizer")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-size", type=int, default=None,
                   help="model vocabulary (default: the tokenizer's); NullTokenizer's size")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the model vocabulary to a multiple of this x TP (Megatron-LM's rule)")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--eod-mask-loss", action="store_true",
                   help="no loss where the input token is the end-of-document token (Megatron-LM's)")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--keep-last-n", type=int, default=None,
                   help="keep only the newest N >= 1 checkpoints (the latest is never deleted)")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="resume from iteration N of --load instead of its latest (e.g. when the latest is damaged)")
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on resume, apply changed LR/weight-decay/ProRes schedule flags from the checkpoint's "
                        "iteration on (without it a changed schedule flag is refused)")
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true",
                   help="on resume, keep the checkpoint's LR/weight-decay schedule and ignore the flags")
    g.add_argument("--override-data-flags", action="store_true",
                   help="on resume, accept a changed --global-batch-size/--seq-length/--seed/--data-path/--split "
                        "(the position in samples is kept: samples may repeat or be skipped)")
    g.add_argument("--no-load-optim", action="store_true",
                   help="on resume, load the model weights and the schedule's position but start a fresh Adam "
                        "state (e.g. to switch --use-distributed-optimizer)")
    g.add_argument("--finetune", action="store_true",
                   help="start a new run at iteration 0 from --load's model weights (no optimizer, schedule, "
                        "data position or RNG state); a --save that holds this run's checkpoints resumes it")
    g.add_argument("--no-load-rng", action="store_true",
                   help="on resume, do not restore the RNG states (allows a checkpoint whose RNG files are missing)")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in a background process while training goes on; a checkpoint "
                        "becomes the latest only once every rank has finished writing it")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="SIGTERM/SIGUSR1 or a first Ctrl-C: save at the next step boundary and exit 0")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit 0 once the run has lasted this long")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit 0 after the iteration that is a multiple of this")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--valid-data-path", nargs="+", default=None, metavar="[NAME=]PREFIX",
                   help="held-out validation sets beside the --split part of --data-path: each whole file is "
                        "evaluated on its own (--eval-iters batches) and logged under its NAME (default: the "
                        "file name)")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--wandb-project", default=None,
                   help="also log the scalars to this Weights & Biases project (the optional extra: pip install "
                        "'megatron-prores[wandb]'); one wandb run per run, continued after a requeue")
    g.add_argument("--wandb-entity", default=None,
                   help="the wandb team or user the project belongs to (default: the logged-in user's default)")
    g.add_argument("--wandb-exp-name", default=None, help="the wandb run's name (default: wandb's)")
    g.add_argument("--wandb-save-dir", default=None,
                   help="where wandb keeps its files (default: SAVE/wandb, else ./wandb)")
    g = p.add_argument_group("profiling and the host (Megatron-LM's flags)")
    g.add_argument("--profile", action="store_true",
                   help="profile steps --profile-step-start .. --profile-step-end - 1: for Nsight Systems "
                        "(cudaProfilerStart/Stop and NVTX ranges; run under nsys profile "
                        "--capture-range=cudaProfilerApi), or with --use-pytorch-profiler")
    g.add_argument("--use-pytorch-profiler", action="store_true",
                   help="--profile with torch.profiler: a trace per rank in TENSORBOARD_DIR/../torch_profile "
                        "(./torch_profile without --tensorboard-dir) and the top operators in the log")
    g.add_argument("--profile-step-start", type=int, default=10, help="first profiled step (0-based)")
    g.add_argument("--profile-step-end", type=int, default=12, help="the step after the last profiled one")
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0], metavar="RANK",
                   help="the global ranks that profile (default: 0)")
    g.add_argument("--manual-gc", action="store_true",
                   help="turn Python's automatic garbage collector off; collect on every rank at the same "
                        "steps (--manual-gc-interval) and around evaluation")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="with --manual-gc: collect after every N-th step (0: not during training)")
    g.add_argument("--no-manual-gc-eval", dest="manual_gc_eval", action="store_false",
                   help="with --manual-gc: do not collect before and after each evaluation")

    g = p.add_argument_group("Megatron-LM flags that state what this model always is (accepted, no effect)")
    for flag, what in MEGATRON_STATEMENTS.items():
        g.add_argument(flag, action="store_true", help=what)
    g.add_argument("--position-embedding-type", choices=["rope"], default=None, help="RoPE (the only one)")
    g.add_argument("--distributed-backend", choices=["nccl"], default="nccl",
                   help="NCCL on GPUs (a CPU run uses gloo)")
    g.add_argument("--use-flash-attn", action="store_true",
                   help="Megatron-LM's older name for --attention-backend flash")
    g.add_argument("--kv-channels", type=int, default=None, help="the head size: must be hidden / heads here")
    g.add_argument("--rotary-percent", type=float, default=1.0, help="RoPE over the whole head (1.0 only)")
    g.add_argument("--ckpt-format", choices=["torch_dist"], default="torch_dist",
                   help="megatron-core's distributed checkpoint format (the only one)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="no effect: batches come from the memory-mapped dataset in the training process")
    g.add_argument("--distributed-timeout-minutes", type=int, default=30,
                   help="timeout of the process groups' collectives")
    p._negative_number_matcher = _NUMBER
    return p


# Megatron-LM flags a Llama-style recipe carries that describe this project's model as it always
# is (Llama-style: SwiGLU, RoPE, no biases, untied output layer, GQA by --num-query-groups) or a
# setting it always has: a Megatron-LM recipe runs unchanged.
MEGATRON_STATEMENTS = {
    "--swiglu": "SwiGLU MLP (always)",
    "--disable-bias-linear": "no linear biases (always)",
    "--untie-embeddings-and-output-weights": "an output layer of its own (the default here; "
                                             "--tie-embeddings-and-output-weights ties it)",
    "--use-rotary-position-embeddings": "RoPE (always)",
    "--no-position-embedding": "no learned absolute positions (always)",
    "--group-query-attention": "GQA: set by --num-query-groups",
    "--use-mcore-models": "megatron-core's GPTModel (always)",
    "--attention-softmax-in-fp32": "softmax accumulates in fp32 (SDPA and TE kernels)",
    "--no-masked-softmax-fusion": "no masked-softmax kernel is used (SDPA or TE attention)",
    "--no-gradient-accumulation-fusion": "gradients accumulate without the apex/TE fused wgrad kernel (always)",
    "--log-throughput": "tokens/s, TFLOP/s and MFU are always in the log line",
    "--no-create-attention-mask-in-dataloader": "no attention mask is built (the attention kernels are causal)",
}


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args, this_machine: bool = True) -> None:
    """Cross-flag checks that need no model and no process group (``this_machine=False``: leave
    out the checks that depend on this machine having a GPU, e.g. for a cluster recipe)."""
    def need(cond, message):
        if not cond:
            raise ConfigError(message)

    for flag, ok, what in _RANGES:
        v = getattr(args, flag)
        if v is None:
            continue
        need(not isinstance(v, float) or math.isfinite(v), f"--{flag.replace('_', '-')} {v} is not valid; it "
                                                              f"must be a finite number")
        need(ok(v), f"--{flag.replace('_', '-')} {v} is not valid; it must be {what}")
    _check_training_length(args)
    need(not (args.tie_embeddings_and_output_weights and args.untie_embeddings_and_output_weights),
         "--tie-embeddings-and-output-weights and --untie-embeddings-and-output-weights exclude each other; give one")
    _check_megatron_recipe(args)
    _check_split(args.split)
    need(0 <= args.min_lr <= args.lr, f"--min-lr {args.min_lr} must be in [0, --lr {args.lr}]")
    need(args.mock_data or args.data_path,
         "no training data: give --data-path PREFIX (from tools/preprocess_data.py) or --mock-data")
    need(not (args.mock_data and args.data_path), "give either --data-path or --mock-data, not both")
    need(not args.valid_data_path or args.eval_iters > 0,
         "--valid-data-path needs evaluation: give --eval-iters > 0 (with --eval-interval N to evaluate every N steps)")
    if args.tokenizer_type == "NullTokenizer" or args.mock_data:
        need(args.vocab_size or args.tokenizer_model,
             "--mock-data/--tokenizer-type NullTokenizer need --vocab-size" if args.vocab_size is None else
             f"--vocab-size {args.vocab_size} is not valid; it must be >= 2")
    else:
        need(args.tokenizer_model, f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model")
    if args.max_position_embeddings is not None:
        need(args.max_position_embeddings >= args.seq_length,
             f"--max-position-embeddings {args.max_position_embeddings} is below --seq-length {args.seq_length}")
    if args.lr_warmup_fraction is not None:
        need(0 <= args.lr_warmup_fraction < 1, f"--lr-warmup-fraction {args.lr_warmup_fraction} is not valid; it "
                                                f"must be in [0, 1)")
        need(args.lr_warmup_iters == 0, "--lr-warmup-fraction and --lr-warmup-iters exclude each other; give one")
        need(args.lr_warmup_samples == 0, "--lr-warmup-fraction and --lr-warmup-samples exclude each other; give one")
    if args.kv_channels is not None:
        need(args.kv_channels * args.num_attention_heads == args.hidden_size,
             f"--kv-channels {args.kv_channels} is not --hidden-size {args.hidden_size} / --num-attention-heads "
             f"{args.num_attention_heads}: this model's head size is hidden / heads; drop --kv-channels")
    need(args.use_rope_scaling or not stated(args, "rope_scaling_factor"),
         f"--rope-scaling-factor {args.rope_scaling_factor:g} does nothing without --use-rope-scaling (RoPE would "
         f"stay unscaled); add --use-rope-scaling or drop the factor")
    need(args.rotary_percent == 1.0, f"--rotary-percent {args.rotary_percent}: this model applies RoPE to the whole "
                                     f"head (1.0); drop the flag")
    if args.use_flash_attn:
        need(args.attention_backend in ("auto", "flash"), f"--use-flash-attn asks for --attention-backend flash, "
                                                          f"but --attention-backend is {args.attention_backend}; give one")
        args.attention_backend = "flash"
    if args.lr_decay_style == "WSD":
        need(args.lr_wsd_decay_samples if args.train_samples else args.lr_wsd_decay_iters,
             f"--lr-decay-style WSD needs --lr-wsd-decay-{'samples' if args.train_samples else 'iters'}")
    need(args.lr_warmup_init <= args.lr, f"--lr-warmup-init {args.lr_warmup_init} must be at most --lr {args.lr}")
    lengths = schedule_samples(args)
    unit = "samples" if args.train_samples else "iters"
    need(lengths["warmup"] < lengths["decay"],
         f"the LR warmup ({lengths['warmup']:g} samples) must be shorter than its decay ({lengths['decay']:g} samples); "
         f"shorten --lr-warmup-{unit} or lengthen --lr-decay-{unit}")
    need(lengths["wsd"] is None or lengths["wsd"] <= lengths["decay"],
         f"--lr-wsd-decay-{unit} is longer than the LR decay (--lr-decay-{unit}, default the training length)")
    need(not (args.tie_embeddings_and_output_weights and args.pipeline_model_parallel_size > 1
              and args.use_distributed_optimizer and args.gpas),
         "--tie-embeddings-and-output-weights with pipeline parallelism, the distributed optimizer and --gpas fails "
         "to save (megatron-core's optimizer layout); drop one of them (e.g. use the plain optimizer)")
    need(not (args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler),
         "--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other; give one")
    for flag in ("save", "load", "tensorboard_dir", "data_cache_path"):
        value = getattr(args, flag)
        need(value is None or value.strip(), f"--{flag.replace('_', '-')} is empty (an unset shell variable?); give a "
                                             f"directory or leave the flag out")
    need(args.ckpt_step is None or args.load, "--ckpt-step needs --load DIR (the run to resume from)")
    if args.finetune:
        need(args.load, "--finetune needs --load DIR (the checkpoint whose weights start the new run)")
        need(not args.save or os.path.realpath(args.save) != os.path.realpath(args.load),
             f"--finetune starts a new run at iteration 0: give it a --save other than --load ({args.load})")
    for flag in ("save_interval", "exit_interval", "exit_duration_in_mins", "exit_signal_handler", "async_save"):
        if getattr(args, flag):  # a stop or a save with nowhere to save: the steps trained would be lost
            need(args.save, f"--{flag.replace('_', '-')} needs --save DIR (the run saves there before it stops)"
                 if "exit" in flag else f"--{flag.replace('_', '-')} needs --save DIR")
    if args.clip_gate_grad > 0:
        need(args.gpas, "--clip-gate-grad needs --gpas")
    if args.overlap_param_gather:
        need(args.use_distributed_optimizer, "--overlap-param-gather needs --use-distributed-optimizer "
                                             "(it overlaps the distributed optimizer's parameter all-gather)")
        need(args.overlap_grad_reduce, "--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM)")
    if args.ddp_bucket_size is not None:
        need(args.overlap_grad_reduce, "--ddp-bucket-size needs --overlap-grad-reduce (without it, all gradients "
                                       "are reduced at once after backward)")
    _check_profiling(args, this_machine)
    _check_wandb(args, this_machine)
    if args.bf16 and this_machine:
        need(torch.cuda.is_available(), "--bf16 needs a GPU; the CPU path trains in fp32 (drop --bf16)")


# What a Megatron-LM recipe builds when it leaves a flag out, where that differs from this model:
# (how the flag is given here, what it states, what its absence means in Megatron-LM)
_MEGATRON_DEFAULTS = (
    (lambda a: a.swiglu, "--swiglu", "a GeLU MLP"),
    (lambda a: a.disable_bias_linear, "--disable-bias-linear", "linear layers with biases"),
    (lambda a: a.untie_embeddings_and_output_weights or a.tie_embeddings_and_output_weights,
     "--untie-embeddings-and-output-weights (or --tie-embeddings-and-output-weights)",
     "an output layer tied to the embedding"),
    (lambda a: a.position_embedding_type or a.use_rotary_position_embeddings, "--position-embedding-type rope",
     "learned absolute positions"),
    (lambda a: a.normalization, "--normalization RMSNorm (or LayerNorm)", "LayerNorm"),
    (lambda a: a.group_query_attention or a.num_query_groups is None, "--group-query-attention",
     "--num-query-groups ignored (every head its own keys and values)"),
    (lambda a: not a.group_query_attention or a.num_query_groups is not None,
     "--num-query-groups (with --group-query-attention)", "one key/value group (multi-query attention)"),
    (lambda a: a.ffn_hidden_size is not None, "--ffn-hidden-size",
     "4 x --hidden-size, or with --swiglu 8/3 x --hidden-size rounded down to a multiple of 64"),
    # defaults of this project that differ from Megatron-LM's (here: dropout 0, wd 0.1, beta2 0.95, cosine)
    (lambda a: stated(a, "hidden_dropout"), "--hidden-dropout", "0.1"),
    (lambda a: stated(a, "attention_dropout"), "--attention-dropout", "0.1"),
    (lambda a: stated(a, "weight_decay"), "--weight-decay", "0.01"),
    (lambda a: stated(a, "adam_beta2"), "--adam-beta2", "0.999"),
    (lambda a: stated(a, "lr_decay_style"), "--lr-decay-style", "linear"),
)


def _check_megatron_recipe(args) -> None:
    """A command that gives Megatron-LM's model-statement flags reads as a Megatron-LM recipe: every
    flag whose absence would build another model there must then be given (one line naming them)."""
    given = [f for f in MEGATRON_STATEMENTS if getattr(args, f[2:].replace("-", "_"))]
    given += ["--position-embedding-type"] * bool(args.position_embedding_type) + ["--use-flash-attn"] * args.use_flash_attn
    if not given:
        return
    missing = [(flag, there) for stated, flag, there in _MEGATRON_DEFAULTS if not stated(args)]
    if missing:
        raise ConfigError(f"this command reads as a Megatron-LM recipe (it gives {given[0]}), where leaving out "
                          + ", ".join(f"{flag} means {there}" for flag, there in missing)
                          + "; add " + " ".join(flag.split(" (")[0] for flag, _ in missing)
                          + " to state this model and its training (or drop the Megatron-LM flags)")


# the LR schedule's lengths: in steps with --train-iters, in samples with --train-samples (Megatron-LM's)
_ITER_SCHEDULE = {"lr_warmup_iters": 0, "lr_decay_iters": None, "lr_wsd_decay_iters": None}
_SAMPLE_SCHEDULE = {"lr_warmup_samples": 0, "lr_decay_samples": None, "lr_wsd_decay_samples": None}


def _check_training_length(args) -> None:
    """One of --train-iters and --train-samples; the LR schedule's flags of the same kind. With
    --train-samples, --train-iters becomes train_samples // global batch (Megatron-LM's rule)."""
    def flag(name):
        return "--" + name.replace("_", "-")

    from_samples = getattr(args, "_train_iters_from_samples", False)  # check_args ran before
    if args.train_samples is None:
        if args.train_iters is None:
            raise ConfigError("give the training length: --train-iters STEPS or --train-samples SAMPLES")
        wrong, kind = _SAMPLE_SCHEDULE, "--train-iters"
    else:
        if args.train_iters is not None and not from_samples:
            raise ConfigError("--train-iters and --train-samples exclude each other; give one")
        if args.global_batch_size > 0 and args.train_samples < args.global_batch_size:
            raise ConfigError(f"--train-samples {args.train_samples} is less than one global batch "
                              f"(--global-batch-size {args.global_batch_size})")
        args.train_iters = args.train_samples // max(args.global_batch_size, 1)
        args._train_iters_from_samples = True
        wrong, kind = _ITER_SCHEDULE, "--train-samples"
    for name, unset in wrong.items():
        if getattr(args, name) != unset:
            other = name.replace("iters", "samples") if "iters" in name else name.replace("samples", "iters")
            raise ConfigError(f"{flag(name)} does not go with {kind} (the LR schedule is in "
                              f"{'samples' if kind == '--train-samples' else 'steps'} then); give {flag(other)}")


def schedule_samples(args) -> dict:
    """The LR schedule's lengths in samples, as megatron's OptimizerParamScheduler counts them:
    warmup (not rounded to whole steps: --lr-warmup-fraction x decay, or --lr-warmup-samples),
    decay, and WSD's final decay (None without one)."""
    from megatron_prores.resume import run_flags, schedule_in_samples

    return schedule_in_samples(run_flags(args))


def _check_profiling(args, this_machine: bool) -> None:
    if args.use_pytorch_profiler and not args.profile:
        raise ConfigError("--use-pytorch-profiler is a way of --profile: add --profile")
    if (args.manual_gc_interval or not args.manual_gc_eval) and not args.manual_gc:
        raise ConfigError("--manual-gc-interval and --no-manual-gc-eval set --manual-gc's collections: add --manual-gc")
    if not args.profile:
        return
    if args.profile_step_end <= args.profile_step_start:
        raise ConfigError(f"--profile-step-end {args.profile_step_end} must be after --profile-step-start "
                          f"{args.profile_step_start} (it is the step after the last profiled one)")
    if args.profile_step_end > args.train_iters:
        raise ConfigError(f"--profile-step-end {args.profile_step_end} is past the run's end (--train-iters "
                          f"{args.train_iters}): the profile would never be written; lower it")
    if any(r < 0 for r in args.profile_ranks):
        raise ConfigError(f"--profile-ranks {' '.join(map(str, args.profile_ranks))}: ranks are >= 0")
    if this_machine and not args.use_pytorch_profiler and not torch.cuda.is_available():
        raise ConfigError("--profile without --use-pytorch-profiler marks the steps for Nsight Systems, which "
                          "needs a GPU; on this machine add --use-pytorch-profiler")


def _check_wandb(args, this_machine: bool) -> None:
    """The --wandb-* flags need --wandb-project and (on this machine) the wandb package, an
    optional extra."""
    from megatron_prores import wandb_writer

    given = [f for f in wandb_writer.FLAGS if getattr(args, f) is not None]
    if not given:
        return
    flag = "--" + given[0].replace("_", "-")
    if this_machine and not wandb_writer.available():
        raise ConfigError(f"{flag} needs the wandb package, which is not installed: {wandb_writer.EXTRA}")
    if not args.wandb_project:
        raise ConfigError(f"{flag} needs --wandb-project NAME (the wandb project to log to)")


# Value ranges of numeric flags: (flag, test, what the value must be). None (unset) is not checked.
_RANGES = (
    ("micro_batch_size", lambda v: v > 0, "positive"),
    ("global_batch_size", lambda v: v > 0, "positive"),
    ("train_iters", lambda v: v > 0, "positive"),
    ("distributed_timeout_minutes", lambda v: 0 < v <= 10 ** 6, "positive, at most 1,000,000"),
    ("seed", lambda v: 0 <= v <= 2 ** 31, "in [0, 2**31] (each rank adds a small offset; torch takes < 2**32)"),
    ("train_samples", lambda v: v > 0, "positive"),
    ("lr_warmup_samples", lambda v: v >= 0, ">= 0"),
    ("lr_decay_samples", lambda v: v > 0, "positive"),
    ("lr_wsd_decay_samples", lambda v: v > 0, "positive"),
    ("seq_length", lambda v: v > 0, "positive"),
    ("log_interval", lambda v: v > 0, "positive"),
    ("lr", lambda v: v > 0, "positive"),
    ("min_lr", lambda v: v >= 0, ">= 0"),
    ("lr_warmup_init", lambda v: v >= 0, ">= 0"),
    ("lr_warmup_iters", lambda v: v >= 0, ">= 0"),
    ("lr_decay_iters", lambda v: v > 0, "positive"),
    ("lr_wsd_decay_iters", lambda v: v > 0, "positive"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_eps", lambda v: v >= 0, ">= 0"),
    ("clip_grad", lambda v: v >= 0, ">= 0 (0: no clipping)"),
    ("clip_gate_grad", lambda v: v >= 0, ">= 0 (0: off)"),
    ("init_method_std", lambda v: v > 0, "positive"),
    ("max_nonfinite_iters", lambda v: v > 0, "positive"),
    ("eval_iters", lambda v: v >= 0, ">= 0 (0: no evaluation)"),
    ("eval_interval", lambda v: v > 0, "positive"),
    ("save_interval", lambda v: v > 0, "positive"),
    ("ddp_bucket_size", lambda v: v > 0, "positive"),
    ("keep_last_n", lambda v: v >= 1, ">= 1 (the number of newest checkpoints kept)"),
    ("ckpt_step", lambda v: v >= 0, ">= 0"),
    ("exit_duration_in_mins", lambda v: v > 0, "positive"),
    ("exit_interval", lambda v: v > 0, "positive"),
    ("prores_warmup_steps", lambda v: v >= 0, ">= 0"),
    ("profile_step_start", lambda v: v >= 0, ">= 0"),
    ("manual_gc_interval", lambda v: v >= 0, ">= 0 (0: no collection during training)"),
)


def _check_split(split: str) -> None:
    """--split: 1 to 3 comma-separated non-negative weights (train, valid, test), train > 0."""
    parts = split.replace("/", ",").split(",")
    try:
        weights = [float(x) for x in parts]
    except ValueError:
        weights = []
    if not 1 <= len(parts) <= 3 or len(weights) != len(parts) or not all(math.isfinite(w) and w >= 0 for w in weights) \
            or weights[0] <= 0:
        raise ConfigError(f"--split {split!r} is not valid; give train,valid,test weights such as 969,30,1 "
                          f"(non-negative numbers, train > 0)")


def parse_data_path(data_path):
    """['p'] or ['w1', 'p1', 'w2', 'p2'] -> (prefixes, weights or None)."""
    if len(data_path) == 1:
        return [data_path[0]], None
    if len(data_path) % 2:
        raise ConfigError("--data-path takes PREFIX or pairs WEIGHT PREFIX [WEIGHT PREFIX ...]")
    try:
        weights = [float(w) for w in data_path[0::2]]
    except ValueError:
        raise ConfigError("--data-path with several prefixes takes pairs WEIGHT PREFIX") from None
    for w in weights:
        if not (math.isfinite(w) and w > 0):
            raise ConfigError(f"--data-path weight {w} is not valid; the weights must be positive finite numbers")
    return list(data_path[1::2]), weights


def model_config(args, vocab_size: int) -> ModelConfig:
    method = MethodConfig(**{name: getattr(args, name) for name in _METHOD})  # the flags carry its field names
    return ModelConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        ffn_hidden_size=args.ffn_hidden_size, vocab_size=vocab_size, seq_length=args.seq_length,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        normalization=args.normalization or _MODEL.normalization, norm_epsilon=args.norm_epsilon,
        rotary_base=args.rotary_base,
        rope_scaling_factor=args.rope_scaling_factor if args.use_rope_scaling else None,
        tie_embeddings=args.tie_embeddings_and_output_weights,
        init_method_std=args.init_method_std, hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
        sequence_parallel=args.sequence_parallel, context_parallel_size=args.context_parallel_size,
        transformer_impl=args.transformer_impl, bf16=args.bf16, method=method,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        recompute_modules=tuple(args.recompute_modules) if args.recompute_modules else None,
        fp8_format=args.fp8_format,
        fp8_recipe=args.fp8_recipe, attention_backend=args.attention_backend,
        bias_dropout_fusion=args.bias_dropout_fusion,
        rope_fusion=args.rope_fusion,
    )


def check_layout(args, cfg: ModelConfig, world: int) -> tuple:
    """World size against TP x PP x CP and the batch sizes; returns (data-parallel size,
    microbatches per step)."""
    model_parallel = cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size * cfg.context_parallel_size
    if world % model_parallel:
        raise ConfigError(f"{world} processes do not divide into TP x PP x CP = {model_parallel}")
    dp = world // model_parallel
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                          f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}")
    num_micro = args.global_batch_size // (args.micro_batch_size * dp)
    if args.profile and max(args.profile_ranks) >= world:
        raise ConfigError(f"--profile-ranks {' '.join(map(str, args.profile_ranks))}: this run of {world} "
                          f"process(es) has ranks 0..{world - 1}")
    if cfg.fp8_format is not None:
        shards = cfg.context_parallel_size * (cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1)
        tokens = cfg.seq_length // shards * args.micro_batch_size
        if tokens % 16:
            raise ConfigError(f"FP8 GEMMs need the tokens of a micro batch per rank ({tokens} = --seq-length / "
                              f"(CP x SP-TP) x --micro-batch-size) to be a multiple of 16; change --seq-length "
                              f"or --micro-batch-size, or drop --fp8-format")
    if cfg.virtual_pipeline_size and num_micro % cfg.pipeline_model_parallel_size:
        raise ConfigError(f"the interleaved pipeline needs the number of microbatches ({num_micro}) "
                          f"to be a multiple of --pipeline-model-parallel-size")
    return dp, num_micro


def train_iters(argv) -> int:
    """The steps a run of these flags trains for, as the driver reads them (``=`` forms, ``@file``,
    the last of repeated flags, --train-samples // global batch): slurm/launch.sh asks it whether a
    run that stopped is finished."""
    args = build_parser().parse_args(argv)
    check_args(args, this_machine=False)
    return args.train_iters


def check_recipe(argv, world: int, vocab_size: int = 32000) -> tuple:
    """Parse and check a recipe's flags for a cluster of ``world`` processes, on any machine
    (no GPU or Transformer Engine needed here). Returns (args, model config, dp, microbatches)."""
    p = build_parser()
    args = p.parse_args(argv)
    check_args(args, this_machine=False)
    cfg = model_config(args, args.vocab_size or vocab_size)
    cfg.validate(check_installed=False)
    dp, num_micro = check_layout(args, cfg, world)
    return args, cfg, dp, num_micro

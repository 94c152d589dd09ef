"""Convert a checkpoint of this project to a Hugging Face model directory (streamed, layer by layer).

    megatron-prores-convert-to-hf --load CKPT_DIR [--iteration N] --output HF_DIR [--no-fold]

Pre-LN and LNS models become a plain LlamaForCausalLM (ProRes values, GPAS scales and LNS constants
folded into the weights); other norms, LayerNorm, an unfoldable GPAS scale or --no-fold give
ProResForCausalLM (code shipped in HF_DIR, load with trust_remote_code=True). Any iteration and
any TP/PP layout the checkpoint was saved with.
"""

from __future__ import annotations

import argparse
import math
import sys

from megatron_prores.config import ConfigError
from megatron_prores.tools import run


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="the --save directory of a run")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest complete checkpoint")
    p.add_argument("--output", required=True, help="new Hugging Face model directory")
    p.add_argument("--no-fold", action="store_true",
                   help="keep ProRes values and GPAS gates explicit (ProResForCausalLM), even for Pre-LN")
    p.add_argument("--tokenizer-model", default=None,
                   help="tokenizer to include: a SentencePiece .model, or a Hugging Face tokenizer.json or "
                        "directory (default: the one the run trained with); 'none': the weights alone")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype (default: as stored; GPAS gates stay fp32)")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="GB per safetensors shard")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    from megatron_prores.hf_export import export

    if not (math.isfinite(args.max_shard_size) and args.max_shard_size > 0):
        raise ConfigError(f"--max-shard-size {args.max_shard_size} is not valid; it must be a positive number of GB")
    if not args.output.strip():
        raise ConfigError("--output is empty (an unset shell variable?); give the new model directory")
    return export(args.load, args.output, args.iteration, fold=not args.no_fold,
                  tokenizer_model=args.tokenizer_model, dtype=args.dtype,
                  max_shard_bytes=int(args.max_shard_size * 1e9), progress=sys.stderr.isatty())


def cli():
    sys.exit(run(main))


if __name__ == "__main__":
    cli()

"""Import a Hugging Face Llama model as a checkpoint of this project, to continue pretraining.

    megatron-prores-convert-from-hf --input HF_DIR --save CKPT_DIR [--seq-length N] [--tokenizer-model M]

Writes CKPT_DIR/iter_0000000 (model only) and the latest marker; train from it with
``megatron-prores-train --load CKPT_DIR --save CKPT_DIR ...`` under any TP/PP layout. The tokenizer
(HF_DIR's tokenizer.json, or --tokenizer-model), the special token ids and max_position_embeddings
are recorded for a later convert-to-hf.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from megatron_prores.config import ConfigError
from megatron_prores.tools import run


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="Hugging Face Llama model directory (safetensors)")
    p.add_argument("--save", required=True, help="checkpoint directory to create")
    p.add_argument("--seq-length", type=int, default=None, help="default: max_position_embeddings (<= 4096)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--tokenizer-model", default=None,
                   help="tokenizer recorded for a later export: a SentencePiece .model, or a Hugging Face "
                        "tokenizer.json or directory (default: --input's tokenizer.json when it has one)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    for flag, value, what in (("--input", args.input, "the Hugging Face model directory"),
                              ("--save", args.save, "the checkpoint directory to create")):
        if not value.strip():
            raise ConfigError(f"{flag} is empty (an unset shell variable?); give {what}")
    if args.make_vocab_size_divisible_by <= 0:
        raise ConfigError(f"--make-vocab-size-divisible-by {args.make_vocab_size_divisible_by} is not valid; it "
                          f"must be a positive integer (default 128)")
    if args.seq_length is not None and args.seq_length <= 0:
        raise ConfigError(f"--seq-length {args.seq_length} is not valid; it must be positive (or left out: "
                          f"config.json's max_position_embeddings, at most 4096)")
    if os.path.exists(args.save) and (not os.path.isdir(args.save) or os.listdir(args.save)):
        raise ConfigError(f"--save {args.save!r} is not an empty directory; give a new directory")
    from megatron_prores.hf_import import check_input, import_tokenizer

    check_input(args.input)  # a damaged download fails here, in one line, before anything is written
    args.tokenizer_type, args.tokenizer_model = import_tokenizer(args.input, args.tokenizer_model)
    created = not os.path.exists(args.save)
    try:
        os.makedirs(args.save, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--save {args.save!r}: cannot create {e.filename or args.save} ({e.strerror}); "
                          f"give a writable directory") from None
    try:
        _import(args)
    except BaseException:  # no partial checkpoint: --save was empty or did not exist
        if created:
            shutil.rmtree(args.save, ignore_errors=True)
        else:
            for name in os.listdir(args.save):
                path = os.path.join(args.save, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
        raise


def _import(args):
    import socket

    # one process of its own: a free local port, whatever a surrounding launcher exported
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from megatron_prores import parallel
    from megatron_prores.hf_import import import_llama

    parallel.initialize()
    import_llama(args.input, args.save, args.seq_length, args.make_vocab_size_divisible_by,
                 tokenizer_model=args.tokenizer_model, tokenizer_type=args.tokenizer_type)


def cli():
    code = run(main)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    cli()

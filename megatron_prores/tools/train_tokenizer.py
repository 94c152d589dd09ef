"""Train a SentencePiece tokenizer (BPE or unigram) on JSONL, Parquet or plain text files."""

from __future__ import annotations

import argparse
import io
import os
import sys

from megatron_prores.errors import ConfigError
from megatron_prores.text_corpus import Skipped, iter_texts
from megatron_prores.tools import run


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", nargs="+", required=True,
                   help="JSONL (.jsonl/.json, also .jsonl.gz/.jsonl.zst), Parquet (.parquet) or text files (any other "
                        "name), directories of JSONL/Parquet files, or globs (read as tools/preprocess_data.py reads "
                        "them)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSONL keys holding text")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="unknown characters become UTF-8 bytes (no <unk> in practice)")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="lines sampled for training (input is split into lines)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip JSONL lines that are not UTF-8, not JSON or not an object (counted at the end) "
                        "instead of stopping at the first")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    import sentencepiece as spm

    if args.vocab_size < 16:
        raise ConfigError(f"--vocab-size {args.vocab_size} is too small; use at least 16")
    skipped = Skipped() if args.skip_bad_lines else None
    lines = [line for text in iter_texts(args.input, args.json_keys, skipped)
             for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"--input {' '.join(args.input)} holds no text"
                          + (f" ({skipped.summary()})" if skipped and skipped.count else ""))
    os.makedirs(os.path.dirname(os.path.abspath(args.model_prefix)), exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=args.vocab_size,
            model_type=args.model_type, byte_fallback=args.byte_fallback,
            character_coverage=args.character_coverage, input_sentence_size=args.max_sentences,
            shuffle_input_sentence=True, split_digits=True,
            allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConfigError(f"SentencePiece could not train: {msg} (adjust --vocab-size or give more text)") from None
    tmp = args.model_prefix + ".model.tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, args.model_prefix + ".model")
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(args.model_prefix + ".vocab", "w", encoding="utf-8") as f:
        for i in range(sp.GetPieceSize()):
            f.write(f"{sp.IdToPiece(i)}\t{sp.GetScore(i)}\n")
    print(f"trained a {args.model_type} tokenizer of {sp.GetPieceSize()} pieces on {len(lines)} lines: "
          f"{args.model_prefix}.model (eos id {sp.eos_id()})")
    if skipped and skipped.count:
        print(skipped.summary())


def cli():
    sys.exit(run(main))


if __name__ == "__main__":
    cli()

"""Train a SentencePiece tokenizer (BPE or unigram) on JSONL, Parquet or plain text files."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys

from megatron_prores.errors import ConfigError
from megatron_prores.text_corpus import Skipped, iter_texts
from megatron_prores.tools import check_output, run

MAX_LINE_BYTES = 1 << 16  # SentencePiece's max_sentence_length: it leaves longer lines out without a word


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
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of the characters the vocabulary covers, 0.98 to 1.0 (rarer ones: byte fallback)")
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="lines sampled for training (input is split into lines, lines over 64 KiB into pieces): "
                        "more than 100, or 0 for all")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip JSONL lines that are not UTF-8, not JSON or not an object (counted at the end) "
                        "instead of stopping at the first")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    import sentencepiece as spm

    if args.vocab_size < 16:
        raise ConfigError(f"--vocab-size {args.vocab_size} is too small; use at least 16")
    if not 0.98 <= args.character_coverage <= 1.0:  # SentencePiece's range (also rejects nan)
        raise ConfigError(f"--character-coverage {args.character_coverage} is out of range; give a value from "
                          f"0.98 to 1.0 (e.g. 0.9995, or 1.0 for every character)")
    if not (args.max_sentences == 0 or 100 < args.max_sentences < 2 ** 64):  # SentencePiece's range
        raise ConfigError(f"--max-sentences {args.max_sentences} is out of range; give a number of lines above 100, "
                          f"or 0 to train on all lines")
    check_output("--model-prefix", args.model_prefix, "tok", suffixes=(".model", ".vocab"))
    skipped = Skipped() if args.skip_bad_lines else None
    lines, cut = [], 0
    for text in iter_texts(args.input, args.json_keys, skipped):
        for line in text.splitlines():
            if line.strip():
                parts = pieces(line)
                cut += len(parts) > 1
                lines += [p for p in parts if p.strip()]
    if not lines:
        raise ConfigError(f"--input {' '.join(args.input)} holds no text"
                          + (f" ({skipped.summary()})" if skipped and skipped.count else ""))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=args.vocab_size,
            model_type=args.model_type, byte_fallback=args.byte_fallback,
            character_coverage=args.character_coverage, input_sentence_size=args.max_sentences,
            shuffle_input_sentence=True, split_digits=True,
            allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            max_sentence_length=MAX_LINE_BYTES, num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConfigError(f"SentencePiece could not train: {msg} (adjust --vocab-size or give more text)") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{sp.IdToPiece(i)}\t{sp.GetScore(i)}\n" for i in range(sp.GetPieceSize()))
    write_files(args.model_prefix, {".model": model.getvalue(), ".vocab": vocab.encode("utf-8")})
    long = f" ({cut} line{'s' if cut != 1 else ''} over 64 KiB cut into pieces)" if cut else ""
    print(f"trained a {args.model_type} tokenizer of {sp.GetPieceSize()} pieces on {len(lines)} lines{long}: "
          f"{args.model_prefix}.model (eos id {sp.eos_id()})")
    if skipped and skipped.count:
        print(skipped.summary())


def pieces(line: str, limit: int = MAX_LINE_BYTES) -> list:
    """``line`` in pieces of at most ``limit`` UTF-8 bytes, which SentencePiece trains on (it drops a
    longer line): each cut before a space or tab in the second half of a piece, else between two
    characters (text without spaces); the pieces joined are the line."""
    if len(line) * 4 <= limit:  # no character takes more than 4 bytes
        return [line]
    data = line.encode("utf-8")
    out, start = [], 0
    while len(data) - start > limit:
        cut = max(data.rfind(b" ", start + limit // 2, start + limit + 1),
                  data.rfind(b"\t", start + limit // 2, start + limit + 1))
        if cut < 0:
            cut = start + limit
            while data[cut] & 0xC0 == 0x80:  # a continuation byte: back to the start of its character
                cut -= 1
        out.append(data[start:cut].decode("utf-8"))
        start = cut
    out.append(data[start:].decode("utf-8"))
    return out


def write_files(prefix: str, contents: dict) -> None:
    """PREFIX+ext for each ext: contents, each written to a .tmp first (never a half-written file under
    its final name); one line, with the .tmp files removed, when writing fails (a full disk)."""
    tmps = {ext: prefix + ext + ".tmp" for ext in contents}
    name = prefix
    try:
        for ext, data in contents.items():
            name = tmps[ext]
            with open(name, "wb") as f:
                f.write(data)
        for ext in contents:
            os.replace(tmps[ext], prefix + ext)
    except OSError as e:
        raise ConfigError(f"--model-prefix {prefix!r}: cannot write {e.filename or name} ({e.strerror or e}); "
                          f"check the free space and permissions there or give another --model-prefix") from None
    finally:
        for tmp in tmps.values():
            with contextlib.suppress(OSError):
                os.remove(tmp)  # moved away on success


def cli():
    sys.exit(run(main))


if __name__ == "__main__":
    cli()

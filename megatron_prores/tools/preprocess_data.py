"""Tokenize a JSONL corpus into Megatron's indexed dataset (.bin/.idx), EOD appended per document.

Writes PREFIX_KEY_document.bin/.idx for each --json-keys KEY (Megatron-LM's naming), which
megatron-core's IndexedDataset / GPTDataset read. Tokens are uint16 for a vocabulary below 65,500,
int32 above (megatron-core's ``DType.optimal_dtype``; it has no uint32). Files are written under
temporary names and renamed when complete: an interrupted run never leaves a readable half dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
import time

from megatron_prores.config import ConfigError
from megatron_prores.text_corpus import BadLine, Skipped, parse_jsonl_line, read_lines
from megatron_prores.tools import run

_worker = {}
CHUNK = 32  # lines a worker takes at a time


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", required=True, help="JSONL file, one document per line")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                   help="SentencePieceTokenizer, HuggingFaceTokenizer or NullTokenizer")
    p.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model, or Hugging Face tokenizer.json or its directory (read offline)")
    p.add_argument("--vocab-size", type=int, default=None, help="for NullTokenizer")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="end each document with the tokenizer's EOS (not twice when its post-processor "
                        "adds it, as T5's does)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizing processes (default: one per CPU; never more than the CPUs or the input's "
                        f"chunks of {CHUNK} lines)")
    p.add_argument("--log-interval", type=int, default=1000,
                   help="documents between progress lines (when stderr is not a terminal; a terminal "
                        "gets a progress bar)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip lines that are not UTF-8, not JSON or not an object (counted at the end) instead "
                        "of stopping at the first")
    return p.parse_args(argv)


def _init(args):
    from megatron_prores.tokenizer import build_tokenizer

    _worker["tok"] = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    _worker["args"] = args


def _encode(item):
    """(line number, {key: token ids} or None, bytes, the line's error or None) of one input line."""
    n, offset, raw = item
    args, tok = _worker["args"], _worker["tok"]
    try:
        doc = parse_jsonl_line(args.input, n, offset, raw)
    except BadLine as e:
        return n, None, len(raw), str(e)
    if doc is None:
        return n, None, 0, None
    out = {}
    for key in args.json_keys:
        if key not in doc:
            raise ConfigError(f"{args.input}:{n}: no key {key!r}; pick the text keys with --json-keys")
        ids = tok.tokenize(str(doc[key]))
        if args.append_eod and not getattr(tok, "adds_eod", False):
            ids.append(tok.eod)
        out[key] = ids
    return n, out, len(raw), None


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _lines_up_to(path: str, limit: int) -> int:
    """Lines of ``path``, counted only up to ``limit`` (a quick look at the start of a large file)."""
    lines, last = 0, b""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            lines += block.count(b"\n")
            last = block
            if lines >= limit:
                return lines
    return lines + (1 if last and not last.endswith(b"\n") else 0)


def workers(args) -> int:
    """--workers (default: the CPUs), capped by the CPUs and the input's chunks; a note when capped."""
    cpus = _cpus()
    want = cpus if args.workers is None else args.workers
    lines = _lines_up_to(args.input, want * CHUNK)
    chunks = max(1, -(-lines // CHUNK))
    n = min(want, cpus, chunks)
    if args.workers is not None and n < args.workers:
        why = (f"the input has {lines} line{'s' if lines != 1 else ''} ({chunks} chunk{'s' if chunks != 1 else ''} "
               f"of {CHUNK})" if chunks < min(want, cpus) else f"this machine has {cpus} CPUs")
        print(f"note: using {n} worker{'s' if n != 1 else ''} instead of --workers {args.workers}: {why}",
              file=sys.stderr, flush=True)
    return n


def main(argv=None):
    args = parse(argv)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers} is not valid; give at least 1 (tokenizing processes)")
    if args.log_interval < 1:
        raise ConfigError(f"--log-interval {args.log_interval} is not valid; give at least 1 (documents)")
    if not os.path.isfile(args.input):
        raise ConfigError(f"--input {args.input!r} does not exist or is not a file")
    nworkers = workers(args)
    from megatron_prores.tokenizer import build_tokenizer

    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)  # before the slow imports
    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(tok.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    paths = {k: f"{args.output_prefix}_{k}_document" for k in args.json_keys}
    builders = {k: IndexedDatasetBuilder(p + ".bin.tmp", dtype=dtype) for k, p in paths.items()}

    from tqdm import tqdm

    bar = tqdm(total=os.path.getsize(args.input), unit="B", unit_scale=True, desc="tokenizing",
               disable=not sys.stderr.isatty(), file=sys.stderr)
    start, docs, tokens, nbytes = time.time(), 0, 0, 0
    skipped = Skipped()
    with contextlib.closing(read_lines(args.input)) as lines:
        if nworkers > 1:
            pool = multiprocessing.get_context("spawn").Pool(nworkers, _init, (args,))
            results = pool.imap(_encode, lines, chunksize=CHUNK)
        else:
            pool = None
            _init(args)
            results = map(_encode, lines)
        try:
            for n, out, size, bad in results:
                if bad is not None:
                    if not args.skip_bad_lines:
                        raise ConfigError(bad)
                    skipped.add(bad)
                    bar.update(size)
                if out is None:
                    continue
                for key, ids in out.items():
                    builders[key].add_item(torch.tensor(ids, dtype=torch.int64))
                    builders[key].end_document()
                    tokens += len(ids)
                docs += 1
                nbytes += size
                bar.update(size)
                if docs % args.log_interval == 0 and bar.disable:
                    dt = time.time() - start
                    print(f"processed {docs} documents ({nbytes / 1e6 / dt:.2f} MB/s, "
                          f"{tokens / dt:,.0f} tokens/s)", file=sys.stderr, flush=True)
        except BaseException:
            for key, b in builders.items():
                b.data_file.close()
                os.remove(paths[key] + ".bin.tmp")
            raise
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
    if docs == 0:
        for key, b in builders.items():
            b.data_file.close()
            os.remove(paths[key] + ".bin.tmp")
        raise ConfigError(f"--input {args.input!r} holds no documents"
                          + (f" ({skipped.summary()})" if skipped.count else ""))
    for key, b in builders.items():
        b.finalize(paths[key] + ".idx.tmp")
        os.replace(paths[key] + ".bin.tmp", paths[key] + ".bin")
        os.replace(paths[key] + ".idx.tmp", paths[key] + ".idx")
    dt = time.time() - start
    print(f"wrote {docs} documents, {tokens:,} tokens ({numpy.dtype(dtype).name}) to "
          f"{', '.join(p + '.bin/.idx' for p in paths.values())} in {dt:.1f}s: "
          f"{tokens / dt:,.0f} tokens/s with {nworkers} worker{'s' if nworkers != 1 else ''}")
    if skipped.count:
        print(skipped.summary())


def cli():
    sys.exit(run(main))


if __name__ == "__main__":
    cli()

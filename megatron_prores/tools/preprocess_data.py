"""Tokenize a JSONL corpus into Megatron's indexed dataset (.bin/.idx), EOD appended per document.

Writes PREFIX_KEY_document.bin/.idx for each --json-keys KEY (Megatron-LM's naming), which
megatron-core's IndexedDataset / GPTDataset read. Files are written under temporary names and
renamed when complete: an interrupted run never leaves a readable half dataset.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

from megatron_prores.config import ConfigError
from megatron_prores.tools import run

_worker = {}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", required=True, help="JSONL file, one document per line")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-size", type=int, default=None, help="for NullTokenizer")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    p.add_argument("--log-interval", type=int, default=1000,
                   help="documents between progress lines (when stderr is not a terminal; a terminal "
                        "gets a progress bar)")
    return p.parse_args(argv)


def _init(args):
    from megatron_prores.tokenizer import build_tokenizer

    _worker["tok"] = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    _worker["args"] = args


def _encode(item):
    n, line = item
    args, tok = _worker["args"], _worker["tok"]
    if not line.strip():
        return n, None, 0
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{args.input}:{n}: not valid JSON ({e.msg}); fix or remove that line") from None
    out = {}
    for key in args.json_keys:
        if not isinstance(doc, dict) or key not in doc:
            raise ConfigError(f"{args.input}:{n}: no key {key!r}; pick the text keys with --json-keys")
        ids = tok.tokenize(str(doc[key]))
        if args.append_eod:
            ids.append(tok.eod)
        out[key] = ids
    return n, out, len(line.encode("utf-8"))


def main(argv=None):
    args = parse(argv)
    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_prores.tokenizer import build_tokenizer

    if not os.path.isfile(args.input):
        raise ConfigError(f"--input {args.input!r} does not exist or is not a file")
    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    dtype = DType.optimal_dtype(tok.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    paths = {k: f"{args.output_prefix}_{k}_document" for k in args.json_keys}
    builders = {k: IndexedDatasetBuilder(p + ".bin.tmp", dtype=dtype) for k, p in paths.items()}

    from tqdm import tqdm

    bar = tqdm(total=os.path.getsize(args.input), unit="B", unit_scale=True, desc="tokenizing",
               disable=not sys.stderr.isatty(), file=sys.stderr)
    start, docs, tokens, nbytes = time.time(), 0, 0, 0
    with open(args.input, encoding="utf-8") as f:
        lines = enumerate(f, 1)
        if args.workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(args.workers, _init, (args,))
            results = pool.imap(_encode, lines, chunksize=32)
        else:
            pool = None
            _init(args)
            results = map(_encode, lines)
        try:
            for n, out, size in results:
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
        raise ConfigError(f"--input {args.input!r} holds no documents")
    for key, b in builders.items():
        b.finalize(paths[key] + ".idx.tmp")
        os.replace(paths[key] + ".bin.tmp", paths[key] + ".bin")
        os.replace(paths[key] + ".idx.tmp", paths[key] + ".idx")
    dt = time.time() - start
    print(f"wrote {docs} documents, {tokens:,} tokens ({numpy.dtype(dtype).name}) to "
          f"{', '.join(p + '.bin/.idx' for p in paths.values())} in {dt:.1f}s: "
          f"{tokens / dt:,.0f} tokens/s with {args.workers} workers")


def cli():
    sys.exit(run(main))


if __name__ == "__main__":
    cli()

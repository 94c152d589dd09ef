"""Tokenize a corpus into Megatron's indexed dataset (.bin/.idx), EOD appended per document.

--input takes files, directories and globs of JSONL (one JSON object per line; .jsonl, also
gzip/zstd compressed: .jsonl.gz, .jsonl.zst) and Parquet (.parquet; the text columns named by
--json-keys, read one record batch at a time); a directory's files and a glob's matches are read in
sorted order (megatron_prores.corpus_readers). Parquet and zstd need the ``data`` extra.

Writes PREFIX_KEY_document.bin/.idx for each --json-keys KEY (Megatron-LM's naming), which
megatron-core's IndexedDataset / GPTDataset read. Tokens are uint16 for a vocabulary below 65,500,
int32 above (megatron-core's ``DType.optimal_dtype``; it has no uint32). Files are written under
temporary names and renamed when complete: an interrupted run never leaves a readable half dataset.

Speed: the input is cut into units of about 1 MB (a plain file's byte ranges, which each worker
process reads itself; blocks of decompressed lines; Parquet record batches); a worker tokenizes a
unit's documents in one batch call and sends back one token array per unit, and this process
writes the arrays in input order, so the output does not depend on --workers.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import signal
import struct
import sys
import threading
import time

from megatron_prores.errors import ConfigError
from megatron_prores.corpus_readers import (UNIT_BYTES, check_not_plain_text, check_parquet, count_rows, encode_unit,
                                            expand, init_worker, require_readers, tokenizer_spec, units)
from megatron_prores.text_corpus import BadLine, Skipped
from megatron_prores.tools import run
from megatron_prores.worker_pool import OrderedWorkers, WorkerDied

CHUNK = 32  # the fewest documents worth a worker of their own


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not argparse's usage; for a flag this tool does not have, the driver's hint of what
        to give instead of Megatron-LM's (--vocab-file/--merge-file: a tokenizer.json)."""
        if message.startswith("unrecognized arguments:"):
            from megatron_prores.arguments import _MEGATRON_ONLY  # the driver's hints (imports torch: only here)

            hints = {h for word in message.split()[2:] for flag, h in _MEGATRON_ONLY.items()
                     if word.split("=")[0] == flag}
            message += "".join(f" ({h})" for h in sorted(hints))
        raise ConfigError(message)


def parse(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="JSONL (.jsonl, .jsonl.gz, .jsonl.zst) or Parquet (.parquet) files, directories of them or "
                        "globs (quote them); other file names are read as JSONL")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="the JSON keys (Parquet columns) holding the text; one output per key")
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
                   help="tokenizing processes, one CPU each (default: one per CPU; never more than the CPUs or "
                        f"the input's chunks of {CHUNK} documents)")
    p.add_argument("--log-interval", type=int, default=1000,
                   help="documents between progress lines (when stderr is not a terminal; a terminal "
                        "gets a progress bar)")
    p.add_argument("--skip-bad-lines", "--skip-bad-rows", dest="skip_bad_lines", action="store_true",
                   help="skip JSONL lines that are not UTF-8, not JSON or not an object, and lines or Parquet rows "
                        "whose text is null (counted at the end), instead of stopping at the first")
    return p.parse_args(argv)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _inputs(args) -> list:
    return [args.input] if isinstance(args.input, (str, os.PathLike)) else list(args.input)


def workers(args, sources=None) -> int:
    """--workers (default: the CPUs), capped by the CPUs and the input's chunks; a note when capped."""
    sources = expand(_inputs(args)) if sources is None else sources
    cpus = _cpus()
    want = cpus if args.workers is None else args.workers
    rows = count_rows(sources, want * CHUNK)
    noun = "row" if any(s.kind == "parquet" for s in sources) else "line"
    chunks = max(1, -(-rows // CHUNK))
    n = min(want, cpus, chunks)
    if args.workers is not None and n < args.workers:
        why = (f"the input has {rows} {noun}{'s' if rows != 1 else ''} ({chunks} chunk{'s' if chunks != 1 else ''} "
               f"of {CHUNK})" if chunks < min(want, cpus) else f"this machine has {cpus} CPUs")
        print(f"note: using {n} worker{'s' if n != 1 else ''} instead of --workers {args.workers}: {why}",
              file=sys.stderr, flush=True)
    return n


def _unit_bytes(sources, nworkers: int) -> int:
    """UNIT_BYTES, or less for an input of under 16 of them per worker: the workers finish
    together (the last unit is at most a 16th of a worker's share)."""
    total = sum(os.path.getsize(s.path) for s in sources)
    return int(max(16 << 10, min(UNIT_BYTES, total // (16 * nworkers))))


class _Results:
    """The encoded units in input order: from worker processes (megatron_prores.worker_pool; at most
    2 per worker plus 2 in flight: the parent reads compressed or Parquet input only as fast as the
    workers take it), or from this process."""

    def __init__(self, nworkers, init_args):
        self.pool = None
        if nworkers > 1:
            self.pool = OrderedWorkers(nworkers, encode_unit, init_worker, init_args, name="tokenizing worker")
        else:
            init_worker(*init_args)

    def __call__(self, units):
        if self.pool is not None:
            try:
                yield from self.pool(units)
            except WorkerDied as e:
                raise ConfigError(str(e)) from None
            return
        for unit in units:
            yield unit, encode_unit(unit)

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool = None


# megatron-core's .idx layout (megatron.core.datasets.indexed_dataset._IndexWriter), written here
# without importing megatron-core (seconds of start-up); tests/test_input_formats.py checks that
# megatron-core's IndexedDatasetBuilder writes the same bytes
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7, "uint16": 8}


def optimal_dtype(vocab_size: int) -> str:
    """megatron-core's DType.optimal_dtype: uint16 below 65,500 ids, else int32 (it has no uint32)."""
    return "uint16" if vocab_size is not None and vocab_size < 65500 else "int32"


class _Output:
    """One key's PREFIX_KEY_document.bin/.idx: tokens appended to ``.bin.tmp`` as they come, the
    document lengths kept (as arrays) for the ``.idx``; ``finish`` writes ``.idx.tmp`` and renames
    both, ``discard`` removes what was written."""

    def __init__(self, prefix: str, dtype: str):
        import numpy

        self.prefix, self.dtype = prefix, numpy.dtype(dtype)
        self.lengths = []
        self.file = open(prefix + ".bin.tmp", "wb")

    def add(self, tokens, lengths) -> None:
        self.file.write(tokens.data)
        self.lengths.append(lengths)

    def finish(self) -> None:
        """Write the ``.idx`` under its temporary name; ``publish`` renames both files (every key's
        files are finished before any is published: a failure leaves no key's dataset behind)."""
        import numpy

        self.file.close()
        lengths = numpy.concatenate(self.lengths) if self.lengths else numpy.zeros(0, numpy.int64)
        if lengths.size and lengths.max() > numpy.iinfo(numpy.int32).max:
            raise ConfigError(f"a document of {int(lengths.max()):,} tokens does not fit the .idx (int32 lengths)")
        pointers = numpy.zeros(lengths.size, numpy.int64)
        numpy.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        with open(self.prefix + ".idx.tmp", "wb") as f:
            f.write(_INDEX_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", _DTYPE_CODES[self.dtype.name]))
            f.write(struct.pack("<Q", lengths.size))  # sequences: one per document
            f.write(struct.pack("<Q", lengths.size + 1))  # document boundaries
            f.write(lengths.astype(numpy.int32).tobytes())
            f.write(pointers.tobytes())
            f.write(numpy.arange(lengths.size + 1, dtype=numpy.int64).tobytes())

    def publish(self) -> None:
        """Rename both files into place, and remove the indices megatron-core cached for the files
        replaced in its default cache, the folder PREFIX/cache (the driver keys its cache by the
        .idx's contents too, so that none is read for other files: this is tidying)."""
        os.replace(self.prefix + ".bin.tmp", self.prefix + ".bin")
        os.replace(self.prefix + ".idx.tmp", self.prefix + ".idx")
        cache = os.path.join(self.prefix, "cache")
        if os.path.isdir(cache):
            shutil.rmtree(cache, ignore_errors=True)
            if os.path.lexists(cache):
                print(f"note: could not remove {cache}, the index cache of the files replaced; the driver does not "
                      f"read it (delete it to free the space)", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                os.rmdir(self.prefix)  # empty now: megatron-core made it for its cache

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # a full disk fails the close's flush too
            self.file.close()
        for ext in (".bin.tmp", ".idx.tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.prefix + ext)


def _check_keys(keys) -> None:
    """A key names the output files (PREFIX_KEY_document.bin): no path separators, no empty name."""
    for k in keys:
        if not k or k in (".", "..") or "/" in k or os.sep in k or "\0" in k or "\n" in k:
            raise ConfigError(f"--json-keys {k!r}: a key is part of the output file names (PREFIX_KEY_document.bin), "
                              f"so it cannot be empty or hold '/' or a newline; rename that field in the input")
    if len(set(keys)) < len(keys):
        raise ConfigError(f"--json-keys {' '.join(keys)}: a key is given twice; give each once")


def _check_not_inputs(prefix: str, keys, sources) -> None:
    """The outputs must not be any input (a run reading p_text_document.bin into itself)."""
    inputs = {os.path.realpath(s.path) for s in sources}
    for k in keys:
        for ext in (".bin", ".idx", ".bin.tmp", ".idx.tmp"):
            path = f"{prefix}_{k}_document{ext}"
            if os.path.realpath(path) in inputs:
                raise ConfigError(f"--output-prefix {prefix!r} would write {path}, which is an --input; give another "
                                  f"--output-prefix")


class _OutputLock:
    """PREFIX.lock, held (flock) while this run writes PREFIX_*: a second run on the same prefix is
    refused, not interleaved with this one into a dataset whose .idx does not match its .bin. The
    lock dies with its process; the file is removed at the end."""

    def __init__(self, prefix: str):
        import fcntl

        self.path = prefix + ".lock"
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "?"
            self.file.close()
            raise ConfigError(f"--output-prefix {prefix!r} is being written by another preprocess_data (pid "
                              f"{holder}, lock {self.path}); wait for it or give another --output-prefix") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)
            self.file.close()
            self.file = None


def _write_error(e: OSError, prefix: str, sources=()) -> ConfigError:
    """An OSError of writing the outputs (an unwritable directory, a full disk) as one line; one of
    reading an input (removed while read) names that file."""
    if e.filename and os.path.realpath(e.filename) in {os.path.realpath(s.path) for s in sources}:
        return ConfigError(f"cannot read {e.filename} ({e.strerror or e}); check the --input files (nothing was kept)")
    where = e.filename or f"{prefix}_*"
    return ConfigError(f"--output-prefix {prefix!r}: cannot write {where} ({e.strerror or e}); give an "
                       f"--output-prefix in a writable directory with free space (nothing was kept)")


def _on_sigterm(signum, frame):
    """SIGTERM (scancel, timeout, kill) ends the run like an error: its temporary files are removed."""
    print("stopped by SIGTERM; nothing was kept", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def main(argv=None):
    args = parse(argv)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers} is not valid; give at least 1 (tokenizing processes)")
    if args.log_interval < 1:
        raise ConfigError(f"--log-interval {args.log_interval} is not valid; give at least 1 (documents)")
    _check_keys(args.json_keys)
    sources = expand(_inputs(args))
    _check_not_inputs(args.output_prefix, args.json_keys, sources)
    require_readers(sources)
    check_not_plain_text(sources)
    for s in sources:
        if s.kind == "parquet":  # its columns are checked before any output is written
            check_parquet(s, args.json_keys)
    nworkers = workers(args, sources)
    from megatron_prores.tokenizer import build_tokenizer

    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    if tok.vocab_size > 2 ** 31 - 1:
        raise ConfigError(f"a vocabulary of {tok.vocab_size:,} tokens does not fit megatron-core's int32 token files; "
                          f"give a vocabulary below 2,147,483,648")
    eod = tok.eod if args.append_eod and not getattr(tok, "adds_eod", False) else None
    dtype = optimal_dtype(tok.vocab_size)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
        lock = _OutputLock(args.output_prefix)
    except OSError as e:
        raise _write_error(e, args.output_prefix) from None
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    outputs, results = {}, None
    try:
        results = _Results(nworkers, (tokenizer_spec(tok), args.json_keys, eod, dtype, args.skip_bad_lines))
        for k in args.json_keys:
            outputs[k] = _Output(f"{args.output_prefix}_{k}_document", dtype)
        docs, tokens, skipped, dt = _run(args, sources, nworkers, results, outputs)
        results.close()
        for out in outputs.values():
            out.finish()
        for out in outputs.values():
            out.publish()
    except BaseException as e:
        for out in outputs.values():
            out.discard()
        if isinstance(e, OSError):
            raise _write_error(e, args.output_prefix, sources) from None
        raise
    finally:
        if results is not None:
            results.close()
        lock.release()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    files = f" (from {len(sources)} files)" if len(sources) > 1 else ""
    print(f"wrote {docs} documents, {tokens:,} tokens ({dtype}) to "
          f"{', '.join(o.prefix + '.bin/.idx' for o in outputs.values())} in {dt:.1f}s: "
          f"{tokens / dt:,.0f} tokens/s with {nworkers} worker{'s' if nworkers != 1 else ''}{files}")
    if skipped.count:
        print(skipped.summary())


def _run(args, sources, nworkers, results, outputs):
    """Tokenize every unit, writing each key's tokens as they come; (documents, tokens, Skipped, seconds)."""
    from tqdm import tqdm

    total = sum(os.path.getsize(s.path) for s in sources)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not sys.stderr.isatty(),
               file=sys.stderr)
    start, docs, tokens, nbytes = time.time(), 0, 0, 0
    skipped = Skipped()
    lines_before = {}  # source -> lines of its units handled so far (line numbers of later units)
    try:
        for unit, out in results(units(sources, args.json_keys, _unit_bytes(sources, nworkers))):
            s = sources[unit.index]
            base = unit.start if unit.kind == "rows" else lines_before.get(unit.index, 0)
            lines_before[unit.index] = base + out["rows"]
            for n, detail in out["bad"]:
                message = f"{s.where(base + n)}: {detail}"
                if not args.skip_bad_lines:
                    raise BadLine(message)
                skipped.add(message, "row" if s.kind == "parquet" else "line")
            if out["fatal"] is not None:
                n, detail = out["fatal"]
                raise ConfigError(f"{s.where(base + n)}: {detail}")
            for key, o in outputs.items():
                o.add(out["tokens"][key], out["lengths"][key])
                tokens += int(out["tokens"][key].size)
            before, docs = docs, docs + out["docs"]
            nbytes += unit.progress
            bar.update(unit.progress)
            if bar.disable and docs // args.log_interval > before // args.log_interval:
                dt = time.time() - start
                print(f"processed {docs} documents ({nbytes / 1e6 / dt:.2f} MB/s, {tokens / dt:,.0f} tokens/s)",
                      file=sys.stderr, flush=True)
    finally:
        bar.close()
    if docs == 0:
        given = " ".join(map(str, _inputs(args)))
        raise ConfigError(f"--input {given!r} holds no documents"
                          + (f" ({skipped.summary()})" if skipped.count else ""))
    return docs, tokens, skipped, max(time.time() - start, 1e-9)


def cli():
    sys.exit(run(main))


if __name__ == "__main__":
    cli()

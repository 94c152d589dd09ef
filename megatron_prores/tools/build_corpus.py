"""Build a JSONL corpus ({"text", "path"} per line) from the Python standard library's source
files (present on every machine: the quickstart needs no download), or from any directory."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from megatron_prores.errors import ConfigError
from megatron_prores.text_corpus import stdlib_documents
from megatron_prores.tools import check_output, run


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--source", default=None, help="directory to read (default: the stdlib)")
    p.add_argument("--extensions", nargs="+", default=[".py"], help="file name endings to take")
    p.add_argument("--max-bytes", type=int, default=None, help="stop after this much text")
    p.add_argument("--min-chars", type=int, default=64, help="skip shorter files")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.source is not None and not os.path.isdir(args.source):
        raise ConfigError(f"--source {args.source!r} is not a directory")
    check_output("--output", args.output, "corpus.jsonl")
    tmp = args.output + ".tmp"
    docs = size = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rel, text in stdlib_documents(args.source, args.extensions, args.max_bytes, args.min_chars):
                f.write(json.dumps({"text": text, "path": rel}) + "\n")
                docs += 1
                size += len(text.encode("utf-8"))
        if docs:
            os.replace(tmp, args.output)  # never a half-written corpus under the final name
    except OSError as e:  # reading skips unreadable files: this is writing (a full disk, a quota)
        raise ConfigError(f"--output {args.output!r}: cannot write {e.filename or tmp} ({e.strerror or e}); check the "
                          f"free space and permissions there or give another --output") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # moved away on success; otherwise no half-written file is left behind
    if docs == 0:
        raise ConfigError(f"no files ending in {' '.join(args.extensions)} found; check --source/--extensions")
    print(f"wrote {docs} documents, {size / 1e6:.1f} MB of text, to {args.output}")


def cli():
    sys.exit(run(main))


if __name__ == "__main__":
    cli()

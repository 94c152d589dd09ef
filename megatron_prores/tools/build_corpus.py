"""Build a JSONL corpus ({"text", "path"} per line) from the Python standard library's source
files (present on every machine: the quickstart needs no download), or from any directory."""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_prores.errors import ConfigError
from megatron_prores.text_corpus import stdlib_documents
from megatron_prores.tools import run


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
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    tmp = args.output + ".tmp"
    docs = size = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for rel, text in stdlib_documents(args.source, args.extensions, args.max_bytes, args.min_chars):
            f.write(json.dumps({"text": text, "path": rel}) + "\n")
            docs += 1
            size += len(text.encode("utf-8"))
    if docs == 0:
        os.remove(tmp)
        raise ConfigError(f"no files ending in {' '.join(args.extensions)} found; check --source/--extensions")
    os.replace(tmp, args.output)  # never a half-written corpus under the final name
    print(f"wrote {docs} documents, {size / 1e6:.1f} MB of text, to {args.output}")


def cli():
    sys.exit(run(main))


if __name__ == "__main__":
    cli()

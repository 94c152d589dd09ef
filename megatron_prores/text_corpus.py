"""Text corpora: reading with clear errors (the formats: megatron_prores.corpus_readers), and the
embedded default corpus.

The default corpus is built from the Python standard library's own source tree, which is
present on every machine with Python: tens of MB of real code and docstrings, no download.
"""

from __future__ import annotations

import gzip
import os
import sysconfig
import zlib
from typing import Iterator, List, Optional, Sequence

from megatron_prores.errors import ConfigError
from megatron_prores.corpus_readers import expand, iter_documents, require_readers


class BadLine(ConfigError):
    """A JSONL line (Parquet row) that is not UTF-8, not JSON, not an object or whose text is null
    (--skip-bad-lines skips it)."""


class Skipped:
    """Bad lines and rows skipped under --skip-bad-lines: how many, and the first one's error."""

    def __init__(self):
        self.count, self.first = 0, None
        self.by_unit = {}

    def add(self, error: str, unit: str = "line") -> None:
        self.count += 1
        self.by_unit[unit] = self.by_unit.get(unit, 0) + 1
        self.first = self.first or error.split(";")[0]

    def summary(self) -> str:
        counts = " and ".join(f"{n} bad {unit}{'s' if n != 1 else ''}" for unit, n in sorted(self.by_unit.items()))
        return (f"skipped {counts or '0 bad lines'} (not UTF-8, not JSON, not an object or a null text; "
                f"the first: {self.first})")


def iter_texts(paths: Sequence[str], keys: Sequence[str], skipped: Optional[Skipped] = None) -> Iterator[str]:
    """Texts of JSONL / compressed JSONL / Parquet files (by ``keys``) and of plain text files (any
    other name: their text, in pieces of whole lines); ``paths`` may name directories and globs
    (see corpus_readers.expand); with ``skipped``, bad lines/rows are skipped and counted there."""
    sources = expand(paths, default="text")
    require_readers(sources)
    for texts in iter_documents(sources, keys, skipped):
        yield from texts


def stdlib_documents(root: str = None, extensions=(".py",), max_bytes: int = None,
                     min_chars: int = 64):
    """(relative path, text) of the standard library's files (or of the tree under ``root``), in a
    stable order. A gzip-compressed file counts by its name without ``.gz`` (Debian compresses
    /usr/share/doc: the kernel documentation of linux-doc is ``*.rst.gz``). Only regular files
    are read: a FIFO, socket or device (reading one could block forever), a dangling symlink and
    an unreadable, non-UTF-8 or damaged file are skipped."""
    root = root or sysconfig.get_paths()["stdlib"]
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in sorted(filenames):
            gz = name.endswith(".gz")
            if not (name[:-3] if gz else name).endswith(tuple(extensions)):
                continue
            path = os.path.join(dirpath, name)
            if not os.path.isfile(path):  # follows symlinks: a link to a regular file is read
                continue
            try:
                with (gzip.open(path, "rt", encoding="utf-8") if gz else open(path, encoding="utf-8")) as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError, EOFError, zlib.error):
                continue
            if len(text) < min_chars:
                continue
            yield os.path.relpath(path, root), text
            total += len(text.encode("utf-8"))
            if max_bytes is not None and total >= max_bytes:
                return

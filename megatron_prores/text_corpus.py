"""Text corpora as JSONL: reading with clear errors, and the embedded default corpus.

The default corpus is built from the Python standard library's own source tree, which is
present on every machine with Python: tens of MB of real code and docstrings, no download.
"""

from __future__ import annotations

import gzip
import json
import os
import sysconfig
from typing import Iterator, List, Optional, Sequence, Tuple

from megatron_prores.config import ConfigError


SKIP_HINT = "or pass --skip-bad-lines to skip such lines"


class BadLine(ConfigError):
    """A JSONL line that is not UTF-8, not JSON or not a JSON object (--skip-bad-lines skips it)."""


class Skipped:
    """Bad lines skipped under --skip-bad-lines: how many, and the first one's error."""

    def __init__(self):
        self.count, self.first = 0, None

    def add(self, error: str) -> None:
        self.count += 1
        self.first = self.first or error.split(";")[0]

    def summary(self) -> str:
        return (f"skipped {self.count} bad line{'s' if self.count != 1 else ''} (not UTF-8, not JSON or not "
                f"an object; the first: {self.first})")


def read_lines(path: str) -> Iterator[Tuple[int, int, bytes]]:
    """(line number from 1, byte offset of the line's start, its bytes) of each line of ``path``."""
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            yield n, offset, raw
            offset += len(raw)


def parse_jsonl_line(path: str, n: int, offset: int, raw: bytes) -> Optional[dict]:
    """The JSON object on line ``n`` of ``path`` (starting at byte ``offset``), None for a blank line;
    BadLine, naming the line (and the byte), when it is not UTF-8, not JSON or not an object."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {offset + e.start} "
                      f"of the file); convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8) {SKIP_HINT}") from None
    if not line.strip():
        return None
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove that line, {SKIP_HINT}") from None
    if not isinstance(doc, dict):
        raise BadLine(f"{path}:{n}: a JSON object per line is expected; fix or remove that line, {SKIP_HINT}")
    return doc


def iter_jsonl(path: str, keys: Sequence[str], skipped: Optional[Skipped] = None) -> Iterator[List[str]]:
    """Yield, per line of ``path``, the texts under ``keys``; one-line errors for bad input. With
    ``skipped``, lines that are not UTF-8/JSON/objects are skipped and counted there."""
    if not os.path.isfile(path):
        raise ConfigError(f"--input {path!r} does not exist or is not a file")
    for n, offset, raw in read_lines(path):
        try:
            doc = parse_jsonl_line(path, n, offset, raw)
        except BadLine as e:
            if skipped is None:
                raise
            skipped.add(str(e))
            continue
        if doc is None:
            continue
        missing = [k for k in keys if k not in doc]
        if missing:
            raise ConfigError(
                f"{path}:{n}: no key {missing[0]!r} (keys there: {', '.join(map(str, doc)) or 'none'}); "
                f"pick them with --json-keys"
            )
        yield [str(doc[k]) for k in keys]


def iter_texts(paths: Sequence[str], keys: Sequence[str], skipped: Optional[Skipped] = None) -> Iterator[str]:
    """Texts of JSONL files (by ``keys``) and of plain text files (one text per file); ``skipped``:
    see iter_jsonl."""
    for path in paths:
        if path.endswith(".jsonl") or path.endswith(".json"):
            for texts in iter_jsonl(path, keys, skipped):
                yield from texts
        else:
            if not os.path.isfile(path):
                raise ConfigError(f"--input {path!r} does not exist or is not a file")
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()


def stdlib_documents(root: str = None, extensions=(".py",), max_bytes: int = None,
                     min_chars: int = 64):
    """(relative path, text) of the standard library's files (or of the tree under ``root``), in a
    stable order. A gzip-compressed file counts by its name without ``.gz`` (Debian compresses
    /usr/share/doc: the kernel documentation of linux-doc is ``*.rst.gz``)."""
    root = root or sysconfig.get_paths()["stdlib"]
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in sorted(filenames):
            gz = name.endswith(".gz")
            if not (name[:-3] if gz else name).endswith(tuple(extensions)):
                continue
            path = os.path.join(dirpath, name)
            try:
                with (gzip.open(path, "rt", encoding="utf-8") if gz else open(path, encoding="utf-8")) as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError, EOFError):
                continue
            if len(text) < min_chars:
                continue
            yield os.path.relpath(path, root), text
            total += len(text.encode("utf-8"))
            if max_bytes is not None and total >= max_bytes:
                return

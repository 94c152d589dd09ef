"""Text corpora as JSONL: reading with clear errors, and the embedded default corpus.

The default corpus is built from the Python standard library's own source tree, which is
present on every machine with Python: tens of MB of real code and docstrings, no download.
"""

from __future__ import annotations

import gzip
import json
import os
import sysconfig
from typing import Iterator, List, Sequence

from megatron_prores.config import ConfigError


def iter_jsonl(path: str, keys: Sequence[str]) -> Iterator[List[str]]:
    """Yield, per line of ``path``, the texts under ``keys``; one-line errors for bad input."""
    if not os.path.isfile(path):
        raise ConfigError(f"--input {path!r} does not exist or is not a file")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(doc, dict):
                raise ConfigError(f"{path}:{n}: a JSON object per line is expected")
            missing = [k for k in keys if k not in doc]
            if missing:
                raise ConfigError(
                    f"{path}:{n}: no key {missing[0]!r} (keys there: {', '.join(map(str, doc)) or 'none'}); "
                    f"pick them with --json-keys"
                )
            yield [str(doc[k]) for k in keys]


def iter_texts(paths: Sequence[str], keys: Sequence[str]) -> Iterator[str]:
    """Texts of JSONL files (by ``keys``) and of plain text files (one text per file)."""
    for path in paths:
        if path.endswith(".jsonl") or path.endswith(".json"):
            for texts in iter_jsonl(path, keys):
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

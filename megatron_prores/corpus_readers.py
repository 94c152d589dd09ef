"""Reading documents from JSONL (plain, gzip or zstd compressed) and Parquet files, for
``tools/preprocess_data.py`` and ``tools/train_tokenizer.py``, and tokenizing them in batches.

An input is a file, a directory (its files with a known suffix, recursively, in sorted order) or a
glob (its matches in sorted order). The format comes from the file name:

    .jsonl .json .ndjson        one JSON object per line
    ... + .gz / .zst / .zstd    the same, gzip or zstd compressed (zstd needs ``zstandard``)
    .parquet .pq                a Parquet table; the text is in columns named like JSON keys
                                (needs ``pyarrow``; read one record batch at a time)

A file named on the command line (or matched by a glob) with another suffix is read as the tool's
default format: JSONL for preprocess_data, plain text for train_tokenizer.

The input is cut into *units* (about ``UNIT_BYTES`` of text each): a byte range of a plain JSONL
file (read by whoever processes the unit: a worker reads its own range), a block of whole
decompressed lines of a compressed file, or a record batch of a Parquet file. Rows of a unit are
numbered from 0 within it; the reader adds the unit's start (rows before it in the file), so an
error names the file and its line (JSONL, from 1) or row index (Parquet, from 0) whoever read it.

This module does not import torch (nor megatron-core): preprocess_data's worker processes import
only it, the tokenizer library and numpy. Errors it raises are ``megatron_prores.config.ConfigError``
(imported when raised).
"""

from __future__ import annotations

import glob as _glob
import gzip
import itertools
import json
import os
import zlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

UNIT_BYTES = 1 << 20  # text per unit of work (a worker's task); a unit holds whole lines
EXTRA_HINT = "pip install 'megatron-prores[data]'"
SKIP_HINT = "or pass --skip-bad-lines to skip such lines"
SKIP_ROWS_HINT = "or pass --skip-bad-lines to skip such rows"

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
GLOB_CHARS = "*?["


def _error(message: str):
    from megatron_prores.errors import ConfigError

    return ConfigError(message)


# ---- which files, in which format -----------------------------------------------------------------

class Source:
    """One input file: ``path``, ``kind`` (jsonl, parquet or text) and ``compression`` (None, gzip
    or zstd)."""

    __slots__ = ("path", "kind", "compression")

    def __init__(self, path: str, kind: str, compression: Optional[str] = None):
        self.path, self.kind, self.compression = path, kind, compression

    def where(self, row: int) -> str:
        """The file and line (JSONL, text: ``row`` is 0-based, the line 1-based) or row index (Parquet)."""
        return f"{self.path}: row index {row}" if self.kind == "parquet" else f"{self.path}:{row + 1}"

    def __repr__(self):
        return f"Source({self.path!r}, {self.kind!r}, {self.compression!r})"


def detect(path: str, default: Optional[str] = "jsonl") -> Optional[Source]:
    """The Source of ``path`` by its suffix; None for an unknown suffix when ``default`` is None."""
    name = os.path.basename(path).lower()
    stem, ext = os.path.splitext(name)
    compression = COMPRESSION.get(ext)
    if compression:
        name = stem
    if name.endswith(PARQUET_SUFFIXES):
        if compression:
            raise _error(f"--input {path!r}: a compressed Parquet file is not read; Parquet compresses its own "
                         f"pages, give the .parquet file")
        return Source(path, "parquet")
    if name.endswith(JSONL_SUFFIXES):
        return Source(path, "jsonl", compression)
    if default is None:
        return None
    return Source(path, default, compression)


def known_suffixes() -> str:
    return ", ".join(JSONL_SUFFIXES + tuple(s + c for s in (".jsonl",) for c in COMPRESSION) + PARQUET_SUFFIXES)


def expand(inputs: Sequence[str], default: str = "jsonl") -> List[Source]:
    """The files of ``inputs`` (files, directories, globs), each once, in order: a directory's files
    with a known suffix and a glob's matches sorted by path; ConfigError naming an input that gives
    nothing."""
    sources, seen = [], set()

    def add(source: Source):
        key = os.path.realpath(source.path)
        if key not in seen:
            seen.add(key)
            sources.append(source)

    for given in inputs:
        given = os.fspath(given)
        if os.path.isfile(given):
            add(detect(given, default))
        elif os.path.isdir(given):
            found = sorted(_walk(given))
            if not found:
                raise _error(f"--input {given!r} is a directory without input files (file names ending in "
                             f"{known_suffixes()})")
            for path in found:
                add(detect(path, None))
        elif any(c in given for c in GLOB_CHARS):
            matches = sorted(_glob.glob(given, recursive=True))
            files = []
            for m in matches:
                if os.path.isdir(m):
                    files += sorted(_walk(m))
                elif os.path.isfile(m):
                    files.append(m)
            if not files:
                raise _error(f"--input {given!r} matches no file")
            for path in files:
                add(detect(path, default) if path in matches else detect(path, None))
        else:
            raise _error(f"--input {given!r} does not exist or is not a file (give a file, a directory or a glob)")
    return sources


def _walk(root: str) -> Iterator[str]:
    """Files under ``root`` with a known suffix, hidden files and folders left out."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:  # regular files only: a FIFO would block the reader, a dangling link fail it
            path = os.path.join(dirpath, name)
            if not name.startswith(".") and detect(name, None) is not None and os.path.isfile(path):
                yield path


_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}
_SUFFIX = {"gzip": ".gz", "zstd": ".zst"}


def require_readers(sources: Sequence[Source]) -> None:
    """A one-line ConfigError when a file's format needs a package that is not installed, when a
    JSONL file's first bytes say it is compressed otherwise than its name says (it would be read as
    lines of bad UTF-8), or when a compressed file is empty (no valid gzip/zstd file is: a failed
    download or copy)."""
    for s in sources:
        if s.kind == "parquet":
            _pyarrow_parquet(s.path)
            continue
        if s.compression == "zstd":
            _zstandard(s.path)
        if s.kind != "jsonl":
            continue
        try:
            with open(s.path, "rb") as f:
                head = f.read(6)
        except OSError as e:
            raise _error(f"--input {s.path!r}: cannot read it ({e.strerror})") from None
        if s.compression and not head:
            raise _error(f"--input {s.path!r} is empty (0 bytes), which no {s.compression} file is; "
                         f"a failed download or copy? Fetch it again or leave it out")
        found = next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)
        if found and found != s.compression:
            name = os.path.basename(s.path)
            fix = (f"name it with the {_SUFFIX[found]} suffix (e.g. {name.rsplit('.gz', 1)[0].rsplit('.zst', 1)[0]}"
                   f"{'' if name.endswith(JSONL_SUFFIXES) else '.jsonl'}{_SUFFIX[found]})" if found in _SUFFIX
                   else f"decompress it first (e.g. {'bunzip2' if found == 'bzip2' else 'unxz'} -k)")
            raise _error(f"--input {s.path!r} is {found}-compressed (its first bytes say so) but named as "
                         f"{s.compression or 'plain'} JSONL; {fix}")


def check_not_plain_text(sources: Sequence[Source]) -> None:
    """A one-line ConfigError for a file read as JSONL only because its name has no known suffix (a
    .txt given by name) whose text does not begin with a JSON object: plain text, each line of which
    would be a bad line (and --skip-bad-lines would skip them all)."""
    for s in sources:
        name = os.path.basename(s.path).lower()
        if s.compression:
            name = os.path.splitext(name)[0]
        if s.kind != "jsonl" or name.endswith(JSONL_SUFFIXES):
            continue
        try:
            with open(s.path, "rb") as raw, (_open_compressed(s, raw) if s.compression else raw) as f:
                head = f.read(1 << 16)
        except _decompress_errors():
            continue  # reading it says what is wrong
        head = head.removeprefix(b"\xef\xbb\xbf").lstrip()
        if head and not head.startswith(b"{"):
            raise _error(f"--input {s.path!r} is not JSONL (it does not begin with a JSON object: plain text?); "
                         f"preprocess_data reads JSONL (one object per line, e.g. {{\"text\": \"...\"}}) and Parquet: "
                         f"write the documents as JSONL first")


def _pyarrow_parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _error(f"--input {path!r}: reading Parquet needs pyarrow: {EXTRA_HINT}") from None
    return pq


def _zstandard(path: str):
    try:
        import zstandard
    except ImportError:
        raise _error(f"--input {path!r}: reading zstd-compressed files needs zstandard: {EXTRA_HINT}") from None
    return zstandard


# ---- units of work --------------------------------------------------------------------------------

class Unit:
    """A piece of one source: ``kind`` "range" (bytes [start, end) of a plain file, read by whoever
    processes the unit), "lines" (``data``: whole decompressed lines, ``start`` their offset in the
    decompressed file) or "rows" (``columns``: key -> values of a Parquet record batch). ``index``:
    the source's position in the input list; ``progress``: the input bytes the unit stands for."""

    __slots__ = ("index", "kind", "path", "start", "end", "data", "columns", "progress")

    def __init__(self, index, kind, path, start=0, end=0, data=None, columns=None, progress=0):
        self.index, self.kind, self.path = index, kind, path
        self.start, self.end, self.data, self.columns, self.progress = start, end, data, columns, progress


def units(sources: Sequence[Source], keys: Sequence[str], unit_bytes: int = UNIT_BYTES) -> Iterator[Unit]:
    """The units of ``sources`` in order (a plain file's ranges found by seeking; a compressed file
    decompressed, a Parquet file decoded, one unit at a time: memory stays at a few units)."""
    for i, s in enumerate(sources):
        if s.kind == "parquet":
            yield from _parquet_units(i, s, keys, unit_bytes)
        elif s.compression:
            yield from _compressed_units(i, s, unit_bytes)
        else:
            yield from _range_units(i, s, unit_bytes)


def _range_units(index: int, s: Source, unit_bytes: int) -> Iterator[Unit]:
    size = os.path.getsize(s.path)
    with open(s.path, "rb") as f:
        start = 0
        while start < size:
            end = start + unit_bytes
            if end >= size:
                end = size
            else:
                f.seek(end)
                f.readline()  # to the end of the line under ``end``
                end = f.tell()
            yield Unit(index, "range", s.path, start, end, progress=end - start)
            start = end


def _open_compressed(s: Source, raw):
    if s.compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return _ZstdFrames(_zstandard(s.path), raw)


class _ZstdFrames:
    """The decompressed bytes of a zstd file of one or more frames, read(n) at a time. A file that
    ends inside a frame raises ZstdError, like gzip's EOFError for a cut file (zstandard's
    ``stream_reader(read_across_frames=True)`` ends there without a word: a cut file read as whole)."""

    def __init__(self, zstandard, raw):
        self.zstandard, self.raw = zstandard, raw
        self.dctx = zstandard.ZstdDecompressor()
        self.frame, self.in_frame = self.dctx.decompressobj(), False
        self.buf, self.pos = bytearray(), 0

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) - self.pos < n:
            chunk = self.raw.read(1 << 18)
            if not chunk:
                if self.in_frame:
                    raise self.zstandard.ZstdError("the file ends inside a zstd frame (truncated)")
                break
            self._feed(chunk)
        end = len(self.buf) if n < 0 else self.pos + n
        out = bytes(self.buf[self.pos:end])
        self.pos += len(out)
        if self.pos > (1 << 22) and self.pos * 2 > len(self.buf):  # drop what was read, now and then
            del self.buf[:self.pos]
            self.pos = 0
        return out

    def _feed(self, chunk: bytes) -> None:
        while chunk:
            if self.frame.eof:  # the next frame
                self.frame = self.dctx.decompressobj()
            self.buf += self.frame.decompress(chunk)
            self.in_frame = not self.frame.eof
            chunk = self.frame.unused_data if self.frame.eof else b""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _decompress_errors():
    errors = (OSError, EOFError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _compressed_units(index: int, s: Source, unit_bytes: int) -> Iterator[Unit]:
    offset, pending, done = 0, [], 0  # pending: the blocks of a line under way (no newline in them)
    with open(s.path, "rb") as raw:
        stream = _open_compressed(s, raw)
        try:
            while True:
                try:
                    block = stream.read(unit_bytes)
                except _decompress_errors() as e:
                    raise _error(f"--input {s.path!r}: not a valid {s.compression} file, or damaged or incomplete "
                                 f"({_first_line(e)}); decompress it by hand to check") from None
                if not block:
                    break
                cut = block.rfind(b"\n") + 1
                if cut == 0:  # a line longer than the block: read on (joined once, at its end)
                    pending.append(block)
                    continue
                data = b"".join(pending + [block[:cut]]) if pending else block[:cut]
                pending = [block[cut:]] if cut < len(block) else []
                progress, done = raw.tell() - done, raw.tell()
                yield Unit(index, "lines", s.path, start=offset, data=data, progress=progress)
                offset += len(data)
            size = os.path.getsize(s.path)
            rest = b"".join(pending)
            if rest or done < size:  # the last line without its newline; the rest of the progress
                yield Unit(index, "lines", s.path, start=offset, data=rest, progress=size - done)
        finally:
            stream.close()


def parquet_file(s: Source):
    pq = _pyarrow_parquet(s.path)
    import pyarrow

    try:
        return pq.ParquetFile(s.path)
    except (pyarrow.ArrowException, OSError) as e:
        raise _error(f"--input {s.path!r} is not a Parquet file, or is damaged ({_first_line(e)})") from None


def _parquet_columns(s: Source, pf, keys: Sequence[str]) -> None:
    """ConfigError unless every key is a text (string or binary) column of the file."""
    import pyarrow as pa

    schema = pf.schema_arrow
    for key in keys:
        if key not in schema.names:
            raise _error(f"--input {s.path!r}: no column {key!r} (columns there: {', '.join(schema.names) or 'none'}); "
                         f"pick the text columns with --json-keys")
        if schema.names.count(key) > 1:
            raise _error(f"--input {s.path!r}: {schema.names.count(key)} columns are named {key!r}; which one is the "
                         f"text is not clear: rename the others (e.g. with pyarrow) and give that one in --json-keys")
        t = schema.field(key).type
        text = (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
                or pa.types.is_large_binary(t) or getattr(pa.types, "is_string_view", lambda _: False)(t)
                or getattr(pa.types, "is_binary_view", lambda _: False)(t))
        if not text:
            raise _error(f"--input {s.path!r}: column {key!r} holds {t}, not text; pick the text columns with "
                         f"--json-keys")


def check_parquet(s: Source, keys: Sequence[str]) -> None:
    """ConfigError unless ``s`` is a Parquet file whose ``keys`` are text columns."""
    _parquet_columns(s, parquet_file(s), keys)


def _parquet_units(index: int, s: Source, keys: Sequence[str], unit_bytes: int) -> Iterator[Unit]:
    import pyarrow

    pf = parquet_file(s)
    _parquet_columns(s, pf, keys)
    meta = pf.metadata
    rows = meta.num_rows
    size = os.path.getsize(s.path)
    text_bytes = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    batch = int(max(1, min(65536, unit_bytes * rows // max(1, text_bytes)))) if rows else 1
    done = 0
    try:
        for rb in pf.iter_batches(batch_size=batch, columns=list(keys), use_threads=False):
            n = rb.num_rows
            columns = {k: rb.column(k).to_pylist() for k in keys}
            progress = size * (done + n) // max(1, rows) - size * done // max(1, rows)
            yield Unit(index, "rows", s.path, start=done, end=done + n, columns=columns, progress=progress)
            done += n
    except (pyarrow.ArrowException, OSError) as e:
        raise _error(f"--input {s.path!r}: the Parquet file is damaged near row index {done} "
                     f"({_first_line(e)})") from None
    if not rows:
        yield Unit(index, "rows", s.path, columns={k: [] for k in keys}, progress=size)


def count_rows(sources: Sequence[Source], limit: int) -> int:
    """Documents (lines, rows) of ``sources``, counted only up to ``limit`` (a quick look)."""
    total = 0
    for s in sources:
        if s.kind == "parquet":
            total += parquet_file(s).metadata.num_rows
        else:
            with open(s.path, "rb") as raw, (_open_compressed(s, raw) if s.compression else raw) as f:
                last = b""
                try:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        total += block.count(b"\n")
                        last = block
                        if total >= limit:
                            return total
                except _decompress_errors() as e:
                    raise _error(f"--input {s.path!r}: not a valid {s.compression} file, or damaged or incomplete "
                                 f"({_first_line(e)}); decompress it by hand to check") from None
                total += 1 if last and not last.endswith(b"\n") else 0
        if total >= limit:
            return total
    return total


# ---- a unit's rows --------------------------------------------------------------------------------

def unit_lines(unit: Unit) -> Tuple[bytes, int]:
    """(the unit's bytes, the file offset of their start) for a range or lines unit; a range is read
    once, here (by the worker that processes it)."""
    if unit.data is None:
        with open(unit.path, "rb") as f:
            f.seek(unit.start)
            unit.data = f.read(unit.end - unit.start)
    return unit.data, unit.start


def _split(data):
    """The lines of ``data`` (bytes or str) without their newlines, as iterating a file gives them."""
    lines = data.split(b"\n" if isinstance(data, bytes) else "\n")
    if not lines[-1]:
        lines.pop()
    return lines


def jsonl_detail(raw: bytes, offset: int, compressed: bool = False):
    """(the JSON object of one line or None for a blank line, the error detail or None)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        of = "the decompressed file" if compressed else "the file"
        return None, (f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {offset + e.start} of {of}); "
                      f"convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8) {SKIP_HINT}")
    return _json_detail(line)


def _json_detail(line: str):
    if not line or line.isspace():
        return None, None
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg}); fix or remove that line, {SKIP_HINT}"
    except (ValueError, RecursionError) as e:  # an integer of over 4,300 digits; arrays nested thousands deep
        why = "nested too deeply" if isinstance(e, RecursionError) else _first_line(e)
        return None, f"not readable JSON ({why}); fix or remove that line, {SKIP_HINT}"
    if not isinstance(doc, dict):
        return None, f"a JSON object per line is expected; fix or remove that line, {SKIP_HINT}"
    return doc, None


# a row of a unit: (row within the unit, texts by key or None, error detail or None, fatal)
Row = Tuple[int, Optional[List[str]], Optional[str], bool]


def unit_rows(unit: Unit, keys: Sequence[str], text_kind: bool = False) -> Iterator[Row]:
    """The rows of ``unit``: texts under ``keys`` for a document, nothing for a blank line; a bad row
    (not UTF-8, not JSON, not an object, a null text: skippable) or a missing key (fatal) as an error
    detail. ``text_kind``: the unit is a plain text file, one document."""
    if unit.kind == "rows":
        yield from _parquet_rows(unit, keys)
        return
    data, offset = unit_lines(unit)
    if text_kind:
        yield 0, [data.decode("utf-8", errors="replace")], None, False  # one text, whatever the keys
        return
    compressed = unit.kind == "lines"
    if offset == 0 and data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark opening the file
        data, offset = data[3:], 3
    try:
        lines = _split(data.decode("utf-8"))
    except UnicodeDecodeError:
        lines = None
    if lines is not None:  # the common case: the whole unit is UTF-8
        parsed = map(_json_detail, lines)
    else:
        raws = _split(data)
        starts = itertools.accumulate((len(r) + 1 for r in raws), initial=offset)
        parsed = (jsonl_detail(r, o, compressed) for r, o in zip(raws, starts))
    for n, (doc, detail) in enumerate(parsed):
        if detail is not None:
            yield n, None, detail, False
            continue
        if doc is None:
            continue
        texts = []
        for key in keys:
            value = doc.get(key, _MISSING)
            if value is _MISSING:
                yield n, None, (f"no key {key!r} (keys there: {', '.join(map(str, doc)) or 'none'}); "
                                f"pick them with --json-keys"), True
                return
            detail = _text_detail(key, value)
            if detail is not None:
                yield n, None, f"{detail}; fix or remove that line, {SKIP_HINT}", False
                break
            texts.append(value)
        else:
            yield n, texts, None, False


_JSON_KINDS = {dict: "a JSON object", list: "a JSON array", bool: "a JSON boolean", int: "a JSON number",
               float: "a JSON number"}


def _text_detail(key: str, value) -> Optional[str]:
    """Why a JSON value is no text (null, another type, a lone UTF-16 surrogate), or None."""
    if value is None:
        return f"the {key!r} value is null"
    if not isinstance(value, str):
        return f"the {key!r} value is {_JSON_KINDS.get(type(value), type(value).__name__)}, not a string"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # "\ud800" escapes without their pair: no character, no bytes
            return (f"the {key!r} value holds a lone UTF-16 surrogate (\\u{ord(value[e.start]):04x} at character "
                    f"{e.start}), which is no text")
    return None


_MISSING = object()


def _parquet_rows(unit: Unit, keys: Sequence[str]) -> Iterator[Row]:
    columns = [unit.columns[k] for k in keys]
    for n, values in enumerate(zip(*columns)):
        texts = []
        for key, value in zip(keys, values):
            if value is None:
                yield n, None, f"the {key!r} value is null; fix or remove that row, {SKIP_ROWS_HINT}", False
                break
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield n, None, (f"the {key!r} value is not valid UTF-8 (byte 0x{value[e.start]:02x} at its byte "
                                    f"{e.start}); fix or remove that row, {SKIP_ROWS_HINT}"), False
                    break
            texts.append(value)
        else:
            yield n, texts, None, False


def iter_documents(sources: Sequence[Source], keys: Sequence[str], skipped=None) -> Iterator[List[str]]:
    """The texts (under ``keys``) of each document of ``sources``, read in this process; a bad row
    raises BadLine naming the file and line/row, or with ``skipped`` (text_corpus.Skipped) is
    counted there; a missing key raises ConfigError."""
    from megatron_prores.text_corpus import BadLine

    row_base = {}
    for unit in units(sources, keys):
        s = sources[unit.index]
        base = unit.start if unit.kind == "rows" else row_base.get(unit.index, 0)
        for n, texts, detail, fatal in unit_rows(unit, keys, text_kind=s.kind == "text"):
            if detail is not None:
                message = f"{s.where(base + n)}: {detail}"
                if fatal:
                    raise _error(message)
                if skipped is None:
                    raise BadLine(message)
                skipped.add(message, "row" if s.kind == "parquet" else "line")
                continue
            yield texts
        if unit.kind != "rows":
            row_base[unit.index] = base + _count_lines(unit)


def _count_lines(unit: Unit) -> int:
    data, _ = unit_lines(unit)
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ---- tokenizing a unit (preprocess_data's workers) ------------------------------------------------

def tokenizer_spec(tok) -> tuple:
    """What a worker process needs to rebuild ``tok`` without torch: the SentencePiece model file,
    the Hugging Face tokenizer as its JSON, or (any other tokenizer) the object itself."""
    cls = type(tok).__name__
    if cls == "SentencePieceTokenizer":
        return ("sentencepiece", tok.model_path)
    if cls == "HuggingFaceTokenizer":
        return ("huggingface", tok.tok.to_str())
    return ("object", tok)


class Encoder:
    """Tokenizes the documents of a unit in one batch per key: SentencePiece's ``encode`` of a list
    (one thread), Hugging Face's ``encode_batch_fast`` (its threads off: one CPU per worker)."""

    def __init__(self, spec, keys, eod: Optional[int], dtype: str, skip_bad: bool):
        kind, value = spec
        self.keys, self.eod, self.dtype, self.skip_bad = list(keys), eod, dtype, skip_bad
        if kind == "sentencepiece":
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor()
            sp.Load(value)
            self.batch = lambda texts: sp.encode(texts, out_type=int, num_threads=1)
        elif kind == "huggingface":
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # a worker is one CPU's worth
            from tokenizers import Tokenizer

            hf = Tokenizer.from_str(value)
            encode = getattr(hf, "encode_batch_fast", hf.encode_batch)
            self.batch = lambda texts: [e.ids for e in encode(texts)]
        else:
            self.batch = lambda texts: [value.tokenize(t) for t in texts]

    def __call__(self, unit: Unit, text_kind: bool = False) -> dict:
        """The unit's documents as one token array and one length array per key, its row count, its
        bad rows (row within the unit, detail) and a fatal error (row, detail) or None."""
        import numpy

        texts = [[] for _ in self.keys]
        bad, fatal = [], None
        for n, doc, detail, is_fatal in unit_rows(unit, self.keys, text_kind):
            if detail is not None:
                if is_fatal:
                    fatal = (n, detail)
                    break
                bad.append((n, detail))
                if not self.skip_bad:
                    break
                continue
            for i, t in enumerate(doc):
                texts[i].append(t)
        rows = unit.end - unit.start if unit.kind == "rows" else _count_lines(unit)
        out = {"rows": rows, "bad": bad, "fatal": fatal, "docs": len(texts[0]), "tokens": {}, "lengths": {}}
        if fatal or (bad and not self.skip_bad):
            return out
        for key, batch in zip(self.keys, texts):
            ids = self.batch(batch) if batch else []
            if self.eod is not None:
                for x in ids:
                    x.append(self.eod)
            lengths = numpy.fromiter(map(len, ids), dtype=numpy.int64, count=len(ids))
            out["lengths"][key] = lengths
            out["tokens"][key] = numpy.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype,
                                                count=int(lengths.sum()))
        return out


_encoder: Dict[str, Encoder] = {}


def init_worker(spec, keys, eod, dtype, skip_bad) -> None:
    """Pool initializer: the worker's Encoder."""
    _encoder["e"] = Encoder(spec, keys, eod, dtype, skip_bad)


def encode_unit(unit: Unit) -> dict:
    return _encoder["e"](unit)

"""tools/preprocess_data.py's input formats (megatron_prores.corpus_readers): JSONL, gzip/zstd JSONL,
Parquet (several row groups), directories and globs give exactly the .bin/.idx of the plain JSONL of
the same documents, read back with megatron-core's IndexedDataset; bad rows name the file and the
line (JSONL) or row index (Parquet), or are skipped and counted; a missing optional package is one
line naming the ``data`` extra; --workers 1 and 2 write the same bytes.

Small hand-made documents and tokenizers trained here in a fraction of a second (a byte-level BPE
with ``tokenizers``, a SentencePiece BPE); every tool runs in-process through ``tools.run``.
"""

import gzip
import json
import os
import sys

import pytest

from tests.test_hf_tokenizer import one_error_line, preprocess  # the shared test helpers

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

WORDS = ("the quick brown fox jumps over a lazy dog while naïve café owners in Zürich count 1,234 "
         "emoji 😀 and 日本語 text\twith tabs").split(" ")


def documents(n=600):
    """``n`` documents of 5 to 60 words (deterministic), a few edge cases among them."""
    docs = []
    for i in range(n):
        k = 5 + (i * 7919) % 56
        docs.append(" ".join(WORDS[(i + j * 3) % len(WORDS)] for j in range(k)) + ("\n" if i % 5 == 0 else ""))
    docs[3], docs[10], docs[11] = "", " leading space", "line one\n\nline three\r\n"
    return docs


DOCS = documents()


def jsonl_bytes(docs, key="text", extra=True):
    return b"".join((json.dumps({key: d, "id": i} if extra else {key: d}) + "\n").encode() for i, d in enumerate(docs))


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """name -> (--tokenizer-type, --tokenizer-model): a byte-level BPE tokenizer.json and a SentencePiece model."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(DOCS[:200], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                            show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS[:200] * 3), model_prefix=str(d / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2, num_threads=1)
    return {"hf": ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(d / "tokenizer.json")],
            "sp": ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(d / "sp.model")]}


def output(prefix, key="text"):
    p = f"{prefix}_{key}_document"
    with open(p + ".bin", "rb") as b, open(p + ".idx", "rb") as i:
        return b.read(), i.read()


def write_parquet(path, docs, row_group_size=70, **columns):
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs, **columns}), str(path),
                   row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def reference(toks, tmp_path_factory):
    """The plain JSONL of DOCS and its .bin/.idx (HF tokenizer, one worker)."""
    d = tmp_path_factory.mktemp("ref")
    (d / "docs.jsonl").write_bytes(jsonl_bytes(DOCS))
    assert preprocess("--input", d / "docs.jsonl", "--output-prefix", d / "ref", *toks["hf"], "--workers", 1) == 0
    return d


def test_plain_jsonl_reads_back_as_the_tokenizer_gives(toks, reference):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_prores.tokenizer import build_tokenizer

    tok = build_tokenizer("HuggingFaceTokenizer", toks["hf"][3])
    ds = IndexedDataset(str(reference / "ref_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.tokenize(t) + [tok.eod] for t in DOCS]


def test_every_format_gives_the_bytes_of_the_plain_jsonl(toks, reference, tmp_path, capsys):
    data = jsonl_bytes(DOCS)
    half = data.index(b"\n", len(data) // 2) + 1
    c = zstandard.ZstdCompressor()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "a.jsonl.zst").write_bytes(c.compress(data[:half]) + c.compress(data[half:]))  # two frames
    (tmp_path / "a.jsonl.zstd").write_bytes(c.compress(data))
    write_parquet(tmp_path / "a.parquet", DOCS)  # 9 row groups of 70 rows
    assert pq.ParquetFile(str(tmp_path / "a.parquet")).metadata.num_row_groups == 9
    # a directory of parts in sorted order (names that sort differently by number), mixed formats,
    # a hidden file and files of other names left out
    parts = tmp_path / "parts"
    (parts / "sub").mkdir(parents=True)
    (parts / "01.jsonl").write_bytes(jsonl_bytes(DOCS[:100]))
    write_parquet(parts / "02.parquet", DOCS[100:250], row_group_size=40)
    (parts / "sub" / "03.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(DOCS[250:400])))
    (parts / "sub" / "04.jsonl.zst").write_bytes(c.compress(jsonl_bytes(DOCS[400:])))
    (parts / "README.md").write_text("not data")
    (parts / ".hidden.jsonl").write_bytes(jsonl_bytes(["not read"]))
    cases = {"gz": [tmp_path / "a.jsonl.gz"], "zst": [tmp_path / "a.jsonl.zst"], "zstd": [tmp_path / "a.jsonl.zstd"],
             "parquet": [tmp_path / "a.parquet"], "dir": [parts], "glob": [str(parts / "**" / "0*")],
             "files": [parts / "01.jsonl", parts / "02.parquet", parts / "sub"]}
    expected = output(reference / "ref")
    for name, inputs in cases.items():
        assert preprocess("--input", *inputs, "--output-prefix", tmp_path / name, *toks["hf"], "--workers", 1) == 0, \
            capsys.readouterr().err
        assert output(tmp_path / name) == expected, name
    assert "(from 4 files)" in capsys.readouterr().out


def test_workers_1_and_2_write_the_same_bytes(toks, tmp_path, capsys):
    """Units of 16 kB (the input is ~100 kB): each worker tokenizes several; the output is in input
    order whatever finishes first; both tokenizers' batch encodes give tokenize()'s ids."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_prores.tokenizer import build_tokenizer

    (tmp_path / "in.jsonl").write_bytes(jsonl_bytes(DOCS))
    write_parquet(tmp_path / "in.parquet", DOCS)
    for name in ("sp", "hf"):
        tok = build_tokenizer(toks[name][1], toks[name][3])
        want = [tok.tokenize(t) + [tok.eod] for t in DOCS]
        for workers in (1, 2):  # a JSONL (byte ranges the workers read) then a Parquet (batches sent)
            assert preprocess("--input", tmp_path / "in.jsonl", tmp_path / "in.parquet", "--output-prefix",
                              tmp_path / f"{name}{workers}", *toks[name], "--workers", workers) == 0
            assert f"with {workers} worker" in capsys.readouterr().out
        assert output(tmp_path / f"{name}1") == output(tmp_path / f"{name}2")
        ds = IndexedDataset(str(tmp_path / f"{name}2_text_document"))
        assert [ds[i].tolist() for i in range(len(ds))] == want * 2, name


def test_idx_bytes_are_megatron_cores(tmp_path, capsys):
    """The .idx preprocess writes itself (no megatron-core import) is what megatron-core's
    IndexedDatasetBuilder writes, for uint16 and int32 (NullTokenizer: the ids are the text)."""
    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_prores.tools.preprocess_data import optimal_dtype

    docs = [[5, 6, 7], [], [8], list(range(40))]
    for vocab in (100, 70_000):
        assert optimal_dtype(vocab) == numpy.dtype(DType.optimal_dtype(vocab)).name
        data = tmp_path / f"in{vocab}.jsonl"
        data.write_bytes(jsonl_bytes([" ".join(map(str, d)) for d in docs], extra=False))
        assert preprocess("--input", data, "--output-prefix", tmp_path / f"ours{vocab}", "--tokenizer-type",
                          "NullTokenizer", "--vocab-size", vocab) == 0
        b = IndexedDatasetBuilder(str(tmp_path / f"mc{vocab}.bin"), dtype=DType.optimal_dtype(vocab))
        for d in docs:
            b.add_item(torch.tensor(d + [vocab - 1], dtype=torch.int64))
            b.end_document()
        b.finalize(str(tmp_path / f"mc{vocab}.idx"))
        assert output(tmp_path / f"ours{vocab}") == ((tmp_path / f"mc{vocab}.bin").read_bytes(),
                                                     (tmp_path / f"mc{vocab}.idx").read_bytes())


def test_several_keys_from_jsonl_and_parquet(toks, tmp_path):
    titles = [f"title {i}" for i in range(len(DOCS))]
    with open(tmp_path / "in.jsonl", "w") as f:
        for t, d in zip(titles, DOCS):
            f.write(json.dumps({"title": t, "text": d}) + "\n")
    write_parquet(tmp_path / "in.parquet", DOCS, title=titles)
    for ext in ("jsonl", "parquet"):
        assert preprocess("--input", tmp_path / f"in.{ext}", "--output-prefix", tmp_path / ext, *toks["hf"],
                          "--json-keys", "title", "text", "--workers", 1) == 0
    for key in ("title", "text"):
        assert output(tmp_path / "jsonl", key) == output(tmp_path / "parquet", key)


def bad_inputs(tmp_path):
    """A JSONL, its gzip and a Parquet of DOCS with a bad document at line 500 / row index 499,
    past the first 16 kB unit (the line number counts the units before it)."""
    lines = jsonl_bytes(DOCS).splitlines(keepends=True)
    lines[499] = b'{"text": broken}\n'
    (tmp_path / "bad.jsonl").write_bytes(b"".join(lines))
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b"".join(lines)))
    write_parquet(tmp_path / "bad.parquet", DOCS[:499] + [None] + DOCS[500:])


def test_bad_rows_name_the_file_and_the_line_or_row(toks, tmp_path, capsys):
    bad_inputs(tmp_path)
    cases = {"bad.jsonl": ":500: not valid JSON", "bad.jsonl.gz": ":500: not valid JSON",
             "bad.parquet": ": row index 499: the 'text' value is null"}
    for workers, names in ((1, cases), (2, ["bad.jsonl"])):  # 2: the line number from the units before it
        for name in names:
            message = cases[name]
            code = preprocess("--input", tmp_path / name, "--output-prefix", tmp_path / "out", *toks["hf"],
                              "--workers", workers)
            err = one_error_line(capsys, code)
            assert f"{tmp_path / name}{message}" in err and "--skip-bad-lines" in err, err
            assert not [p for p in os.listdir(tmp_path) if p.startswith("out")], "partial output left behind"

    utf8 = tmp_path / "latin1.jsonl.gz"  # a byte offset in the decompressed file
    utf8.write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'))
    err = one_error_line(capsys, preprocess("--input", utf8, "--output-prefix", tmp_path / "out", *toks["hf"]))
    assert f"{utf8}:2: not valid UTF-8 (byte 0xe9 at byte offset 28 of the decompressed file)" in err, err


def test_skip_bad_lines_skips_and_counts(toks, tmp_path, capsys):
    bad_inputs(tmp_path)
    expected = None
    for name in ("bad.jsonl", "bad.jsonl.gz", "bad.parquet"):
        flag = "--skip-bad-rows" if name.endswith("parquet") else "--skip-bad-lines"  # the alias
        assert preprocess("--input", tmp_path / name, "--output-prefix", tmp_path / name, *toks["hf"], flag,
                          "--workers", 1) == 0
        out, err = capsys.readouterr()
        assert err == "", err
        noun = "row" if name.endswith("parquet") else "line"
        last = out.strip().splitlines()[-1]
        assert last.startswith(f"skipped 1 bad {noun} ") and str(tmp_path / name) in last, last
        assert "wrote 599 documents" in out
        expected = expected or output(tmp_path / name)
        assert output(tmp_path / name) == expected


def test_input_errors_are_one_line(toks, tmp_path, capsys):
    base = ["--output-prefix", tmp_path / "out", *toks["hf"]]
    write_parquet(tmp_path / "a.parquet", ["x", "y"])
    pq.write_table(pa.table({"text": [1, 2]}), str(tmp_path / "ints.parquet"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "damaged.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(DOCS))[:-200])
    (tmp_path / "not.parquet").write_text("plain text")
    cases = [
        (["--input", tmp_path / "a.parquet", "--json-keys", "body"],
         f"--input '{tmp_path / 'a.parquet'}': no column 'body' (columns there: id, text); pick the text columns"),
        (["--input", tmp_path / "ints.parquet"], "column 'text' holds int64, not text"),
        (["--input", tmp_path / "empty"], "is a directory without input files"),
        (["--input", str(tmp_path / "nothing*.jsonl")], "matches no file"),
        (["--input", tmp_path / "missing.jsonl"], "does not exist"),
        (["--input", tmp_path / "damaged.jsonl.gz"], "not a valid gzip file, or damaged or incomplete"),
        (["--input", tmp_path / "not.parquet"], "is not a Parquet file"),
    ]
    for extra, message in cases:
        err = one_error_line(capsys, preprocess(*base, *extra))
        assert message in err, (extra, err)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]


NOT_JSONL = ("is not JSONL (it does not begin with a JSON object: plain text?); preprocess_data reads JSONL (one "
             "object per line, e.g. {\"text\": \"...\"}) and Parquet: write the documents as JSONL first")
HF_TYPE = "a Hugging Face tokenizer.json or tokenizer directory takes --tokenizer-type HuggingFaceTokenizer"
MIXUPS = {  # what was given -> (flags, the error line); D: the test's folder, HF: a tokenizer.json, HF_FLAGS: its flags
    "plain text": (["--input", "D/notes.txt", "HF_FLAGS"], "error: --input 'D/notes.txt' " + NOT_JSONL),
    "plain text, gzip, --skip-bad-lines": (["--input", "D/notes.txt.gz", "HF_FLAGS", "--skip-bad-lines"],
                                           "error: --input 'D/notes.txt.gz' " + NOT_JSONL),
    "Megatron-LM's GPT-2 BPE flags": (
        ["--input", "D/a.jsonl", "--vocab-file", "gpt2-vocab.json", "--merge-file", "gpt2-merges.txt"],
        "error: unrecognized arguments: --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt (GPT-2 BPE files "
        "are not read: give --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json (or its "
        "directory))"),
    "a tokenizer.json as a SentencePiece model": (["--input", "D/a.jsonl", "--tokenizer-model", "HF"],
                                                  "error: --tokenizer-model 'HF' is not a SentencePiece model ("),
    "a tokenizer directory as a SentencePiece model": (["--input", "D/a.jsonl", "--tokenizer-model", "HF_DIR"],
                                                       "error: --tokenizer-model 'HF_DIR' is not a file; " + HF_TYPE),
}


@pytest.mark.parametrize("case", sorted(MIXUPS))
def test_a_plain_text_input_megatron_flags_or_a_tokenizer_of_the_other_type_name_the_fix(toks, tmp_path, capsys,
                                                                                         case):
    """A plain text file given by name (read as JSONL: its every line a bad line, which --skip-bad-lines
    would all skip), Megatron-LM's GPT-2 BPE flags (argparse's usage before), a Hugging Face tokenizer
    with the default --tokenizer-type: one line naming what to give; nothing written."""
    text = "The first line of plain text.\nThe second one.\n"
    (tmp_path / "notes.txt").write_text(text)
    (tmp_path / "notes.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(DOCS[:20]))
    hf = toks["hf"][-1]

    def named(text):
        return text.replace("HF_DIR", os.path.dirname(hf)).replace("HF", hf).replace("D/", f"{tmp_path}/")

    flags, message = MIXUPS[case]
    flags = [a for f in flags for a in (toks["hf"] if f == "HF_FLAGS" else [named(f)])]
    err = one_error_line(capsys, preprocess("--output-prefix", tmp_path / "out", *flags))
    assert err.startswith(named(message)), err
    assert "tokenizer" not in case or err.endswith(HF_TYPE), err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]


def test_a_tokenizer_of_neither_kind_and_jsonl_of_another_name(toks, tmp_path, capsys):
    """A --tokenizer-model that is no tokenizer: the SentencePiece fix; JSONL named .txt is read as JSONL."""
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(DOCS[:20]))
    (tmp_path / "notes.txt").write_text("plain text\n")
    err = one_error_line(capsys, preprocess("--output-prefix", tmp_path / "out", "--input", tmp_path / "a.jsonl",
                                            "--tokenizer-model", tmp_path / "notes.txt"))
    assert err.endswith("give the .model written by tools/train_tokenizer.py"), err
    (tmp_path / "docs.txt").write_bytes(jsonl_bytes(DOCS[:20]))
    assert preprocess("--output-prefix", tmp_path / "out", "--input", tmp_path / "docs.txt", *toks["hf"]) == 0
    assert preprocess("--output-prefix", tmp_path / "ref", "--input", tmp_path / "a.jsonl", *toks["hf"]) == 0
    assert output(tmp_path / "out") == output(tmp_path / "ref")


@pytest.mark.parametrize("module,name", [("pyarrow", "a.parquet"), ("zstandard", "a.jsonl.zst")])
def test_a_missing_extra_is_one_line(toks, tmp_path, capsys, monkeypatch, module, name):
    write_parquet(tmp_path / "a.parquet", ["x"])
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(["x"])))
    for m in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, m, None)  # as if not installed: import raises ImportError
    monkeypatch.setitem(sys.modules, module, None)
    err = one_error_line(capsys, preprocess("--input", tmp_path / name, "--output-prefix", tmp_path / "out",
                                            *toks["hf"]))
    assert err.endswith(f"needs {module}: pip install 'megatron-prores[data]'"), err
    assert str(tmp_path / name) in err


def test_train_tokenizer_reads_the_same_formats(tmp_path):
    """train_tokenizer's reader is preprocess's: a Parquet file and a glob of gzip JSONL give the
    texts of the plain JSONL; other file names are plain text."""
    from megatron_prores.text_corpus import iter_texts

    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(DOCS))
    write_parquet(tmp_path / "a.parquet", DOCS)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "1.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(DOCS[:300])))
    (tmp_path / "gz" / "2.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(DOCS[300:])))
    (tmp_path / "notes.txt").write_text("plain\ntext\n")
    want = list(iter_texts([str(tmp_path / "a.jsonl")], ["text"]))
    assert want == DOCS
    assert list(iter_texts([str(tmp_path / "a.parquet")], ["text"])) == want
    assert list(iter_texts([str(tmp_path / "gz" / "*.jsonl.gz")], ["text"])) == want
    assert list(iter_texts([str(tmp_path / "notes.txt")], ["text"])) == ["plain\ntext\n"]

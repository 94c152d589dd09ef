"""Corpus -> tokenizer -> .bin/.idx, read back with megatron-core's IndexedDataset."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool(name, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    out = tool("build_corpus", "--output", d / "corpus.jsonl", "--max-bytes", 400_000)
    assert out.returncode == 0, out.stderr
    out = tool("train_tokenizer", "--input", d / "corpus.jsonl", "--model-prefix", d / "tok", "--vocab-size", 500)
    assert out.returncode == 0, out.stderr
    return d


def test_pipeline_round_trips_every_document(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_prores.tokenizer import build_tokenizer

    out = tool("preprocess_data", "--input", corpus / "corpus.jsonl", "--tokenizer-model", corpus / "tok.model",
               "--output-prefix", corpus / "std", "--workers", 2)
    assert out.returncode == 0, out.stderr
    assert "tokens/s" in out.stdout
    docs = [json.loads(l)["text"] for l in open(corpus / "corpus.jsonl")]
    assert len(docs) > 5
    tok = build_tokenizer("SentencePieceTokenizer", str(corpus / "tok.model"))
    assert tok.vocab_size == 500
    ds = IndexedDataset(str(corpus / "std_text_document"))
    assert len(ds.document_indices) - 1 == len(docs)
    for i in (0, len(docs) // 2, len(docs) - 1):
        expect = tok.tokenize(docs[i]) + [tok.eod]
        assert ds[i].tolist() == expect
        assert tok.detokenize(expect[:-1]) == docs[i]  # byte fallback: lossless
    assert ds[0].dtype == np.uint16  # vocab below 65500


def test_bad_inputs_give_one_line_and_no_output(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken}\n')
    cases = [
        (["--input", tmp_path / "missing.jsonl"], "--input"),
        (["--input", bad], "bad.jsonl:2: not valid JSON"),
        (["--input", corpus / "corpus.jsonl", "--json-keys", "body"], ":1: no key 'body'"),
        (["--input", corpus / "corpus.jsonl", "--tokenizer-model", tmp_path / "none.model"],
         "--tokenizer-model"),
        (["--input", corpus / "corpus.jsonl", "--tokenizer-type", "GPT2BPE"], "--tokenizer-type 'GPT2BPE' is not valid"),
        (["--input", corpus / "corpus.jsonl", "--tokenizer-type", "NullTokenizer", "--vocab-size", 300],
         "NullTokenizer reads whitespace-separated integer ids, not text"),
    ]
    for extra, message in cases:
        args = ["--tokenizer-model", corpus / "tok.model", "--output-prefix", tmp_path / "out", "--workers", 1] + extra
        out = tool("preprocess_data", *args)
        assert out.returncode == 2, (extra, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.strip().count("\n") == 0, out.stderr
        assert not [p for p in os.listdir(tmp_path) if p.startswith("out")], "partial output left behind"
    out = tool("train_tokenizer", "--input", tmp_path / "missing.txt", "--model-prefix", tmp_path / "t")
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_progress_bar_on_a_terminal(corpus, tmp_path):
    """On a terminal (a pty of 120 columns) preprocess_data draws a progress bar over the input bytes."""
    import fcntl
    import pty
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # child: a 120x40 terminal, then the tool
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.environ["PYTHONWARNINGS"] = "ignore"
        os.execv(sys.executable, [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
                                  "--input", str(corpus / "corpus.jsonl"), "--tokenizer-model",
                                  str(corpus / "tok.model"), "--output-prefix", str(tmp_path / "bar"),
                                  "--workers", "1"])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text[-2000:]
    assert "tokenizing: 100%" in text and "B/s" in text, text[-2000:]
    assert "tokens/s" in text


def test_corpus_from_gzip_compressed_documentation(tmp_path):
    """Debian ships documentation gzip-compressed (linux-doc's *.rst.gz): read as by its plain name."""
    import gzip

    src = tmp_path / "Documentation"
    (src / "sub").mkdir(parents=True)
    text = "The kernel's documentation, in English prose.\n" * 5
    with gzip.open(src / "sub" / "intro.rst.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    (src / "notes.txt").write_text("plain text file " * 10)
    (src / "image.png.gz").write_bytes(gzip.compress(b"not text"))
    out = tool("build_corpus", "--source", src, "--extensions", ".rst", ".txt", "--output", tmp_path / "c.jsonl")
    assert out.returncode == 0, out.stderr
    docs = {d["path"]: d["text"] for d in map(json.loads, open(tmp_path / "c.jsonl"))}
    assert docs == {"notes.txt": "plain text file " * 10, "sub/intro.rst.gz": text}


def test_quality_experiments_are_launchable():
    """Every run of benchmarks/quality/run.py passes the driver's parser and checks."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_run", os.path.join(ROOT, "benchmarks", "quality", "run.py"))
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)

    from megatron_prores.arguments import check_recipe

    for size in quality.SIZES:
        for experiment, runs in quality.experiments(size).items():
            assert runs, experiment
            for name, flags in runs:
                args, cfg, _, _ = check_recipe(quality.training_flags("/r", flags, size, ("/d/p", "/d/t.model")), 1)
                if name.startswith("post-") and name != "post-baseline":
                    expected = name[len("post-"):]  # stability/schedules: the run is named by its schedule
                else:
                    expected = "linear" if "prores" in name else "none"
                assert args.prores_schedule == expected and args.num_layers >= 12, name
                assert ("--gpas" in flags) == ("gpas" in name), name

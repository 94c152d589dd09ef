"""build_corpus and train_tokenizer on bad input: one line on stderr, exit code 2, no traceback, no
stray .tmp, no hang (every run has a timeout)."""

import json
import os
import resource
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "def answer():\n    return 42  # the answer to everything, with enough text to be kept\n"


def tool(name, *args, file_size_limit=None, timeout=60):
    """Run tools/NAME.py (at most ``timeout`` s); with ``file_size_limit``, writing past that many bytes fails
    with EFBIG ("File too large"), as writing to a full disk fails with ENOSPC."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit if file_size_limit else None,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONDONTWRITEBYTECODE": "1"})


def assert_error(out, message):
    """Exit code 2 and exactly ``error: message`` on stderr, nothing else."""
    assert out.returncode == 2, out.stderr
    assert out.stderr == f"error: {message}\n", out.stderr


def leftovers(directory):
    return sorted(p for p in os.listdir(directory) if ".tmp" in p or p.startswith(".write-test-"))


def unwritable_dir(tmp_path):
    """A directory this process cannot create files in (root writes anywhere but /sys)."""
    if os.geteuid() != 0:
        d = tmp_path / "read-only"
        d.mkdir(mode=0o555)
        return str(d)
    if not os.path.isdir("/sys"):
        pytest.skip("no unwritable directory for root")
    return "/sys"


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text(TEXT)
    return src


def test_build_corpus_skips_fifos_and_dangling_symlinks(source, tmp_path):
    """A FIFO named like a source file blocked the tool forever (and left OUT.tmp): only regular
    files are read."""
    os.mkfifo(source / "fifo.py")
    os.symlink("nowhere.py", source / "dangling.py")
    os.symlink("a.py", source / "link.py")  # a link to a regular file is still read
    out = tool("build_corpus", "--source", source, "--output", tmp_path / "c.jsonl", timeout=15)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    docs = {d["path"]: d["text"] for d in map(json.loads, open(tmp_path / "c.jsonl"))}
    assert docs == {"a.py": TEXT, "link.py": TEXT}
    assert leftovers(tmp_path) == []


def test_build_corpus_output_that_cannot_be_written(source, tmp_path):
    """--output checked before the corpus is built: a directory, under a file, in an unwritable directory."""
    (tmp_path / "d").mkdir()
    (tmp_path / "c.jsonl").write_text("a file\n")
    d, c = tmp_path / "d", tmp_path / "c.jsonl"
    cases = [
        (d, f"--output '{d}' is a directory; give a file name in it, e.g. --output {d}/corpus.jsonl"),
        (f"{d}/", f"--output '{d}/' names a directory; give a file name in it, e.g. --output {d}/corpus.jsonl"),
        (c / "x.jsonl", f"--output '{c}/x.jsonl': '{c}' is not a directory; give --output in a directory"),
        (c / "sub" / "x.jsonl", f"--output '{c}/sub/x.jsonl': '{c}' is not a directory; give --output in a directory"),
    ]
    for output, message in cases:
        assert_error(tool("build_corpus", "--source", source, "--output", output), message)
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "d", "src"] and os.listdir(d) == []
    assert (tmp_path / "c.jsonl").read_text() == "a file\n"

    ro = unwritable_dir(tmp_path)
    out = tool("build_corpus", "--source", source, "--output", f"{ro}/x.jsonl")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"error: --output '{ro}/x.jsonl': cannot write in '{ro}' ("), out.stderr
    assert out.stderr.endswith("); give --output in a writable directory\n"), out.stderr


def test_build_corpus_disk_full_leaves_no_tmp(source, tmp_path):
    """Writing fails (as on a full disk): one line, and the half-written .tmp is removed."""
    for i in range(20):
        (source / f"m{i}.py").write_text(TEXT * 20)
    out = tool("build_corpus", "--source", source, "--output", tmp_path / "c.jsonl", file_size_limit=4096)
    assert_error(out, f"--output '{tmp_path}/c.jsonl': cannot write {tmp_path}/c.jsonl.tmp (File too large); "
                      f"check the free space and permissions there or give another --output")
    assert sorted(os.listdir(tmp_path)) == ["src"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(300)))
    return path


def test_train_tokenizer_rejects_bad_numbers_up_front(text_file, tmp_path):
    coverage = "--character-coverage {} is out of range; give a value from 0.98 to 1.0 (e.g. 0.9995, or 1.0 for " \
               "every character)"
    sentences = "--max-sentences {} is out of range; give a number of lines above 100, or 0 to train on all lines"
    cases = [
        (["--character-coverage", "2"], coverage.format("2.0")),
        (["--character-coverage", "0.95"], coverage.format("0.95")),
        (["--character-coverage", "nan"], coverage.format("nan")),
        (["--max-sentences", "-5"], sentences.format(-5)),
        (["--max-sentences", "100"], sentences.format(100)),
        (["--max-sentences", str(2 ** 64)], sentences.format(2 ** 64)),
    ]
    for extra, message in cases:
        out = tool("train_tokenizer", "--input", text_file, "--model-prefix", tmp_path / "tok", "--vocab-size", 300,
                   *extra)
        assert_error(out, message)
    assert sorted(os.listdir(tmp_path)) == ["t.txt"]
    # the bounds themselves are SentencePiece's: they train
    out = tool("train_tokenizer", "--input", text_file, "--model-prefix", tmp_path / "tok", "--vocab-size", 300,
               "--character-coverage", "0.98", "--max-sentences", "0")
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path)) == ["t.txt", "tok.model", "tok.vocab"]


def test_train_tokenizer_model_prefix_that_cannot_be_written(text_file, tmp_path):
    """--model-prefix checked before reading the input and training."""
    (tmp_path / "d").mkdir()
    (tmp_path / "tok.vocab").mkdir()
    d, f = tmp_path / "d", text_file
    cases = [
        (f / "x", f"--model-prefix '{f}/x': '{f}' is not a directory; give --model-prefix in a directory"),
        (f"{d}/", f"--model-prefix '{d}/' names a directory; give a file name in it, e.g. --model-prefix {d}/tok"),
        (tmp_path / "tok", f"--model-prefix '{tmp_path}/tok': '{tmp_path}/tok.vocab' is a directory; "
                           f"give another --model-prefix"),
    ]
    for prefix, message in cases:
        out = tool("train_tokenizer", "--input", text_file, "--model-prefix", prefix, "--vocab-size", 300)
        assert_error(out, message)
    assert sorted(os.listdir(tmp_path)) == ["d", "t.txt", "tok.vocab"] and os.listdir(d) == []

    ro = unwritable_dir(tmp_path)
    out = tool("train_tokenizer", "--input", text_file, "--model-prefix", f"{ro}/x", "--vocab-size", 300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"error: --model-prefix '{ro}/x': cannot write in '{ro}' ("), out.stderr
    assert out.stderr.endswith("); give --model-prefix in a writable directory\n"), out.stderr


def test_train_tokenizer_disk_full_leaves_no_tmp(text_file, tmp_path):
    out = tool("train_tokenizer", "--input", text_file, "--model-prefix", tmp_path / "tok", "--vocab-size", 300,
               file_size_limit=1024)
    assert_error(out, f"--model-prefix '{tmp_path}/tok': cannot write {tmp_path}/tok.model.tmp (File too large); "
                      f"check the free space and permissions there or give another --model-prefix")
    assert sorted(os.listdir(tmp_path)) == ["t.txt"]


def test_long_lines_are_cut_into_pieces_sentencepiece_keeps():
    """SentencePiece drops a line of over 64 KiB (its max_sentence_length) without a word: the pieces,
    joined, are the line; each within the limit, cut before a space where the piece's second half has
    one, else between characters (never inside a multi-byte character)."""
    from megatron_prores.tools.train_tokenizer import MAX_LINE_BYTES, pieces

    assert MAX_LINE_BYTES == 1 << 16
    words = " ".join(f"w{i % 97}" for i in range(40))
    cjk = "日本語のテキスト" * 5  # 3 bytes a character, no space
    for line, limit in ((words, 16), (cjk, 16), (cjk, 17), (words + " " + cjk + "😀" * 9, 20), ("short", 16)):
        parts = pieces(line, limit)
        assert "".join(parts) == line and all(0 < len(p.encode()) <= limit for p in parts), (line, parts)
    assert pieces(words, 16)[:3] == ["w0 w1 w2 w3 w4", " w5 w6 w7 w8 w9", " w10 w11 w12 w13"]
    assert all(p.startswith(" ") for p in pieces(words, 16)[1:])
    assert pieces(cjk, 16) == pieces(cjk, 17) == [cjk[i:i + 5] for i in range(0, len(cjk), 5)]  # 15 bytes each
    big = "x" * (3 * MAX_LINE_BYTES)
    assert pieces(big) == ["x" * MAX_LINE_BYTES] * 3


def test_train_tokenizer_trains_on_a_corpus_of_one_long_line(tmp_path):
    """One document of 200 kB without a newline (minified text): trained on, not 'give more text'."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    vocabulary = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    text = " ".join(rng.choice(vocabulary) for _ in range(40000))
    assert len(text.encode()) > 3 * (1 << 16)
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": text}) + "\n")
    out = tool("train_tokenizer", "--input", tmp_path / "c.jsonl", "--model-prefix", tmp_path / "tok",
               "--vocab-size", 64, "--no-byte-fallback")
    assert out.returncode == 0, out.stderr
    assert "(1 line over 64 KiB cut into pieces)" in out.stdout, out.stdout
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    learned = [sp.IdToPiece(i).replace("\u2581", " ") for i in range(3, sp.GetPieceSize())]
    assert sp.GetPieceSize() == 64 and all(p in " " + text for p in learned), learned
    assert max(map(len, learned)) > 2  # merges learned from the text

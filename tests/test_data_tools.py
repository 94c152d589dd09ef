"""Corpus -> tokenizer -> .bin/.idx, read back with megatron-core's IndexedDataset; the training data
loader (megatron_prores.data) on tiny files written by megatron-core's own builder: --split shares
without tokens, index caches of replaced files, an unwritable cache."""

import errno
import json
import os
import re
import shutil
import signal
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


# ---- the training data loader on tiny files ------------------------------------------------------

def write_dataset(prefix, lengths, vocab=64, shift=0):
    """PREFIX.bin/.idx of documents of ``lengths`` tokens (ids below ``vocab - 1``, the EOD), written
    by megatron-core's IndexedDatasetBuilder."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for i, n in enumerate(lengths):
        builder.add_document(torch.as_tensor((np.arange(n) * 7 + i * 13 + shift) % (vocab - 1)), [n])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def build(prefix, split="969,30,1", valid=0, train=8, **kw):
    """data.build_datasets as the driver calls it (sizes [train, valid, 0]), seq length 16; at most
    60 s (megatron-core's loop over epochs of a split without tokens never ends)."""
    from megatron_prores.data import build_datasets
    from megatron_prores.tokenizer import build_tokenizer

    def hung(*_):
        raise TimeoutError(f"building --split {split} of {prefix} did not end")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        return build_datasets(build_tokenizer("NullTokenizer", None, 64), [train, valid, 0],
                              data_path=prefix if isinstance(prefix, list) else [prefix], split=split,
                              seq_length=16, seed=1, **kw)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def split_tokens(lengths, split):
    """Tokens of the (training, validation, test) parts of a file as megatron-core cuts it: the
    documents [round(a n), round(b n)) for the cumulative normalized shares a, b; None for no share."""
    weights = [float(w) for w in split.split(",")] + [0.0] * (3 - len(split.split(",")))
    edges = np.concatenate([[0.0], np.cumsum(weights)]) / sum(weights)
    n = len(lengths)
    return [sum(lengths[round(edges[i] * n):round(edges[i + 1] * n)]) if weights[i] else None for i in range(3)]


FILES = {"53 documents": [20] * 53, "9 documents": [30] * 9, "1 document": [200],
         "empty last documents": [40, 40, 40, 40, 0, 0], "empty first documents": [0, 0, 0, 50, 50, 50]}
SPLITS = ["969,30,1", "98,2,0", "99,1,0", "90,10,0", "50,50,0", "1,1,1", "1,0,1", "1,99,0", "100,0,0"]


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_split_builds_or_is_one_line_naming_a_split_that_does(tmp_path, name):
    """Every --split x {no validation, validation}: the splits the run reads are built (never the test
    split, which the driver never reads: megatron-core looped forever over one without a token), or
    one line names the split without a token and a --split that builds."""
    from megatron_prores.config import ConfigError

    lengths = FILES[name]
    prefix = write_dataset(tmp_path / "d", lengths)
    for split in SPLITS:
        for valid in (0, 4):
            tokens = split_tokens(lengths, split)
            empty = [part for part, want, t in zip(("training", "validation"), (8, valid), tokens)
                     if want and t == 0]
            if not empty:
                train_ds, valid_ds, test_ds = build(prefix, split, valid)
                assert len(train_ds) >= 8 and train_ds[7]["tokens"].shape == (16,), (split, valid)
                assert (valid_ds is None) == (not valid or tokens[1] is None), (split, valid)
                assert valid_ds is None or len(valid_ds) >= valid
                assert test_ds is None
                continue
            with pytest.raises(ConfigError) as e:
                build(prefix, split, valid)
            message = str(e.value)
            docs = f"{len(lengths)} document{'s' if len(lengths) > 1 else ''}"
            assert message.startswith(f"--split {split} leaves the {empty[0]} split of '{prefix}' ({docs}) "
                                      f"without a token; give "), message
            assert ("--eval-iters 0" in message) == bool(valid), message
            fix = re.search(r"give --split (\S+?),? ", message + " ")
            if fix:
                assert all(t for t, want in zip(split_tokens(lengths, fix.group(1)), (8, valid)) if want), message
                train_ds, valid_ds, _ = build(prefix, fix.group(1), valid)
                assert len(train_ds) >= 8 and (valid_ds is None) == (not valid)
            else:  # no share gives both parts a token
                assert valid and len([n for n in lengths if n]) < 2, message


def test_a_blend_builds_no_test_split_and_names_its_file_without_validation_tokens(tmp_path):
    """In a process of its own, at most 120 s: megatron-core builds a blend's files in a thread, which
    no alarm stops (it looped forever over the test split of the small file)."""
    big, small = write_dataset(tmp_path / "big", [30] * 100), write_dataset(tmp_path / "small", [30] * 9, shift=5)
    script = f"""if True:
        import json, sys
        sys.path.insert(0, {ROOT!r})
        from megatron_prores.config import ConfigError
        from tests.test_data_tools import build
        blend, out = ["0.5", {big!r}, "0.5", {small!r}], {{}}
        train, valid, test = build(blend)  # 969,30,1: no test document in the small file
        out["default"] = [len(train) >= 8, valid, test]
        try:
            build(blend, "98,2,0", valid=4)
        except ConfigError as e:
            out["error"] = str(e)
        out["fixed"] = len(build(blend, "94,6,0", valid=4)[1]) >= 4
        print(json.dumps(out))
    """
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.splitlines()[-1]) == {
        "default": [True, None, None], "fixed": True,
        "error": f"--split 98,2,0 leaves the validation split of '{small}' (9 documents) without a token; give "
                 f"--split 94,6,0, or --eval-iters 0 to train without validation"}


def indices(ds, n=8):
    return ([np.asarray(getattr(ds, k)).tolist() for k in ("document_index", "sample_index", "shuffle_index")],
            [ds[i]["tokens"].tolist() for i in range(n)])


@pytest.mark.parametrize("shared_cache", [False, True], ids=["default cache", "--data-cache-path"])
def test_indices_cached_for_replaced_files_are_not_read(tmp_path, shared_cache):
    """The same prefix re-made with other documents: the samples are those of the new files (built
    from scratch at another path: the reference), never of the indices megatron-core cached for the
    old ones (its cache key holds the path, not the contents: an IndexError, or other samples).
    Unchanged files read their cache however old their time stamps."""
    kw = {"cache_path": str(tmp_path / "cache")} if shared_cache else {}
    cache = tmp_path / "cache" if shared_cache else tmp_path / "d" / "cache" / "GPTDataset_indices"
    prefix = write_dataset(tmp_path / "d", [30] * 20)
    build(prefix, "90,10,0", valid=4, **kw)
    cached = sorted(os.listdir(cache))
    assert cached
    os.utime(prefix + ".idx", (1, 1))  # copied without its time stamps (a node-local copy): the same cache
    build(prefix, "90,10,0", valid=4, **kw)
    assert sorted(os.listdir(cache)) == cached
    for lengths in ([50] * 5, [10, 50] * 10):  # fewer documents; as many, of other lengths
        write_dataset(prefix, lengths, shift=3)
        got = build(prefix, "90,10,0", valid=4, **kw)
        os.makedirs(tmp_path / "ref", exist_ok=True)
        for ext in (".bin", ".idx"):
            shutil.copy(prefix + ext, tmp_path / "ref" / f"d{ext}")
        want = build(str(tmp_path / "ref" / "d"), "90,10,0", valid=4, cache_path=str(tmp_path / "ref" / "cache"))
        assert indices(got[0]) == indices(want[0]) and indices(got[1], 4) == indices(want[1], 4), lengths
        shutil.rmtree(tmp_path / "ref")


def test_preprocess_removes_the_index_cache_of_the_files_it_replaces(tmp_path, capsys):
    from megatron_prores.tools import run
    from megatron_prores.tools.preprocess_data import main

    def preprocess(docs):
        (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": " ".join(map(str, d))}) + "\n" for d in docs))
        assert run(main, ["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "p"),
                          "--tokenizer-type", "NullTokenizer", "--vocab-size", "64", "--workers", "1"]) == 0, \
            capsys.readouterr().err

    prefix = str(tmp_path / "p_text_document")
    preprocess([range(i, i + 30) for i in range(20)])
    build(prefix, "100,0,0")
    assert os.listdir(os.path.join(prefix, "cache", "GPTDataset_indices"))  # megatron-core's default place
    preprocess([range(i, i + 40) for i in range(6)])
    assert not os.path.exists(prefix)  # the folder megatron-core made for its cache, gone with it
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("distributed", [False, True], ids=["alone", "under torch.distributed"])
def test_an_unwritable_index_cache_is_one_line_naming_data_cache_path(tmp_path, monkeypatch, request, distributed):
    """A read-only data directory (the cache defaults to PREFIX/cache) or a file in the cache's
    place: one line naming where and --data-cache-path, not megatron-core's 'path_to_cache
    attribute' (raised under torch.distributed) nor a blame on the sample counts."""
    from megatron_prores.config import ConfigError

    if distributed:
        request.getfixturevalue("single_process")
    prefix = write_dataset(tmp_path / "d", [30] * 20)
    open(prefix, "w").close()  # a file where the folder PREFIX/cache would go
    with pytest.raises(ConfigError) as e:
        build(prefix, valid=4)
    assert str(e.value) == (f"cannot write the index cache under {prefix}/cache (Not a directory); give "
                            f"--data-cache-path DIR, a writable directory that every node sees (by default it is "
                            f"PREFIX/cache, beside the data)")
    os.remove(prefix)
    real = os.makedirs

    def read_only(path, *a, **kw):
        if str(path).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(ConfigError, match=re.escape(f"cannot write the index cache under {prefix}/cache/"
                                                    f"GPTDataset_indices (Read-only file system); give "
                                                    f"--data-cache-path DIR")):
        build(prefix, valid=4)
    with pytest.raises(ConfigError, match=re.escape(f"cannot write the index cache under {tmp_path}/ro "
                                                    f"(Read-only file system); give --data-cache-path DIR")):
        build(prefix, valid=4, cache_path=str(tmp_path / "ro"))

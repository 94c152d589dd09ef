"""tools/preprocess_data.py against what an adversarial run found: inputs that hung it (a FIFO in a
directory), read it in quadratic time (one long line of a compressed file), or were read wrong with
exit 0 (a cut zstd file, a tokenizer.json saved with truncation or padding, non-string JSON values,
a byte order mark); outputs that were half kept (a failure between two keys, SIGTERM), interleaved
by two runs or written over an input; and errors that were tracebacks. Each case checks the bytes
written, or that nothing was, and the one error line."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_hf_tokenizer import one_error_line, preprocess
from tests.test_input_formats import DOCS, jsonl_bytes, output, toks  # noqa: F401  (toks: the fixture)

zstandard = pytest.importorskip("zstandard")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def outputs_left(directory, prefix="out"):
    return sorted(p for p in os.listdir(directory) if p.startswith(prefix))


def test_a_fifo_or_a_dangling_link_in_an_input_directory_is_passed_over(toks, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl_bytes(DOCS[:50]))
    os.mkfifo(tmp_path / "in" / "fifo.jsonl")  # reading it would block for ever
    os.symlink(tmp_path / "nowhere.jsonl", tmp_path / "in" / "dangling.jsonl")
    (tmp_path / "ref.jsonl").write_bytes(jsonl_bytes(DOCS[:50]))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", tmp_path / "in",
                        "--output-prefix", tmp_path / "out", *toks["hf"], "--workers", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert preprocess("--input", tmp_path / "ref.jsonl", "--output-prefix", tmp_path / "ref", *toks["hf"]) == 0
    assert output(tmp_path / "out") == output(tmp_path / "ref")


def test_one_long_line_of_a_compressed_file_is_read_in_linear_time(tmp_path):
    # 32 MB in one line, read in blocks of 4 KB: the carried line was copied at every block (8,000
    # copies of up to 32 MB: 66 s here); joined once it takes 0.1 s
    from megatron_prores.corpus_readers import expand, units

    line = json.dumps({"text": "x" * (32 << 20)}).encode() + b"\n" + jsonl_bytes(DOCS[:3], extra=False)
    (tmp_path / "long.jsonl.gz").write_bytes(gzip.compress(line, compresslevel=1))
    start = time.time()
    got = list(units(expand([str(tmp_path / "long.jsonl.gz")]), ["text"], unit_bytes=4096))
    assert time.time() - start < 10
    assert b"".join(u.data for u in got) == line
    assert all(u.data.endswith(b"\n") for u in got) and got[0].data.startswith(line[:line.index(b"\n") + 1])


@pytest.mark.parametrize("frames", [1, 5])
def test_a_cut_zstd_file_is_refused_like_a_cut_gzip_file(toks, tmp_path, capsys, frames):
    data = jsonl_bytes(DOCS)
    step = -(-len(data) // frames)
    whole = b"".join(zstandard.ZstdCompressor().compress(data[i:i + step]) for i in range(0, len(data), step))
    (tmp_path / "whole.jsonl.zst").write_bytes(whole)
    (tmp_path / "cut.jsonl.zst").write_bytes(whole[:len(whole) * 3 // 5])  # inside a frame
    assert preprocess("--input", tmp_path / "whole.jsonl.zst", "--output-prefix", tmp_path / "whole", *toks["hf"]) == 0
    capsys.readouterr()
    for skip in ([], ["--skip-bad-lines"]):  # damage is never skipped as a bad line
        err = one_error_line(capsys, preprocess("--input", tmp_path / "cut.jsonl.zst", "--output-prefix",
                                                tmp_path / "out", *toks["hf"], *skip))
        assert "not a valid zstd file, or damaged or incomplete (the file ends inside a zstd frame" in err, err
        assert outputs_left(tmp_path) == []


def test_compressed_files_named_otherwise_and_empty_ones_are_named(toks, tmp_path, capsys):
    import bz2

    data = jsonl_bytes(DOCS[:20])
    cases = {"gz_named_plain.jsonl": (gzip.compress(data), "is gzip-compressed (its first bytes say so) but named "
                                      "as plain JSONL; name it with the .gz suffix (e.g. gz_named_plain.jsonl.gz)"),
             "a.jsonl.bz2": (bz2.compress(data), "is bzip2-compressed (its first bytes say so) but named as plain "
                             "JSONL; decompress it first (e.g. bunzip2 -k)"),
             "empty.jsonl.gz": (b"", "is empty (0 bytes), which no gzip file is; a failed download or copy?"),
             "empty.jsonl.zst": (b"", "is empty (0 bytes), which no zstd file is")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        err = one_error_line(capsys, preprocess("--input", tmp_path / name, "--output-prefix", tmp_path / "out",
                                                *toks["hf"]))
        assert message in err, (name, err)
    assert outputs_left(tmp_path) == []


def test_a_tokenizer_json_saved_with_truncation_or_padding_tokenizes_whole_documents(toks, tmp_path):
    from tokenizers import Tokenizer

    model = toks["hf"][-1]
    (tmp_path / "docs.jsonl").write_bytes(jsonl_bytes(DOCS[:100]))
    tok = Tokenizer.from_file(model)
    tok.enable_truncation(16)  # every document would be cut to 16 tokens
    tok.save(str(tmp_path / "trunc.json"))
    tok = Tokenizer.from_file(model)
    tok.enable_padding(length=64, pad_id=tok.token_to_id("<|endoftext|>"), pad_token="<|endoftext|>")
    tok.save(str(tmp_path / "pad.json"))  # its padded encode("a") ends in EOS: read as "adds EOD itself"
    assert preprocess("--input", tmp_path / "docs.jsonl", "--output-prefix", tmp_path / "plain", *toks["hf"]) == 0
    for name in ("trunc", "pad"):
        for workers in ("1", "2"):
            assert preprocess("--input", tmp_path / "docs.jsonl", "--output-prefix", tmp_path / f"{name}{workers}",
                              "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tmp_path / f"{name}.json",
                              "--workers", workers) == 0
            assert output(tmp_path / f"{name}{workers}") == output(tmp_path / "plain"), (name, workers)


def test_values_that_are_no_text_are_bad_lines_and_a_byte_order_mark_is_dropped(toks, tmp_path, capsys):
    good = jsonl_bytes(DOCS[:40], extra=False)
    cases = {  # line 3 of each file
        '{"text": {"a": 1}}': "the 'text' value is a JSON object, not a string",
        '{"text": [1, 2]}': "the 'text' value is a JSON array, not a string",
        '{"text": 12}': "the 'text' value is a JSON number, not a string",
        '{"text": true}': "the 'text' value is a JSON boolean, not a string",
        '{"text": "a \\ud800 b"}': "the 'text' value holds a lone UTF-16 surrogate (\\ud800 at character 2)",
        "[" * 100000 + "]" * 100000: "not readable JSON (nested too deeply)",
        '{"text": ' + "9" * 5000 + "}": "not readable JSON (Exceeds the limit (4300 digits)",
    }
    lines = good.splitlines(keepends=True)
    for i, (bad, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_bytes(b"".join(lines[:2]) + bad.encode() + b"\n" + b"".join(lines[2:]))
        err = one_error_line(capsys, preprocess("--input", path, "--output-prefix", tmp_path / "out", *toks["hf"],
                                                "--workers", "1"))
        assert f"{path}:3: {message}" in err and "--skip-bad-lines" in err, err
        assert preprocess("--input", path, "--output-prefix", tmp_path / f"skip{i}", *toks["hf"],
                          "--skip-bad-lines") == 0
        assert "skipped 1 bad line" in capsys.readouterr().out
    (tmp_path / "good.jsonl").write_bytes(good)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good)
    for name in ("good", "bom"):
        assert preprocess("--input", tmp_path / f"{name}.jsonl", "--output-prefix", tmp_path / name, *toks["hf"]) == 0
    assert output(tmp_path / "bom") == output(tmp_path / "good") == output(tmp_path / "skip0")


def test_outputs_over_an_input_bad_keys_and_bad_output_places_are_one_line(toks, tmp_path, capsys):
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(DOCS[:20]))
    (tmp_path / "p_text_document.bin").write_bytes(jsonl_bytes(DOCS[:20]))  # an input named like an output
    pq.write_table(pa.Table.from_arrays([pa.array(["x"]), pa.array(["y"])], names=["text", "text"]),
                   str(tmp_path / "dup.parquet"))
    base = [*toks["hf"]]
    cases = [
        (["--input", tmp_path / "p_text_document.bin", "--output-prefix", tmp_path / "p"],
         f"would write {tmp_path / 'p'}_text_document.bin, which is an --input; give another --output-prefix"),
        (["--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "out", "--json-keys", "a/b"],
         "--json-keys 'a/b': a key is part of the output file names"),
        (["--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "out", "--json-keys", "text", "text"],
         "a key is given twice"),
        (["--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "a.jsonl" / "sub" / "out"],
         f"--output-prefix '{tmp_path / 'a.jsonl' / 'sub' / 'out'}': cannot write"),
        (["--input", tmp_path / "dup.parquet", "--output-prefix", tmp_path / "out"],
         "2 columns are named 'text'; which one is the text is not clear"),
    ]
    for args, message in cases:
        err = one_error_line(capsys, preprocess(*base, *args))
        assert message in err, (args, err)
    err = one_error_line(capsys, preprocess("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "out",
                                            "--tokenizer-type", "NullTokenizer", "--vocab-size", "5000000000"))
    assert "a vocabulary of 5,000,000,000 tokens does not fit megatron-core's int32 token files" in err, err
    assert outputs_left(tmp_path) == []
    assert (tmp_path / "p_text_document.bin").read_bytes() == jsonl_bytes(DOCS[:20])


def test_a_second_run_on_the_same_prefix_is_refused_while_the_first_writes(toks, tmp_path, capsys):
    import fcntl

    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(DOCS[:20]))
    with open(tmp_path / "out.lock", "a+") as held:  # what the first run holds while it writes
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        err = one_error_line(capsys, preprocess("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "out",
                                                *toks["hf"]))
        assert "is being written by another preprocess_data (pid 4242" in err, err
        assert outputs_left(tmp_path) == ["out.lock"]
    # released (its process ended): the next run writes, and leaves no lock file
    os.remove(tmp_path / "out.lock")
    assert preprocess("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "out", *toks["hf"]) == 0
    assert outputs_left(tmp_path) == ["out_text_document.bin", "out_text_document.idx"]


def test_a_failure_after_one_key_is_finished_keeps_no_key(toks, tmp_path, capsys, monkeypatch):
    from megatron_prores.tools import preprocess_data

    (tmp_path / "a.jsonl").write_bytes(b"".join(json.dumps({"text": d, "title": d[:5]}).encode() + b"\n"
                                                for d in DOCS[:30]))
    finish = preprocess_data._Output.finish

    def full_disk_at_the_second_key(self):
        if self.prefix.endswith("title_document"):
            raise OSError(28, "No space left on device")
        finish(self)

    monkeypatch.setattr(preprocess_data._Output, "finish", full_disk_at_the_second_key)
    err = one_error_line(capsys, preprocess("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "out",
                                            *toks["hf"], "--json-keys", "text", "title"))
    assert "cannot write" in err and "No space left on device" in err and "nothing was kept" in err, err
    assert outputs_left(tmp_path) == []


@pytest.mark.parametrize("sig,code,line", [(signal.SIGTERM, 143, "stopped by SIGTERM; nothing was kept"),
                                           (signal.SIGINT, 130, "interrupted (Ctrl-C)")])
def test_a_run_stopped_by_a_signal_keeps_nothing_and_leaves_no_worker(toks, tmp_path, sig, code, line):
    psutil = pytest.importorskip("psutil")
    docs = [d * 40 for d in DOCS] * 8  # ~6 MB: seconds of tokenizing with 2 workers
    (tmp_path / "big.jsonl").write_bytes(jsonl_bytes(docs))
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input",
                          tmp_path / "big.jsonl", "--output-prefix", tmp_path / "out", *toks["hf"], "--workers", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # CI may ignore SIGINT
    deadline = time.time() + 120
    while not (tmp_path / "out_text_document.bin.tmp").exists() or os.path.getsize(
            tmp_path / "out_text_document.bin.tmp") == 0:  # tokens are being written
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.05)
    children = psutil.Process(p.pid).children()  # the workers, and multiprocessing's resource tracker
    workers = [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]
    assert len(workers) == 2, [c.cmdline() for c in children]
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err, err
    assert outputs_left(tmp_path) == []
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive

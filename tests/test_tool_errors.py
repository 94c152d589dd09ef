"""Bad input to the data tools, the data loader, estimate_memory and convert_from_hf: one line
``error: ...`` naming the file or flag, exit code 2, no traceback and no partial output.

Each tool's ``main`` runs in-process through ``megatron_prores.tools.run`` (what its console
script does) on tiny inputs: no subprocess, no worker processes.
"""

import gc
import json
import os
import sys
import types

import pytest

from megatron_prores.tools import run

GOOD = b'{"text": "5 6 7"}\n'
NULL_TOKENIZER = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]


def one_error_line(capsys, code) -> str:
    """The tool's only stderr line, after checking it is one ``error:`` line and the exit code 2."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


def preprocess(*args):
    from megatron_prores.tools.preprocess_data import main

    return run(main, [str(a) for a in args])


def outputs(directory, prefix="out"):
    return sorted(p for p in os.listdir(directory) if p.startswith(prefix))


# a line that is not UTF-8 / not JSON / not an object, as line 2 after GOOD (18 bytes)
BAD_LINES = {
    "utf8": (b'{"text": "caf\xe9"}\n', "not valid UTF-8 (byte 0xe9 at byte offset 31 of the file)"),
    "json": (b'{"text": broken}\n', "not valid JSON (Expecting value)"),
    "object": (b'[5, 6]\n', "a JSON object per line is expected"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_preprocess_bad_line_names_file_line_and_byte(tmp_path, capsys, kind):
    line, message = BAD_LINES[kind]
    data = tmp_path / "in.jsonl"
    data.write_bytes(GOOD + line + GOOD)
    code = preprocess("--input", data, "--output-prefix", tmp_path / "out", *NULL_TOKENIZER)
    err = one_error_line(capsys, code)
    assert f"{data}:2: {message}" in err and "--skip-bad-lines" in err, err
    assert outputs(tmp_path) == [], "partial output left behind"


def test_preprocess_skip_bad_lines_skips_and_counts_them(tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = tmp_path / "in.jsonl"
    data.write_bytes(GOOD + b"".join(line for line, _ in BAD_LINES.values()) + b'{"text": "8 9"}\n')
    code = preprocess("--input", data, "--output-prefix", tmp_path / "out", *NULL_TOKENIZER, "--skip-bad-lines")
    out, err = capsys.readouterr()
    assert code == 0 and err == "", err
    last = out.strip().splitlines()[-1]
    assert last.startswith("skipped 3 bad lines") and f"{data}:2: not valid UTF-8" in last, out
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[5, 6, 7, 99], [8, 9, 99]]

    only_bad = tmp_path / "bad.jsonl"  # nothing left: no documents, and the skipped lines are said
    only_bad.write_bytes(BAD_LINES["utf8"][0])
    code = preprocess("--input", only_bad, "--output-prefix", tmp_path / "none", *NULL_TOKENIZER, "--skip-bad-lines")
    err = one_error_line(capsys, code)
    assert "holds no documents (skipped 1 bad line" in err, err
    assert outputs(tmp_path, "none") == []


@pytest.mark.parametrize("flag,value", [("--workers", 0), ("--workers", -1), ("--log-interval", 0)])
def test_preprocess_refuses_non_positive_counts(tmp_path, capsys, flag, value):
    data = tmp_path / "in.jsonl"
    data.write_bytes(GOOD)
    code = preprocess("--input", data, "--output-prefix", tmp_path / "out", *NULL_TOKENIZER, flag, value)
    assert f"{flag} {value} is not valid; give at least 1" in one_error_line(capsys, code)
    assert outputs(tmp_path) == []


def test_preprocess_workers_capped_by_input_and_cpus(tmp_path, capsys, monkeypatch):
    """--workers 64 on 3 documents runs in this process (no pool of 64 spawned interpreters: that
    took minutes) with one note line; the default (one per CPU) is capped silently."""
    import multiprocessing

    from megatron_prores.tools import preprocess_data

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started")

    monkeypatch.setattr(multiprocessing, "get_context", no_pool)
    data = tmp_path / "in.jsonl"
    data.write_bytes(GOOD * 3)
    assert preprocess("--input", data, "--output-prefix", tmp_path / "out", *NULL_TOKENIZER, "--workers", 64) == 0
    out, err = capsys.readouterr()
    assert err == "note: using 1 worker instead of --workers 64: the input has 3 lines (1 chunk of 32)\n", err
    assert "wrote 3 documents" in out and "with 1 worker" in out
    assert preprocess("--input", data, "--output-prefix", tmp_path / "out2", *NULL_TOKENIZER) == 0
    assert capsys.readouterr().err == ""

    big = tmp_path / "big.jsonl"  # 40 chunks of input: the CPUs cap
    big.write_bytes(GOOD * 32 * 40)
    monkeypatch.setattr(preprocess_data, "_cpus", lambda: 4)
    args = types.SimpleNamespace(input=str(big), workers=64)
    assert preprocess_data.workers(args) == 4
    assert capsys.readouterr().err == "note: using 4 workers instead of --workers 64: this machine has 4 CPUs\n"
    args.workers = 3
    assert preprocess_data.workers(args) == 3 and capsys.readouterr().err == ""


def test_train_tokenizer_bad_line_and_skip_bad_lines(tmp_path, capsys):
    from megatron_prores.tools.train_tokenizer import main

    data = tmp_path / "in.jsonl"
    data.write_bytes(b'{"text": "abab abba baab"}\n' + BAD_LINES["utf8"][0] + b'{"text": "ba ab ab ba"}\n')
    args = ["--input", str(data), "--model-prefix", str(tmp_path / "tok"), "--vocab-size", "16", "--no-byte-fallback"]
    err = one_error_line(capsys, run(main, args))
    assert f"{data}:2: not valid UTF-8 (byte 0xe9 at byte offset " in err and "--skip-bad-lines" in err, err
    assert outputs(tmp_path, "tok") == []
    assert run(main, args + ["--skip-bad-lines"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "on 2 lines" in out[0] and out[-1].startswith("skipped 1 bad line ") and f"{data}:2:" in out[-1], out
    assert outputs(tmp_path, "tok") == ["tok.model", "tok.vocab"]


def write_empty_dataset(prefix):
    """What megatron-core's builder writes for no documents: a 0-byte .bin and a 42-byte .idx."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16).finalize(f"{prefix}.idx")


def write_dataset(prefix, docs):
    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16)
    for doc in docs:
        b.add_item(torch.tensor(doc, dtype=torch.int64))
        b.end_document()
    b.finalize(f"{prefix}.idx")


def zero_byte_files(prefix):
    open(f"{prefix}.bin", "wb").close()
    open(f"{prefix}.idx", "wb").close()


def zero_byte_bin(prefix):
    write_dataset(prefix, [[1, 2, 3]])
    open(f"{prefix}.bin", "wb").close()


def truncated_idx(prefix):
    write_dataset(prefix, [[1, 2, 3], [4, 5]])
    with open(f"{prefix}.idx", "r+b") as f:
        f.truncate(40)


def empty_documents(prefix):
    write_dataset(prefix, [[], []])


EMPTY = {
    "zero-byte files": (zero_byte_files, "{p}.idx is empty (0 bytes"),
    "empty dataset": (write_empty_dataset, "--data-path '{p}' holds no documents"),
    "zero-byte .bin": (zero_byte_bin, "{p}.bin has 0 bytes but its .idx describes 6"),
    "truncated .idx": (truncated_idx, "{p}.idx is truncated (40 bytes"),
    "empty documents": (empty_documents, "--data-path '{p}' holds no tokens"),
}


@pytest.mark.parametrize("case", sorted(EMPTY))
def test_data_loader_empty_or_broken_dataset_one_line(tmp_path, capsys, monkeypatch, case):
    """The training data loader (data.build_datasets) on an empty .bin/.idx: the one line, and no
    'Exception ignored in ... __del__' from a half-built megatron-core IndexedDataset."""
    from megatron_prores.data import build_datasets

    make, message = EMPTY[case]
    prefix = str(tmp_path / "c_text_document")
    make(prefix)
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    code = run(lambda argv: build_datasets(None, [1, 0, 0], data_path=[prefix], split="969,30,1", seq_length=16,
                                           seed=1))
    gc.collect()  # whatever the failed open left behind is finalized now
    err = one_error_line(capsys, code)
    assert message.format(p=prefix) in err, err
    assert "Exception ignored" not in err and not ignored, [str(u.exc_value) for u in ignored]


@pytest.mark.parametrize("flag,value", [("--world-size", 0), ("--world-size", -1), ("--vocab-size", 0)])
def test_estimate_memory_refuses_non_positive_sizes(capsys, flag, value):
    from megatron_prores.tools.estimate_memory import main

    argv = ["--world-size", "8", flag, str(value), "--", "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size",
            "8", "--lr", "1e-3", "--train-iters", "1", "--mock-data", "--vocab-size", "100"]
    err = one_error_line(capsys, run(main, argv))
    assert f"error: {flag} {value} is not valid; give a positive integer" in err, err


def llama_dir(path, **tensors):
    """A (weightless) Llama directory: config.json and model.safetensors with ``tensors``."""
    import torch
    from safetensors.torch import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps(dict(
        model_type="llama", hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=32, max_position_embeddings=16)))
    save_file(tensors or {"model.embed_tokens.weight": torch.zeros(32, 8)}, str(path / "model.safetensors"))
    return path


def test_convert_from_hf_damaged_safetensors_one_line(tmp_path, capsys):
    from megatron_prores.tools.convert_from_hf import main

    hf = llama_dir(tmp_path / "hf")
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted download
    err = one_error_line(capsys, run(main, ["--input", str(hf), "--save", str(tmp_path / "ckpt")]))
    assert f"--input '{hf}': {weights} is damaged or incomplete (" in err and "download it again" in err, err
    assert not os.path.exists(tmp_path / "ckpt")

    weights.unlink()  # a shard the index lists but the download lacks
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model.safetensors"}}))
    err = one_error_line(capsys, run(main, ["--input", str(hf), "--save", str(tmp_path / "ckpt")]))
    assert f"{weights} is missing (listed in the index); download it again" in err, err
    (hf / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model.safe')
    err = one_error_line(capsys, run(main, ["--input", str(hf), "--save", str(tmp_path / "ckpt")]))
    assert f"{hf / 'model.safetensors.index.json'} is damaged or incomplete (not valid JSON" in err, err
    assert not os.path.exists(tmp_path / "ckpt")


@pytest.mark.parametrize("case", ["no intermediate_size", "hidden too large", "heads differ", "untied without lm_head",
                                  "index lists a tensor its file lacks"])
def test_convert_from_hf_config_and_tensors_that_disagree_one_line(tmp_path, capsys, case, single_process):
    """A config.json without a field, or whose sizes the tensors do not have, gave KeyError and
    RuntimeError tracebacks; an untied model without lm_head.weight was imported as tied (found by
    an adversarial run). One line each, nothing written."""
    import torch
    from safetensors.torch import save_file

    from megatron_prores.tools.convert_from_hf import main

    full = {"model.embed_tokens.weight": torch.zeros(32, 8), "model.norm.weight": torch.ones(8),
            "lm_head.weight": torch.zeros(32, 8),
            "model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8),
            "model.layers.0.self_attn.k_proj.weight": torch.zeros(4, 8),
            "model.layers.0.self_attn.v_proj.weight": torch.zeros(4, 8),
            "model.layers.0.self_attn.o_proj.weight": torch.zeros(8, 8),
            "model.layers.0.mlp.gate_proj.weight": torch.zeros(16, 8),
            "model.layers.0.mlp.up_proj.weight": torch.zeros(16, 8),
            "model.layers.0.mlp.down_proj.weight": torch.zeros(8, 16),
            "model.layers.0.input_layernorm.weight": torch.ones(8),
            "model.layers.0.post_attention_layernorm.weight": torch.ones(8)}
    hf = llama_dir(tmp_path / "hf", **full)
    config = json.loads((hf / "config.json").read_text())
    config["tie_word_embeddings"] = False
    if case == "no intermediate_size":
        del config["intermediate_size"]
        want = "config.json lacks 'intermediate_size'; give the model's complete config.json"
    elif case == "hidden too large":
        config["hidden_size"], config["head_dim"] = 16, 8
        want = "model.embed_tokens.weight has shape (32, 8), but config.json (hidden 16"
    elif case == "heads differ":
        config["num_attention_heads"], config["head_dim"] = 4, 2
        want = "model.layers.0.self_attn.k_proj.weight has shape (4, 8), but config.json (hidden 8, 4 heads in 1"
    elif case == "untied without lm_head":
        save_file({k: v for k, v in full.items() if k != "lm_head.weight"}, str(hf / "model.safetensors"))
        want = "lacks the tensor lm_head.weight (config.json: tie_word_embeddings false); download it again"
    else:
        (hf / "model.safetensors").rename(hf / "model-00001-of-00002.safetensors")
        save_file({"other": torch.zeros(1)}, str(hf / "model-00002-of-00002.safetensors"))
        weight_map = {k: "model-00001-of-00002.safetensors" for k in full if k != "lm_head.weight"}
        weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
        (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        save_file({k: v for k, v in full.items() if k != "lm_head.weight"}, str(hf / "model-00001-of-00002.safetensors"))
        want = "lacks the tensor lm_head.weight (listed in the index in model-00002-of-00002.safetensors)"
    (hf / "config.json").write_text(json.dumps(config))
    err = one_error_line(capsys, run(main, ["--input", str(hf), "--save", str(tmp_path / "ckpt")]))
    assert want in err, err
    assert not os.path.exists(tmp_path / "ckpt")


def test_convert_from_hf_failure_leaves_no_partial_checkpoint(tmp_path, capsys, monkeypatch):
    """Whatever stops the import once it writes (a failed save, an interrupt), --save is left as it
    was: removed when the convert created it, empty when it was given empty."""
    from megatron_prores import hf_import, parallel
    from megatron_prores.config import ConfigError
    from megatron_prores.tools.convert_from_hf import main

    hf = llama_dir(tmp_path / "hf")
    failure = [ConfigError("saving checkpoint 0 failed")]

    def import_llama(input_dir, save, *args, **kwargs):
        os.makedirs(os.path.join(save, "iter_0000000.tmp"))
        open(os.path.join(save, "iter_0000000.tmp", "part"), "w").close()
        raise failure[0]

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):  # main sets them
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(parallel, "initialize", lambda *a, **k: None)
    monkeypatch.setattr(hf_import, "import_llama", import_llama)
    assert "saving checkpoint 0 failed" in one_error_line(capsys, run(main, ["--input", str(hf), "--save",
                                                                           str(tmp_path / "new")]))
    assert not os.path.exists(tmp_path / "new")
    (tmp_path / "given").mkdir()
    failure[0] = KeyboardInterrupt()
    assert run(main, ["--input", str(hf), "--save", str(tmp_path / "given")]) == 130  # Ctrl-C: one line
    assert capsys.readouterr().err.strip() == "interrupted (Ctrl-C)"
    assert os.listdir(tmp_path / "given") == []

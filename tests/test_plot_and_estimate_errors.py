"""plot_run and estimate_memory against an adversarial run: runs' heatmaps written over each other
(every RUN/tensorboard labelled "tensorboard"), several runs under one directory merged step by
step, tracebacks for a '/' in --labels and a bad --output, a matplotlib warning for a one-step
run; estimate_memory's bf16 figures for an fp32 recipe, and argparse's usage for training flags
given without "--" before them.

Each tool's ``main`` runs in-process through ``megatron_prores.tools.run`` (what its console
script does); the event files are written with TensorBoard's SummaryWriter and the driver's tags.
"""

import os
import warnings

import pytest

from megatron_prores.tools import run


def one_error_line(capsys, code) -> str:
    """The tool's only stderr line, after checking it is one ``error:`` line and the exit code 2."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


def tb_run(directory, steps=(1, 2, 3), scale=1.0):
    """A run's TensorBoard directory as the driver writes it (its last stage's file): the training
    loss and the ProRes value of two blocks at each step."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(directory), filename_suffix=".stage0")
    for it in steps:
        w.add_scalar("lm-loss-training/lm loss", scale * 5.0 / it, it)
        for b in (1, 2):
            w.add_scalar(f"prores/block {b:03d}", scale * it * b / 10, it)
    w.close()
    return str(directory)


def plot(*argv):
    from megatron_prores.tools.plot_run import main

    return run(main, [str(a) for a in argv])


# ---- plot_run: labels and file names ----------------------------------------------------------

def test_runs_in_the_readme_layout_get_their_run_names(tmp_path, capsys):
    a = tb_run(tmp_path / "runs" / "A" / "tensorboard")
    b = tb_run(tmp_path / "runs" / "B" / "tensorboard", scale=2.0)
    out = tmp_path / "out"
    assert plot(a, b, "--output", out) == 0
    assert capsys.readouterr().out.strip() == f"wrote loss.png, prores-A.png, prores-B.png to {out}"
    assert sorted(os.listdir(out)) == ["loss.png", "prores-A.png", "prores-B.png"]


def test_default_labels_are_unique():
    from megatron_prores.tools.plot_run import default_labels

    assert default_labels(["runs/A/tensorboard", "runs/B/tensorboard/"]) == ["A", "B"]
    assert default_labels(["x/A", "y/A", "z/B"]) == ["x/A", "y/A", "B"]  # parents only where needed
    assert default_labels(["p/x/A/tensorboard", "q/x/A/tensorboard"]) == ["p/x/A", "q/x/A"]
    assert default_labels(["runs/A", "runs/A/"]) == ["A", "A-2"]  # the same run twice: numbered
    assert default_labels(["."]) == [os.path.basename(os.getcwd())]


def test_same_directory_names_write_separate_files(tmp_path, capsys):
    x = tb_run(tmp_path / "x" / "A")
    y = tb_run(tmp_path / "y" / "A")
    assert plot(x, y, "--output", tmp_path / "out") == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["loss.png", "prores-x_A.png", "prores-y_A.png"]


def test_duplicate_labels_are_refused(tmp_path, capsys):
    a = tb_run(tmp_path / "a")
    b = tb_run(tmp_path / "b")
    err = one_error_line(capsys, plot(a, b, "--output", tmp_path / "out", "--labels", "base", "base"))
    assert err == "error: --labels: 'base' is given twice; give every run its own name"
    err = one_error_line(capsys, plot(a, b, "--output", tmp_path / "out", "--labels", "a/b", "a:b"))
    assert err == ("error: --labels: 'a/b' and 'a:b' give the same file names (prores-a_b.png, ...); "
                   "give names that differ in letters or digits")
    assert not (tmp_path / "out").exists()  # refused before anything is made


def test_a_label_with_a_slash_is_a_file_name(tmp_path, capsys):
    a = tb_run(tmp_path / "a")
    assert plot(a, "--output", tmp_path / "out", "--labels", "lr 1e-3/seed 1") == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["loss.png", "prores-lr_1e-3_seed_1.png"]


# ---- plot_run: one run per directory ----------------------------------------------------------

def test_a_directory_of_several_runs_is_refused(tmp_path, capsys):
    tb_run(tmp_path / "runs" / "A" / "tensorboard")
    tb_run(tmp_path / "runs" / "B" / "tensorboard", scale=2.0)
    runs = str(tmp_path / "runs")
    err = one_error_line(capsys, plot(runs, "--output", tmp_path / "out"))
    assert err == (f"error: {runs!r} holds event files in 2 directories, one run each "
                   f"({runs}/A/tensorboard, {runs}/B/tensorboard); give each run's directory instead")
    assert not (tmp_path / "out").exists()  # the --output made for the plots is removed again


def test_one_run_in_a_subdirectory_and_its_stage_files_are_read(tmp_path, capsys):
    """RUN (its event files in RUN/tensorboard) is one run; the driver's one file per pipeline
    stage in that directory are read together."""
    from torch.utils.tensorboard import SummaryWriter

    from megatron_prores.tools.plot_run import read_scalars

    tb = tb_run(tmp_path / "RUN" / "tensorboard")
    w = SummaryWriter(tb, filename_suffix=".stage1")
    w.add_scalar("prores/block 003", 0.5, 2)
    w.close()
    scalars = read_scalars(str(tmp_path / "RUN"))
    assert scalars["prores/block 003"] == ([2], [0.5])
    assert scalars["lm-loss-training/lm loss"] == ([1, 2, 3], pytest.approx([5.0, 2.5, 5.0 / 3]))
    assert plot(tmp_path / "RUN", "--output", tmp_path / "out") == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["loss.png", "prores-RUN.png"]


# ---- plot_run: --output -----------------------------------------------------------------------

def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    a = tb_run(tmp_path / "a")
    f = tmp_path / "plots.png"
    f.write_bytes(b"mine")
    err = one_error_line(capsys, plot(a, "--output", f))
    assert err == f"error: --output {f} is a file; give a directory for the PNG files (created if missing)"
    assert f.read_bytes() == b"mine"
    err = one_error_line(capsys, plot(a, "--output", f / "sub"))
    assert err == (f"error: --output {f}/sub cannot be created or written (Not a directory); "
                   f"give a directory you can write to")


def test_output_that_cannot_be_created_is_refused(tmp_path, capsys):
    a = tb_run(tmp_path / "a")
    err = one_error_line(capsys, plot(a, "--output", "/proc/x"))
    assert err.startswith("error: --output /proc/x cannot be created or written (")
    assert err.endswith("); give a directory you can write to")


def test_output_is_checked_before_the_runs_are_read(tmp_path, capsys, monkeypatch):
    from megatron_prores.tools import plot_run

    read = []
    monkeypatch.setattr(plot_run, "read_scalars", read.append)
    f = tmp_path / "f"
    f.write_text("")
    one_error_line(capsys, plot(tmp_path, "--output", f))
    assert read == []


def test_a_failed_write_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from matplotlib.figure import Figure

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", full)
    a = tb_run(tmp_path / "a")
    out = tmp_path / "out"
    err = one_error_line(capsys, plot(a, "--output", out))
    assert err == (f"error: --output {out}: writing loss.png failed (No space left on device); "
                   f"free space there or give another --output")


# ---- plot_run: one logged step ----------------------------------------------------------------

def test_a_run_of_one_step_plots_without_warnings(tmp_path, capsys):
    a = tb_run(tmp_path / "a", steps=(5,))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert plot(a, "--output", tmp_path / "out") == 0
    assert [str(w.message) for w in seen if "matplotlib" in w.filename or "plot_run" in w.filename] == []
    assert sorted(os.listdir(tmp_path / "out")) == ["loss.png", "prores-a.png"]


# ---- estimate_memory --------------------------------------------------------------------------

L, H, HEADS, GROUPS, F, S, B, V = 2, 64, 4, 2, 176, 32, 2, 1024
FLAGS = ["--num-layers", L, "--hidden-size", H, "--num-attention-heads", HEADS, "--num-query-groups", GROUPS,
         "--ffn-hidden-size", F, "--seq-length", S, "--max-position-embeddings", S, "--micro-batch-size", B,
         "--global-batch-size", 8, "--lr", "1e-3", "--train-iters", 1, "--mock-data", "--vocab-size", V]


def estimate(*extra):
    from megatron_prores.tools.estimate_memory import main

    return main(["--world-size", "4", "--", *map(str, FLAGS), *extra])


@pytest.mark.parametrize("optimizer", [[], ["--use-distributed-optimizer"]], ids=["adam", "distributed"])
def test_estimate_memory_follows_bf16(optimizer, capsys):
    """Without --bf16 the driver trains in fp32: 4-byte weights and activations, no main copy."""
    kv = GROUPS * H // HEADS
    params = L * (H * (H + 2 * kv) + H * H + 3 * H * F + 2 * H) + 2 * V * H + H  # untied embeddings
    shard = 4 if optimizer else 1  # data parallel 4 (world 4, TP = PP = CP = 1)
    values = L * S * B * (5 * H + (H + 2 * kv) + 3 * F)  # one micro batch's activations, in values
    gib = 1024 ** 3

    bf16 = estimate("--bf16", *optimizer)
    bf16_out = capsys.readouterr().out
    assert bf16["precision"] == "bf16" and bf16["params_per_gpu"] == params
    assert {k: v for k, v in bf16["bytes"].items() if k != "total"} == {
        "weights (bf16)": 2 * params, "gradients (fp32)": 4 * params,
        "optimizer (fp32 main + Adam)": 12 * params / shard, "activations": 2 * values,
        "logits + loss": 10 * S * B * V, "CUDA context, NCCL, slack": 3 * gib}
    fp32 = estimate(*optimizer)
    fp32_out = capsys.readouterr().out
    assert fp32["precision"] == "fp32" and fp32["params_per_gpu"] == params
    assert {k: v for k, v in fp32["bytes"].items() if k != "total"} == {
        "weights (fp32)": 4 * params, "gradients (fp32)": 4 * params,
        "optimizer (Adam, fp32)": 8 * params / shard, "activations": 4 * values,
        "logits + loss": 8 * S * B * V, "CUDA context, NCCL, slack": 3 * gib}
    for r in (bf16, fp32):
        assert r["bytes"]["total"] == pytest.approx(sum(v for k, v in r["bytes"].items() if k != "total"))
    assert bf16_out.splitlines()[:2] == ["precision: bf16 (--bf16)", f"{'weights (bf16)':32s} {0.0:8.1f} GiB"]
    assert fp32_out.splitlines()[:2] == ["precision: fp32 (no --bf16: the driver trains in fp32)",
                                         f"{'weights (fp32)':32s} {0.0:8.1f} GiB"]


def test_estimate_memory_without_the_separator_gives_one_line(capsys):
    from megatron_prores.tools.estimate_memory import main

    code = run(main, ["--world-size", "4", *map(str, FLAGS)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "usage:" not in err, err
    assert err == ("error: --num-layers is not a flag of this tool; put -- before the training flags "
                   "(estimate_memory.py --world-size N -- --num-layers ...)\n")


def test_estimate_memory_takes_the_vocabulary_the_driver_takes(dataset, tmp_path, capsys):
    """--vocab-size of the flags, else the recipe's tokenizer where it is here (the driver's), else
    the tool's --vocab-size; the logits' bytes follow (10 bytes a value in bf16), and the line says which."""
    from megatron_prores.tools.estimate_memory import main

    base = [str(x) for x in FLAGS[:-3]] + ["--bf16", "--data-path", str(tmp_path / "c_text_document")]
    tok = str(dataset / "tok.model")  # 600 pieces: padded to 640
    cases = [(["--tokenizer-model", tok, "--vocab-size", "1000"], 1000, 1024, "--vocab-size of the flags"),
             (["--tokenizer-model", tok], 600, 640, f"the tokenizer {tok}"),
             (["--tokenizer-model", str(tmp_path / "elsewhere.model")], 50000, 50048,
              f"this tool's --vocab-size: the tokenizer {tmp_path / 'elsewhere.model'} is not a file or folder here")]
    for extra, vocab, padded, source in cases:
        r = main(["--world-size", "4", "--vocab-size", "50000", "--", *base, *extra])
        assert r["bytes"]["logits + loss"] == 10 * S * B * padded
        assert capsys.readouterr().out.splitlines()[-1] == f"vocabulary {vocab:,} ({source}), padded to {padded:,}"


def test_estimate_memory_gives_mock_data_its_vocabulary(capsys):
    """--mock-data without --vocab-size: the tool's --vocab-size (README), not the driver's refusal."""
    from megatron_prores.tools.estimate_memory import main

    mock = [str(x) for x in FLAGS[:-2]] + ["--bf16"]
    assert mock[-2:] == ["--mock-data", "--bf16"]
    for tool_flags, vocab in (([], 32000), (["--vocab-size", "1000"], 1000)):
        r = main(["--world-size", "4", *tool_flags, "--", *mock])
        padded = -(-vocab // 128) * 128  # --make-vocab-size-divisible-by 128
        assert r["bytes"]["logits + loss"] == 10 * S * B * padded
        assert capsys.readouterr().out.splitlines()[-1] == (f"vocabulary {vocab:,} (this tool's --vocab-size: the "
                                                            f"flags give no tokenizer), padded to {padded:,}")


def test_estimate_memory_refuses_a_vocabulary_below_the_tokenizers(tmp_path, capsys):
    """A --vocab-size below the recipe's tokenizer's size: the driver's refusal (the top ids would have no
    embedding), not an estimate."""
    import sentencepiece as spm

    from megatron_prores.tools.estimate_memory import main

    spm.SentencePieceTrainer.train(sentence_iterator=iter([f"word{i} and text {i * 7}" for i in range(300)]),
                                   model_prefix=str(tmp_path / "tok"), vocab_size=200, model_type="bpe",
                                   minloglevel=2, num_threads=1)
    recipe = [str(x) for x in FLAGS[:-3]] + ["--bf16", "--data-path", str(tmp_path / "d"),
                                             "--tokenizer-model", str(tmp_path / "tok.model")]
    err = one_error_line(capsys, run(main, ["--world-size", "4", "--", *recipe, "--vocab-size", "100"]))
    assert err == ("error: the tokenizer has 200 tokens but --vocab-size is 100; raise --vocab-size or drop it to use "
                   "the tokenizer's")
    r = main(["--world-size", "4", "--", *recipe, "--vocab-size", "200"])
    assert r["bytes"]["logits + loss"] == 10 * S * B * 256  # 200 padded to 256

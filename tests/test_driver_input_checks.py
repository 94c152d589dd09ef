"""The driver against what an adversarial run found: a final evaluation that fails lost the last
trained steps (the checkpoint came after it); data tokenized with another tokenizer crashed mid-run
(an index error; a device assert on a GPU); forced attention kernels that cannot run here passed
the checks and failed at the first step; a requeue with a preset's inert flags (--lns-gain,
--gpas-gate) was refused as another model; bad paths and values ended in tracebacks."""

import os

import numpy
import pytest
import torch

from tests.test_profile_and_gc import TINY, trainer


@pytest.mark.stack  # megatron-core's dataset builder and checkpointing differ by release
def test_the_last_checkpoint_is_written_before_the_last_evaluation(single_process, tmp_path, monkeypatch):
    from megatron_prores.trainer import Trainer

    calls = []

    def failing_evaluation(self):
        calls.append(self.state.iteration)
        raise RuntimeError("the validation set cannot be read")

    monkeypatch.setattr(Trainer, "evaluate", failing_evaluation)
    t = trainer(["--train-iters", "3", "--save", tmp_path / "run", "--save-interval", "2", "--eval-iters", "1"])
    try:
        with pytest.raises(RuntimeError, match="cannot be read"):
            t.train()
    finally:
        t.close(1)
    assert calls == [3]  # the final evaluation only (no --eval-interval), after the save
    assert open(tmp_path / "run" / "latest_checkpointed_iteration.txt").read().strip() == "3"


def write_dataset(prefix, docs, dtype=numpy.uint16):
    """A .bin/.idx pair in megatron-core's format, written by megatron-core's own builder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        builder.add_document(torch.tensor(d), [len(d)])
    builder.finalize(prefix + ".idx")


@pytest.mark.stack  # megatron-core's dataset builder and checkpointing differ by release
def test_data_with_token_ids_beyond_the_vocabulary_is_refused_before_training(tmp_path):
    from megatron_prores.config import ConfigError
    from megatron_prores.data import check_prefix, largest_token

    rng = numpy.random.default_rng(0)
    ok = [rng.integers(0, 64, size=200).tolist() for _ in range(300)]  # ids of a 64-token vocabulary
    write_dataset(str(tmp_path / "ok"), ok)
    big = [rng.integers(0, 1000, size=200).tolist() for _ in range(300)]  # another tokenizer's ids
    write_dataset(str(tmp_path / "big"), big)
    # larger than 8 chunks of 256 KB: the sample spans the file, and still sees ids above 64
    assert largest_token(str(tmp_path / "big.bin"), numpy.dtype(numpy.uint16)) == max(map(max, big))
    many = [[5] * 200 for _ in range(6000)] + [[63] * 200]  # 2.4 MB: sampled; the last document in the sample
    write_dataset(str(tmp_path / "many"), many)
    assert largest_token(str(tmp_path / "many.bin"), numpy.dtype(numpy.uint16)) == 63
    check_prefix(str(tmp_path / "ok"), vocab_size=64)
    check_prefix(str(tmp_path / "many"), vocab_size=64)
    with pytest.raises(ConfigError) as e:
        check_prefix(str(tmp_path / "big"), vocab_size=64)
    assert (f"--data-path {str(tmp_path / 'big')!r} holds token id {max(map(max, big)):,} but the model's vocabulary "
            f"has 64 ids: it was tokenized with another tokenizer") in str(e.value)
    with pytest.raises(ConfigError, match=r"^--valid-data-path .* holds token id"):
        check_prefix(str(tmp_path / "big"), "--valid-data-path", 64)


def test_the_driver_refuses_another_tokenizers_data_in_one_line(tmp_path):
    from tests.test_train import run

    rng = numpy.random.default_rng(1)
    write_dataset(str(tmp_path / "d"), [rng.integers(0, 1000, size=100).tolist() for _ in range(50)])
    base = [a for a in TINY if a != "--mock-data"]
    code, out = run(base + ["--train-iters", "2", "--data-path", tmp_path / "d", "--tokenizer-type", "NullTokenizer"],
                    nproc=1)
    errors = [l for l in out.splitlines() if l.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in out, out[-2000:]
    assert "holds token id 999 but the model's vocabulary has 128 ids" in errors[0], errors[0][-300:]


def test_forced_attention_kernels_that_cannot_run_here_are_refused():
    from megatron_prores.arguments import model_config, parse_args
    from megatron_prores.config import ConfigError

    def validate(extra):
        model_config(parse_args(TINY + ["--train-iters", "3"] + extra), 64).validate()

    if torch.cuda.is_available():
        cases = [(["--attention-backend", "flash"], "needs --bf16 on a GPU")]
        validate(["--attention-backend", "flash", "--bf16"])
    else:  # the CPU has no memory-efficient kernel, and its flash kernel takes no dropout
        cases = [(["--attention-backend", "fused"], "--attention-backend fused (the memory-efficient kernel) needs a GPU"),
                 (["--attention-backend", "flash", "--attention-dropout", "0.1"], "--attention-backend flash on the CPU takes no "
                                                                       "--attention-dropout (0.1)")]
        validate(["--attention-backend", "flash"])
    validate(["--attention-backend", "auto", "--attention-dropout", "0.1"])
    for extra, message in cases:
        with pytest.raises(ConfigError) as e:
            validate(extra)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_flags_inert_in_a_model_do_not_make_it_another_model():
    from megatron_prores.checkpointing import check_model_args
    from megatron_prores.config import ConfigError

    pre = dict(num_layers=2, norm_type="pre", gpas=False, gpas_gate="block", lns_gain="fixed")
    check_model_args(pre, {**pre, "gpas_gate": "sublayer", "lns_gain": "learnable"}, "R")  # both inert here
    for changed, name in (({"gpas": True, "gpas_gate": "sublayer"}, "gpas_gate"),
                          ({"norm_type": "lns", "lns_gain": "learnable"}, "lns_gain")):
        saved = {**pre, **changed, name: {"gpas_gate": "block", "lns_gain": "fixed"}[name]}
        with pytest.raises(ConfigError, match=f"{name} is"):
            check_model_args(saved, {**pre, **changed}, "R")


@pytest.mark.parametrize("extra,message", [
    (["--seed", "-1"], "--seed -1 is not valid; it must be in [0, 2**31]"),
    (["--seed", "99999999999"], "--seed 99999999999 is not valid"),
    (["--distributed-timeout-minutes", "10000000000000"], "it must be positive, at most 1,000,000"),
    (["--save", ""], "--save is empty (an unset shell variable?)"),
    (["--load", ""], "--load is empty"),
    (["--tensorboard-dir", ""], "--tensorboard-dir is empty"),
    (["--deepnorm", "official"], "unrecognized arguments: --deepnorm official"),  # no abbreviations (Megatron-LM)
    (["--exit-dur", "1"], "unrecognized arguments: --exit-dur"),
    (["--fp16"], "unrecognized arguments: --fp16 (fp16 with loss scaling is not supported: train in bf16"),
    (["--recompute-activations"], "(Megatron-LM's old name: give --recompute-granularity selective)"),
    (["--vocab-file", "v.json"], "--vocab-file v.json (GPT-2 BPE files are not read: give --tokenizer-type "
                                 "HuggingFaceTokenizer"),
    # found by an adversarial run: the first two passed every check and failed at step 1 (tracebacks)
    (["--hidden-size", "60"], "the head size 15 (--hidden-size 60 / --num-attention-heads 4) is odd"),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"],
     "--num-layers-per-virtual-pipeline-stage 2 is all 2 layers of each pipeline stage"),
    (["--rope-scaling-factor", "32"], "--rope-scaling-factor 32 does nothing without --use-rope-scaling"),
    (["--num-layers", "1", "--norm-type", "mix"], "--norm-type mix needs at least 2 layers"),
    (["--vocab-size", "0"], "--vocab-size 0 is not valid; it must be >= 2"),
])
def test_bad_values_are_one_line(extra, message):
    from megatron_prores.arguments import model_config, parse_args
    from megatron_prores.config import ConfigError

    with pytest.raises(ConfigError) as e:
        model_config(parse_args(TINY + ["--train-iters", "3"] + extra), 64).validate()
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("weights", [["nan", "A"], ["inf", "A"], ["1", "A", "nan", "B"], ["-1", "A"]])
def test_blend_weights_must_be_positive_finite_numbers(weights):
    from megatron_prores.arguments import parse_data_path
    from megatron_prores.config import ConfigError

    with pytest.raises(ConfigError, match=r"^--data-path weight \S+ is not valid; the weights must be positive finite"):
        parse_data_path(weights)


def test_output_directories_that_are_files_are_one_line_before_the_model(single_process, tmp_path):
    from megatron_prores.config import ConfigError

    (tmp_path / "afile").write_text("x")
    for flag in ("--save", "--tensorboard-dir", "--data-cache-path"):
        with pytest.raises(ConfigError, match=f"^{flag} '{tmp_path / 'afile'}' is a file; give a directory$"):
            trainer(["--train-iters", "2", flag, tmp_path / "afile"])
    with pytest.raises(ConfigError, match=r"^--tensorboard-dir '/proc/nope/tb' is not writable"):
        trainer(["--train-iters", "2", "--tensorboard-dir", "/proc/nope/tb"])


def test_a_prores_warmup_longer_than_the_run_is_noted(single_process):
    """A warmup that outlasts --train-iters leaves blocks below a = 1 in every checkpoint and
    export (e.g. a per-block T given as the total W, or a recipe's run shortened): the start says
    which blocks and where they end; a warmup that ends in time says nothing."""
    from megatron_prores.schedules import prores_value

    t = trainer(["--train-iters", "6", "--prores-schedule", "linear", "--prores-warmup-steps", "8"])
    try:
        note = t._prores_past_the_end()
    finally:
        t.close(0)
    # L = 2, T = W / L = 4: block 1 is done at step 4, block 2 at 8; the last step is 5
    assert prores_value("linear", 5, 2, 2, 8.0) == 5 / 8
    assert note.startswith("note: the ProRes warmup (--prores-warmup-steps 8) outlasts the run: at its last step "
                           "(5) block 2 of 2 is still warming up (a = 0.625), which its checkpoints"), note
    for extra in (["--train-iters", "9"], ["--train-iters", "6", "--prores-schedule", "fix-L"]):
        t = trainer(extra + ([] if "fix-L" in extra else ["--prores-schedule", "linear", "--prores-warmup-steps", "8"]))
        try:
            assert t._prores_past_the_end() is None
        finally:
            t.close(0)


def test_the_gpu_tests_driver_command_lines_pass_the_checks():
    """Each driver command line of tests/test_gpu.py passes the flag checks (those that need no GPU
    on this machine): a dry run of them on CPU found one without --lr, which would have failed
    at its first line on a GPU."""
    from megatron_prores.arguments import build_parser, check_args
    from tests.test_gpu import GPU_DRIVER_RUNS

    assert len(GPU_DRIVER_RUNS) == 6
    for argv in GPU_DRIVER_RUNS:
        check_args(build_parser().parse_args(argv), this_machine=False)

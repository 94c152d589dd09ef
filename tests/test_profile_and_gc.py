"""--profile (torch.profiler / Nsight marks) and --manual-gc, through the driver's Trainer."""

import gc
import gzip
import json
import re

import pytest

from megatron_prores.config import ConfigError

TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--mock-data", "--vocab-size", "128",
        "--log-interval", "1", "--eval-iters", "1"]


def trainer(extra):
    from megatron_prores.arguments import build_parser, check_args
    from megatron_prores.trainer import Trainer

    args = build_parser().parse_args(list(map(str, TINY + extra)))
    check_args(args)
    return Trainer(args)


def train(extra):
    t = trainer(extra)
    try:
        assert t.train() == 0
    finally:
        t.close(0)


def trace_events(path):
    with gzip.open(path) as f:
        return json.load(f)["traceEvents"]


def test_pytorch_profiler_traces_the_window_and_a_resumed_run_what_is_left(tmp_path, single_process, capsys):
    prof = ["--profile", "--use-pytorch-profiler", "--profile-step-start", "2", "--profile-step-end", "4",
            "--tensorboard-dir", tmp_path / "tb", "--train-iters", "5"]
    trace = tmp_path / "torch_profile" / "rank-0.json.gz"  # Megatron-LM's place: beside the TensorBoard dir
    train(prof)
    events = trace_events(trace)
    steps = {e["name"]: e for e in events if e.get("name", "").startswith("training step")}
    assert sorted(steps) == ["training step 2", "training step 3"]  # the warm-up step 1 is not in the trace

    def ops_in(step, name):
        lo, hi = step["ts"], step["ts"] + step["dur"]
        return sum(1 for e in events if e.get("name") == name and lo <= e.get("ts", -1) <= hi)

    mm = [ops_in(steps[s], "aten::mm") for s in sorted(steps)]
    assert mm[0] == mm[1] > 0  # the same work in both steps: forward and backward matmuls
    out = capsys.readouterr().out
    assert f"[rank 0] profile of steps 2..3 written to {trace}" in out
    table = out[out.index("[rank 0] profile"):]
    assert "aten::mm" in table and "ProfilerStep" not in table and "training step" not in table

    # a run that stops inside the window writes no trace; resumed, it profiles what is left (step 3)
    trace.unlink()
    ckpt = ["--save", tmp_path / "c", "--save-interval", "3"]
    train(prof + ckpt + ["--exit-interval", "3"])
    assert not trace.exists()
    train(prof + ckpt + ["--load", tmp_path / "c"])
    assert sorted(e["name"] for e in trace_events(trace) if e.get("name", "").startswith("training step")) == [
        "training step 3"]


@pytest.mark.parametrize("extra, message", [
    (["--use-pytorch-profiler"], "--use-pytorch-profiler is a way of --profile: add --profile"),
    (["--profile", "--use-pytorch-profiler", "--profile-step-start", "3", "--profile-step-end", "3"],
     "--profile-step-end 3 must be after --profile-step-start 3"),
    (["--profile", "--use-pytorch-profiler", "--profile-step-end", "12"],
     "--profile-step-end 12 is past the run's end (--train-iters 5)"),
    (["--profile", "--profile-step-start", "1", "--profile-step-end", "2"], "--profile without --use-pytorch-profiler marks the steps for Nsight Systems, which needs a GPU"),
    (["--manual-gc-interval", "10"], "add --manual-gc"),
    (["--no-manual-gc-eval"], "add --manual-gc"),
    (["--manual-gc", "--manual-gc-interval", "-1"], "--manual-gc-interval -1 is not valid"),
])
def test_profile_and_gc_flags_given_wrongly(extra, message):
    import torch

    from megatron_prores.arguments import build_parser, check_args

    if "--use-pytorch-profiler" not in extra and "--profile" in extra and torch.cuda.is_available():
        pytest.skip("the Nsight marks need no --use-pytorch-profiler on a GPU (test_gpu covers them there)")
    args = build_parser().parse_args(list(map(str, TINY + ["--train-iters", "5"] + extra)))
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_args(args)


def test_profile_ranks_beyond_the_run(single_process):
    with pytest.raises(ConfigError, match=re.escape("--profile-ranks 0 1: this run of 1 process(es) has ranks 0..0")):
        trainer(["--profile", "--use-pytorch-profiler", "--profile-ranks", "0", "1", "--train-iters", "12"])


def collections_during(extra, monkeypatch):
    """(generation, inside a training step?, iterations done) of every collection of a run."""
    from megatron_prores.trainer import Trainer

    inside, seen, t = [False], [], None
    step = Trainer.train_step

    def observed_step(self, *a, **k):
        inside[0] = True
        try:
            return step(self, *a, **k)
        finally:
            inside[0] = False

    def hook(phase, info):
        if phase == "start" and t is not None:
            seen.append((info["generation"], inside[0], t.state.iteration))

    monkeypatch.setattr(Trainer, "train_step", observed_step)
    gc.callbacks.append(hook)
    try:
        t = trainer(extra)
        try:
            assert t.train() == 0
        finally:
            t.close(0)
    finally:
        gc.callbacks.remove(hook)
    return seen


def test_manual_gc_collects_only_at_the_chosen_steps_and_around_evaluation(single_process, monkeypatch):
    assert gc.isenabled()
    run = ["--train-iters", "5", "--eval-interval", "3"]
    automatic = collections_during(run, monkeypatch)
    assert any(inside for _, inside, _ in automatic)  # by default the collector also runs inside steps
    manual = collections_during(run + ["--manual-gc", "--manual-gc-interval", "2"], monkeypatch)
    # after iterations 2 and 4; a full one before each evaluation (3, and the final one at 5), a young one after
    assert manual == [(2, False, 2), (2, False, 3), (0, False, 3), (2, False, 4), (2, False, 5), (0, False, 5)]
    assert gc.isenabled()  # the collector is back after the run
    no_eval = collections_during(run + ["--manual-gc", "--no-manual-gc-eval"], monkeypatch)
    assert no_eval == []

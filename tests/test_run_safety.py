"""Never lose a run: every way a resume could lose, overwrite or silently misuse checkpoints ends
with one `error:` line and leaves every byte of the run directory as it was; loading never runs
code from a checkpoint; unsound (non-finite) state is never saved.

Refusals run the driver's own ``main`` in this process (they stop before training); the cases
that train run it as a subprocess, as users do."""

import hashlib
import json
import math
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import finish
from tests.test_train import launch, run, train_state

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--mock-data", "--vocab-size", "64",
        "--log-interval", "1", "--eval-iters", "0", "--seed", "3"]


def snapshot(root) -> dict:
    """path -> sha256 of every file under root (what 'nothing lost or changed' compares)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 3-iteration run with a checkpoint at every iteration."""
    root = tmp_path_factory.mktemp("safety") / "run"
    code, out = run(TINY + ["--train-iters", "3", "--save-interval", "1", "--save", root], nproc=1)
    assert code == 0, out[-3000:]
    assert sorted(os.listdir(root)) == ["iter_0000001", "iter_0000002", "iter_0000003",
                                        "latest_checkpointed_iteration.txt"]  # the lock is released
    return root


class Payload:
    """Unpickling it would create the file MARK: proof that loading ran code."""
    mark = None

    def __reduce__(self):
        return (os.system, (f"touch {Payload.mark}",))


def _plant_payload(path):
    if os.path.basename(path) == ".metadata":
        with open(path, "wb") as f:
            pickle.dump({"x": Payload()}, f)
    else:
        torch.save({"python": Payload()}, path)


def _truncate(path, keep=300):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep])


def _common_state_file(d):
    """megatron-core < 0.19 keeps the common state in common.pt; 0.19 inside the shard file."""
    return "common.pt" if os.path.exists(os.path.join(d, "common.pt")) else "__0_0.distcp"


IT3 = "iter_0000003"
CASES = {
    # name: (mutation of the copied run directory R, extra flags (R = run dir, O = other dir), message)
    "latest marker missing": (lambda r: os.remove(r / "latest_checkpointed_iteration.txt"),
                              ["--load", "R", "--save", "R"], "but no latest_checkpointed_iteration.txt; resume from one with --ckpt-step N (e.g. --ckpt-step 3)"),
    "typo in --load": (None, ["--load", "R_typo", "--save", "R"], "does not exist; correct the path"),
    "--save holds a run, no --load": (None, ["--save", "R"], "already holds checkpoints (up to iteration 3) and no --load"),
    "--load elsewhere, --save holds a run": (lambda r: shutil.copytree(r, r.parent / "O"), ["--load", "O", "--save", "R"],
                                             "but --load names another directory"),
    "--load is a file": (None, ["--load", "R/latest_checkpointed_iteration.txt"], "is a file; give the run's checkpoint directory"),
    "--load holds nothing": (lambda r: os.makedirs(r.parent / "O"), ["--load", "O"], "holds no checkpoint"),
    "--train-iters below the checkpoint": (None, ["--load", "R", "--save", "R", "--train-iters", "2"],
                                           "--train-iters 2 is below the checkpoint's iteration 3"),
    "--ckpt-step absent": (None, ["--load", "R", "--save", "R", "--ckpt-step", "9"], "has no iter_0000009; it holds iterations 1, 2, 3"),
    "latest names a missing directory": (lambda r: shutil.rmtree(r / IT3), ["--load", "R", "--save", "R"],
                                         "is missing; the newest complete older checkpoint is iteration 2: resume from it with --ckpt-step 2"),
    "shard truncated": (lambda r: _truncate(r / IT3 / "__0_0.distcp", 1000), ["--load", "R", "--save", "R"],
                        "__0_0.distcp is truncated (1000 of at least"),
    "shard deleted": (lambda r: os.remove(r / IT3 / "__0_0.distcp"), ["--load", "R", "--save", "R"],
                      "__0_0.distcp is missing (a shard of the checkpoint); the newest complete older checkpoint is iteration 2"),
    ".metadata deleted": (lambda r: os.remove(r / IT3 / ".metadata"), ["--load", "R", "--save", "R"], ".metadata is missing"),
    "metadata.json deleted": (lambda r: os.remove(r / IT3 / "metadata.json"), ["--load", "R", "--save", "R"], "metadata.json is missing"),
    "common state deleted": (lambda r: os.remove(r / IT3 / _common_state_file(r / IT3)), ["--load", "R", "--save", "R"],
                             "is missing"),
    "RNG file truncated": (lambda r: _truncate(r / IT3 / "rng_rank00000.pt"), ["--load", "R", "--save", "R"],
                           "rng_rank00000.pt (RNG state) is damaged or truncated"),
    "RNG file deleted": (lambda r: os.remove(r / IT3 / "rng_rank00000.pt"), ["--load", "R", "--save", "R"],
                         "rng_rank00000.pt is missing (written by each of the 1 processes that saved it); the newest complete "
                         "older checkpoint is iteration 2: resume from it with --ckpt-step 2; or resume this one with "
                         "--no-load-rng"),
    # bytes that are no pickle at all: damaged (with the way back), not a refused object
    "RNG file of random bytes": (lambda r: open(r / IT3 / "rng_rank00000.pt", "wb").write(random_bytes(0)),
                                 ["--load", "R", "--save", "R"], "rng_rank00000.pt (RNG state) is damaged or truncated "
                                 "(not a torch.save file: Unsupported operand"),
    "code in the RNG file": (lambda r: _plant_payload(r / IT3 / "rng_rank00000.pt"), ["--load", "R", "--save", "R"],
                             "holds objects this project never writes (posix.system); refusing to load it"),
    "code in .metadata": (lambda r: _plant_payload(r / IT3 / ".metadata"), ["--load", "R", "--save", "R"],
                          "holds objects a checkpoint index never has"),
    "code in the common state": (lambda r: _plant_payload(r / IT3 / "common.pt") if os.path.exists(r / IT3 / "common.pt")
                                 else _plant_payload(r / IT3 / ".metadata"), ["--load", "R", "--save", "R"],
                                 "refusing to load it"),
    "Megatron-LM legacy checkpoint": (lambda r: (os.makedirs(r.parent / "O" / "iter_0000005" / "mp_rank_00"),
                                                 open(r.parent / "O" / "latest_checkpointed_iteration.txt", "w").write("5")),
                                      ["--load", "O"], "is a Megatron-LM legacy checkpoint"),
    "changed --lr": (None, ["--load", "R", "--save", "R", "--lr", "2e-3"],
                     "--lr 0.001 -> 0.002 changes the LR schedule of the checkpoint (iteration 3); give the checkpoint's values (None: leave the flag out), or pass --override-opt-param-scheduler"),
    "warmup iterations -> fraction": (None, ["--load", "R", "--save", "R", "--lr-warmup-fraction", "0.5"],
                                      "--lr-warmup-fraction None -> 0.5 changes the LR schedule"),
    "extended --train-iters": (None, ["--load", "R", "--save", "R", "--train-iters", "6"],
                               "--train-iters 6 sets the LR decay length (--lr-decay-iters defaults to it) to 6, the checkpoint's is 3"),
    "changed --lr-decay-style": (None, ["--load", "R", "--save", "R", "--lr-decay-style", "linear"], "--lr-decay-style 'cosine' -> 'linear'"),
    "changed --min-lr": (None, ["--load", "R", "--save", "R", "--min-lr", "1e-4"], "--min-lr 0.0 -> 0.0001"),
    "changed warmup": (None, ["--load", "R", "--save", "R", "--lr-warmup-iters", "1"], "--lr-warmup-iters 0 -> 1"),
    "ProRes switched on": (None, ["--load", "R", "--save", "R", "--prores-schedule", "linear", "--prores-warmup-steps", "8"],
                           "--prores-schedule 'none' -> 'linear', --prores-warmup-steps 0 -> 8.0 changes the ProRes schedule"),
    "changed --seed": (None, ["--load", "R", "--save", "R", "--seed", "4"], "--seed is 4 but the checkpoint (iteration 3) was trained with 3, which sets the data order"),
    "changed --global-batch-size": (None, ["--load", "R", "--save", "R", "--global-batch-size", "8"], "--global-batch-size is 8 but"),
    "changed --seq-length": (None, ["--load", "R", "--save", "R", "--seq-length", "32"], "--seq-length is 32 but"),
    "plain -> distributed optimizer": (None, ["--load", "R", "--save", "R", "--use-distributed-optimizer"],
                                       "saved with the plain optimizer and this run uses the distributed optimizer; use the same setting of --use-distributed-optimizer, or pass --no-load-optim"),
    "another padded vocabulary": (None, ["--load", "R", "--save", "R", "--make-vocab-size-divisible-by", "256"],
                                  "the checkpoint's embedding has 128 rows (padded vocabulary) but this layout pads to 256"),
    "both scheduler overrides": (None, ["--load", "R", "--save", "R", "--override-opt-param-scheduler",
                                        "--use-checkpoint-opt-param-scheduler"], "exclude each other"),
    "a live run holds --save": (lambda r: open(r / ".lock", "w").write(json.dumps(
        {"host": socket.gethostname(), "pid": os.getppid(), "slurm_job": None})), ["--load", "R", "--save", "R"],
                                "is in use by a live run (pid"),
}


def random_bytes(seed: int) -> bytes:
    """The bytes of a damaged file: seeded (os.urandom gave a flaky test: some bytes parse as opcodes)."""
    import random

    return random.Random(seed).randbytes(4770)


@pytest.mark.stack
def test_any_garbage_in_a_checkpoint_file_is_damage_not_a_traceback(tmp_path):
    # 7% of random files failed inside the unpickler with IndexError/KeyError (tracebacks) before;
    # every one is now "damaged", never "untrusted objects"
    from megatron_prores.checkpoint_check import CheckpointDamaged, read_index, safe_torch_load

    path = tmp_path / ".metadata"
    kinds = set()
    for seed in range(400):
        path.write_bytes(random_bytes(seed))
        for load in (lambda: safe_torch_load(str(path), "RNG state"), lambda: read_index(str(tmp_path))):
            with pytest.raises(CheckpointDamaged, match="is damaged or truncated") as info:
                load()
            kinds.add(str(info.value).split("(")[-1].split(" ")[0])
    assert len(kinds) > 3, kinds  # the seeds reach several kinds of failure, not one


@pytest.mark.stack
@pytest.mark.parametrize("case", list(CASES))
def test_refused_with_one_line_and_nothing_changed(case, run_dir, tmp_path, single_process, capsys):
    from megatron_prores.train import main

    mutate, flags, message = CASES[case]
    r = tmp_path / "run"
    shutil.copytree(run_dir, r)
    Payload.mark = tmp_path / "MARK"
    if mutate:
        mutate(r)
    before = {d: snapshot(tmp_path / d) for d in ("run", "O") if (tmp_path / d).exists()}
    where = {"R": str(r), "O": str(tmp_path / "O")}
    argv = TINY + ["--train-iters", "3"] + [where[f[0]] + f[1:] if f[:1] in where and f[1:2] in ("", "/", "_") else f
                                            for f in flags]
    capsys.readouterr()
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(errors) == 1, err[-3000:]
    assert message in errors[0], errors[0]
    assert "Traceback" not in err
    assert {d: snapshot(tmp_path / d) for d in before} == before  # nothing lost, nothing written
    assert not Payload.mark.exists()  # no planted code ran


@pytest.mark.stack
def test_the_data_path_is_compared_as_the_files_it_names(tmp_path, single_process, capsys, monkeypatch):
    """--data-path is recorded resolved: the same files spelled another way resume (they were refused
    as another data path); another directory's files under the same relative name are refused as
    other data (they were refused as "another run length"); --mock-data is named as such."""
    import numpy

    from megatron_prores.train import main
    from tests.test_driver_input_checks import write_dataset

    rng = numpy.random.default_rng(0)
    for d in ("first", "second"):  # two working directories, each with its own a/d
        os.makedirs(tmp_path / d / "a")
        write_dataset(str(tmp_path / d / "a" / "d"), [rng.integers(0, 64, size=40).tolist() for _ in range(300)])
    base = [a for a in TINY if a != "--mock-data"] + ["--tokenizer-type", "NullTokenizer", "--split", "100,0,0"]
    run = str(tmp_path / "run")
    monkeypatch.chdir(tmp_path / "first")
    assert main(base + ["--train-iters", "2", "--data-path", "a/d", "--save", run]) == 0
    assert main(base + ["--train-iters", "3", "--lr-decay-iters", "2", "--save", run, "--load", run,
                        "--data-path", str(tmp_path / "first" / "." / "a" / ".." / "a" / "d")]) == 0
    assert "resumed from" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path / "second")
    for data, now in ((["--data-path", "a/d"], f"--data-path {tmp_path.resolve() / 'second' / 'a' / 'd'}"),
                      (["--mock-data"], "--mock-data")):
        code = main(base + ["--train-iters", "4", "--lr-decay-iters", "2", "--save", run, "--load", run] + data)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err[-2000:]
        assert (f"error: this run reads {now} but the checkpoint (iteration 3) was trained on --data-path "
                f"{tmp_path.resolve() / 'first' / 'a' / 'd'}, which sets the data order; give that again, or pass "
                f"--override-data-flags") in err, err[-2000:]
    # the same path, other files (tokenized again: longer documents): other data, not another length
    monkeypatch.chdir(tmp_path / "first")
    write_dataset(str(tmp_path / "first" / "a" / "d"), [rng.integers(0, 64, size=50).tolist() for _ in range(300)])
    code = main(base + ["--train-iters", "3", "--lr-decay-iters", "2", "--save", run, "--load", run, "--data-path",
                        "a/d", "--data-cache-path", str(tmp_path / "fresh-cache")])
    err = capsys.readouterr().err
    assert code == 2 and "error: the training data under --data-path is not the checkpoint's" in err, err[-2000:]


def test_the_latest_checkpoint_resumes_bitwise_and_a_finished_run_does_nothing(run_dir, tmp_path):
    """Control for the refusals: --ckpt-step 2 (the way out named for a damaged latest; its RNG file
    gone, --no-load-rng) trains iteration 3 again bitwise as the uninterrupted run did; resuming the
    finished run is a no-op."""
    r = tmp_path / "run"
    shutil.copytree(run_dir, r)
    _, ref = train_state(run_dir)
    _truncate(r / IT3 / "__0_0.distcp", 1000)
    os.remove(r / "iter_0000002" / "rng_rank00000.pt")  # allowed with --no-load-rng (no dropout here)
    code, out = run(TINY + ["--train-iters", "3", "--load", r, "--save", r, "--ckpt-step", "2", "--no-load-rng"],
                    nproc=1)
    assert code == 0 and "resumed from" in out and "at iteration 2" in out, out[-3000:]
    _, got = train_state(r)
    assert got["train_state"]["losses"] == ref["train_state"]["losses"] and len(ref["train_state"]["losses"]) == 3
    code, out = run(TINY + ["--train-iters", "3", "--load", r, "--save", r], nproc=1)
    before = snapshot(r)
    assert code == 0 and "already trained to iteration 3 (--train-iters 3): nothing to do" in out, out[-3000:]
    assert snapshot(r) == before


def test_a_run_taken_back_with_ckpt_step_is_not_taken_back_again_by_its_requeue(run_dir, tmp_path, single_process,
                                                                                 capsys):
    """--ckpt-step N older than the latest checkpoint takes the run back to N (said in one line) and
    trains on bitwise as before. A requeued job keeps its command: with --ckpt-step N still in it,
    every requeue went back to N and overwrote what the run had trained since (found by an
    adversarial run); the checkpoints of a run taken back record it, and the same --ckpt-step is then
    refused in one line; without it the run resumes from its latest."""
    from megatron_prores.train import main

    r = tmp_path / "run"
    shutil.copytree(run_dir, r)
    _, ref = train_state(r)
    cmd = list(map(str, TINY + ["--train-iters", "3", "--save-interval", "1", "--load", r, "--save", r]))
    capsys.readouterr()
    assert main(cmd + ["--ckpt-step", "1"]) == 0
    out = capsys.readouterr().out
    assert "--ckpt-step 1: going back from the latest checkpoint (3); the run overwrites the checkpoints after 1" in out
    _, got = train_state(r)
    assert got["train_state"]["losses"] == ref["train_state"]["losses"]  # iterations 2 and 3 again, bitwise
    before = snapshot(r)
    assert main(cmd + ["--ckpt-step", "1"]) == 2  # the requeue with the same command
    errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert errors == ["error: --ckpt-step 1: the latest checkpoint (iteration 3) already continues the run resumed "
                      "from iteration 1; going back again would overwrite iterations 2-3. Drop --ckpt-step to resume "
                      "from 3 (a requeued job keeps its command: take --ckpt-step out of the job script)"]
    assert snapshot(r) == before
    assert main(cmd) == 0 and "already trained to iteration 3" in capsys.readouterr().out
    assert main(cmd + ["--ckpt-step", "2"]) == 0  # another step back is a new decision: allowed
    assert "--ckpt-step 2: going back from the latest checkpoint (3)" in capsys.readouterr().out


def _cosine_lr(lr, min_lr, step, decay):
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / decay))


@pytest.mark.stack  # megatron-core 0.19 pairs optimizer groups by settings that hold the LR bounds
def test_schedule_overrides_and_optimizer_switch(run_dir, tmp_path):
    """--override-opt-param-scheduler: LR from the new flags at the checkpoint's iteration;
    --use-checkpoint-opt-param-scheduler: the checkpoint's (finished) schedule; --no-load-optim:
    another optimizer kind with the weights loaded. Formulas written out here."""
    import re

    for name, flags, expect in (
        ("override", ["--train-iters", "5", "--lr", "2e-3", "--override-opt-param-scheduler"], _cosine_lr(2e-3, 0, 3, 5)),
        ("checkpoint", ["--train-iters", "4", "--lr", "2e-3", "--use-checkpoint-opt-param-scheduler"], 0.0),
        # a fresh optimizer's groups hold the flags' LR bounds: the checkpoint's schedule still rules
        ("checkpoint-fresh-adam", ["--train-iters", "4", "--lr", "2e-3", "--min-lr", "1e-4", "--ckpt-step", "2",
                                   "--use-checkpoint-opt-param-scheduler", "--no-load-optim"],
         _cosine_lr(1e-3, 0, 2, 3)),
        ("no-load-optim", ["--train-iters", "4", "--use-distributed-optimizer", "--no-load-optim",
                           "--override-opt-param-scheduler"], _cosine_lr(1e-3, 0, 3, 4)),
    ):
        r = tmp_path / name
        shutil.copytree(run_dir, r)
        code, out = run(TINY + flags + ["--load", r, "--save", r], nproc=1)
        assert code == 0, out[-3000:]
        at, lr = re.search(r"resumed from \S+ at iteration (\d+) \(learning rate (\S+?),", out).groups()
        assert int(at) == (2 if "--ckpt-step" in flags else 3)
        assert float(lr) == pytest.approx(expect, rel=1e-6, abs=1e-12), (name, out[-2000:])
        steps = re.findall(r"iteration\s+(\d+)/.*?learning rate: (\S+)", out)
        assert [int(s[0]) for s in steps] == list(range(int(at) + 1, int(flags[1]) + 1)), out[-2000:]
        if name == "checkpoint-fresh-adam":  # logged after steps 3 and 4: the checkpoint's cosine (decay 3), then its end
            assert [float(s[1]) for s in steps] == pytest.approx([0.0, 0.0], abs=1e-12)
        if name == "override":  # logged after step i: the LR of the new cosine at i (of 5)
            assert [float(s[1]) for s in steps] == pytest.approx([_cosine_lr(2e-3, 0, i, 5) for i in (4, 5)],
                                                                 rel=1e-6, abs=1e-12)
        if name == "no-load-optim":
            assert "--no-load-optim: the Adam state starts fresh" in out
            assert train_state(r)[1]["run_flags"]["use_distributed_optimizer"] is True
            # the distributed optimizer's state, loaded under another --lr (its groups are paired by
            # settings that held the LR bounds in every megatron-core release)
            code, out = run(TINY + ["--train-iters", "5", "--use-distributed-optimizer", "--lr", "3e-3",
                                    "--override-opt-param-scheduler", "--load", r, "--save", r], nproc=1)
            assert code == 0, out[-3000:]
            lr = float(re.search(r"resumed from \S+ at iteration 4 \(learning rate (\S+?),", out).group(1))
            assert lr == pytest.approx(_cosine_lr(3e-3, 0, 4, 5), rel=1e-6, abs=1e-12), out[-2000:]


def _main_refuses(argv, message, capsys, *unchanged):
    """The driver's ``main`` in this process ends with one ``error:`` line holding ``message`` and
    leaves every file under ``unchanged`` as it was."""
    from megatron_prores.train import main

    before = [snapshot(d) for d in unchanged]
    capsys.readouterr()
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err[-3000:]
    assert [snapshot(d) for d in unchanged] == before


def test_a_requeued_finetune_keeps_its_source_and_its_way_back(run_dir, tmp_path, single_process, capsys):
    """A fine-tuning run of iteration 2 stopped at 2 and requeued: the requeue naming another
    --ckpt-step is refused (it would resume a fine-tuning run of another checkpoint); with its
    newest checkpoint damaged, the refusal names the flags that resume the older one, and those
    flags (no --finetune) train on bitwise as an uninterrupted fine-tuning run, recorded still as a
    fine-tuning run of iteration 2 (a later requeue with --finetune accepts it)."""
    src, f, full = run_dir, tmp_path / "f", tmp_path / "full"
    ft = TINY + ["--train-iters", "3", "--lr", "2e-3", "--finetune", "--load", src, "--save-interval", "1"]
    code, out = run(ft + ["--ckpt-step", "2", "--save", full], nproc=1)
    assert code == 0, out[-3000:]
    code, out = run(ft + ["--ckpt-step", "2", "--save", f, "--exit-interval", "2"], nproc=1)
    assert code == 0 and "exiting at iteration 2" in out, out[-3000:]
    _main_refuses(ft + ["--ckpt-step", "3", "--save", f],
                  f"holds a fine-tuning run of {os.path.realpath(src)} iteration 2, not of iteration 3 (--ckpt-step); "
                  f"requeue it with --ckpt-step 2", capsys, f, src)
    damaged = {"no marker": lambda d: os.remove(d / "latest_checkpointed_iteration.txt"),
               "RNG file": lambda d: os.remove(d / "iter_0000002" / "rng_rank00000.pt"),
               "shard": lambda d: _truncate(d / "iter_0000002" / "__0_0.distcp", 1000)}
    for name, damage in damaged.items():  # each refusal names flags that resume the run's own older checkpoint
        d = f if name == "shard" else tmp_path / name.replace(" ", "_")
        if d != f:
            shutil.copytree(f, d)
        damage(d)
        _main_refuses(ft + ["--ckpt-step", "2", "--save", d],
                      f"resume from one with --load {d} --ckpt-step N and without --finetune (it stays this fine-tuning "
                      f"run) (e.g. --load {d} --ckpt-step 2" if name == "no marker" else
                      f"the newest complete older checkpoint is iteration 1: resume from it with --load {d} --ckpt-step "
                      f"1 and without --finetune", capsys, d, src)
    plain = [x for x in ft if x not in ("--finetune", src)]
    plain.remove("--load")
    code, out = run(plain + ["--load", f, "--save", f, "--ckpt-step", "1"], nproc=1)
    assert code == 0 and "resumed from" in out and "at iteration 1" in out, out[-3000:]
    _, got = train_state(f)
    _, ref = train_state(full)
    assert got["train_state"]["losses"] == ref["train_state"]["losses"] and len(ref["train_state"]["losses"]) == 3
    assert (got["run_flags"]["finetune_from"], got["run_flags"]["finetune_step"]) == (os.path.realpath(src), 2)
    assert ref["run_flags"]["finetune_step"] == 2
    code, out = run(ft + ["--ckpt-step", "2", "--save", f], nproc=1)  # the original command, requeued again
    assert code == 0 and "nothing to do" in out, out[-3000:]


def test_training_length_in_the_other_unit(run_dir, tmp_path, single_process, capsys):
    """A run trained with --train-iters resumed with --train-samples: the same schedule in samples
    (3 steps x 4 = 12) trains on bitwise as the uninterrupted run; a longer one is refused with
    the lengths in samples (it named '--train-iters 3 sets the decay length to None' before), and
    so is the same --train-iters at another global batch (megatron loaded the checkpoint's decay
    length then and WSD's from the new flags)."""
    r = tmp_path / "run"
    shutil.copytree(run_dir, r)
    _, ref = train_state(run_dir)
    _main_refuses(TINY + ["--train-samples", "16", "--load", r, "--save", r, "--ckpt-step", "2"],
                  "in samples, the LR decay length 12 -> 16 (the checkpoint's lengths in steps of 4 samples, this "
                  "run's in samples): that changes the LR schedule of the checkpoint (iteration 2); give its schedule "
                  "(in samples: warmup 0, decay length 12;", capsys, r)
    # another global batch (--override-data-flags keeps the data position): the same steps are more samples
    i = TINY.index("--global-batch-size") + 1
    _main_refuses(TINY[:i] + ["8"] + TINY[i + 1:] + ["--train-iters", "3", "--load", r, "--save", r, "--ckpt-step", "2",
                                                    "--override-data-flags"],
                  "in samples, the LR decay length 12 -> 24 (the checkpoint's lengths in steps of 4 samples, this "
                  "run's in steps of 8 samples)", capsys, r)
    code, out = run(TINY + ["--train-samples", "12", "--load", r, "--save", r, "--ckpt-step", "2"], nproc=1)
    assert code == 0 and "resumed from" in out and "at iteration 2" in out, out[-3000:]
    _, got = train_state(r)
    assert got["train_state"]["losses"] == ref["train_state"]["losses"] and len(ref["train_state"]["losses"]) == 3
    assert got["run_flags"]["lr_decay_samples"] == 12  # recorded in the unit it now runs in


def test_two_runs_on_one_save_directory(tmp_path):
    """Started together: one trains to the end, the other is refused with one line and writes
    nothing; then the finished run's directory resumes (lock released)."""
    args = TINY + ["--train-iters", "6", "--save-interval", "2", "--save", tmp_path / "c", "--load", tmp_path / "c"]
    a, b = launch(args, nproc=1), launch(args, nproc=1)
    outs = [finish(p, 600)[0] for p in (a, b)]
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], outs
    refused = outs[[a.returncode, b.returncode].index(2)]
    assert [l for l in refused.splitlines() if l.startswith("error:")][0].count("is in use by a live run") == 1
    it, state = train_state(tmp_path / "c")
    assert it == 6 and len(state["train_state"]["losses"]) == 6
    assert not os.path.exists(tmp_path / "c" / ".lock")


def test_nonfinite_weights_are_never_saved(tmp_path):
    """--adam-eps 0: embedding rows of tokens that never occur get no gradient, so Adam's first
    update is 0/0 there and the weights turn NaN from a finite loss and finite gradients. The save
    is refused with one line, the run exits 3, and nothing is written."""
    code, out = run(TINY + ["--train-iters", "3", "--save-interval", "1", "--adam-eps", "0",
                            "--save", tmp_path / "c"], nproc=1)
    assert code == 3, out[-3000:]
    errors = [l for l in out.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "the weights or optimizer state are non-finite at iteration 1" in errors[0], out[-3000:]
    assert "lm loss: 4." in out  # the step itself had a finite loss
    assert os.listdir(tmp_path / "c") == []


@pytest.mark.stack
def test_checkpointer_refuses_nonfinite_state_and_keeps_the_latest(run_dir, tmp_path, single_process, capsys):
    """The part the driver calls at every save: one NaN in the model (or the Adam moments) and
    nothing is written; the run directory keeps every byte."""
    from megatron_prores.arguments import parse_args
    from megatron_prores.trainer import Trainer

    r = tmp_path / "run"
    shutil.copytree(run_dir, r)
    before = snapshot(r)
    trainer = Trainer(parse_args(list(map(str, TINY + ["--train-iters", "4", "--override-opt-param-scheduler",
                                                       "--load", r, "--save", r]))))
    try:
        assert trainer.state.iteration == 3
        for where in ("model", "adam"):
            with torch.no_grad():
                if where == "model":
                    p = next(trainer.model[0].parameters())
                else:
                    inner = trainer.optimizer.chained_optimizers[0].optimizer if hasattr(
                        trainer.optimizer, "chained_optimizers") else trainer.optimizer.optimizer
                    p = next(iter(inner.state.values()))["exp_avg_sq"]
                keep = p.view(-1)[0].item()
                p.view(-1)[0] = float("nan")
            capsys.readouterr()
            assert trainer.checkpointer.save(trainer) is False
            assert "error: the weights or optimizer state are non-finite at iteration 3" in capsys.readouterr().err
            with torch.no_grad():
                p.view(-1)[0] = keep
        assert trainer.checkpointer.save(trainer, last_step_finite=False) is True  # skipped step: no save
        assert "not saving at iteration 3" in capsys.readouterr().out
    finally:
        trainer.close()
    assert snapshot(r) == before


# ---- the parts, without the driver ------------------------------------------------------------
def test_run_lock_stale_and_live_holders(tmp_path, monkeypatch):
    from megatron_prores.config import ConfigError
    from megatron_prores.run_lock import STALE_AFTER, RunLock

    def plant(**holder):
        (tmp_path / ".lock").write_text(json.dumps(holder))

    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant(host=host, pid=dead.pid)  # a killed run on this host
    lock = RunLock(str(tmp_path))
    assert "has ended" in lock.acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(ConfigError, match="in use by a live run"):  # held by this process now
        RunLock(str(tmp_path)).acquire()
    lock.release()
    assert not (tmp_path / ".lock").exists()

    plant(host="other-node", pid=1, slurm_job=None)  # fresh heartbeat on another node: live
    with pytest.raises(ConfigError, match="pid 1 on other-node"):
        RunLock(str(tmp_path)).acquire()
    old = time.time() - STALE_AFTER - 5
    os.utime(tmp_path / ".lock", (old, old))  # no heartbeat: gone
    lock = RunLock(str(tmp_path))
    assert "no heartbeat" in lock.acquire()
    lock.release()

    # a run in a container with a PID namespace of its own, on this host: its pid says nothing here
    # (a second container run took a live run's lock over), only its heartbeat does
    plant(host=host, pid=dead.pid, pidns=-1)
    with pytest.raises(ConfigError, match="in use by a live run"):
        RunLock(str(tmp_path)).acquire()
    os.utime(tmp_path / ".lock", (old, old))
    lock = RunLock(str(tmp_path))
    assert "no heartbeat" in lock.acquire()
    lock.release()
    plant(host=host, pid=dead.pid, pidns=os.stat("/proc/self/ns/pid").st_ino)  # same namespace: gone
    lock = RunLock(str(tmp_path))
    assert "has ended" in lock.acquire()
    lock.release()

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    plant(host="other-node", pid=1, slurm_job="77", slurm_restart=0)  # this job before its requeue
    lock = RunLock(str(tmp_path))
    assert "requeued" in lock.acquire()
    lock.release()
    plant(host="other-node", pid=1, slurm_job="77", slurm_restart=1)  # same job, same start: live
    with pytest.raises(ConfigError, match="SLURM job 77"):
        RunLock(str(tmp_path)).acquire()


def test_run_lock_that_cannot_be_written_or_read_or_removed(tmp_path, monkeypatch):
    """A full disk while writing the lock: one line, and no empty lock left behind (it blocked the
    next run as "in use by a live run (pid None on None)" for 5 minutes); an empty lock is judged
    by its age (a live run writes it at once); a lock that cannot be removed at the end (a file
    system gone read-only) is left for the next run to take over, without a traceback."""
    import errno

    from megatron_prores import run_lock
    from megatron_prores.config import ConfigError
    from megatron_prores.run_lock import WRITE_GRACE, RunLock

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run_lock.json, "dump", full_disk)
    with pytest.raises(ConfigError, match=r"cannot write the run lock .*\(No space left on device\); free space"):
        RunLock(str(tmp_path)).acquire()
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    (tmp_path / ".lock").write_text("")  # just created by a run that is writing it now
    with pytest.raises(ConfigError, match="in use by a live run \\(a run starting this moment\\)"):
        RunLock(str(tmp_path)).acquire()
    old = time.time() - WRITE_GRACE - 1
    os.utime(tmp_path / ".lock", (old, old))  # its run ended between creating and writing it
    lock = RunLock(str(tmp_path))
    assert "empty or unreadable" in lock.acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(run_lock.os, "remove", read_only)
    lock.release()  # no exception
    monkeypatch.undo()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()  # left for the next run


def test_two_runs_that_find_the_same_stale_lock_do_not_both_take_it(tmp_path, monkeypatch):
    """Run Y judges a dead run's lock stale; before Y renames it away, run X takes it over and
    writes its own. Y renamed X's fresh lock away and both ran on one --save (found by an
    adversarial run, with a pause injected). Now Y sees that it moved another lock, puts it back
    and is refused; X's lock is intact."""
    from megatron_prores.config import ConfigError
    from megatron_prores.run_lock import RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps(dict(host=socket.gethostname(), pid=dead.pid)))
    x_lock = dict(host="other-node", pid=4242, slurm_job=None)  # run X, alive on another node
    judge = RunLock._stale

    def judged_then_overtaken(self, holder):
        why = judge(self, holder)
        if holder.get("pid") == dead.pid:  # X takes over between Y's judgement and Y's rename
            os.remove(tmp_path / ".lock")
            (tmp_path / ".lock").write_text(json.dumps(x_lock))
        return why

    monkeypatch.setattr(RunLock, "_stale", judged_then_overtaken)
    with pytest.raises(ConfigError, match="in use by a live run \\(pid 4242 on other-node\\)"):
        RunLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / ".lock").read_text()) == x_lock
    assert sorted(os.listdir(tmp_path)) == [".lock"]


@pytest.mark.stack
def test_keep_last_n_never_deletes_the_latest(tmp_path, single_process):
    from megatron_prores.checkpointing import _publish, iteration_dir

    for i in (2, 4, 6, 8):  # 6, 8: newer, left by a run later resumed with --ckpt-step 4
        os.makedirs(iteration_dir(str(tmp_path), i))
    os.makedirs(iteration_dir(str(tmp_path), 5) + ".tmp")
    _publish(str(tmp_path), 5, keep_last_n=1)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000005", "iter_0000006", "iter_0000008",
                                            "latest_checkpointed_iteration.txt"]


def test_a_flag_newer_than_the_checkpoint_counts_as_its_value_then():
    """A checkpoint written before --lr-warmup-fraction existed was trained without it: adding it
    on resume changes the schedule (refused), not silently ignored."""
    from megatron_prores import resume
    from megatron_prores.arguments import parse_args
    from megatron_prores.config import ConfigError

    args = parse_args(TINY + ["--train-iters", "3"])
    saved = {k: v for k, v in resume.run_flags(args).items() if k != "lr_warmup_fraction"}
    assert resume.check_flags(saved, args, 2) == "same"
    with pytest.raises(ConfigError, match=r"^--lr-warmup-fraction None -> 0.5 changes the LR schedule"):
        resume.check_flags(saved, parse_args(TINY + ["--train-iters", "3", "--lr-warmup-fraction", "0.5"]), 2)


@pytest.mark.parametrize("flag,value,message", [
    ("--split", "abc", "--split 'abc' is not valid"),
    ("--weight-decay", "-1", "--weight-decay -1.0 is not valid; it must be >= 0"),
    ("--adam-beta2", "1.5", "--adam-beta2 1.5 is not valid; it must be in [0, 1)"),
    ("--init-method-std", "-1", "--init-method-std -1.0 is not valid; it must be positive"),
    ("--lr-decay-iters", "-3", "--lr-decay-iters -3 is not valid; it must be positive"),
    ("--lr", "inf", "--lr inf is not valid; it must be a finite number"),
    ("--lr", "-1e-3", "--lr -0.001 is not valid; it must be positive"),
    ("--eval-iters", "-1", "--eval-iters -1 is not valid"),
    ("--clip-grad", "-1", "--clip-grad -1.0 is not valid"),
    ("--exit-duration-in-mins", "-1", "--exit-duration-in-mins -1.0 is not valid"),
    ("--keep-last-n", "0", "--keep-last-n 0 is not valid; it must be >= 1"),
    ("--keep-last-n", "-1", "--keep-last-n -1 is not valid; it must be >= 1"),
    ("--ckpt-step", "2", "--ckpt-step needs --load"),
    ("--overlap-param-gather", None, "--overlap-param-gather needs --use-distributed-optimizer"),
    ("--ddp-bucket-size", "1000", "--ddp-bucket-size needs --overlap-grad-reduce"),
    ("--rotary-base", "-1", "--rotary-base -1.0 is not valid; it must be a positive number"),
    # a stop or a background save without --save: the trained steps were thrown away with exit 0
    ("--exit-interval", "2", "--exit-interval needs --save DIR (the run saves there before it stops)"),
    ("--exit-duration-in-mins", "1", "--exit-duration-in-mins needs --save DIR"),
    ("--exit-signal-handler", None, "--exit-signal-handler needs --save DIR"),
    ("--async-save", None, "--async-save needs --save DIR"),
    ("--save-interval", "2", "--save-interval needs --save DIR"),
])
def test_bad_flag_values(flag, value, message):
    from megatron_prores.arguments import model_config, parse_args
    from megatron_prores.config import ConfigError

    with pytest.raises(ConfigError) as e:
        args = parse_args(TINY + ["--train-iters", "3", flag] + ([value] if value else []))
        model_config(args, 64).validate()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_torchrun_launcher_keeps_the_one_line_promise(tmp_path):
    """megatron-prores-torchrun (torchrun's arguments): a refused start on 2 ranks ends with the
    driver's one error line and exit code 2, without torchrun's ChildFailedError traceback."""
    from tests.conftest import free_port, run_tree

    cmd = [sys.executable, "-m", "megatron_prores.launch", "--nproc-per-node", "2", f"--master-port={free_port()}",
           "-m", "megatron_prores.train", *TINY, "--train-iters", "3", "--load", str(tmp_path / "typo")]
    p = run_tree(cmd, 600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    out = p.stdout + p.stderr
    errors = [l for l in out.splitlines() if l.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "typo' does not exist" in errors[0], out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out


def _adam_after_one_step(device):
    """A model and torch AdamW after one step: moments on ``device``, step counts on the CPU
    (torch keeps them there unless capturable), as the driver's optimizer state is laid out."""
    model = torch.nn.Linear(4, 3).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 4, device=device)).sum().backward()
    opt.step()
    return model, SimpleNamespace(optimizer=opt)


@pytest.mark.parametrize("plant", [None, "param", "moment"])
def test_state_is_finite_sees_every_parameter_and_moment(single_process, plant):
    """The save-time check (CPU counterpart of test_gpu's mixed-device case): a planted NaN in a
    weight or in an Adam moment is found; finite state passes, the CPU step counts included."""
    from megatron_prores.trainer import state_is_finite

    model, opt = _adam_after_one_step("cpu")
    assert any(v.device.type == "cpu" for st in opt.optimizer.state.values() for v in st.values())
    if plant == "param":
        model.weight.data[1, 2] = float("nan")
    elif plant == "moment":
        next(iter(opt.optimizer.state.values()))["exp_avg_sq"][0] = float("inf")
    assert state_is_finite([model], opt) is (plant is None)


def test_the_checkpoint_writers_manager_survives_exit_signals_while_it_starts(monkeypatch):
    """SLURM signals every process of a job. A USR1 (time limit) or TERM that reached the manager
    process of the checkpoint writer while its interpreter was still starting killed it, and the
    first save of the job, the one the signal asked for, failed (EOFError). Here every new child of
    this process gets SIGUSR1 every 5 ms from the moment the manager is started."""
    import signal
    import threading
    import time

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_prores import checkpointing

    monkeypatch.setattr(filesystem_async, "_results_queue", None, raising=False)
    monkeypatch.setattr(filesystem_async, "_prores_manager", None, raising=False)

    def children():
        tasks = f"/proc/{os.getpid()}/task"
        return {int(p) for t in os.listdir(tasks) for p in open(f"{tasks}/{t}/children").read().split()}

    before, stop, hits = children(), threading.Event(), []

    def hit():
        while not stop.is_set():
            for pid in children() - before:
                try:
                    os.kill(pid, signal.SIGUSR1)
                    hits.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)

    sender = threading.Thread(target=hit)
    sender.start()
    try:
        checkpointing._signal_proof_writer_queue()
        time.sleep(0.2)  # signals after the start too: the manager ignores them
        queue = filesystem_async._results_queue
        queue.put("written")
        assert queue.get() == "written"
    finally:
        stop.set()
        sender.join()
        if filesystem_async._prores_manager is not None:
            filesystem_async._prores_manager.shutdown()
    assert len(hits) > 10


def test_the_checkpoint_writers_manager_ends_with_a_training_killed_by_sigkill(tmp_path):
    """The manager ignores TERM/INT/USR1: after a kill -9 of the training it lived on (forever where
    no SLURM job ends it), one per rank and kill."""

    child = subprocess.Popen([sys.executable, "-c", (
        "import time\n"
        "from megatron.core.dist_checkpointing.strategies import filesystem_async\n"
        "from megatron_prores import checkpointing\n"
        "filesystem_async._results_queue = None\n"
        "checkpointing._signal_proof_writer_queue()\n"
        "print(filesystem_async._prores_manager._process.pid, flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        manager = int(child.stdout.readline())
        _assert_ignores_term(manager)
    finally:
        child.kill()
        child.wait()
    _assert_ends(manager)


def _assert_ignores_term(manager: int) -> None:
    """The writer's manager lives on after SIGTERM, what SLURM sends every process of a job."""
    import signal

    os.kill(manager, signal.SIGTERM)
    time.sleep(0.5)
    os.kill(manager, 0)  # ProcessLookupError if it died


def _assert_ends(manager: int, within: float = 20.0) -> None:
    """The writer's manager ``manager`` ends within seconds of its training's kill -9 (a zombie
    whose new parent has not reaped it yet counts as ended)."""
    import signal

    t0 = time.time()
    while time.time() - t0 < within:
        try:
            with open(f"/proc/{manager}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(manager, signal.SIGKILL)
    pytest.fail(f"the manager {manager} outlived the training process killed with -9")


def _maps_torch(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()


@pytest.mark.stack  # megatron-core's writer queue (filesystem_async) differs between releases
def test_the_writers_manager_starts_in_the_background_ready_for_the_first_save(tmp_path):
    """The first save of every run paused training while megatron-core's queue manager started (a
    new interpreter) and then, at the first result a writer put on the queue, imported torch to
    unpickle it: 10-13 s on the H200 machine, 4-5 s on CPU, once per run and rank. Now the driver
    starts it while the model is built: start_writer_queue returns at once, the manager comes up in
    the background with torch.distributed.checkpoint already imported (before any result reaches
    it), stays up after the start (the thread that started it stays), takes a writer's result, and
    still ends with a training killed with -9."""

    child = subprocess.Popen([sys.executable, "-c", (
        "import time, threading\n"
        "from megatron.core.dist_checkpointing.strategies import filesystem_async\n"
        "from megatron_prores import checkpointing\n"
        "filesystem_async._results_queue = None\n"
        "t0 = time.monotonic()\n"
        "checkpointing.start_writer_queue()\n"
        "print(f'returned {time.monotonic() - t0:.3f}', flush=True)\n"
        "while filesystem_async._results_queue is None and time.monotonic() - t0 < 120:\n"
        "    time.sleep(0.05)\n"
        "manager = filesystem_async._prores_manager\n"
        "print('pid', manager._process.pid, flush=True)\n"
        "input()\n"  # the test looks at the manager before any result reaches it
        "time.sleep(1.0)\n"
        "from torch.distributed.checkpoint.metadata import MetadataIndex\n"
        "from torch.distributed.checkpoint.storage import WriteResult\n"
        "from torch.distributed.checkpoint.filesystem import _StorageInfo\n"
        "r = WriteResult(index=MetadataIndex('w'), size_in_bytes=4, storage_data=_StorageInfo('f', 0, 4))\n"
        "filesystem_async._results_queue.put((0, [r]))\n"
        "print('got', filesystem_async._results_queue.get()[1][0].size_in_bytes, flush=True)\n"
        "time.sleep(120)\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        returned = float(child.stdout.readline().split()[1])
        assert returned < 0.5, returned  # the manager's start (seconds) is not waited for
        line = child.stdout.readline()
        assert line.startswith("pid"), line
        manager = int(line.split()[1])
        assert _maps_torch(manager)  # imported at its start, not at the first save's result
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().split() == ["got", "4"]  # alive after its start, serving
        _assert_ignores_term(manager)
    finally:
        child.kill()
        child.wait()
    _assert_ends(manager)


def test_a_run_that_ends_while_the_writers_manager_starts_exits_at_once():
    """A run that ends within seconds of its start (a bad flag, a missing --load) while the manager
    is still starting: multiprocessing's exit hook waited for that manager forever (the run hung
    instead of printing its error and exiting); the unfinished start is ended instead."""
    from tests.conftest import run_tree

    code = ("import os\n"
            "from megatron.core.dist_checkpointing.strategies import filesystem_async\n"
            "from megatron_prores import checkpointing\n"
            "filesystem_async._results_queue = None\n"
            "checkpointing.start_writer_queue()\n"
            "raise SystemExit(2)\n")
    for _ in range(3):  # the exit meets the start at different points of it
        t0 = time.monotonic()
        r = run_tree([sys.executable, "-c", code], 120)
        assert r.returncode == 2 and time.monotonic() - t0 < 60, (r.returncode, r.stderr[-2000:])


def test_the_driver_starts_the_writers_manager_before_its_first_save(tmp_path):
    """A Trainer with --save starts the manager while it builds (it is up before the first step);
    without --save it starts none."""
    from megatron_prores import checkpointing

    started = []
    real = checkpointing.start_writer_queue
    try:
        checkpointing.start_writer_queue = lambda: started.append(True)
        flags = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
                 "--max-position-embeddings", "16", "--micro-batch-size", "2", "--global-batch-size", "2",
                 "--vocab-size", "128", "--mock-data", "--lr", "1e-3", "--train-iters", "1", "--eval-iters", "0"]
        from megatron_prores.arguments import parse_args
        from megatron_prores.trainer import Trainer

        Trainer(parse_args(flags)).close()
        assert started == []
        Trainer(parse_args(flags + ["--save", str(tmp_path / "ckpt")])).close()
        assert started == [True]
    finally:
        checkpointing.start_writer_queue = real


def test_more_tasks_than_gpus_on_a_node_is_one_line():
    """Two tasks on one GPU failed in NCCL at the first collective; a task that sees only its own
    GPU (SLURM's --gpus-per-task) takes device 0."""
    from megatron_prores.config import ConfigError
    from megatron_prores.parallel import device_of

    assert [device_of(local, 8) for local in range(8)] == list(range(8))
    assert device_of(5, 1) == 0
    with pytest.raises(ConfigError) as e:
        device_of(8, 8)
    assert str(e.value) == ("this node runs a task of local rank 8 but has 8 GPUs: start one task per GPU "
                            "(--ntasks-per-node 8 under SLURM, --nproc-per-node 8 with torchrun)")

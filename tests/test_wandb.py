"""Weights & Biases (the optional extra): the same scalars as TensorBoard in one wandb run,
written offline by one process under pipeline parallelism, continued by a resumed job; without
the package the flags fail with one line naming the extra."""

import glob
import json
import os
import struct
import sys

import pytest

from tests.test_train import BASE, SMALL, one_line_error, run, train_state

OFFLINE = dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off", WANDB_DISABLE_CODE="true",
               WANDB_DISABLE_GIT="true", WANDB__DISABLE_STATS="true", WANDB__DISABLE_META="true")


def wandb_records(path):
    """The records of an offline run file ``run-ID.wandb``: wandb's leveldb-style log (a 7-byte
    header ':W&B' + magic + version, then 32 KiB blocks of records with a 7-byte header: CRC32,
    length, type full/first/middle/last), each a wandb_internal_pb2.Record. wandb 0.31 has no
    Python reader of its own any more (its DataStore went to wandb-core)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B" and len(data) > 7, f"{path}: empty or not a wandb file ({len(data)} bytes)"
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def offline_run(directory):
    """(run id, config, {step: {tag: value}}, summary, exit code) of one offline run directory."""
    files = glob.glob(os.path.join(directory, "run-*.wandb"))
    assert len(files) == 1, files
    run_id, config, history, summary, exit_code = None, {}, {}, {}, None
    for r in wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
            config = {u.key: json.loads(u.value_json) for u in r.run.config.update}
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[r.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif kind == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
        elif kind == "exit":
            exit_code = r.exit.exit_code
    return run_id, config, history, summary, exit_code


def test_offline_run_holds_the_scalars_and_a_resumed_job_continues_it(tmp_path, monkeypatch):
    """PP=2: every block's series reach the one wandb process (the last stage); the job stops at
    iteration 2 (--exit-interval), the requeued job resumes from the checkpoint and logs 3-4 to
    the same run id (a second offline directory of that id: wandb sync uploads the directories of
    one id in start order into that run)."""
    pytest.importorskip("wandb")
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    ckpt = tmp_path / "c"
    args = BASE + ["--train-iters", "4", "--eval-interval", "2", "--save", ckpt, "--load", ckpt,
                   "--wandb-project", "prores-test", "--wandb-exp-name", "pp2"]
    code, out = run(args + ["--pipeline-model-parallel-size", "2", "--exit-interval", "2",
                            "--tensorboard-dir", tmp_path / "tb"])
    assert code == 0 and "exiting at iteration 2" in out, out[-3000:]
    run_id = train_state(ckpt)[1]["train_state"]["wandb_run_id"]
    runs = glob.glob(str(ckpt / "wandb" / "wandb" / "offline-run-*"))  # --wandb-save-dir default: SAVE/wandb
    assert len(runs) == 1 and runs[0].endswith("-" + run_id), runs
    first = runs[0]
    rid, config, history, _, exit_code = offline_run(first)
    assert rid == run_id and exit_code == 0
    assert config["wandb_project"] == "prores-test" and config["pipeline_model_parallel_size"] == 2
    assert sorted(history) == [1, 2]
    run_level = {"lm-loss-training/lm loss", "learning-rate", "grad-norm", "throughput/tokens per second",
                 "gpas/gate grad norm"}
    blocks = {f"{series}/block {b:03d}" for series in ("prores", "gpas-scale", "stream-rms") for b in (1, 2, 3, 4)}
    assert set(history[1]) == run_level | blocks  # blocks 1-2 come from stage 0, 3-4 from stage 1
    assert set(history[2]) == run_level | blocks | {"lm-loss-validation/lm loss", "lm-loss-validation/lm loss ppl"}
    assert history[2]["prores/block 001"] > history[1]["prores/block 001"]  # ProRes warms up block 1 first
    from megatron_prores.tools.plot_run import read_scalars

    tb = {(step, tag): value for tag, (steps, values) in read_scalars(str(tmp_path / "tb")).items()
          for step, value in zip(steps, values)}  # the same scalars as TensorBoard (one file per stage)
    logged = {(step, tag): value for step, row in history.items() for tag, value in row.items()}
    assert tb.keys() == logged.keys()
    assert [tb[k] for k in sorted(tb)] == pytest.approx([logged[k] for k in sorted(tb)], rel=1e-6)  # TB: float32

    code, out = run(args, nproc=1)  # the requeued job (one process, quicker here: a resume may change layout)
    assert code == 0 and "resumed from" in out and "at iteration 2" in out, out[-3000:]
    it, state = train_state(ckpt)
    assert it == 4 and state["train_state"]["wandb_run_id"] == run_id  # kept in every checkpoint
    runs = glob.glob(str(ckpt / "wandb" / "wandb" / "offline-run-*"))
    assert len(runs) == 2 and first in runs and all(r.endswith("-" + run_id) for r in runs), runs
    rid, _, history2, summary, exit_code = offline_run(next(r for r in runs if r != first))
    assert rid == run_id and exit_code == 0
    assert sorted(history2) == [3, 4]  # appends: the steps after the checkpoint
    assert {"lm-loss-validation/lm loss", "loss-spike-score"} <= set(history2[4])
    assert "loss-spike-score" in summary
    # the logged training losses (log interval 1) are the run's, step by step
    losses = {**history, **history2}
    assert [losses[i]["lm-loss-training/lm loss"] for i in (1, 2, 3, 4)] == \
        pytest.approx(state["train_state"]["losses"], rel=1e-6)


class _StubRun:
    id, step = "abc", 3  # a resumed online run whose last logged step is 2

    def __init__(self):
        self.logged, self.summary, self.finished = [], {}, None

    def log(self, data, step):
        self.logged.append((step, dict(data)))

    def finish(self, exit_code=0):
        self.finished = exit_code


def test_writer_logs_one_dict_per_step_and_leaves_out_steps_already_in_the_run(capsys):
    from megatron_prores.wandb_writer import WandbWriter

    stub = _StubRun()
    w = WandbWriter(stub)
    for step in (2, 3, 4):
        w.add_scalar("a", step, step)
        w.add_scalar("b", 10 * step, step)
        w.flush()
    w.add_scalar("val", 1.5, 4)  # validation at the step just logged: merged by wandb into that row
    w.add_scalar("a", 5, 5)  # a new step flushes the pending one
    w.close(exit_code=1)
    assert stub.logged == [(3, {"a": 3.0, "b": 30.0}), (4, {"a": 4.0, "b": 40.0}), (4, {"val": 1.5}), (5, {"a": 5.0})]
    assert stub.finished == 1
    assert "steps 2..2 were already in run abc" in capsys.readouterr().out


def test_without_wandb_the_flags_fail_with_one_line(monkeypatch, capsys):
    from megatron_prores import train
    from megatron_prores.arguments import check_recipe

    mock = SMALL + ["--mock-data", "--vocab-size", "128"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as when it is not installed
    for flags in (["--wandb-project", "p", "--wandb-exp-name", "x"], ["--wandb-save-dir", "d"]):
        assert train.main(mock + flags) == 2
        err = capsys.readouterr().err
        one_line_error(2, err, f"{flags[0]} needs the wandb package, which is not installed: "
                               f"pip install 'megatron-prores[wandb]'")
    check_recipe(mock + ["--wandb-project", "p"], world=1)  # a cluster recipe, checked on another machine


def test_wandb_flags_need_a_project(capsys):
    pytest.importorskip("wandb")
    from megatron_prores import train

    assert train.main(SMALL + ["--mock-data", "--vocab-size", "128", "--wandb-exp-name", "x"]) == 2
    one_line_error(2, capsys.readouterr().err, "--wandb-exp-name needs --wandb-project NAME")


def test_a_run_stopped_by_nonfinite_steps_is_marked_with_its_exit_code(tmp_path, monkeypatch):
    """The wandb run ends with the process's exit code: 3 when non-finite steps stop the run."""
    pytest.importorskip("wandb")
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    args = BASE + ["--train-iters", "20", "--lr", "1e30", "--lr-warmup-iters", "0", "--clip-grad", "0",
                   "--max-nonfinite-iters", "2", "--wandb-project", "prores-test", "--wandb-entity", "someone",
                   "--wandb-save-dir", tmp_path / "w"]
    code, out = run(args, nproc=1)
    assert code == 3 and "consecutive non-finite steps" in out, out[-3000:]
    runs = glob.glob(str(tmp_path / "w" / "wandb" / "offline-run-*"))
    assert len(runs) == 1, runs
    _, config, history, _, exit_code = offline_run(runs[0])
    assert exit_code == 3 and config["wandb_entity"] == "someone"
    assert history  # the steps before the stop were logged

"""The training driver: exact resume after SIGKILL, SIGTERM save-and-exit, and bad input."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import finish, free_port

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--mock-data",
        "--vocab-size", "256", "--norm-type", "mix", "--prores-schedule", "linear",
        "--prores-warmup-steps", "12", "--gpas", "--log-interval", "1", "--eval-iters", "1",
        "--lr-warmup-iters", "2"]


def launch(args, nproc=2, **popen):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if nproc == 1:  # a plain process: its exit code is the driver's own
        cmd = [sys.executable, "-m", "megatron_prores.train", *map(str, args)]
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", "megatron_prores.train", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, **popen)


def run(args, nproc=2):
    p = launch(args, nproc)
    out, _ = finish(p, 600)
    return p.returncode, out


def train_state(ckpt):
    from megatron.core import dist_checkpointing

    it = int(open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read())
    return it, dist_checkpointing.load_common_state_dict(os.path.join(ckpt, f"iter_{it:07d}"))


def final_weights(ckpt):
    """Every tensor (model and optimizer state) of the latest checkpoint under ``ckpt``."""
    from megatron_prores.checkpoint_reader import CheckpointReader

    it, _ = train_state(ckpt)
    reader = CheckpointReader(os.path.join(ckpt, f"iter_{it:07d}"))
    return {k: reader.read(k) for k in reader.tensors}


def assert_same_weights(a, b):
    """The latest checkpoints under ``a`` and ``b`` hold bitwise the same tensors."""
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 10
    for k in wa:
        if isinstance(wa[k], torch.Tensor):
            assert torch.equal(wa[k], wb[k]), k


def kill_tree(p, sig, launcher=True):
    """Signal every rank torchrun started (ranks may sit in sessions of their own), and torchrun."""
    import psutil

    procs = ([psutil.Process(p.pid)] if launcher else []) + psutil.Process(p.pid).children(recursive=True)
    for proc in reversed(procs):
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_for(p, text, timeout=300):
    seen, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = p.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"never saw {text!r}:\n" + "".join(seen[-30:]))


@pytest.mark.stack
def test_resume_after_sigkill_is_bitwise(tmp_path):
    iters = 40
    common = BASE + ["--train-iters", iters, "--tensor-model-parallel-size", "2", "--save-interval", "4",
                     "--keep-last-n", "2"]
    code, out = run(common + ["--save", tmp_path / "full"])
    assert code == 0, out[-3000:]

    p = launch(common + ["--save", tmp_path / "killed"])
    wait_for(p, "saved checkpoint at iteration 8")
    kill_tree(p, signal.SIGKILL)  # every process at once, no clean-up
    p.wait()
    time.sleep(1)
    killed_at = train_state(tmp_path / "killed")[0]
    assert 8 <= killed_at < iters  # killed mid-run, after at least two checkpoints

    code, out = run(common + ["--save", tmp_path / "killed", "--load", tmp_path / "killed"])
    assert code == 0, out[-3000:]
    assert "resumed from" in out and f"at iteration {killed_at}" in out
    assert "took over the lock of a run that is gone (process" in out  # the killed run's lock
    assert sorted(os.listdir(tmp_path / "killed")) == ["iter_0000036", "iter_0000040",
                                                       "latest_checkpointed_iteration.txt"]
    it_a, a = train_state(tmp_path / "full")
    it_b, b = train_state(tmp_path / "killed")
    assert it_a == it_b == iters
    assert a["train_state"]["consumed_samples"] == b["train_state"]["consumed_samples"] == 8 * iters
    assert a["train_state"]["losses"] == b["train_state"]["losses"]  # bitwise, every step
    assert_same_weights(tmp_path / "full", tmp_path / "killed")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_saves_at_step_boundary_and_exits_0(tmp_path, sig):
    args = BASE + ["--train-iters", "200", "--save", tmp_path / "c", "--exit-signal-handler"]
    p = launch(args)
    wait_for(p, "iteration        3/")
    kill_tree(p, sig, launcher=False)  # as srun delivers --signal to every task
    out = finish(p, 300)[0]
    assert p.returncode == 0, out[-3000:]
    assert "exiting at iteration" in out
    it, state = train_state(tmp_path / "c")
    assert 3 <= it < 200 and state["train_state"]["consumed_samples"] == 8 * it
    assert len(state["train_state"]["losses"]) == it


def test_ctrl_c_without_the_handler_is_one_line_and_keeps_the_checkpoints(tmp_path):
    """Ctrl-C without --exit-signal-handler stops at once: one line and exit 130 (it was a 30-line
    KeyboardInterrupt traceback); the checkpoints written before stay, the latest is complete."""
    args = BASE + ["--train-iters", "200", "--save", tmp_path / "c", "--save-interval", "2"]
    # a shell's background job (CI started with &) has SIGINT ignored, which Python then keeps: the
    # driver gets SIGINT's usual action here, as under a terminal
    p = launch(args, nproc=1, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(p, "iteration        3/")
    p.send_signal(signal.SIGINT)
    out = finish(p, 300)[0]
    assert p.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "interrupted (Ctrl-C): stopped without saving" in out, out[-3000:]
    it, state = train_state(tmp_path / "c")
    assert it >= 2 and it % 2 == 0 and len(state["train_state"]["losses"]) == it


def test_exit_duration_saves_and_exits_0(tmp_path):
    args = BASE + ["--train-iters", "100000", "--save", tmp_path / "c", "--exit-duration-in-mins", "0.05"]
    t0 = time.time()
    code, out = run(args, 1)
    assert code == 0 and "exiting at iteration" in out, out[-3000:]
    assert time.time() - t0 < 120
    it, state = train_state(tmp_path / "c")
    assert 1 <= it < 100000 and len(state["train_state"]["losses"]) == it


@pytest.mark.stack
def test_async_save_checkpoints_equal_sync_ones_and_resume_bitwise(tmp_path):
    """--async-save: stop at 4 (written in the background), resume to 8; every loss and the final
    weights equal a run that saved synchronously."""
    args = BASE + ["--train-iters", "8", "--save-interval", "2"]
    code, out = run(args + ["--save", tmp_path / "sync"])
    assert code == 0, out[-3000:]
    code, out = run(args + ["--save", tmp_path / "async", "--async-save", "--exit-interval", "4"])
    assert code == 0 and "writing checkpoint 4 in the background" in out, out[-3000:]
    assert "saved checkpoint at iteration 4" in out.split("writing checkpoint 4")[1]
    assert train_state(tmp_path / "async")[0] == 4
    code, out = run(args + ["--save", tmp_path / "async", "--load", tmp_path / "async", "--async-save"])
    assert code == 0 and "at iteration 4" in out, out[-3000:]
    _, a = train_state(tmp_path / "sync")
    _, b = train_state(tmp_path / "async")
    assert len(a["train_state"]["losses"]) == 8 and a["train_state"]["losses"] == b["train_state"]["losses"]
    assert_same_weights(tmp_path / "sync", tmp_path / "async")
    assert not [d for d in os.listdir(tmp_path / "async") if d.endswith(".tmp")]


def test_resume_into_another_layout(tmp_path):
    code, out = run(BASE + ["--train-iters", "4", "--tensor-model-parallel-size", "2", "--save", tmp_path / "c"])
    assert code == 0, out[-2000:]
    code, out = run(BASE + ["--train-iters", "6", "--pipeline-model-parallel-size", "2",
                            "--override-opt-param-scheduler", "--load", tmp_path / "c", "--save", tmp_path / "c"])
    assert code == 0, out[-3000:]
    assert "at iteration 4" in out
    # the same 2 processes in other roles: their RNG files are not theirs (DP replicas' identical
    # streams would become one dropout mask repeated over the CP ranks' chunks)
    assert ("the checkpoint was written by 2 processes (TP 2, PP 1, CP 1, DP 1), this run has 2 (TP 1, PP 2, "
            "CP 1, DP 1): RNG states start from --seed") in out
    assert train_state(tmp_path / "c")[0] == 6


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path):
    args = BASE + ["--train-iters", "20", "--lr", "1e30", "--lr-warmup-iters", "0", "--clip-grad", "0",
                   "--max-nonfinite-iters", "2", "--save", tmp_path / "c", "--save-interval", "1"]
    code, out = run(args, nproc=1)
    assert code == 3, out[-3000:]
    assert "non-finite loss or gradient, step skipped" in out
    assert "consecutive non-finite steps" in out
    assert "lm loss: nan" in out and "lm loss: 0.000000E+00" not in out  # a skipped step shows as nan
    it, state = train_state(tmp_path / "c")
    assert it >= 1 and os.path.isdir(tmp_path / "c" / f"iter_{it:07d}")
    assert f"not saving at iteration {it + 1}" in out  # nothing written during the non-finite streak
    assert sorted(os.listdir(tmp_path / "c")) == [f"iter_{i:07d}" for i in range(1, it + 1)] + \
        ["latest_checkpointed_iteration.txt"]
    from megatron_prores.checkpoint_reader import CheckpointReader

    reader = CheckpointReader(os.path.join(tmp_path / "c", f"iter_{it:07d}"))
    assert all(torch.isfinite(reader.read(k)).all() for k in reader.tensors if not k.endswith("_extra_state"))


# ---- bad input: one clear line, nothing lost -------------------------------------------------
SMALL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--train-iters", "2",
         "--log-interval", "1", "--eval-iters", "1"]


def one_line_error(code, out, message):
    assert code == 2, out[-3000:]
    errors = [l for l in out.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], out[-3000:]
    assert "Traceback" not in out


def test_bad_data_and_tokenizer_inputs(dataset, tmp_path):
    data = ["--tokenizer-model", dataset / "tok.model"]
    one_line_error(*run(SMALL + data + ["--data-path", tmp_path / "nope"], 1), "nope.bin does not exist")
    # truncated .bin: its .idx describes more bytes
    for ext in (".bin", ".idx"):
        with open(dataset / f"c_text_document{ext}", "rb") as src, open(tmp_path / f"t{ext}", "wb") as dst:
            blob = src.read()
            dst.write(blob[: len(blob) // 2] if ext == ".bin" else blob)
    one_line_error(*run(SMALL + data + ["--data-path", tmp_path / "t"], 1), "truncated or mismatched pair")
    one_line_error(*run(SMALL + data + ["--data-path", dataset / "c_text_document", "--vocab-size", "100"], 1),
                   "the tokenizer has 600 tokens but --vocab-size is 100")
    one_line_error(*run(SMALL + ["--data-path", dataset / "c_text_document"], 1),
                   "--tokenizer-type SentencePieceTokenizer needs --tokenizer-model")
    one_line_error(*run(SMALL + data + ["--data-path", dataset / "c_text_document", "--split", "999,1,0"], 1),
                   "leaves the validation split")
    code, out = run(SMALL + data + ["--data-path", dataset / "c_text_document", "--split", "70,30,0"], 1)
    assert code == 0, out[-3000:]  # the same data, valid: trains
    assert "validation loss at iteration 2" in out


def test_bad_run_configuration(tmp_path):
    mock = SMALL + ["--mock-data", "--vocab-size", "128"]
    one_line_error(*run(mock + ["--global-batch-size", "5"], 1),
                   "--global-batch-size 5 is not divisible by --micro-batch-size 2 x data-parallel size 1")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(*run(mock + ["--save", blocker / "sub"], 1), "is not writable")
    one_line_error(*run(mock + ["--norm-type", "post", "--gpas"], 1), "--gpas with --norm-type post")
    one_line_error(*run(mock + ["--prores-schedule", "linear"], 1), "--prores-warmup-steps 0 is not valid")
    # --load of a different architecture
    code, out = run(mock + ["--save", tmp_path / "c"], 1)
    assert code == 0, out[-3000:]
    one_line_error(*run(mock + ["--hidden-size", "64", "--load", tmp_path / "c"], 1),
                   "holds a different model: hidden_size is 32 there but 64 now, ffn_hidden_size is 128 there "
                   "but 256 now; train it with --hidden-size 32 --ffn-hidden-size 128")
    one_line_error(*run(mock + ["--norm-type", "sandwich", "--load", tmp_path / "c"], 1),
                   "norm_type is 'pre' there but 'sandwich' now; train it with --norm-type pre")
    # what follows from the norm type (Post-LN has no final norm) is not asked for separately
    one_line_error(*run(mock + ["--norm-type", "post", "--load", tmp_path / "c"], 1),
                   "norm_type is 'pre' there but 'post' now, final_norm is True there but False now; train it with "
                   "--norm-type pre")
    one_line_error(*run(mock + ["--tie-embeddings-and-output-weights", "--load", tmp_path / "c"], 1),
                   "tie_embeddings is False there but True now; train it without --tie-embeddings-and-output-weights")
    one_line_error(*run(mock + ["--tie-embeddings-and-output-weights", "--untie-embeddings-and-output-weights"], 1),
                   "--tie-embeddings-and-output-weights and --untie-embeddings-and-output-weights exclude each other")


@pytest.mark.parametrize("mode", [[], ["--async-save"]], ids=["sync", "async"])
def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, mode):
    mnt = tmp_path / "small"
    mnt.mkdir()
    # room for one checkpoint of this model (about 3.9 MB), not two
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill the disk")
    try:
        args = BASE + ["--train-iters", "4", "--save", mnt / "c", "--save-interval", "2"] + mode
        code, out = run(args, 1)
        assert code == 2, out[-3000:]
        assert "saving checkpoint 4" in out and "the previous checkpoint stays the latest" in out
        it, state = train_state(mnt / "c")
        assert it == 2 and len(state["train_state"]["losses"]) == 2
        assert not [d for d in os.listdir(mnt / "c") if d.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(mnt)])


@pytest.mark.stack
def test_distributed_optimizer_resume_is_bitwise(tmp_path):
    """DP=2 with megatron's distributed optimizer: stop at 4 (--exit-interval), resume to 8."""
    args = BASE + ["--train-iters", "8", "--use-distributed-optimizer", "--save-interval", "2",
                   "--keep-last-n", "2"]
    code, out = run(args + ["--save", tmp_path / "full"])
    assert code == 0, out[-3000:]
    code, out = run(args + ["--save", tmp_path / "two", "--exit-interval", "4"])
    assert code == 0 and "exiting at iteration 4" in out, out[-3000:]
    code, out = run(args + ["--save", tmp_path / "two", "--load", tmp_path / "two"])
    assert code == 0 and "at iteration 4" in out, out[-3000:]
    _, a = train_state(tmp_path / "full")
    _, b = train_state(tmp_path / "two")
    assert len(a["train_state"]["losses"]) == 8
    assert a["train_state"]["losses"] == b["train_state"]["losses"]
    assert sorted(d for d in os.listdir(tmp_path / "full") if d.startswith("iter_")) == \
        ["iter_0000006", "iter_0000008"]  # --keep-last-n 2


def checkpoint_model(ckpt, it):
    from megatron_prores.checkpoint_reader import CheckpointReader

    reader = CheckpointReader(os.path.join(ckpt, f"iter_{it:07d}"))
    return {k: reader.read(k) for k in reader.tensors if not k.startswith("optimizer")}


def validation_losses(out):
    return [float(x) for x in re.findall(r"validation loss at iteration \d+ \| lm loss value: (\S+)", out)]


@pytest.mark.stack
def test_overlapped_gradient_reduce_and_parameter_gather(tmp_path):
    """--overlap-grad-reduce --overlap-param-gather (DP=2, distributed optimizer, gradient buckets
    of 3000 elements) against the same run without overlap: every training and validation loss,
    and the weights of the mid-run checkpoint at iteration 4 (the all-gathered parameters reach the
    model in the next forward: evaluation and saving gather them first, else they are one step
    behind); resumed from that checkpoint, the overlapped run goes on bitwise."""
    args = BASE + ["--train-iters", "6", "--use-distributed-optimizer", "--save-interval", "2",
                   "--eval-interval", "3"]  # no evaluation (a forward) before the save at 4
    overlap = ["--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "3000"]
    code, plain = run(args + ["--save", tmp_path / "plain"])
    assert code == 0, plain[-3000:]
    code, out = run(args + overlap + ["--save", tmp_path / "ovl"])
    assert code == 0, out[-3000:]
    _, a = train_state(tmp_path / "plain")
    _, b = train_state(tmp_path / "ovl")
    assert len(a["train_state"]["losses"]) == 6
    # the buckets change the summation order of the gradient norm: the last bits may differ
    assert b["train_state"]["losses"] == pytest.approx(a["train_state"]["losses"], rel=1e-6, abs=0)
    assert len(validation_losses(plain)) == 2
    assert validation_losses(out) == pytest.approx(validation_losses(plain), rel=1e-5, abs=0)
    wa, wb = checkpoint_model(tmp_path / "plain", 4), checkpoint_model(tmp_path / "ovl", 4)
    assert wa.keys() == wb.keys() and len(wa) > 5
    for k in wa:
        assert (wa[k].double() - wb[k].double()).norm() <= 1e-6 * wa[k].double().norm(), k
    code, out = run(args + overlap + ["--load", tmp_path / "ovl", "--ckpt-step", "4", "--save", tmp_path / "resumed"])
    assert code == 0 and "at iteration 4" in out, out[-3000:]
    assert train_state(tmp_path / "resumed")[1]["train_state"]["losses"] == b["train_state"]["losses"]
    # the saved optimizer state is laid out by TP/PP rank and bucket: other ones are refused in one line
    tp2 = args + ["--tensor-model-parallel-size", "2", "--train-iters", "8", "--lr-decay-iters", "6"]
    code, out = run(tp2 + ["--load", tmp_path / "ovl", "--save", tmp_path / "ovl"])
    errors = [l for l in out.splitlines() if l.startswith("error:")]  # torchrun exits 1 after its own report
    assert code == 1 and errors == [
        "error: the checkpoint's distributed-optimizer state is laid out by TP/PP rank and gradient bucket "
        "(megatron-core's dp_reshardable format; only the data-parallel size may change): resume with "
        "--tensor-model-parallel-size 1 and with --overlap-grad-reduce --ddp-bucket-size 3000 as it was saved, "
        "or pass --no-load-optim to load the weights and the schedule's position with a fresh Adam state"], out[-3000:]
    code, out = run(tp2 + ["--load", tmp_path / "ovl", "--save", tmp_path / "ovl", "--no-load-optim"])
    assert code == 0 and "at iteration 6" in out and "the Adam state starts fresh" in out, out[-3000:]


def test_finetune_starts_a_new_run_from_the_weights_and_resumes_its_own(tmp_path):
    """--finetune --load A --save B starts at iteration 0 (samples counted from 0); requeued with
    the same command, it resumes from B's own checkpoints, bitwise with an uninterrupted
    fine-tuning run; a --save holding a fine-tuning run of another checkpoint is refused."""
    pre = BASE + ["--train-iters", "4", "--save", tmp_path / "a"]
    code, out = run(pre, 1)
    assert code == 0, out[-3000:]
    ft = BASE + ["--train-iters", "4", "--lr", "1e-3", "--lr-decay-style", "constant", "--finetune",
                 "--load", tmp_path / "a", "--save-interval", "2"]
    code, out = run(ft + ["--save", tmp_path / "full"], 1)
    assert code == 0 and "--finetune: model weights from" in out and "a new run starts at iteration 0" in out, \
        out[-3000:]
    code, out = run(ft + ["--save", tmp_path / "b", "--exit-interval", "2"], 1)
    assert code == 0 and "exiting at iteration 2" in out, out[-3000:]
    _, b = train_state(tmp_path / "b")
    assert b["train_state"]["iteration"] == 2 and b["train_state"]["consumed_samples"] == 16
    code, out = run(ft + ["--save", tmp_path / "b"], 1)  # the requeued job: the same command
    assert code == 0 and "already holds checkpoints (up to iteration 2): resuming them as this fine-tuning run" \
        in out, out[-3000:]
    assert "resumed from" in out and "at iteration 2" in out
    assert train_state(tmp_path / "b")[1]["train_state"]["losses"] == \
        train_state(tmp_path / "full")[1]["train_state"]["losses"]
    one_line_error(*run(ft + ["--save", tmp_path / "a"], 1), "--finetune starts a new run at iteration 0: give it "
                                                           "a --save other than --load")
    one_line_error(*run(BASE + ["--train-iters", "4", "--finetune"], 1), "--finetune needs --load DIR")
    code, out = run(BASE + ["--train-iters", "4", "--save", tmp_path / "other"], 1)
    assert code == 0, out[-3000:]
    one_line_error(*run(ft + ["--load", tmp_path / "other", "--save", tmp_path / "b"], 1),
                   f"holds a fine-tuning run of {os.path.realpath(tmp_path / 'a')}, not of "
                   f"{os.path.realpath(tmp_path / 'other')}; choose an empty --save for this one")
    # a --save that holds a run not started with --finetune (a pretraining run) is not resumed as one
    one_line_error(*run(ft + ["--save", tmp_path / "other"], 1),
                   f"holds a run not started with --finetune, not a fine-tuning run of {os.path.realpath(tmp_path / 'a')}")


def train_in_process(make, extra):
    """The driver's Trainer ``make(extra)``, trained to its end (or its exit interval) in this process."""
    t = make(extra)
    try:
        assert t.train() == 0
    finally:
        t.close(0)


def bf16_trainer(extra, bf16=True):
    """The driver's Trainer in bf16 on CPU (its GPU check is the submit host's here:
    check_args(this_machine=False)); GPAS gates stay fp32 in the bf16 model."""
    from megatron_prores.arguments import build_parser, check_args
    from megatron_prores.trainer import Trainer

    args = build_parser().parse_args(list(map(str, [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-5", "--mock-data", "--vocab-size", "128",
        "--eval-iters", "0", "--gpas", "--log-interval", "1"] + ["--bf16"] * bf16 + extra)))
    check_args(args, this_machine=False)
    return Trainer(args)


@pytest.mark.stack
@pytest.mark.parametrize("optimizer", [[], ["--use-distributed-optimizer"]], ids=["plain", "distributed"])
def test_bf16_with_fp32_gates_saves_and_resumes_bitwise(tmp_path, single_process, optimizer):
    """A bf16 model with fp32 GPAS gates: megatron-core's optimizers (0.16 and 0.19) fail to save
    it (the plain one numbers its state by the bf16 parameters alone; the distributed one indexes
    mixed groups in another order than it holds them). Saved at 2 and resumed to 5, the losses
    equal the uninterrupted run's bitwise (swapped Adam moments would not)."""
    flags = optimizer + ["--train-iters", "5", "--lr", "3e-3", "--lr-warmup-iters", "0"]
    full = bf16_trainer(flags + ["--save", tmp_path / "full"])
    try:
        assert full.train() == 0
    finally:
        full.close(0)
    part = bf16_trainer(flags + ["--save", tmp_path / "part", "--exit-interval", "2"])
    try:
        assert part.train() == 0
    finally:
        part.close(0)
    rest = bf16_trainer(flags + ["--save", tmp_path / "part", "--load", tmp_path / "part"])
    try:
        assert rest.state.iteration == 2 and rest.train() == 0
    finally:
        rest.close(0)
    a, b = train_state(tmp_path / "full")[1], train_state(tmp_path / "part")[1]
    assert len(a["train_state"]["losses"]) == 5 and a["train_state"]["losses"] == b["train_state"]["losses"]
    wa, wb = checkpoint_model(tmp_path / "full", 5), checkpoint_model(tmp_path / "part", 5)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # (optimizer buckets: padding)


@pytest.mark.parametrize("how", [["--finetune"], ["--no-load-optim"], ["--finetune", "--use-distributed-optimizer"]],
                         ids=["finetune", "no-load-optim", "finetune-distopt"])
def test_bf16_weights_loaded_without_optimizer_state_are_what_the_step_updates(tmp_path, single_process, how):
    """bf16: the optimizer's fp32 main parameters (every step writes the weights back from them)
    must be the loaded weights when no optimizer state is loaded (--finetune, --no-load-optim, a
    Hugging Face import), not the initial ones they were copied from when the optimizer was built.
    One step at LR 1e-5 from the loaded checkpoint moves no weight beyond bf16 rounding. The
    driver's own set-up, step and save on CPU in bf16 (the driver's GPU check is the submit-host
    one here: check_args(this_machine=False))."""
    t = bf16_trainer(["--train-iters", "2", "--lr", "1e-2", "--save", tmp_path / "a"])  # weights far from their init
    try:
        assert t.train() == 0
    finally:
        t.close(0)
    out = tmp_path / "b"
    t = bf16_trainer(["--train-iters", "4", "--load", tmp_path / "a", "--save", tmp_path / "a" if "--finetune" not in how
                 else out, "--override-opt-param-scheduler"] + how)
    try:
        start = t.state.iteration
        assert t.train_step(start).finite
        assert t.checkpointer.save(t)
    finally:
        t.close(0)
    before = checkpoint_model(tmp_path / "a", 2)
    after = checkpoint_model(tmp_path / "a" if "--finetune" not in how else out, start + 1)
    assert before.keys() == after.keys() and len(before) > 5
    for k in before:
        a, b = before[k].float(), after[k].float()
        assert ((b - a).abs() <= a.abs() * 2 ** -7 + 1e-4).all(), (k, (b - a).abs().max().item())


def test_finetune_takes_the_weights_only(tmp_path, single_process):
    """In the driver's own set-up: after --finetune the model holds the checkpoint's weights
    exactly (saved again at once by the driver's checkpointer), the iteration, samples and Adam
    state are fresh, and the LR is the new schedule's start."""
    from megatron_prores.arguments import parse_args
    from megatron_prores.trainer import Trainer

    code, out = run(BASE + ["--train-iters", "3", "--save", tmp_path / "a"], 1)
    assert code == 0, out[-3000:]
    trainer = Trainer(parse_args(list(map(str, BASE + ["--train-iters", "5", "--lr", "1e-3", "--finetune",
                                                       "--load", tmp_path / "a", "--save", tmp_path / "b"]))))
    try:
        assert (trainer.state.iteration, trainer.state.consumed_samples) == (0, 0)
        inner = trainer.optimizer.chained_optimizers if hasattr(trainer.optimizer, "chained_optimizers") \
            else [trainer.optimizer]
        assert all(not opt.optimizer.state for opt in inner)
        assert trainer.scheduler.get_lr(trainer.optimizer.param_groups[0]) == 0.0  # --lr-warmup-iters 2 from 0
        assert trainer.checkpointer.save(trainer)
    finally:
        trainer.close()
    wa, wb = checkpoint_model(tmp_path / "a", 3), checkpoint_model(tmp_path / "b", 0)
    assert wa.keys() == wb.keys() and len(wa) > 5
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.stack
def test_context_parallel_resume_is_bitwise_and_moves_to_another_layout(tmp_path):
    """CP=2 with the distributed optimizer (sharded over the data x context ranks): stop at 4,
    resume to 8 bitwise against an uninterrupted run; then that CP=2 checkpoint continues under
    DP=2 (optimizer state resharded) with the uninterrupted CP=2 run's losses."""
    dp2 = BASE + ["--use-distributed-optimizer", "--save-interval", "4", "--lr-decay-iters", "10"]
    args = dp2 + ["--context-parallel-size", "2"]
    code, out = run(args + ["--train-iters", "10", "--save", tmp_path / "full"])
    assert code == 0, out[-3000:]
    code, out = run(args + ["--train-iters", "8", "--save", tmp_path / "two", "--exit-interval", "4"])
    assert code == 0 and "exiting at iteration 4" in out, out[-3000:]
    code, out = run(args + ["--train-iters", "8", "--save", tmp_path / "two", "--load", tmp_path / "two"])
    assert code == 0 and "at iteration 4" in out, out[-3000:]
    _, a = train_state(tmp_path / "full")
    _, b = train_state(tmp_path / "two")
    assert len(a["train_state"]["losses"]) == 10
    assert a["train_state"]["losses"][:8] == b["train_state"]["losses"]
    code, out = run(dp2 + ["--train-iters", "10", "--load", tmp_path / "two", "--save", tmp_path / "dp2"])
    assert code == 0 and "at iteration 8" in out, out[-3000:]
    _, c = train_state(tmp_path / "dp2")
    assert c["train_state"]["losses"][:8] == b["train_state"]["losses"]
    assert c["train_state"]["losses"][8:] == pytest.approx(a["train_state"]["losses"][8:], rel=1e-5, abs=0)


@pytest.mark.parametrize("order", ["before", "after"])
def test_gate_gradient_clip_with_the_distributed_optimizer(tmp_path, order):
    """DP=2: the distributed optimizer shards the reduced gate gradients over the DP ranks; the
    gate gradient norm (logged each step, before the gate clip) and the whole run equal the plain
    optimizer's, whose ranks each hold the full reduced gradient. With --clip-gate-grad-order
    after, the gate clip runs inside megatron's step, on the shards it hands to Adam."""
    import re

    args = BASE + ["--train-iters", "6", "--save-interval", "6", "--gpas-gate", "sublayer",
                   "--clip-gate-grad", "1e-6", "--clip-gate-grad-order", order]
    norms, losses = {}, {}
    for name, extra in {"plain": [], "distributed": ["--use-distributed-optimizer"]}.items():
        code, out = run(args + extra + ["--save", tmp_path / name])
        assert code == 0, out[-3000:]
        norms[name] = [float(x) for x in re.findall(r"gate grad norm: (\S+)", out)]
        losses[name] = train_state(tmp_path / name)[1]["train_state"]["losses"]
    assert len(norms["plain"]) == 6 and min(norms["plain"][1:]) > 1e-5  # the clip is active (from step 2)
    assert norms["distributed"] == pytest.approx(norms["plain"], rel=1e-5, abs=0)
    assert losses["distributed"] == pytest.approx(losses["plain"], rel=1e-6, abs=0)


def test_gate_gradient_clip(single_process):
    from megatron_prores.trainer import gate_grad_norm as _gate_grad_norm

    gates = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    for g, v in zip(gates, (0.03, -0.04, 0.12)):
        g.main_grad = torch.tensor([v])
    norm = _gate_grad_norm(gates, clip=0.0)  # measure only
    assert norm.item() == pytest.approx(0.13)
    assert [g.main_grad.item() for g in gates] == pytest.approx([0.03, -0.04, 0.12])
    norm = _gate_grad_norm(gates, clip=0.013)  # clip to a tenth
    assert norm.item() == pytest.approx(0.13)
    assert [g.main_grad.item() for g in gates] == pytest.approx([0.003, -0.004, 0.012], rel=1e-4)
    clipped = sum(g.main_grad.item() ** 2 for g in gates) ** 0.5
    assert clipped == pytest.approx(0.013, rel=1e-4)


def test_eod_mask_loss_leaves_out_the_tokens_after_a_document_end(dataset, single_process):
    """--eod-mask-loss (Megatron-LM's): no loss where the input token is the end-of-document token.
    On real tokenized data: the driver's batches mask exactly those positions, and its forward_step
    loss is the mean of the other tokens' cross entropy, computed here from the model's logits."""
    from megatron_prores.arguments import parse_args
    from megatron_prores.trainer import Trainer

    trainer = Trainer(parse_args([
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "256",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-3",
        "--data-path", str(dataset / "c_text_document"), "--tokenizer-model", str(dataset / "tok.model"),
        "--split", "90,10,0", "--eval-iters", "0", "--eod-mask-loss"]))
    try:
        eod = trainer.tokenizer.eod
        for _ in range(500):  # the first batch that holds a document end (the documents are long)
            batch = next(trainer.train_iter)
            at_eod = batch["tokens"] == eod
            if at_eod.any():
                break
        assert at_eod.any() and (~at_eod).any()
        assert torch.equal(batch["loss_mask"], (~at_eod).float())
        chunk = trainer.model[0]
        out, loss_func = trainer.forward_step(iter([batch]), chunk)
        loss, _ = loss_func(out)
        with torch.no_grad():
            logits = chunk(batch["tokens"], batch["position_ids"], None).double()
        per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                      reduction="none").view_as(at_eod)
        want = per_token[~at_eod].mean()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
        assert abs(per_token.mean().item() - want.item()) > 1e-4  # the masked tokens change the mean
    finally:
        trainer.close()


def test_adam_steps_count_from_a_fresh_adam_state(tmp_path, single_process):
    """The distributed optimizer's Adam step count (its bias correction) is not in megatron-core's
    checkpoint: it is restored from the train state's count of steps since the Adam state was last
    fresh. A --no-load-optim resume at 4 (fresh moments) stopped at 6 and resumed to 8 gives the
    losses of the same run uninterrupted, bitwise (with the count taken as iteration - skipped it
    restarted Adam's bias correction at step 6 instead of 2)."""
    from tests.test_recompute import trainer

    flags = ["--use-distributed-optimizer", "--adam-beta2", "0.999", "--train-iters", "8", "--gpas"]

    def train(extra):
        train_in_process(trainer, flags + extra)

    train(["--save", tmp_path / "a", "--exit-interval", "4"])
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    train(["--load", tmp_path / "a", "--save", tmp_path / "a", "--no-load-optim"])
    train(["--load", tmp_path / "b", "--save", tmp_path / "b", "--no-load-optim", "--exit-interval", "6"])
    train(["--load", tmp_path / "b", "--save", tmp_path / "b"])
    a, b = train_state(tmp_path / "a")[1]["train_state"], train_state(tmp_path / "b")[1]["train_state"]
    assert len(a["losses"]) == 8 and a["losses"] == b["losses"]
    assert a["adam_steps"] == b["adam_steps"] == 4


def test_bf16_switch_needs_a_fresh_adam_state(tmp_path, single_process):
    """--bf16 on or off at a resume changes what the optimizer state holds (fp32 main copies of bf16
    weights, or the fp32 weights themselves): refused in one line unless --no-load-optim (it ended
    in a megatron-core traceback)."""
    from megatron_prores.config import ConfigError

    flags = ["--train-iters", "4", "--save", tmp_path / "a"]
    train_in_process(bf16_trainer, flags + ["--exit-interval", "2"])
    with pytest.raises(ConfigError, match=r"^the checkpoint was trained with --bf16 \(its optimizer state is laid out"):
        bf16_trainer(flags + ["--load", tmp_path / "a"], bf16=False).close(0)
    t = bf16_trainer(flags + ["--load", tmp_path / "a", "--no-load-optim"], bf16=False)
    try:
        assert t.state.iteration == 2 and t.state.adam_steps == 0
    finally:
        t.close(0)


def test_a_resume_with_another_length_keeps_the_data_order_or_is_refused(dataset, tmp_path, single_process):
    """megatron-core shuffles a dataset over as many epochs as the run needs: raising --train-iters
    at a resume gave another order over a dataset smaller than the run (samples repeated and skipped,
    silently; found by an adversarial run). Here ~126 training samples of 512 tokens, 8 per step:
    within the first epoch a longer run continues the order (its losses equal an uninterrupted run's,
    bitwise); past it, the resume is refused in one line, unless --override-data-flags."""
    from megatron_prores.arguments import parse_args
    from megatron_prores.config import ConfigError
    from megatron_prores.trainer import Trainer

    def make(extra):
        return Trainer(parse_args(list(map(str, [
            "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "512",
            "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "1e-3", "--lr-decay-iters", "60",
            "--data-path", dataset / "c_text_document", "--tokenizer-model", dataset / "tok.model",
            "--split", "90,10,0", "--eval-iters", "1", "--log-interval", "1"] + extra))))

    train_in_process(make, ["--train-iters", "6", "--save", tmp_path / "whole"])
    train_in_process(make, ["--train-iters", "4", "--save", tmp_path / "c"])
    train_in_process(make, ["--train-iters", "6", "--save", tmp_path / "c", "--load", tmp_path / "c"])
    assert train_state(tmp_path / "c")[1]["train_state"]["losses"] == \
        train_state(tmp_path / "whole")[1]["train_state"]["losses"]
    longer = ["--train-iters", "40", "--save", tmp_path / "c", "--load", tmp_path / "c"]  # 320 samples: 3 epochs
    with pytest.raises(ConfigError, match=r"^this run's length \(--train-iters 40: 320 samples\) makes megatron-core "
                                          r"shuffle the training data over another number of epochs than the "
                                          r"checkpoint's run \(48 samples\)"):
        make(longer).close(0)
    t = make(longer + ["--override-data-flags", "--exit-interval", "7"])
    try:
        assert t.train() == 0 and t.state.iteration == 7
    finally:
        t.close(0)


@pytest.mark.parametrize("optimizer", [[], ["--use-distributed-optimizer"]], ids=["plain", "distributed"])
def test_adam_flags_given_at_a_resume_apply_from_there(tmp_path, single_process, capsys, optimizer):
    """--adam-beta1/--adam-beta2/--adam-eps at a resume: the loaded optimizer state brought the
    checkpoint's values back and the flags were ignored without a word (found by an adversarial
    run). The flags now apply from the resume on, said in one line: unchanged, the resume is bitwise
    the uninterrupted run; changed, every group holds the flags' values and the losses after the
    resume's first update differ while those before it are the same."""
    from tests.test_recompute import trainer

    flags = ["--train-iters", "6", "--gpas"] + optimizer

    def losses(d):
        return train_state(d)[1]["train_state"]["losses"]

    train_in_process(trainer, flags + ["--save", tmp_path / "whole"])
    train_in_process(trainer, flags + ["--save", tmp_path / "a", "--exit-interval", "3"])
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()
    train_in_process(trainer, flags + ["--save", tmp_path / "a", "--load", tmp_path / "a"])
    assert "Adam from the flags" not in capsys.readouterr().out
    assert losses(tmp_path / "a") == losses(tmp_path / "whole")
    t = trainer(flags + ["--save", tmp_path / "b", "--load", tmp_path / "b", "--adam-eps", "1e-3",
                         "--adam-beta2", "0.9"])
    try:
        groups = [g for opt in getattr(t.optimizer, "chained_optimizers", [t.optimizer])
                  for g in opt.optimizer.param_groups]
        assert groups and all(g["betas"] == (0.9, 0.9) and g["eps"] == 1e-3 for g in groups)
        assert ("Adam from the flags, not the checkpoint: betas (0.9, 0.95) -> (0.9, 0.9), eps 1e-08 -> 0.001 "
                "(the moments are kept)") in capsys.readouterr().out
        assert t.train() == 0
    finally:
        t.close(0)
    changed, whole = losses(tmp_path / "b"), losses(tmp_path / "whole")
    # step 4's loss is computed with the weights of step 3, before the first update with the new values
    assert changed[:4] == whole[:4] and all(x != y for x, y in zip(changed[4:], whole[4:]))


def test_the_first_log_line_after_a_resume_averages_the_whole_window(tmp_path, single_process, capsys):
    """With --log-interval 3 a run stopped at 5 and resumed logged at 6 the loss of step 6 alone,
    where the uninterrupted run logs the mean of steps 4-6 (found by an adversarial run): the window
    under way is checkpointed. Every logged loss of the resumed run equals the uninterrupted run's."""
    import re

    from tests.test_recompute import trainer

    flags = ["--train-iters", "9", "--log-interval", "3", "--gpas"]

    def logged(out):
        return dict(re.findall(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: (\S+)", out))

    capsys.readouterr()
    train_in_process(trainer, flags + ["--save", tmp_path / "whole"])
    whole = logged(capsys.readouterr().out)
    train_in_process(trainer, flags + ["--save", tmp_path / "a", "--exit-interval", "5"])
    first = logged(capsys.readouterr().out)
    train_in_process(trainer, flags + ["--save", tmp_path / "a", "--load", tmp_path / "a"])
    second = logged(capsys.readouterr().out)
    assert sorted(whole) == ["3", "6", "9"] and sorted(first) == ["3"] and sorted(second) == ["6", "9"]
    assert second == {k: whole[k] for k in ("6", "9")} and first["3"] == whole["3"]

"""The driver itself on one device: a bf16 run with ProRes + GPAS (compiled residual op, SDPA) and
its checkpoints; the losses after each resume are compared with the uninterrupted run's, bitwise:
- sync: the uninterrupted run's own step-SAVE_AT checkpoint (written synchronously), resumed;
- async: a run with --async-save, killed with SIGKILL a few steps after its step-SAVE_AT
  checkpoint was complete, resumed (the dead run's lock is taken over).
Four processes in all.

    python benchmarks/gpu/driver_resume.py --out DIR           # GPU: ~125M shape, 30 steps
    python benchmarks/gpu/driver_resume.py --out DIR --toy     # CPU rehearsal at toy size

Writes DIR/<device>-<date>-driver-resume.json (and .log, every process's output) after each run,
so a wall-clock limit still leaves what was measured. Exit code 0 when every check held.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shape_flags(toy: bool) -> list:
    if toy:
        shape = ["--num-layers", 2, "--hidden-size", 64, "--num-attention-heads", 4, "--num-query-groups", 2,
                 "--ffn-hidden-size", 172, "--seq-length", 64, "--micro-batch-size", 2, "--global-batch-size", 4,
                 "--vocab-size", 512]
    else:  # ~125M (GPT-2 small widths, Llama-style GQA), bf16 on megatron-core's Float16Module
        shape = ["--num-layers", 12, "--hidden-size", 768, "--num-attention-heads", 12, "--num-query-groups", 4,
                 "--ffn-hidden-size", 2048, "--seq-length", 1024, "--micro-batch-size", 8,
                 "--global-batch-size", 32, "--vocab-size", 32000, "--bf16"]
    return shape + ["--max-position-embeddings", shape[shape.index("--seq-length") + 1], "--mock-data",
                    "--lr", "6e-4", "--lr-warmup-iters", 5, "--lr-decay-style", "cosine", "--min-lr", "6e-5",
                    "--prores-schedule", "linear", "--prores-warmup-steps", 20, "--gpas",
                    "--log-interval", 1, "--eval-iters", 0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runs:
    def __init__(self, log_path):
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1",
                    "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def launch(self, flags):
        env = {**self.env, "MASTER_PORT": str(free_port())}
        cmd = [sys.executable, "-m", "megatron_prores.train", *map(str, flags)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True, cwd=ROOT)

    def log(self, what, text):
        with open(self.log_path, "a") as f:
            f.write(f"\n===== {what}\n{text}\n")

    def run(self, what, flags, timeout=300):
        t = time.perf_counter()
        p = self.launch(flags)
        try:
            out = p.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out = p.communicate()[0] + "\n(timed out)"
        self.log(what, out)
        return p.returncode, out, time.perf_counter() - t

    def run_and_kill(self, what, flags, after: str, then_iteration: int, timeout=300):
        """Start a run, wait for the line ``after``, then for iteration ``then_iteration`` to be
        logged, and kill -9 the process group (no clean-up of any kind)."""
        p = self.launch(flags)
        seen, t0, state = [], time.time(), 0
        while time.time() - t0 < timeout:
            line = p.stdout.readline()
            if not line:
                break
            seen.append(line)
            if state == 0 and after in line:
                state = 1
            elif state == 1 and f" iteration {then_iteration:8d}/" in line:
                os.killpg(p.pid, signal.SIGKILL)
                state = 2
                break
        if state != 2:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        self.log(what, "".join(seen) + f"\n(killed with SIGKILL: {state == 2})")
        return state == 2, "".join(seen)


def last_error(out: str):
    """The driver's one-line error, else the last '...Error: ...' line of a traceback."""
    lines = [l.split("]: ", 1)[-1].strip() for l in out.splitlines()]
    return next((l for l in reversed(lines) if l.startswith("error:") or "Error: " in l), None)


def train_state(ckpt):
    from megatron.core import dist_checkpointing

    it = int(open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read())
    return it, dist_checkpointing.load_common_state_dict(os.path.join(ckpt, f"iter_{it:07d}"))["train_state"]


def weights(ckpt):
    sys.path.insert(0, ROOT)
    from megatron_prores.checkpoint_reader import CheckpointReader

    it = int(open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read())
    reader = CheckpointReader(os.path.join(ckpt, f"iter_{it:07d}"))
    return {k: reader.read(k) for k in reader.tensors}


def compare(a_dir, b_dir, from_iter):
    """Losses from ``from_iter`` on, and every checkpointed tensor, of two finished runs."""
    _, a = train_state(a_dir)
    _, b = train_state(b_dir)
    la, lb = a["losses"][from_iter:], b["losses"][from_iter:]
    diffs = [abs(x - y) for x, y in zip(la, lb)]
    wa, wb = weights(a_dir), weights(b_dir)
    unequal = [k for k in wa if isinstance(wa[k], torch.Tensor) and not torch.equal(wa[k], wb.get(k))]
    max_w = max((float((wa[k].double() - wb[k].double()).abs().max()) for k in unequal), default=0.0)
    return {"losses_after_resume_bitwise": la == lb and len(la) == len(lb) > 0,
            "max_abs_loss_difference": max(diffs, default=None), "tensors": len(wa),
            "tensors_not_bitwise_equal": len(unequal), "max_abs_tensor_difference": max_w}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--toy", action="store_true", help="toy shape (CPU rehearsal)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--save-at", type=int, default=20)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dev = torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "cpu"
    stamp = f"{dev}-{datetime.date.today().isoformat()}"
    path = os.path.join(args.out, f"{stamp}-driver-resume.json")
    runs = Runs(os.path.join(args.out, f"{stamp}-driver-resume.log"))
    work = tempfile.mkdtemp(prefix="driver-resume-")
    base = shape_flags(args.toy) + ["--train-iters", args.iters, "--save-interval", args.save_at]
    res = {"device": dev, "flags": " ".join(map(str, base)), "runs": {}, "checks": {}}

    def write():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    def done(name, code, out, secs):
        lines = [l for l in out.splitlines() if l.startswith(" iteration ")]
        res["runs"][name] = {"exit": code, "seconds": round(secs, 1), "last_lines": lines[-2:],
                             "error": last_error(out) if code else None}
        print(f"{name}: exit {code} in {secs:.0f} s" + (f" ({res['runs'][name]['error']})" if code else ""),
              flush=True)
        write()
        return code == 0

    full = os.path.join(work, "full")
    if not done("uninterrupted", *runs.run("uninterrupted", base + ["--save", full])):
        return 1
    _, st = train_state(full)
    losses = st["losses"]
    k = max(1, len(losses) // 6)
    res["losses"] = losses
    res["checks"]["loss_falls"] = sum(losses[-k:]) / k < sum(losses[:k]) / k
    print(f"losses: first {losses[0]:.4f}, last {losses[-1]:.4f}", flush=True)
    write()

    ok = res["checks"]["loss_falls"]
    # sync: the uninterrupted run's own step-SAVE_AT checkpoint (written synchronously), alone in a
    # run directory of its own, resumed; async: a run that writes in the background, killed with -9
    # a few steps after its step-SAVE_AT checkpoint was complete, resumed
    sync_dir = os.path.join(work, "sync")
    os.makedirs(sync_dir)
    shutil.copytree(os.path.join(full, f"iter_{args.save_at:07d}"), os.path.join(sync_dir, f"iter_{args.save_at:07d}"))
    with open(os.path.join(sync_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(args.save_at))
    async_dir = os.path.join(work, "async")
    t = time.perf_counter()
    killed, out = runs.run_and_kill("async (killed)", base + ["--async-save", "--save", async_dir],
                                    f"saved checkpoint at iteration {args.save_at}", min(args.save_at + 3, args.iters - 1))
    res["runs"]["async_killed"] = {"killed_after_save": killed, "seconds": round(time.perf_counter() - t, 1),
                                   "background_write_logged": "in the background" in out}
    write()
    if not killed:
        print("async: never saw its checkpoint complete and the next iterations; see the log", flush=True)
        ok = False
    for mode, d, extra in (("sync", sync_dir, []), ("async", async_dir, ["--async-save"])):
        if mode == "async" and not killed:
            continue
        if not done(f"{mode}_resumed", *runs.run(f"{mode} (resumed)", base + extra + ["--save", d, "--load", d])):
            ok = False
            continue
        c = compare(full, d, args.save_at)
        res["checks"][mode] = c
        print(f"{mode}: losses after resume bitwise equal: {c['losses_after_resume_bitwise']} (max diff "
              f"{c['max_abs_loss_difference']}); tensors not bitwise equal {c['tensors_not_bitwise_equal']}"
              f"/{c['tensors']} (max diff {c['max_abs_tensor_difference']:.3g})", flush=True)
        ok = ok and c["losses_after_resume_bitwise"]
        write()
    shutil.rmtree(work, ignore_errors=True)
    res["all_checks_held"] = ok
    write()
    print(f"written {path}; every check held: {ok}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

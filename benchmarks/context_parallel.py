"""Context parallelism through the driver's own step: time, activation memory and load balance
per rank of Trainer.train_step at one long sequence, CP = 1 against CP = 2 (or --cp sizes).

    python benchmarks/context_parallel.py                       # CPU default: seq 4096, CP 1 and 2
    python benchmarks/context_parallel.py --seq-length 8192 --cp 1 2 4 --steps 3

Each CP size runs in its own torchrun job of CP processes (CP=1: one process) on the same
machine, with the same threads in all (the driver gives each of N local processes 1/N of the
cores), one micro batch of one sequence per step, ProRes (mid-warmup) + GPAS, --mock-data.
Per rank it reports:
  step ms       median of --steps timed train_step calls after one warm-up step
  tokens/s      the sequence's tokens / step time (all CP ranks together work on one sequence)
  saved MiB     activations the step keeps for backward: the unique storages autograd saves
                during the step (saved-tensor hooks), parameters excluded; the ideal under CP=N
                is 1/N of CP=1 plus each rank's copy of the whole sequence's K/V
  peak RSS GiB  the process's max resident set (weights, optimizer, allocator and all)
Results: benchmarks/results/<device>-<date>-context-parallel.json and the table, printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(a, cp: int) -> list:
    f = ["--num-layers", a.num_layers, "--hidden-size", a.hidden_size, "--num-attention-heads", a.heads,
         "--num-query-groups", a.groups, "--seq-length", a.seq_length, "--max-position-embeddings", a.seq_length,
         "--micro-batch-size", 1, "--global-batch-size", 1, "--train-iters", a.steps + 1, "--lr", "3e-4",
         "--lr-decay-style", "constant", "--mock-data", "--vocab-size", 4096, "--log-interval", 1,
         "--eval-iters", 0, "--prores-schedule", "linear", "--prores-warmup-steps", 10 ** 6, "--gpas",
         "--context-parallel-size", cp]
    if torch.cuda.is_available():
        f.append("--bf16")
    return [str(x) for x in f]


class SavedActivations:
    """Bytes of the unique non-parameter storages autograd saves for backward while active."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for m in model for p in m.parameters()}
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.params and s.data_ptr() not in self.seen:
            self.seen.add(s.data_ptr())
            self.bytes += s.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def worker(argv, out_path):
    """One rank of a torchrun job: the driver's Trainer, timing its train_step."""
    import torch.distributed as dist

    from megatron_prores.arguments import parse_args
    from megatron_prores.metrics import peak_memory_gib
    from megatron_prores.trainer import Trainer

    trainer = Trainer(parse_args(argv))
    times, saved = [], 0
    for step in range(trainer.args.train_iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        probe = SavedActivations(trainer.model)
        t0 = time.perf_counter()
        with probe.hooks():
            trainer.train_step(step)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
        saved = probe.bytes
    row = {"rank": dist.get_rank(), "step_ms": statistics.median(times[1:]), "times_ms": times[1:],
           "saved_mib": saved / 2 ** 20, "peak_gib": peak_memory_gib(), "threads": torch.get_num_threads()}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    trainer.close()


def run_cp(a, cp: int, tmp: str, log) -> list:
    out = os.path.join(tmp, f"cp{cp}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cp}", f"--master-port={free_port()}",
           os.path.abspath(__file__), "--worker", json.dumps([flags(a, cp), out])]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    log.write(f"\n===== CP={cp}\n$ {' '.join(cmd)}\n{proc.stdout}\n----- stderr\n{proc.stderr}\n")
    if proc.returncode != 0 or not os.path.exists(out):
        tail = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()][-1:]
        return [{"error": (tail or ["(no output)"])[0][-300:]}]
    with open(out) as f:
        return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(*json.loads(a.worker))
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU-{platform.machine()}"
    date = datetime.date.today().isoformat()
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    stem = os.path.join(HERE, "results", f"{device.replace(' ', '-')}-{date}-context-parallel")
    results = {"device": device, "date": date, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
               "shape": {k: getattr(a, k) for k in ("seq_length", "num_layers", "hidden_size", "heads", "groups")},
               "steps": a.steps, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp, open(stem + ".log", "w") as log:
        for cp in a.cp:
            results["runs"][str(cp)] = run_cp(a, cp, tmp, log)
            with open(stem + ".json", "w") as f:
                json.dump(results, f, indent=1)
    base = results["runs"].get("1", [{}])[0]
    print(f"context parallelism, driver train_step, seq {a.seq_length}, {a.num_layers} layers x {a.hidden_size}, "
          f"{results['cores']} cores, {device}")
    print(f"{'CP':>3} {'rank':>4} {'threads':>7} {'step ms':>9} {'tokens/s':>9} {'saved MiB':>10} {'vs CP=1':>8} "
          f"{'peak RSS GiB':>12}")
    for cp, rows in results["runs"].items():
        for r in rows:
            if "error" in r:
                print(f"{cp:>3} error: {r['error']}")
                continue
            rel = f"{r['saved_mib'] / base['saved_mib']:.3f}" if base.get("saved_mib") else "-"
            print(f"{cp:>3} {r['rank']:>4} {r['threads']:>7} {r['step_ms']:>9.0f} "
                  f"{a.seq_length / r['step_ms'] * 1000:>9.0f} {r['saved_mib']:>10.1f} {rel:>8} {r['peak_gib']:>12.2f}")
    print(f"results: {stem}.json")


if __name__ == "__main__":
    main()

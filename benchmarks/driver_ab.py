"""Step time of the training driver at two commits, as a user sees it: A/B in one run on one machine.

    python benchmarks/driver_ab.py --rev 2f5419e                 # that commit vs the working tree
    python benchmarks/driver_ab.py --rev 2f5419e --variant prores_mid --rounds 3 --steps 40

Each side runs ``python -m megatron_prores.train`` from its own tree (the other commit from a
detached ``git worktree`` under --worktree-dir, PYTHONPATH set to it) with the same flags: the
CPU shape of benchmarks/step_time.py, mock data, --log-interval 1. The time of a step is the
"elapsed time per iteration (ms)" of the driver's own log line (a format both commits share);
the first --warmup steps are dropped. Beside it, the CPU time per step: the process's CPU time of
the run minus that of a --warmup-step run, over the steps between (other load on a shared machine
disturbs it far less than wall time; one thread per run by default). The sides alternate A, B, A,
B, ... for --rounds rounds, so slow drift hits both; each figure is the median over rounds, with
the ratio B/A. Results: printed, and as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from step_time import SHAPES, driver_flags  # noqa: E402  (one definition of the shape and flags)

STEP_MS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*elapsed time per iteration \(ms\): ([0-9.]+)")


def worktree(rev: str, parent: str) -> str:
    sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    path = os.path.join(parent, f"megatron-prores-{sha}")
    if not os.path.isdir(path):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, sha], check=True,
                       capture_output=True)
    return path


def run_driver(tree: str, flags, threads: int):
    """(the driver's stdout, CPU seconds of the process) of one run from ``tree``."""
    env = {**os.environ, "PYTHONPATH": tree, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-m", "megatron_prores.train", *flags], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=1800)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"error: the driver in {tree} failed:\n{(out.stdout + out.stderr)[-3000:]}")
    return out.stdout, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def measure(tree: str, flags, short_flags, steps: int, warmup: int, threads: int) -> tuple:
    """(median wall ms of the steps after ``warmup``, CPU ms per step): the CPU time of a
    ``steps`` run minus that of a ``warmup`` run (start-up, compile, first steps) over the steps
    between. CPU time is what other load on the machine disturbs least (with one thread)."""
    out, cpu_long = run_driver(tree, flags, threads)
    times = [float(ms) for it, ms in STEP_MS.findall(out) if int(it) > warmup]
    if not times:
        raise SystemExit(f"error: no step times in the output of {tree}")
    _, cpu_short = run_driver(tree, short_flags, threads)
    return statistics.median(times), 1000 * (cpu_long - cpu_short) / (steps - warmup)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", required=True, help="side A: a commit; side B: the working tree")
    p.add_argument("--variant", default="prores_mid", choices=["megatron", "prores_mid", "prores_done"])
    p.add_argument("--shape", default="cpu", choices=list(SHAPES))
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--steps", type=int, default=40, help="steps per run (timed: those after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (1: least disturbed)")
    p.add_argument("--worktree-dir", default="/tmp")
    p.add_argument("--out", default=None, help="JSON file for the results")
    a = p.parse_args(argv)

    shape = SHAPES[a.shape]
    flags = driver_flags(a.variant, shape, a.micro_batch_size, a.microbatches, a.steps, "")
    short = driver_flags(a.variant, shape, a.micro_batch_size, a.microbatches, a.warmup, "")
    sides = {"A": (a.rev, worktree(a.rev, a.worktree_dir)), "B": ("working tree", ROOT)}
    wall, cpu = {k: [] for k in sides}, {k: [] for k in sides}
    t0 = time.time()
    for r in range(a.rounds):
        for k, (name, tree) in sides.items():
            w, c = measure(tree, flags, short, a.steps, a.warmup, a.threads)
            wall[k].append(w)
            cpu[k].append(c)
            print(f"round {r + 1}/{a.rounds} {k} ({name}): median step {w:.1f} ms wall, {c:.1f} ms CPU", flush=True)
    result = {"variant": a.variant, "shape": a.shape, "flags": flags, "threads": a.threads,
              "A": sides["A"][0], "B": sides["B"][0], "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    for what, rounds in (("wall", wall), ("cpu", cpu)):
        med = {k: statistics.median(v) for k, v in rounds.items()}
        spread = {k: (max(v) - min(v)) / med[k] for k, v in rounds.items()}
        result[what] = {"rounds_ms": rounds, "median_ms": med, "round_spread": spread,
                        "ratio_B_over_A": med["B"] / med["A"]}
        print(f"{what:>4}: A {a.rev} {med['A']:.1f} ms/step (rounds {', '.join(f'{x:.1f}' for x in rounds['A'])}); "
              f"B working tree {med['B']:.1f} ms/step (rounds {', '.join(f'{x:.1f}' for x in rounds['B'])}); "
              f"B/A = {med['B'] / med['A']:.3f}; round spread A {100 * spread['A']:.1f}%, B {100 * spread['B']:.1f}%")
    result["seconds"] = time.time() - t0
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""Step time of the training driver at two commits, as a user sees it: A/B in one run on one machine.

    python benchmarks/driver_ab.py --rev 2f5419e                 # that commit vs the working tree
    python benchmarks/driver_ab.py --rev 2f5419e --variant prores_mid --rounds 3 --steps 40

Each side runs ``python -m megatron_prores.train`` from its own tree (the other commit from a
detached ``git worktree`` under --worktree-dir, PYTHONPATH set to it) with the same flags: the
CPU shape of benchmarks/step_time.py, mock data, --log-interval 1. The time of a step is the
"elapsed time per iteration (ms)" of the driver's own log line (a format both commits share);
the first --warmup steps are dropped. The sides alternate A, B, A, B, ... for --rounds rounds,
so slow drift of the machine hits both; the result is the median over rounds of each round's
median step, and the ratio B/A. Results: printed, and as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def step_times(tree: str, flags, warmup: int) -> list:
    env = {**os.environ, "PYTHONPATH": tree, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", str(os.cpu_count()))}
    out = subprocess.run([sys.executable, "-m", "megatron_prores.train", *flags], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"error: the driver in {tree} failed:\n{(out.stdout + out.stderr)[-3000:]}")
    times = [float(ms) for it, ms in STEP_MS.findall(out.stdout) if int(it) > warmup]
    if not times:
        raise SystemExit(f"error: no step times in the output of {tree}")
    return times


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
    p.add_argument("--worktree-dir", default="/tmp")
    p.add_argument("--out", default=None, help="JSON file for the results")
    a = p.parse_args(argv)

    flags = driver_flags(a.variant, SHAPES[a.shape], a.micro_batch_size, a.microbatches, a.steps, "")
    sides = {"A": (a.rev, worktree(a.rev, a.worktree_dir)), "B": ("working tree", ROOT)}
    rounds = {k: [] for k in sides}
    t0 = time.time()
    for r in range(a.rounds):
        for k, (name, tree) in sides.items():
            times = step_times(tree, flags, a.warmup)
            rounds[k].append(statistics.median(times))
            print(f"round {r + 1}/{a.rounds} {k} ({name}): median step {rounds[k][-1]:.1f} ms over {len(times)} "
                  f"steps", flush=True)
    med = {k: statistics.median(v) for k, v in rounds.items()}
    spread = {k: (max(v) - min(v)) / med[k] for k, v in rounds.items()}
    result = {"variant": a.variant, "shape": a.shape, "flags": flags, "rounds": rounds, "median_ms": med,
              "round_spread": spread, "ratio_B_over_A": med["B"] / med["A"],
              "A": sides["A"][0], "B": sides["B"][0], "cpus": os.cpu_count(), "seconds": time.time() - t0,
              "date": time.strftime("%Y-%m-%d")}
    print(f"A {a.rev}: {med['A']:.1f} ms/step (rounds {', '.join(f'{x:.1f}' for x in rounds['A'])}); "
          f"B working tree: {med['B']:.1f} ms/step (rounds {', '.join(f'{x:.1f}' for x in rounds['B'])}); "
          f"B/A = {med['B'] / med['A']:.3f}; round-to-round spread A {100 * spread['A']:.1f}%, "
          f"B {100 * spread['B']:.1f}%")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

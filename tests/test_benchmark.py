"""benchmarks/step_time.py times the driver's own Trainer.train_step (no log parsing)."""

import importlib.util
import json
import os
import sys

from tests.conftest import run_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_step_time():
    spec = importlib.util.spec_from_file_location("step_time", os.path.join(ROOT, "benchmarks", "step_time.py"))
    step_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_time)
    return step_time


def test_step_time_worker_times_the_trainers_step(tmp_path):
    """The worker runs the driver's single-process start (no MASTER_ADDR: an in-process store, no
    port that another process could take first, as happened on the H200 on 2026-11-30)."""
    step_time = load_step_time()
    flags = step_time.driver_flags("prores_mid", (2, 32, 4, 2, 48, 16), 2, 2, 5, "")
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = run_tree([sys.executable, os.path.join(ROOT, "benchmarks", "step_time.py"), "--driver-worker",
                  json.dumps([flags, 2, str(out)])], 600, env={**env, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert len(res["times_ms"]) == 3 and all(t > 0 for t in res["times_ms"]) and res["peak_gib"] > 0


def test_step_time_ratio_interval_covers_the_noise_of_the_medians():
    """The 95% interval of a ratio of medians: steps drawn from one distribution give an interval
    around 1 whose width is that of the steps' spread; a 3% slower variant gives one around 1.03
    that excludes 1; a speed ratio (invert) is the reciprocal."""
    import random
    import statistics

    st = load_step_time()
    rng = random.Random(7)
    a = [570 + rng.gauss(0, 5) for _ in range(20)]
    b = [570 + rng.gauss(0, 5) for _ in range(20)]
    lo, hi = st.ratio_interval(a, b)
    assert lo < statistics.median(a) / statistics.median(b) < hi and lo < 1 < hi and hi - lo < 0.03
    slow = [1.03 * t for t in b]
    lo, hi = st.ratio_interval(slow, a)
    assert 1 < lo < 1.03 < hi < 1.06
    ilo, ihi = st.ratio_interval(a, slow, invert=True)
    assert abs(ilo - lo) < 0.01 and abs(ihi - hi) < 0.01


def test_step_time_runner_does_not_start_a_variant_the_budget_cannot_cover(tmp_path):
    """A variant cut off by the budget measured nothing and took its time (H200, 2026-11-30: 27 s):
    with less time left than the variants so far took, the next one is not started."""
    st = load_step_time()
    runner = st.Runner(str(tmp_path / "log"), budget_s=60)
    proc, err = runner.run([sys.executable, "-c", "import time; time.sleep(2)"], "sleeper")
    assert err is None and proc.returncode == 0 and 2 <= runner.durations[0] < 30
    runner.durations = [100.0]  # the variants so far took 100 s each; 60 s are left
    proc, err = runner.run([sys.executable, "-c", "raise SystemExit(3)"], "not started")
    assert proc is None and err.startswith("time budget used up") and "~90 s" in err
    runner.durations = [20.0]
    proc, err = runner.run([sys.executable, "-c", "raise SystemExit(3)"], "started")
    assert err is None and proc.returncode == 3 and runner.durations == [20.0]  # failures do not count


def test_rope_benchmark_runs_and_records(tmp_path, capsys):
    """benchmarks/rope.py at a tiny size: both variants timed and recorded; the fused RoPE saves
    only the cos and sin tables of the angles, shared by its calls (megatron-core's eager one keeps
    a cos and a sin per call)."""
    import json

    from benchmarks.rope import main

    main(["--seq-length", "16", "--micro-batch-size", "1", "--heads", "4", "--groups", "2", "--head-dim", "8",
          "--steps", "2", "--rounds", "1", "--out", str(tmp_path)])
    assert "per micro batch of a 24-layer model" in capsys.readouterr().out
    [path] = tmp_path.iterdir()
    rows = json.load(open(path))["variants"]
    assert set(rows) == {"megatron eager", "fused (compiled)"} and all(r["device_ms"] > 0 for r in rows.values())
    assert rows["fused (compiled)"]["saved_mib"] == 2 * 16 * 8 * 4 / 2**20  # cos, sin [16, 1, 1, 8] fp32, once
    assert rows["megatron eager"]["saved_mib"] > rows["fused (compiled)"]["saved_mib"]

"""benchmarks/step_time.py times the driver's own Trainer.train_step (no log parsing)."""

import importlib.util
import json
import os
import sys

from tests.conftest import run_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_time_worker_times_the_trainers_step(tmp_path):
    spec = importlib.util.spec_from_file_location("step_time", os.path.join(ROOT, "benchmarks", "step_time.py"))
    step_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_time)
    flags = step_time.driver_flags("prores_mid", (2, 32, 4, 2, 48, 16), 2, 2, 5, "")
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = run_tree([sys.executable, os.path.join(ROOT, "benchmarks", "step_time.py"), "--driver-worker",
                  json.dumps([flags, 2, str(out)])], 600, env={**env, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert len(res["times_ms"]) == 3 and all(t > 0 for t in res["times_ms"]) and res["peak_gib"] > 0


def test_rope_benchmark_runs_and_records(tmp_path, capsys):
    """benchmarks/rope.py at a tiny size: both variants timed and recorded; the fused RoPE saves
    only the angles for backward (megatron-core's eager one keeps a cos and a sin per call)."""
    import json

    from benchmarks.rope import main

    main(["--seq-length", "16", "--micro-batch-size", "1", "--heads", "4", "--groups", "2", "--head-dim", "8",
          "--steps", "2", "--rounds", "1", "--out", str(tmp_path)])
    assert "per micro batch of a 24-layer model" in capsys.readouterr().out
    [path] = tmp_path.iterdir()
    rows = json.load(open(path))["variants"]
    assert set(rows) == {"megatron eager", "fused (compiled)"} and all(r["device_ms"] > 0 for r in rows.values())
    assert rows["fused (compiled)"]["saved_mib"] == 16 * 8 * 4 / 2**20  # freqs [16, 1, 1, 8] fp32, once
    assert rows["megatron eager"]["saved_mib"] > rows["fused (compiled)"]["saved_mib"]

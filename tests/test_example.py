"""The README's main command trains: loss falls, ProRes and GPAS state is reported."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_cpu_training_loss_falls():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "tiny_cpu_train.py"),
         "--train-iters", "40", "--log-interval", "10", "--prores-warmup-steps", "20"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"lm loss: ([0-9.]+)", out.stdout)]
    assert len(losses) == 4, out.stdout
    assert losses[-1] < losses[0] - 0.3, losses
    assert "per-block ProRes values: [1.0, 1.0, 1.0, 1.0]" in out.stdout  # warmup 20 < 40 steps
    assert "per-block GPAS scales" in out.stdout


def test_bad_flag_value_is_one_line():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "tiny_cpu_train.py"), "--norm-type", "postln"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert out.returncode != 0
    assert "error: --norm-type 'postln' is not valid; choose one of: pre, post" in out.stderr
    assert "Traceback" not in out.stderr

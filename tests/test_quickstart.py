"""The README's main command: corpus -> tokenizer -> data -> train on 2 processes -> stop at 150
-> resume to 300, with a falling loss, validation perplexity and TensorBoard logs."""

import os
import re
import sys

import pytest

from tests.conftest import run_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.exhaustive  # 8-15 minutes on 2 cores: behind the marker to keep CI inside its 90 minutes
def test_quickstart(tmp_path):
    run_dir = tmp_path / "qs"
    out = run_tree(["bash", os.path.join(ROOT, "examples", "quickstart.sh")], 1200,
                   env={**os.environ, "RUN_DIR": str(run_dir),  # the script's `python` is this one
                              "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "exiting at iteration 150" in log
    assert "resumed from" in log and "at iteration 150" in log
    losses = [float(x) for x in re.findall(r"\| lm loss: ([0-9.E+-]+)", log)]
    assert len(losses) == 12, log[-3000:]
    assert losses[-1] < losses[0] - 1.0, losses  # visibly falling
    ppl = [float(x) for x in re.findall(r"lm loss PPL: ([0-9.E+-]+)", log)]
    assert ppl and ppl[-1] < ppl[0], log[-3000:]
    events = [f for _, _, fs in os.walk(run_dir / "tensorboard") for f in fs if "tfevents" in f]
    assert events
    assert open(run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read().strip() == "300"
    plots = sorted(os.listdir(run_dir / "plots"))
    assert plots == ["gpas-scale-quickstart.png", "loss.png", "prores-quickstart.png", "stream-rms-quickstart.png"]

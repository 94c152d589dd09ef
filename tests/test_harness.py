"""The tests' own process helper: a process that runs past its timeout is killed with every
process under it (a hung driver once held one of CI's two cores for a whole leg)."""

import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import finish, run_tree

# a parent that starts a child in a session of its own (as torchrun's ranks may be), then both hang
TREE = ("import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(600)\n")


def test_a_process_past_its_timeout_is_killed_with_its_children():
    p = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())
    with pytest.raises(pytest.fail.Exception, match="ran past 1 s; killed with its children"):
        finish(p, 1)
    assert p.returncode is not None
    t0 = time.time()
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.time() - t0 < 10, "the child outlived the timeout"
        time.sleep(0.05)


def test_run_tree_returns_what_subprocess_run_would():
    r = run_tree([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], 60)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")

"""A run's processes end with the run (megatron_prores/lifetime.py): after a ``kill -9`` of the
training process or of its launcher, nothing of the run goes on training, writing or holding files."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import finish, free_port
from tests.test_run_safety import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by init, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until_ended(pid: int, seconds: float) -> bool:
    end = time.time() + seconds
    while time.time() < end:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def start(script: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=ENV, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)


FORKS = """
    import multiprocessing, os, sys, threading, time
    from megatron_prores import lifetime
    if sys.argv[-1] == "install" or {install}:
        lifetime.end_forked_children_with_me()
    ctx = multiprocessing.get_context("fork")
    main_child = ctx.Process(target=time.sleep, args=(120,))
    main_child.start()
    box = []
    def from_a_thread():
        p = ctx.Process(target=time.sleep, args=(120,))
        p.start()
        box.append(p)
    t = threading.Thread(target=from_a_thread)
    t.start(); t.join()  # that thread has ended
    print(main_child.pid, box[0].pid, flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("install", [True, False])
def test_children_forked_by_the_main_thread_end_with_it(install):
    """megatron-core's checkpoint writers (forked from the main thread, even by a synchronous save)
    lived on after a kill -9 of the training process. Without the hook (control) they do; a child
    forked by a thread that has ended is left alone either way (the kernel would kill it when its
    forking thread ends, not the process)."""
    p = start(FORKS.format(install=install))
    main_child, thread_child = map(int, p.stdout.readline().split())
    try:
        assert alive(main_child) and alive(thread_child)  # the ended thread did not take its child along
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert wait_until_ended(main_child, 10 if install else 2) == install
        assert alive(thread_child)
    finally:
        for pid in (main_child, thread_child):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


WORKER = """
    import os, signal, time
    from megatron_prores import lifetime
    if {deaf}:
        signal.signal(signal.SIGTERM, lambda *a: print("SIGTERM: saving first", flush=True))
    lifetime.end_with_launcher(grace=2.0)
    print("ready", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("deaf", [False, True])
def test_a_worker_ends_when_its_launcher_is_gone(tmp_path, deaf):
    """torchrun starts workers in sessions of their own: a kill -9 of the launcher left them running.
    A worker gets SIGTERM (its own handler may save first), then SIGKILL after the grace period."""
    launcher = start(f"""
        import os, subprocess, sys, time
        w = subprocess.Popen([sys.executable, "-c", {textwrap.dedent(WORKER.format(deaf=deaf))!r}], start_new_session=True,
                             env={{**os.environ, "TORCHELASTIC_RUN_ID": "t"}},
                             stdout=open({str(tmp_path / 'worker.log')!r}, "w"))
        print(w.pid, flush=True)
        time.sleep(120)
    """)
    worker = int(launcher.stdout.readline())
    log = tmp_path / "worker.log"
    try:
        end = time.time() + 30
        while "ready" not in log.read_text() and time.time() < end and alive(worker):
            time.sleep(0.05)
        assert "ready" in log.read_text()
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        t0 = time.time()
        assert wait_until_ended(worker, 15), log.read_text()
        took = time.time() - t0
        text = log.read_text()
        assert f"the launcher (pid {launcher.pid}) is gone: stopping this worker (pid {worker})" in text
        if deaf:  # its handler ran, then the grace period ended it
            assert "SIGTERM: saving first" in text and took >= 2.0, (took, text)
        else:
            assert took < 2.0, took
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_the_driver_saves_and_ends_when_megatron_prores_torchrun_is_killed(tmp_path):
    """The driver under megatron-prores-torchrun, killed -9 at its launcher mid-run: the rank went on
    training and writing checkpoints, holding the --save lock (a restart was refused as "in use by a
    live run"). Now it saves at the next step (--exit-signal-handler), releases the lock and ends."""
    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_prores.launch", "--nproc-per-node", "1", f"--master-port={free_port()}",
           "-m", "megatron_prores.train", *TINY, "--train-iters", "100000", "--save-interval", "100000",
           "--exit-signal-handler", "--save", str(save), "--load", str(save)]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith(" iteration "):
            break
    worker = int(subprocess.run(["pgrep", "-f", "-n", f"megatron_prores.train .*{save}"], capture_output=True,
                                text=True).stdout.split()[0])
    os.kill(p.pid, signal.SIGKILL)
    try:
        out = "".join(seen) + finish(p, 60)[0]
        assert wait_until_ended(worker, 60), out[-3000:]
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)
    latest = save / "latest_checkpointed_iteration.txt"
    assert latest.exists() and int(latest.read_text()) > 0, out[-3000:]
    assert not (save / ".lock").exists()  # released: the next run may start


def children(pid: int) -> list:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
    return found


def forked(pid: int) -> bool:
    """A fork of the driver (its command line), not a process it started anew (the resource tracker, the
    writer queue's manager)."""
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return "megatron_prores.train" in f.read()
    except FileNotFoundError:
        return False


def test_a_kill_during_a_synchronous_save_leaves_no_writer_behind(tmp_path):
    """The driver killed -9 while megatron-core's writers (forked even by a synchronous save) write:
    they lived on, stuck, holding the run's log open. Every process the driver started ends with it."""
    save = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "megatron_prores.train", *TINY, "--train-iters", "100000",
                          "--save-interval", "1", "--save", str(save)], env={**ENV, "MASTER_PORT": str(free_port())},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    left = []
    try:
        end, kids = time.time() + 120, []
        while time.time() < end and not kids and p.poll() is None:  # a save with its writers running
            kids = [k for k in children(p.pid) if alive(k) and forked(k)] if any(
                n.endswith(".tmp") for n in (os.listdir(save) if save.exists() else ())) else []
            time.sleep(0.01)
        assert kids, "no save with writer processes was seen"
        p.kill()
        p.wait()
        left = [k for k in kids if not wait_until_ended(k, 10)]
        assert left == [], f"processes left behind: {left}"
    finally:
        for k in left:
            os.kill(k, signal.SIGKILL)
        if p.poll() is None:
            p.kill()

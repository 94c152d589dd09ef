"""A run's processes end with the run: nothing it started trains, writes or holds files after it.

- ``end_with_parent``: the kernel kills this process when its parent dies (Linux PR_SET_PDEATHSIG).
- ``end_forked_children_with_me``: the same for every process the training process forks from its
  main thread: megatron-core's checkpoint writers (one per bucket, forked even by a synchronous
  save) otherwise lived on after a ``kill -9`` of the run, forever, holding its log open. A child
  forked from another thread is left alone: the kernel would kill it when that thread ends.
- ``end_with_launcher``: a torchrun worker stops when its launcher is gone. torchrun starts each
  worker in a session of its own, so a ``kill -9`` of the launcher left the ranks training, writing
  checkpoints and holding the --save lock. The worker then gets SIGTERM (with
  --exit-signal-handler: save at the next step and exit; without: the default, it ends), and
  SIGKILL after ``LAUNCHER_GRACE`` seconds if it still runs (e.g. waiting on a rank that died).
"""

from __future__ import annotations

import os
import signal
import threading
import time

PR_SET_PDEATHSIG = 1
LAUNCHER_GRACE = 300.0
_POLL = 1.0


def end_with_parent(parent: int) -> None:
    """Die (SIGKILL) when ``parent`` dies; at once if it is already gone (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before that
        os._exit(0)


def deaf_helper(parent: int, signals, preload=()) -> None:
    """Initializer of a helper process the training starts (the checkpoint writer's queue manager):
    it ignores ``signals``, which the training handles (SLURM signals every process of a job), ends
    with ``parent``, and imports the modules ``preload`` names (what it will unpickle) before it
    serves. A light module on purpose: a spawned helper imports it first."""
    import importlib

    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)  # blocked since its start
    end_with_parent(parent)
    for name in preload:
        importlib.import_module(name)


_forker = {"pid": None, "main_thread": False}
_installed = []


def _before_fork() -> None:
    _forker.update(pid=os.getpid(), main_thread=threading.current_thread() is threading.main_thread())


def _in_child() -> None:
    if _forker["main_thread"]:
        end_with_parent(_forker["pid"])


def end_forked_children_with_me() -> None:
    """Every process forked from this process's main thread from now on dies with it (once per process)."""
    if not _installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_child=_in_child)
        _installed.append(True)


def _watch(launcher: int, grace: float) -> None:
    while os.getppid() == launcher:
        time.sleep(_POLL)
    print(f"the launcher (pid {launcher}) is gone: stopping this worker (pid {os.getpid()})", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os.kill(os.getpid(), signal.SIGKILL)


def end_with_launcher(grace: float = LAUNCHER_GRACE) -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID set), stop when the launcher process is gone."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    threading.Thread(target=_watch, args=(os.getppid(), grace), name="launcher-watch", daemon=True).start()

"""One live run per --save directory: ``SAVE/.lock``.

The lock is a file created atomically (O_EXCL) by rank 0, holding who holds it (host, pid, its PID
namespace, SLURM job). While the run lives, a daemon thread refreshes the file's time every
``HEARTBEAT`` seconds. A lock is stale, and taken over, when its holder is gone:
- same host, same PID namespace, and its process no longer exists (a killed run, restarted on the
  same node; containers with PID namespaces of their own, e.g. Apptainer --pid, number their
  processes apart, so a pid from another one says nothing here);
- same SLURM job id, earlier restart count (a requeued job: SLURM ended the old processes first);
- no heartbeat for ``STALE_AFTER`` seconds (a holder on another node that died without cleanup);
- empty or unreadable for ``WRITE_GRACE`` seconds (its holder died between creating and writing it).
Otherwise the new run is refused with one line naming the holder. Takeover renames the stale file
away first (only one of several racing runs can), then creates the lock as usual.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Optional

from megatron_prores.config import ConfigError

NAME = ".lock"
HEARTBEAT = 15.0
STALE_AFTER = 300.0
WRITE_GRACE = 10.0  # an unreadable lock younger than this may be one being written


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _pid_namespace() -> Optional[int]:
    """This process's PID namespace (Linux), None where it cannot be told."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _me() -> dict:
    return dict(host=socket.gethostname(), pid=os.getpid(), pidns=_pid_namespace(),
                slurm_job=os.environ.get("SLURM_JOB_ID"),
                slurm_restart=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), started=time.time())


def _same_processes(holder: dict, me: dict) -> bool:
    """Whether the holder's pid means a process this one can see (same host and PID namespace; a
    lock written before namespaces were recorded counts as the same)."""
    return holder.get("host") == me["host"] and holder.get("pidns") in (None, me["pidns"])


class RunLock:
    def __init__(self, root: str):
        self.path = os.path.join(root, NAME)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _holder(self) -> Optional[dict]:
        return self._read(self.path)  # {}: being written, or garbage: judged by its age

    @staticmethod
    def _read(path: str) -> Optional[dict]:
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}

    def _put_back(self, moved: str) -> None:
        """The lock file renamed by mistake goes back, unless a third run created one meanwhile."""
        try:
            os.link(moved, self.path)  # never replaces an existing lock
        except FileExistsError:
            pass
        os.remove(moved)

    def _stale(self, holder: dict) -> Optional[str]:
        """Why the lock's holder is gone (None: it may be alive)."""
        me = _me()
        try:
            age = time.time() - os.path.getmtime(self.path)
        except FileNotFoundError:
            return "released"
        if _same_processes(holder, me) and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            return f"process {holder['pid']} on this host has ended"
        if (me["slurm_job"] and holder.get("slurm_job") == me["slurm_job"]
                and int(holder.get("slurm_restart") or 0) < me["slurm_restart"]):
            return f"SLURM job {me['slurm_job']} was requeued"
        if not holder and age > WRITE_GRACE:  # a live run writes its lock right after creating it
            return "its lock file is empty or unreadable: its run ended while writing it"
        if age > STALE_AFTER:
            return f"no heartbeat for {age:.0f} s"
        return None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a note when a stale lock was taken over. Raises ConfigError when a
        live run holds it."""
        note = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                why = self._stale(holder)
                if why is None:
                    who = (f"pid {holder.get('pid')} on {holder.get('host')}" + (
                        f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else "")
                           if holder else "a run starting this moment")
                    raise ConfigError(f"--save {os.path.dirname(self.path)!r} is in use by a live run ({who}); "
                                      f"wait for it to end or pick another --save (if that run is gone, "
                                      f"delete {self.path})")
                moved = f"{self.path}.stale.{os.getpid()}"
                try:  # only one of several runs that found it stale wins this rename
                    os.rename(self.path, moved)
                except FileNotFoundError:
                    continue
                if self._read(moved) != holder:  # another run took the stale lock over meanwhile: its lock, back
                    self._put_back(moved)
                    continue  # (judged again: it is alive)
                os.remove(moved)
                note = f"took over the lock of a run that is gone ({why})"
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(_me(), f)
            except OSError as e:  # e.g. a full disk: no empty lock left to block the next run
                _remove(self.path)
                raise ConfigError(f"cannot write the run lock {self.path} ({e.strerror or e}); free space "
                                  f"there or pick another --save") from None
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return note
        raise ConfigError(f"could not take the lock {self.path} (other runs keep taking it); start one run "
                          f"per --save directory")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid() and _same_processes(holder, _me()):
            _remove(self.path)  # where it cannot (a file system gone read-only), the next run takes it over

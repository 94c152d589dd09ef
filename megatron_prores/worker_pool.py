"""An ordered pool of worker processes that can always be stopped.

``multiprocessing.Pool`` is not used: its ``terminate()`` can hang for good when it is called with
tasks in flight (CPython issues 73945, 78178, 96995; a CI run of preprocess_data's bad-line test hung
there), and a worker that dies loses its task, so ``get()`` waits forever. Here each worker is a
spawned process with a task pipe and a result pipe of its own; the parent gives a unit to the
least-busy worker, hands the results back in input order, notices a worker that dies, and stops
the workers by killing them, which cannot hang.

A worker reads its task pipe in a thread of its own, so the parent's send never waits on a worker
that is itself blocked sending a result (the deadlock of two full pipes).
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
import types
from typing import Callable, Iterable, Iterator, Optional, Tuple


class WorkerDied(RuntimeError):
    """A worker process ended without answering (killed, out of memory, a crash in native code)."""


def _serve(tasks, results, init, init_args, work) -> None:
    """A worker: ``init(*init_args)``, then ``work(unit)`` for every unit sent, in order, until None."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, scancel: the parent's to handle; it kills us
        signal.signal(sig, signal.SIG_IGN)
    inbox = queue.SimpleQueue()

    def read():
        while True:
            try:
                unit = tasks.recv()
            except (EOFError, OSError):
                unit = None
            inbox.put(unit)
            if unit is None:
                return

    threading.Thread(target=read, daemon=True).start()

    def answer(kind, value):
        if kind == "error":  # an exception that would not arrive whole is sent as its text
            try:
                pickle.loads(pickle.dumps(value[0]))
            except Exception:
                value = (RuntimeError(f"{type(value[0]).__name__}: {value[0]}"), value[1])
        try:
            results.send((kind, value))
        except OSError:  # the parent is gone (killed): nobody to answer, nothing to print
            os._exit(0)

    try:
        if init is not None:
            init(*init_args)
    except BaseException as e:
        answer("error", (e, traceback.format_exc()))
        return
    while (unit := inbox.get()) is not None:
        try:
            out = work(unit)
        except BaseException as e:
            answer("error", (e, traceback.format_exc()))
            continue
        answer("ok", out)


@contextlib.contextmanager
def _light_main():
    """Spawned workers start without re-running this program's ``__main__`` script (a tool's script
    imports torch: seconds of CPU and 200 MB per worker, for a worker that needs none of it)."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main
        else:
            del sys.modules["__main__"]


class OrderedWorkers:
    """``nworkers`` spawned processes applying the module-level function ``work`` to units, results
    yielded in input order; at most ``ahead`` units are sent or held (the parent reads its input only
    as fast as the workers take it). An exception in ``init`` or ``work`` is raised here, with the
    worker's traceback as its cause; a worker that dies raises WorkerDied. Use as a context manager
    or call ``close()``: the workers are killed, whatever state they are in."""

    def __init__(self, nworkers: int, work: Callable, init: Optional[Callable] = None, init_args: Tuple = (),
                 ahead: Optional[int] = None, name: str = "worker"):
        ctx = multiprocessing.get_context("spawn")
        self.ahead = ahead or 2 * nworkers + 2
        self.name = name
        self.workers = []
        try:
            with _light_main():
                for i in range(nworkers):
                    task_r, task_w = ctx.Pipe(duplex=False)
                    result_r, result_w = ctx.Pipe(duplex=False)
                    p = ctx.Process(target=_serve, args=(task_r, result_w, init, init_args, work), daemon=True,
                                    name=f"{name} {i}")
                    p.start()
                    task_r.close()
                    result_w.close()
                    self.workers.append(types.SimpleNamespace(process=p, tasks=task_w, results=result_r,
                                                              owed=collections.deque()))
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __call__(self, units: Iterable) -> Iterator[tuple]:
        """(unit, work(unit)) for every unit, in the order given."""
        units = iter(units)
        done = {}  # sequence number -> (unit, result), waiting for those before it
        sent = yielded = 0
        exhausted = False
        while True:
            while not exhausted and sent - yielded < self.ahead:
                w = min(self.workers, key=lambda w: len(w.owed))
                try:
                    unit = next(units)
                except StopIteration:
                    exhausted = True
                    break
                w.tasks.send(unit)
                w.owed.append((sent, unit))
                sent += 1
            if yielded in done:
                yield done.pop(yielded)
                yielded += 1
                continue
            if exhausted and yielded == sent:
                return
            self._receive(done)

    def _receive(self, done: dict) -> None:
        """Wait for the busy workers; file what they answered into ``done``."""
        busy = [w for w in self.workers if w.owed]
        ready = set(multiprocessing.connection.wait([w.results for w in busy] + [w.process.sentinel for w in busy]))
        for w in busy:
            if w.results in ready or (w.process.sentinel in ready and w.results.poll()):
                try:
                    kind, value = w.results.recv()
                except (EOFError, OSError):
                    self._died(w)
                seq, unit = w.owed.popleft()
                if kind == "error":
                    error, text = value
                    raise error from (RuntimeError(f"in {w.process.name}:\n{text}") if text else None)
                done[seq] = (unit, value)
            elif w.process.sentinel in ready:
                self._died(w)

    def _died(self, w) -> None:
        w.process.join(1)
        code = w.process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        hint = " (out of memory? use fewer workers)" if code == -signal.SIGKILL else ""
        raise WorkerDied(f"{w.process.name} {how} before answering{hint}")

    def close(self) -> None:
        """Kill the workers and reap them (cannot hang on a worker in any state)."""
        for w in self.workers:
            if w.process.is_alive():
                w.process.kill()
        for w in self.workers:
            w.process.join()
            for conn in (w.tasks, w.results):
                conn.close()
            with contextlib.suppress(ValueError):  # already closed
                w.process.close()
        self.workers = []

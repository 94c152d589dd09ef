"""megatron_prores.worker_pool: results in input order, errors and dead workers raised here, and a
pool stopped with work in flight returns at once (multiprocessing.Pool.terminate could hang there).
The work functions are builtins, so the spawned workers need nothing from the tests."""

import os
import pickle
import time

import pytest

from megatron_prores.worker_pool import OrderedWorkers, WorkerDied


def sleep_and_negate(unit):
    time.sleep(unit)
    return -unit


def test_results_come_in_input_order_whichever_worker_is_faster():
    # each unit sleeps its own time, so the workers finish out of order
    units = [0.03 * (i % 4) for i in range(24)]
    with OrderedWorkers(2, sleep_and_negate, ahead=5) as pool:
        got = list(pool(units))
    assert [u for u, _ in got] == units
    assert [r for _, r in got] == [-u for u in units]


def test_large_units_and_results_both_ways_do_not_deadlock():
    # 4 MB each way, 3 units in flight per worker: two full pipes would block both sides
    units = [bytes([65 + i]) * (4 << 20) for i in range(8)]
    with OrderedWorkers(2, bytes.lower, ahead=6) as pool:
        got = [r for _, r in pool(units)]
    assert got == [u.lower() for u in units]


def test_an_exception_in_the_work_is_raised_here_with_the_workers_traceback():
    with OrderedWorkers(2, int) as pool:
        with pytest.raises(ValueError, match="invalid literal for int") as info:
            list(pool(["1", "2", "x", "4"]))
    assert "in worker " in str(info.value.__cause__) and "Traceback" in str(info.value.__cause__)


def test_an_exception_in_init_is_raised_at_the_first_result():
    with OrderedWorkers(2, int, init=int, init_args=("not a number",)) as pool:
        with pytest.raises(ValueError, match="not a number"):
            list(pool(["1"]))


class Unpicklable(Exception):
    def __init__(self, a, b):  # pickle calls Unpicklable(*args) with one argument: it fails to load
        super().__init__(f"{a}-{b}")


def raise_unpicklable(unit):  # imported by the spawned worker from this module (sys.path is the parent's)
    raise Unpicklable(1, unit)


def test_an_exception_that_does_not_unpickle_arrives_as_its_text():
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(Unpicklable(1, 2)))
    with OrderedWorkers(1, raise_unpicklable) as pool:
        with pytest.raises(RuntimeError, match="^Unpicklable: 1-2$"):
            list(pool([2]))


@pytest.mark.parametrize("code", [0, 7])
def test_a_worker_that_exits_raises_worker_died_not_a_hang(code):
    start = time.time()
    with OrderedWorkers(2, os._exit) as pool:
        with pytest.raises(WorkerDied, match=f"^worker [01] exited with code {code} before answering$"):
            list(pool([code, code]))
    assert time.time() - start < 60


def test_a_killed_worker_is_named_with_its_signal():
    import signal

    with OrderedWorkers(1, time.sleep) as pool:
        results = pool([30])
        pid = pool.workers[0].process.pid
        import threading

        threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
        with pytest.raises(WorkerDied, match="killed by signal 9 .*out of memory"):
            next(results)


def test_closing_with_work_in_flight_returns_at_once_every_time():
    # what hung in CI: an error in the consumer while units are queued and being worked on; 15
    # rounds, each stopping after the third result with up to 6 units sent
    for _ in range(15):
        start = time.time()
        pool = OrderedWorkers(2, time.sleep, ahead=6)
        with pytest.raises(KeyError):
            for i, _ in enumerate(pool([0.0, 0.0, 0.0] + [0.05] * 20)):
                if i == 2:
                    raise KeyError("stop")
        pool.close()
        assert not pool.workers and time.time() - start < 30

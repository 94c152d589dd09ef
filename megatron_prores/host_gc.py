"""--manual-gc: Python's garbage collector runs only where every rank runs it, as in Megatron-LM.

By default CPython collects whenever enough objects were allocated since the last collection; in a
training step that is any moment, on each rank at its own. A full collection scans every tracked
object (about 440,000 once megatron-core and a model are loaded: ~120 ms on this project's CPU
machine), and a rank paused there holds up every collective of the others. With --manual-gc the
collector is off; it runs after every --manual-gc-interval-th step (0: never during training) and
around evaluation (unless --no-manual-gc-eval), on all ranks at the same step.
"""

from __future__ import annotations

import contextlib
import gc


class ManualGC:
    def __init__(self, enabled: bool, interval: int = 0, around_eval: bool = True):
        self.enabled, self.interval, self.around_eval = enabled, interval, around_eval
        self.was_enabled = gc.isenabled()
        if enabled:
            gc.collect()  # the set-up's garbage, before the collector goes quiet
            gc.disable()

    def after_step(self, iteration: int) -> None:
        """``iteration``: the steps done so far (1 after the first)."""
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    @contextlib.contextmanager
    def evaluation(self):
        if self.enabled and self.around_eval:
            gc.collect()
        try:
            yield
        finally:
            if self.enabled and self.around_eval:
                gc.collect(0)  # what evaluation left is young

    def close(self) -> None:
        if self.enabled and self.was_enabled:
            gc.enable()

"""When a run stops early with a checkpoint: a signal (SLURM preemption, time-limit warning), the
--exit-duration-in-mins budget, or --exit-interval. Every rank decides the same (collective)."""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

from megatron_prores import early_signals


class ExitRequest:
    """SIGTERM/SIGUSR1 (SLURM preemption, --signal) and a first Ctrl-C (SIGINT) -> save at the next
    step boundary, exit 0; a second Ctrl-C stops at once (KeyboardInterrupt)."""

    def __init__(self, enabled: bool):
        self.received = enabled and bool(early_signals.received)
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handler)
            signal.signal(signal.SIGINT, self._interrupt)
        elif signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL:
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    def _handler(self, signum, frame):
        self.received = True

    def _interrupt(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = True
        print("Ctrl-C: saving at the end of this step, then exiting (Ctrl-C again stops at once, unsaved)",
              flush=True)

    def any_rank(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class ExitPolicy:
    """Whether to stop (and save) after iteration ``it``: signal, time budget or iteration count.
    Built first, so that a signal that arrives during set-up is kept."""

    def __init__(self, args):
        self.args = args
        self.start = time.time()
        self.signals = ExitRequest(args.exit_signal_handler)

    def should_exit(self, it: int) -> bool:
        a = self.args
        stop = self.signals.any_rank() if a.exit_signal_handler else False
        if a.exit_duration_in_mins is not None:
            over = torch.tensor([1.0 if (time.time() - self.start) / 60 > a.exit_duration_in_mins else 0.0])
            dist.all_reduce(over, op=dist.ReduceOp.MAX)
            stop = stop or bool(over.item())
        if a.exit_interval and it % a.exit_interval == 0 and it < a.train_iters:
            stop = True
        return stop

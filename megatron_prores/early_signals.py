"""SIGUSR1 recorded from the driver's first moment.

SLURM's --signal=USR1 can arrive while the driver still imports torch and megatron-core (seconds);
SIGUSR1's default action would kill the process. The entry point calls ``record()`` before those
imports; ``exits.ExitRequest`` later turns what was recorded into a save-and-exit (or restores the
default action when --exit-signal-handler is off). Imports nothing heavy, on purpose.
"""

import signal

received: list = []


def record() -> None:
    signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))

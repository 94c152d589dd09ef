"""Weights & Biases as a second scalar sink beside TensorBoard (the optional extra: ``pip install
'megatron-prores[wandb]'``), with Megatron-LM's flags --wandb-project, --wandb-entity, --wandb-exp-name
and --wandb-save-dir.

One wandb run per training run, written by one process: the last pipeline stage's first rank (the
one that prints the log line); the per-block series of the other stages reach it at log steps.
The run's id is made once, kept in every checkpoint (the train state's ``wandb_run_id``) and used
again when the run resumes from its own --save directory, so a requeued job continues the same
wandb run (``resume="allow"``); a run started from another run's checkpoint gets a new id.

Steps are training iterations. A job resumed from checkpoint C trains C+1, ... again, which the
job before it may already have logged (when it was killed after C). The resume is bitwise exact,
so those values are the logged ones: an online run starts at the step after its last logged one
(``run.step``) and the writer leaves out the earlier steps (wandb would drop each with a
warning). Offline (``WANDB_MODE=offline``), each job writes its own ``offline-run-*-ID`` directory
with the same id; ``wandb sync`` of these directories uploads them in start order into one run.
Every exit (the end, --exit-interval, a signal, an error) finishes the run; a job killed outright
(SIGKILL) loses what wandb had not written yet (wandb-core writes its file in 32 KiB blocks).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import string
from typing import Optional

EXTRA = "pip install 'megatron-prores[wandb]'"
FLAGS = ("wandb_project", "wandb_entity", "wandb_exp_name", "wandb_save_dir")


def available() -> bool:
    """The wandb package can be imported (without importing it: that takes a while)."""
    try:
        return importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):
        return False


def new_run_id() -> str:
    """A fresh run id in wandb's own form (8 characters of [a-z0-9])."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def save_dir(args) -> Optional[str]:
    """--wandb-save-dir, else SAVE/wandb like Megatron-LM, else wandb's default (./wandb)."""
    return args.wandb_save_dir or (os.path.join(args.save, "wandb") if args.save else None)


class WandbWriter:
    """``add_scalar(tag, value, step)`` like TensorBoard's SummaryWriter; the scalars of one step
    go to wandb in one ``run.log(..., step=step)`` at ``flush()`` (or when the step changes)."""

    def __init__(self, run):
        self.run = run
        self.first_step = run.step  # > 0 for a resumed online run: the step after its last logged one
        self.pending: dict = {}
        self.step: Optional[int] = None
        self.left_out: list = []  # steps already in the run (logged before a requeue)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.step is not None and step != self.step:
            self.flush()
        self.step = step
        self.pending[tag] = float(value)

    def flush(self) -> None:
        if self.pending:
            if self.step >= self.first_step:
                self.run.log(self.pending, step=self.step)
            else:
                self.left_out.append(self.step)
        self.pending, self.step = {}, None

    def summary(self, key: str, value: float) -> None:
        self.run.summary[key] = value

    def close(self, exit_code: int = 0) -> None:
        self.flush()
        if self.left_out:
            print(f"wandb: steps {self.left_out[0]}..{self.left_out[-1]} were already in run {self.run.id} "
                  f"(logged before the requeue, the same values): not logged again", flush=True)
            self.left_out = []
        self.run.finish(exit_code=exit_code)


def open_run(args, run_id: str) -> WandbWriter:
    """Start (or continue) run ``run_id`` of --wandb-project; the config logged is the flags."""
    import wandb

    directory = save_dir(args)
    if directory:
        os.makedirs(directory, exist_ok=True)
    run = wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=args.wandb_exp_name, dir=directory, id=run_id,
                     resume="allow", config={k: v for k, v in vars(args).items() if not k.startswith("_")})
    return WandbWriter(run)

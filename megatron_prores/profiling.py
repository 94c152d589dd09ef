"""--profile: profile the steps --profile-step-start .. --profile-step-end - 1 (0-based, as
Megatron-LM counts them) on the ranks of --profile-ranks.

- Without --use-pytorch-profiler the window is marked for Nsight Systems: cudaProfilerStart/Stop
  around it and an NVTX range per operator inside it (run under
  ``nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop``).
- With --use-pytorch-profiler, torch.profiler records the window (after one warm-up step when the
  window does not start at 0) and writes a Chrome/Perfetto trace per rank,
  ``rank-R.json.gz``, into ``<--tensorboard-dir>/../torch_profile`` (Megatron-LM's place), or
  ``./torch_profile`` without --tensorboard-dir; the rank prints its operators with the most
  self time (device time on a GPU) into the log.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

TOP_OPS = 15


def trace_dir(tensorboard_dir: Optional[str]) -> str:
    if tensorboard_dir:
        return os.path.join(os.path.dirname(os.path.abspath(tensorboard_dir)), "torch_profile")
    return os.path.abspath("torch_profile")


class StepProfiler:
    def __init__(self, args, rank: int, cuda: bool):
        self.on = bool(args.profile) and rank in args.profile_ranks
        self.start, self.end, self.rank, self.cuda = args.profile_step_start, args.profile_step_end, rank, cuda
        self.torch_profiler = args.use_pytorch_profiler
        self.dir = trace_dir(args.tensorboard_dir)
        self.prof = self.nvtx = self.label = None
        self.first = self.start
        self.path: Optional[str] = None

    def before_step(self, step: int) -> None:
        """``step``: the 0-based index of the step about to run."""
        if not self.on:
            return
        if self.torch_profiler:
            # one warm-up step before the window where there is one (a run resumed inside the
            # window profiles what is left of it)
            if self.prof is None and self.start - 1 <= step < self.end:
                warmup = 1 if step < self.start else 0
                activities = [torch.profiler.ProfilerActivity.CPU]
                if self.cuda:
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.first = max(step, self.start)
                self.prof = torch.profiler.profile(
                    activities=activities,
                    schedule=torch.profiler.schedule(wait=0, warmup=warmup, active=self.end - self.first, repeat=1),
                    on_trace_ready=self._write)
                self.prof.start()
            if self.prof is not None:  # the trace names each step by its training step
                self.label = torch.profiler.record_function(f"training step {step}")
                self.label.__enter__()
        elif self.start <= step < self.end and self.nvtx is None:
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStart())
            self.nvtx = torch.autograd.profiler.emit_nvtx()
            self.nvtx.__enter__()

    def after_step(self, step: int) -> None:
        """``step``: the 0-based index of the step that just ran."""
        if not self.on:
            return
        if self.prof is not None:
            self.label.__exit__(None, None, None)
            self.label = None
            self.prof.step()  # the last active step's call writes the trace (``_write``)
            if step == self.end - 1:
                self._stop()
        elif self.nvtx is not None and step == self.end - 1:
            self._stop()

    def _write(self, prof) -> None:
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, f"rank-{self.rank}.json.gz")
        prof.export_chrome_trace(self.path)
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        from torch.autograd.profiler_util import EventList

        steps = ("ProfilerStep", "training step")  # the steps themselves: not operators
        ops = EventList([e for e in prof.key_averages() if not e.key.startswith(steps)])
        table = ops.table(sort_by=key, row_limit=TOP_OPS, max_name_column_width=60)
        steps = f"step {self.first}" if self.first == self.end - 1 else f"steps {self.first}..{self.end - 1}"
        print(f"[rank {self.rank}] profile of {steps} written to {self.path}; "
              f"the {TOP_OPS} operators with the most {'device' if self.cuda else 'CPU'} self time:\n{table}",
              flush=True)

    def _stop(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None
        if self.nvtx is not None:
            self.nvtx.__exit__(None, None, None)
            self.nvtx = None
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStop())
        self.on = False

    def close(self) -> None:
        """A run that stops inside the window (signal, time limit) ends the profile without a trace."""
        if self.prof is not None:
            self.prof.on_trace_ready = None
            if self.label is not None:  # a step that raised
                self.label.__exit__(None, None, None)
                self.label = None
        self._stop()

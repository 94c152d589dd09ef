"""Activation recompute through the driver's own step: what each --recompute-* setting costs in
step time and saves in activation memory.

    python benchmarks/recompute.py                      # CPU default: 8 layers x 256, seq 1024
    python benchmarks/recompute.py --num-layers 24 --hidden-size 2048 --heads 32 --groups 16 \\
        --ffn 5632 --seq-length 2048 --micro-batch-size 2          # the 1.3B shape, on a GPU

One process; the variants run one after another, each a fresh Trainer (--mock-data, ProRes
mid-warmup + GPAS, dropout 0.1, bf16 on a GPU, 2 microbatches per step). Per variant:
  step ms        median of --steps timed Trainer.train_step calls after one warm-up step
  kept MiB       what autograd keeps after one microbatch's forward (the driver's forward_step and
                 loss, no backward): the unique non-parameter storages saved for backward, at
                 their size after the forward
  peak MiB       the most autograd held at once during a whole train_step, backward's recompute
                 included: live saved storages at their current size (megatron's layernorm
                 recompute empties its outputs' storages after use; they are counted empty then)
  CUDA peak GiB  max allocated CUDA memory over the timed steps (GPU only: weights, optimizer
                 and all)
Results: benchmarks/results/<device>-<date>-recompute.json; the table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {
    "none": [],
    "selective core_attn": ["--recompute-granularity", "selective"],
    "selective layernorm mlp": ["--recompute-granularity", "selective", "--recompute-modules", "layernorm", "mlp"],
    "selective all": ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "layernorm", "mlp"],
    "full block half": ["--recompute-granularity", "full", "--recompute-method", "block"],  # + num layers below
    "full uniform 1": ["--recompute-granularity", "full"],
}


def _params(model) -> set:
    return {p.untyped_storage().data_ptr() for chunk in model for p in chunk.parameters()}


def saved_in_forward(trainer) -> int:
    """Bytes autograd keeps after one microbatch's forward and loss through the driver's
    forward_step: the unique storages saved for backward (parameters excluded) at their size after
    the forward (megatron's norm recompute empties its outputs' storages once they are used); the
    graph is then dropped."""
    params, kept = _params(trainer.model), {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept.setdefault(s._cdata, s)  # the storage itself: an emptied one's address is reused
        return t

    for chunk in trainer.model:
        chunk.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, loss_func = trainer.forward_step(trainer.train_iter, trainer.model[0])
        loss, _ = loss_func(out)
    total = sum(s.nbytes() for s in kept.values())
    del out, loss
    return total


class LiveSaved:
    """The most bytes autograd holds at once while active: every saved tensor is wrapped in a
    holder that autograd frees with its graph node; storages counted once, at their current size."""

    def __init__(self, model):
        self.params, self.live, self.peak = _params(model), {}, 0

    class _Held:
        def __init__(self, owner, t):
            self.owner, self.t = owner, t
            self.ptr = t.untyped_storage()._cdata  # the storage itself: an emptied one's address is reused
            storage, count = owner.live.get(self.ptr, (t.untyped_storage(), 0))
            owner.live[self.ptr] = (storage, count + 1)
            owner.peak = max(owner.peak, sum(s.nbytes() for s, _ in owner.live.values()))

        def __del__(self):
            storage, count = self.owner.live[self.ptr]
            if count == 1:
                del self.owner.live[self.ptr]
            else:
                self.owner.live[self.ptr] = (storage, count - 1)

    def pack(self, t):
        if t.untyped_storage().data_ptr() in self.params:
            return t
        return LiveSaved._Held(self, t)

    @staticmethod
    def unpack(h):
        return h.t if isinstance(h, LiveSaved._Held) else h

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def flags(a, variant: str) -> list:
    f = ["--num-layers", a.num_layers, "--hidden-size", a.hidden_size, "--num-attention-heads", a.heads,
         "--num-query-groups", a.groups, "--ffn-hidden-size", a.ffn, "--seq-length", a.seq_length,
         "--micro-batch-size", a.micro_batch_size, "--global-batch-size", 2 * a.micro_batch_size,
         "--train-iters", a.steps + 1, "--lr", "3e-4", "--lr-decay-style", "constant", "--mock-data",
         "--vocab-size", a.vocab_size, "--log-interval", 10 ** 6, "--eval-iters", 0, "--prores-schedule", "linear",
         "--prores-warmup-steps", 10 ** 6, "--gpas", "--hidden-dropout", 0.1, "--attention-dropout", 0.1]
    f += VARIANTS[variant]
    if variant == "full block half":
        f += ["--recompute-num-layers", max(1, a.num_layers // 2)]
    if torch.cuda.is_available():
        f.append("--bf16")
    return [str(x) for x in f]


def measure(a, variant: str) -> dict:
    from megatron_prores.arguments import build_parser, check_args
    from megatron_prores.trainer import Trainer

    args = build_parser().parse_args(flags(a, variant))
    check_args(args)
    trainer = Trainer(args)
    try:
        trainer.train_step(0)  # warm-up (compilation, allocation)
        kept = saved_in_forward(trainer)
        probe = LiveSaved(trainer.model)
        with probe.hooks():
            trainer.train_step(1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(2, a.steps + 1):
            t0 = time.perf_counter()
            result = trainer.train_step(step)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - t0))
        row = {"step_ms": statistics.median(times), "times_ms": times, "kept_mib": kept / 2 ** 20,
               "peak_mib": probe.peak / 2 ** 20, "loss": result.loss}
        if torch.cuda.is_available():
            row["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        return row
    finally:
        trainer.close(0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up and one probed step)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    a = p.parse_args(argv)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    sys.path.insert(0, os.path.dirname(HERE))
    from megatron_prores import parallel

    parallel.initialize()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU-{platform.machine()}"
    date = datetime.date.today().isoformat()
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    stem = os.path.join(HERE, "results", f"{device.replace(' ', '-')}-{date}-recompute")
    shape = {k: getattr(a, k) for k in ("num_layers", "hidden_size", "heads", "groups", "ffn", "seq_length",
                                        "micro_batch_size", "vocab_size")}
    results = {"device": device, "date": date, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "shape": shape, "steps": a.steps, "runs": {}}
    for variant in a.variants:
        results["runs"][variant] = measure(a, variant)
        with open(stem + ".json", "w") as f:
            json.dump(results, f, indent=1)

    base = results["runs"].get("none")
    print(f"activation recompute, driver train_step, {a.num_layers} layers x {a.hidden_size}, seq {a.seq_length}, "
          f"micro batch {a.micro_batch_size} x 2, {results['threads']} threads, {device}")
    print(f"{'variant':<24} {'step ms':>8} {'vs none':>8} {'kept MiB':>9} {'vs none':>8} {'peak MiB':>9} "
          f"{'vs none':>8}" + (f" {'CUDA peak GiB':>13}" if torch.cuda.is_available() else ""))
    for variant, r in results["runs"].items():
        rel = {k: f"{r[k] / base[k]:.3f}" if base else "-" for k in ("step_ms", "kept_mib", "peak_mib")}
        print(f"{variant:<24} {r['step_ms']:>8.0f} {rel['step_ms']:>8} {r['kept_mib']:>9.1f} {rel['kept_mib']:>8} "
              f"{r['peak_mib']:>9.1f} {rel['peak_mib']:>8}"
              + (f" {r['cuda_peak_gib']:>13.2f}" if "cuda_peak_gib" in r else ""))
    print(f"results: {stem}.json")


if __name__ == "__main__":
    main()

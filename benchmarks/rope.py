"""RoPE of one layer's queries and keys, forward + backward: megatron-core's eager RoPE against the
fused one (megatron_prores.fused_rope: what runs on GPUs without TE unless --no-rope-fusion).

    python benchmarks/rope.py                     # GPU: the 1.3B layout, bf16; CPU: a small shape, fp32
    python benchmarks/rope.py --micro-batch-size 4 --steps 50

Per variant, round-robin over --rounds, each the mean of --steps calls issued back to back:
device time per call (CUDA events around the loop on a GPU, wall time on a CPU) and host time per
call (the time to issue the calls, without waiting for the GPU), and the bytes autograd saves for
backward; the figures are the medians over the rounds. The layout is the
1.3B recipe's (seq 2048, 32 query heads and 16 key/value groups of 64) at --micro-batch-size.
Writes <out>/<device>-<date>-rope.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"CPU-{platform.machine()}"


def variants():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron_prores.fused_rope import rope

    return {"megatron eager": lambda t, f: _apply_rotary_pos_emb_bshd(t, f),
            "fused (compiled)": lambda t, f: rope(t, f, compiled=True)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--seq-length", type=int, default=2048 if gpu else 512)
    p.add_argument("--micro-batch-size", type=int, default=8 if gpu else 1)
    p.add_argument("--heads", type=int, default=32 if gpu else 8)
    p.add_argument("--groups", type=int, default=16 if gpu else 4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    s, b, d = a.seq_length, a.micro_batch_size, a.head_dim
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    f = torch.arange(s, dtype=torch.float32)[:, None] * inv[None]
    freqs = torch.cat((f, f), -1)[:, None, None, :].to(dev)
    q = torch.randn(s, b, a.heads, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(s, b, a.groups, d, device=dev, dtype=dtype, requires_grad=True)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def call(fn):  # the gradients are returned, not accumulated into q.grad/k.grad (no extra kernel)
        torch.autograd.grad((fn(q, freqs), fn(k, freqs)), (q, k), (dq, dk))

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(q, freqs), fn(k, freqs)
        return sum(seen.values())

    fns = variants()
    for fn in fns.values():  # warm-up (compilation)
        for _ in range(3):
            call(fn)
    sync()
    dev_ms = {n: [] for n in fns}
    host_us = {n: [] for n in fns}
    for _ in range(a.rounds):
        for name, fn in fns.items():
            # a.steps calls back to back between one pair of events: the device time per call, not
            # max(host, device) of single calls with an idle GPU between them; the host time of the
            # same loop is the launch cost (it waits for the device only where the queue is full)
            sync()
            if gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                call(fn)
            host = (time.perf_counter() - t0) / a.steps
            if gpu:
                end.record()
                end.synchronize()
            dev_ms[name].append(start.elapsed_time(end) / a.steps if gpu else host * 1e3)
            host_us[name].append(host * 1e6)
    rows = {n: {"device_ms": statistics.median(dev_ms[n]), "host_us": statistics.median(host_us[n]),
                "device_ms_rounds": dev_ms[n], "host_us_rounds": host_us[n], "saved_mib": saved_bytes(fns[n]) / 2**20}
            for n in fns}
    base = rows["megatron eager"]
    tokens = s * b
    print(f"RoPE of q [{s}, {b}, {a.heads}, {d}] and k [{s}, {b}, {a.groups}, {d}], forward + backward, {dtype}, "
          f"{device_name()}; mean of {a.steps} calls, median of {a.rounds} rounds")
    print(f"{'variant':20s} {'device ms':>10s} {'vs eager':>9s} {'host us':>9s} {'saved MiB':>10s}")
    for n, r in rows.items():
        print(f"{n:20s} {r['device_ms']:10.3f} {r['device_ms'] / base['device_ms']:9.3f} {r['host_us']:9.0f} "
              f"{r['saved_mib']:10.2f}")
    layers = 24
    saving = (base["device_ms"] - rows["fused (compiled)"]["device_ms"]) * layers
    print(f"per micro batch of a 24-layer model: {saving:.1f} ms less RoPE time ({tokens:,} tokens)")
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"{device_name()}-{datetime.date.today()}-rope.json")
    with open(path, "w") as fh:
        json.dump({"device": device_name(), "date": str(datetime.date.today()), "torch": torch.__version__,
                   "dtype": str(dtype), "shape": dict(seq=s, micro_batch=b, heads=a.heads, groups=a.groups, head_dim=d),
                   "steps": a.steps, "rounds": a.rounds, "variants": rows}, fh, indent=1)
    print(f"results: {path}")


if __name__ == "__main__":
    main()

"""Host cost of one compiled residual op call (forward + backward) against megatron-core's own.

    python benchmarks/residual_op_host.py                  # this checkout
    python benchmarks/residual_op_host.py --rev a06153b^   # and the op at another commit, interleaved

Tiny tensors (seq 8, hidden 32), so the time is the call path itself: Python, dynamo's guards,
the compiled function's wrapper, autograd, and the kernel launches (on a GPU the kernels take a
few microseconds; the timer synchronizes once per block of calls, not per call). This is the
time a GPU waits for whenever the step is bound by the host (the H200 profile of 2026-11-28:
ProRes+GPAS added host time and no GPU time). Cases, timed round-robin in blocks of --calls:
  megatron      megatron-core's compiled bias-dropout-add (get_bias_dropout_add(True, True))
  prores+gpas   this project's op with a ProRes value and a GPAS gate (the target configuration)
  gpas          GPAS only (ProRes after its warmup)
  prores        ProRes only
--rev adds the same three cases of the op at that commit (read from git, not checked out).
Prints min and median microseconds per call and writes benchmarks/results/<device>-<date>-residual-op-host.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def load_op(rev):
    """megatron_prores.fused_residual at ``rev`` (None: this checkout) as a module of its own."""
    if rev is None:
        from megatron_prores import fused_residual
        return fused_residual
    try:
        src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:megatron_prores/fused_residual.py"],
                             check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as e:
        sys.exit(f"--rev {rev}: git cannot read megatron_prores/fused_residual.py there ({e.stderr.strip()})")
    path = os.path.join(tempfile.mkdtemp(), f"fused_residual_{rev.replace('^', '_')}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"fused_residual_at_{len(src)}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", default=None, help="also time the op at this git commit")
    p.add_argument("--calls", type=int, default=200, help="calls per timed block")
    p.add_argument("--rounds", type=int, default=15, help="timed blocks per case (round-robin)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)

    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    r, f, dy = (torch.randn(8, 1, 32, generator=gen).to(dev, dtype) for _ in range(3))
    r.requires_grad_(), f.requires_grad_()
    gate = torch.zeros(1, device=dev, requires_grad=True)  # fp32, as the layer keeps it
    prores = torch.tensor(0.5, device=dev)
    bda = get_bias_dropout_add(True, True)

    def megatron():
        bda((f, None), r, 0.0).backward(dy)

    def op_case(mod, a_, g_):
        def fn():
            mod.residual_op(r, f, None, prob=0.0, training=True, prores=a_, gate=g_, recompute=True,
                            compiled=True).backward(dy)
        return fn

    cases = {"megatron": megatron}
    mods = [("", load_op(None))] + ([(f"@{a.rev} ", load_op(a.rev))] if a.rev else [])
    for tag, mod in mods:
        cases[f"{tag}prores+gpas"] = op_case(mod, prores, gate)
        cases[f"{tag}gpas"] = op_case(mod, None, gate)
        cases[f"{tag}prores"] = op_case(mod, prores, None)
    for fn in cases.values():  # compile and warm up
        for _ in range(20):
            fn()
    times = {k: [] for k in cases}
    for _ in range(a.rounds):
        for k, fn in cases.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(a.calls):
                fn()
            if cuda:
                torch.cuda.synchronize()
            times[k].append((time.perf_counter() - t0) / a.calls * 1e6)

    device = torch.cuda.get_device_name() if cuda else f"cpu-{platform.machine()}-{os.cpu_count()}cores"
    rows = [{"case": k, "min_us": min(v), "median_us": statistics.median(v),
             "min_vs_megatron": min(v) / min(times["megatron"])} for k, v in times.items()]
    result = {"device": device, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "dtype": str(dtype), "calls": a.calls, "rounds": a.rounds, "rev": a.rev, "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"{device.replace(' ', '-').replace('/', '_')}-{result['date']}-residual-op-host.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"{device}, torch {torch.__version__}, {dtype}: microseconds per call (forward + backward), "
          f"{a.rounds} blocks of {a.calls}")
    print(f"{'case':<28} {'min':>8} {'median':>8} {'min/megatron':>13}")
    for row in rows:
        print(f"{row['case']:<28} {row['min_us']:8.1f} {row['median_us']:8.1f} {row['min_vs_megatron']:13.2f}")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

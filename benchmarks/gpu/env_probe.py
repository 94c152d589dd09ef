"""Environment line of a GPU check, and which SDPA kernel runs the 1.3B GQA attention layout.

    python benchmarks/gpu/env_probe.py --out DIR [--toy]

Prints (and writes DIR/<device>-<date>-env.json): GPU, driver, torch, CUDA, triton, megatron-core,
transformers versions; the datasheet bf16 peak the driver's MFU uses and the measured 8192^3 bf16
matmul rate; for q [b=4, 32 heads, s=2048, d=64] and k/v with 16 groups, laid out as the local
spec's SDPAttention passes them (permuted views of [s, b, n, d]) with enable_gqa, whether each
kernel (flash, cuDNN, memory-efficient, math) accepts it and its forward+backward time, and the
kernels PyTorch's own choice ("auto", the driver's default) launches.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "megatron.core", "transformers", "transformer_engine"):
        try:
            mod = __import__(name, fromlist=["__version__"])
            out[name] = getattr(mod, "__version__", "?")
        except Exception:
            out[name] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=20).stdout.strip()
        except Exception as e:  # noqa: BLE001
            out["driver"] = f"nvidia-smi failed: {e}"
    return out


def timed(fn, reps):
    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1000


def sdpa_probe(toy: bool) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    b, heads, groups, s, d = (1, 4, 2, 64, 16) if toy else (4, 32, 16, 2048, 64)
    q = torch.randn(s, b, heads, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(s, b, groups, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(s, b, groups, d, device=dev, dtype=dtype, requires_grad=True)

    def step():
        qq, kk, vv = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True).sum().backward()

    res = {"layout": {"batch": b, "heads": heads, "query_groups": groups, "seq": s, "head_dim": d,
                      "dtype": str(dtype)}, "kernels": {}}
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel(backend):
                ms = timed(step, 3 if toy else 20)
            res["kernels"][name] = {"runs": True, "fwd_bwd_ms": round(ms, 3)}
        except Exception as e:  # noqa: BLE001
            res["kernels"][name] = {"runs": False, "why": str(e).splitlines()[0][:200]}
    res["auto_fwd_bwd_ms"] = round(timed(step, 3 if toy else 20), 3)
    if cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        names = sorted({e.key for e in prof.key_averages() if any(
            w in e.key.lower() for w in ("flash", "fmha", "cudnn", "attention", "efficient", "sdpa"))})
        res["auto_launches"] = names[:10]
    return res


def matmul_tflops(toy: bool) -> float:
    cuda = torch.cuda.is_available()
    n, dtype, dev = (8192, torch.bfloat16, "cuda") if cuda and not toy else (512, torch.float32,
                                                                              "cuda" if cuda else "cpu")
    a, c = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n ** 3 / (min(timed(lambda: a @ c, 10) for _ in range(3)) / 1000) / 1e12


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--toy", action="store_true")
    args = p.parse_args(argv)
    from megatron_prores.metrics import peak_tflops

    res = {"date": datetime.date.today().isoformat(), **versions(),
           "datasheet_bf16_peak_tflops": peak_tflops(), "measured_matmul_tflops": round(matmul_tflops(args.toy), 1)}
    print(json.dumps(res), flush=True)
    try:
        res["sdpa"] = sdpa_probe(args.toy)
    except Exception as e:  # noqa: BLE001
        res["sdpa"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    print("sdpa: " + json.dumps(res["sdpa"]), flush=True)
    dev = res.get("gpu", "cpu").replace(" ", "-")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{dev}-{res['date']}-env.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

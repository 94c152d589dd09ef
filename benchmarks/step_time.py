"""Training step time of ProRes + GPAS against plain megatron-core and a Hugging Face reference.

    python benchmarks/step_time.py                     # GPU: 1.3B and 48-layer shapes; CPU: small shape
    python benchmarks/step_time.py --shapes 1.3b --steps 30 --micro-batch-size 4
    python benchmarks/step_time.py --extra "--transformer-impl transformer_engine --fp8-format hybrid"

Variants, each a full training step (forward/backward over the microbatches of a global batch,
optimizer step) on synthetic tokens, in a process of its own:
  megatron     the driver's Trainer.train_step (--mock-data) with every method off: its layers
               are megatron-core's own (same spec, same core attention, megatron's residual add)
  prores_mid   the driver with ProRes (linear, mid-warmup: every block's multiply active) + GPAS
  prores_done  the driver with ProRes after its warmup (multiply skipped) + GPAS
  hf           a reference built like the papers' published code: transformers' LlamaForCausalLM
               (SDPA attention) whose decoder layers apply the same ProRes/GPAS math in eager
               PyTorch (host-side ProRes value, y = x - SiLU(g) * x.detach()), autocast bf16 on
               fp32 weights, torch AdamW as megatron-core uses without TE/apex, grad clip 1.0
Time: median over --steps timed steps after --warmup steps (times --rounds, run round-robin). Tokens/s = global batch x seq / time;
TFLOP/s from the dense-GPT FLOP count of the driver (megatron_prores.metrics.flops_per_token); MFU
against the datasheet dense bf16 peak (megatron_prores.metrics.peak_tflops, as the driver's log line
and published MFU figures), with the matmul rate this script measures on the device beside it (on
CPU, or a GPU without a datasheet entry, MFU is against the measured rate).
Peak memory: max allocated CUDA memory (GPU) or max resident set (CPU) of the variant's process.
--micro-batch-size auto (the GPU default) measures the peak memory of the prores_mid variant at
micro batch 1 and 2, extrapolates to the largest power of two under 90% of the device, confirms it
(halving until it fits) and uses it for every variant; a variant that runs out of memory halves its
micro batch and doubles its microbatches (same global batch; the table says which it used).
Every child process's output is appended to a .log next to the results; --budget bounds the
whole run (results are written after every variant).
Results: benchmarks/results/<device>-<date>-step-time.json; the table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {
    # name: layers, hidden, heads, query groups, ffn, seq
    "1.3b": (24, 2048, 32, 16, 5632, 2048),
    "48x512": (48, 512, 8, 4, 1408, 2048),
    "cpu": (4, 128, 4, 2, 344, 128),
}
VARIANTS = ["megatron", "prores_mid", "prores_done", "hf"]
VOCAB = 32000
TARGETS = [  # (what, variant, baseline, kind, bound): kind "time" compares step time, "speedup" tokens/s
    ("(2)/(1) step time", "prores_mid", "megatron", "time", 1.01),
    ("(2)/(1) peak memory", "prores_mid", "megatron", "memory", 1.01),
    ("(3)/(1) step time", "prores_done", "megatron", "time", 1.005),
    ("(2) tokens/s over (4)", "prores_mid", "hf", "speedup", 1.5),
]


# a driver variant that failed while torch.distributed started (its store, NCCL's bootstrap)
DIST_START = re.compile(r"torch\.distributed could not start|HashStore|init_process_group|ncclUniqueId|"
                        r"ProcessGroupNCCL.*(Error|error)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def matmul_peak_tflops() -> float:
    """Measured dense matmul rate: bf16 8192^3 on a GPU, fp32 1024^3 on CPU."""
    cuda = torch.cuda.is_available()
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    dev = "cuda" if cuda else "cpu"
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 50 if cuda else 10
    times = []
    for _ in range(5):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / reps)
    return 2 * n ** 3 / min(times) / 1e12


def flops_per_token(shape) -> float:
    sys.path.insert(0, os.path.dirname(HERE))
    from megatron_prores.config import ModelConfig
    from megatron_prores.metrics import flops_per_token as fpt

    L, h, heads, groups, ffn, seq = shape
    return fpt(ModelConfig(num_layers=L, hidden_size=h, num_attention_heads=heads, num_query_groups=groups,
                           ffn_hidden_size=ffn, seq_length=seq, vocab_size=VOCAB))


# ---- megatron variants: the driver ------------------------------------------------------------
def driver_flags(variant, shape, mb, acc, iters, extra):
    L, h, heads, groups, ffn, seq = shape
    flags = [
        "--num-layers", L, "--hidden-size", h, "--num-attention-heads", heads, "--num-query-groups", groups,
        "--ffn-hidden-size", ffn, "--seq-length", seq, "--max-position-embeddings", seq,
        "--micro-batch-size", mb, "--global-batch-size", mb * acc, "--train-iters", iters,
        "--lr", "3e-4", "--lr-decay-style", "constant", "--mock-data", "--vocab-size", VOCAB,
        "--log-interval", 1, "--eval-iters", 0,
    ]
    if torch.cuda.is_available():
        flags.append("--bf16")
    if variant == "prores_mid":
        flags += ["--prores-schedule", "linear", "--prores-warmup-steps", 10 ** 6, "--gpas"]
    elif variant == "prores_done":
        flags += ["--prores-schedule", "linear", "--prores-warmup-steps", 1, "--gpas"]
    return [str(f) for f in flags] + shlex.split(extra)


class Runner:
    """Runs the variants' processes: one environment, one log of every child's output, a time
    budget for the whole benchmark (so that a run under a wall-clock limit ends with results)."""

    def __init__(self, log_path, budget_s=None, timeout_s=900):
        self.log_path, self.timeout_s = log_path, timeout_s
        self.deadline = None if budget_s is None else time.monotonic() + budget_s
        self.durations = []  # seconds of each finished variant process: what the next one will need
        self.env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
        self.env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # same for every variant

    def left(self):
        return None if self.deadline is None else self.deadline - time.monotonic()

    def run(self, cmd, what, env=None):
        left = self.left()
        need = max(30.0, 0.9 * statistics.median(self.durations)) if self.durations else 30.0
        if left is not None and left < need:  # a variant cut off by the budget measures nothing
            return None, f"time budget used up ({max(left, 0):.0f} s left, a variant takes ~{need:.0f} s)"
        timeout = self.timeout_s if left is None else min(self.timeout_s, left - 10)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**self.env, **(env or {})})
        except subprocess.TimeoutExpired as e:
            self._log(what, " ".join(cmd), (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                      else (e.stdout or ""), "")
            return None, f"timed out after {timeout:.0f} s"
        self._log(what, " ".join(cmd), proc.stdout, proc.stderr)
        if proc.returncode == 0:
            self.durations.append(time.monotonic() - t0)
        return proc, None

    def _log(self, what, cmd, out, err):
        with open(self.log_path, "a") as f:
            f.write(f"\n===== {what}\n$ {cmd}\n{out}\n----- stderr\n{err}\n")


def failure(proc) -> dict:
    """The error of a failed child in one line: out of memory, else its last '...Error: ...' line."""
    text = proc.stdout + "\n" + proc.stderr
    if re.search(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|OutOfMemoryError", text):
        return {"error": "out of memory", "oom": True}
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    ours = [l[len("error: "):] for l in lines if l.startswith("error: ")]  # the driver's one-line errors
    raised = [l for l in lines if re.match(r"[\w.]*(Error|Exception): ", l) and ".elastic." not in l]
    return {"error": (ours or raised or lines or ["(no output)"])[-1][-300:], "oom": False}


def host_profile(trainer, steps: int = 2, rows: int = 30) -> None:
    """The host's side by Python function (cProfile, two more steps): which calls take the time the
    GPU waits for when the step is host-bound (megatron-core's layers, this project's op, autograd,
    compiled-function guards), into the log. cProfile slows Python code down, so read it as shares."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for step in range(trainer.args.train_iters - steps, trainer.args.train_iters):
        trainer.train_step(step)
    prof.disable()
    wall = time.perf_counter() - t0
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(rows)
    body = text.getvalue()
    print(f"host profile of {steps} steps (cProfile, wall {wall:.3f} s with it), by own time:\n"
          + body[body.find("ncalls"):].rstrip(), flush=True)


def driver_worker(flags, warmup, out_path):
    """Runs in its own process: the driver's Trainer, timing its ``train_step`` (the step the
    driver runs), synchronized so that each time covers the whole step's device work."""
    from megatron_prores.arguments import parse_args
    from megatron_prores.metrics import peak_memory_gib
    from megatron_prores.trainer import Trainer

    # no MASTER_ADDR: one process starts torch.distributed on an in-process store, as the driver
    # does for a user's single-GPU run (a port picked here could be taken before the store binds it)
    trainer = Trainer(parse_args(flags))
    times = []
    for step in range(trainer.args.train_iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train_step(step)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    peak = peak_memory_gib()
    if os.environ.get("STEP_TIME_PROFILE") and torch.cuda.is_available():
        # two more steps under the profiler: the kernels that take the step's time, into the log
        from torch.profiler import ProfilerActivity, profile

        try:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                for step in range(trainer.args.train_iters - 2, trainer.args.train_iters):
                    trainer.train_step(step)
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            avg = prof.key_averages()
            print(avg.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=90), flush=True)
            # the host's side: where its time goes when the GPU waits for it
            print(avg.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=90), flush=True)
            gpu = sum(e.self_device_time_total for e in avg  # kernels, as the table's "Self CUDA time total"
                      if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation) / 1e6
            print(f"profiled 2 steps: wall {wall:.3f} s under the profiler, GPU kernels {gpu:.3f} s "
                  f"({100 * gpu / wall:.0f}% busy)", flush=True)
        except Exception as e:  # noqa: BLE001 - the timing above stands without the profile
            print(f"profile failed: {type(e).__name__}: {e}", flush=True)
    if os.environ.get("STEP_TIME_PROFILE"):
        host_profile(trainer)
    with open(out_path, "w") as f:
        json.dump({"times_ms": times[warmup:], "peak_gib": peak}, f)


def run_worker(runner, kind, payload, label):
    """This script in a process of its own (``--driver-worker``/``--hf-worker``, the JSON ``payload``
    with its output file last); its figures, or what went wrong."""
    out = payload[-1]
    cmd = [sys.executable, os.path.abspath(__file__), f"--{kind}-worker", json.dumps(payload)]
    proc, err = runner.run(cmd, label)
    if not err and proc.returncode != 0 and kind == "driver" and DIST_START.search(proc.stdout + proc.stderr):
        # torch.distributed did not start on the in-process store: once more on a TCP store
        print("  torch.distributed did not start on the in-process store: again on a TCP store", flush=True)
        proc, err = runner.run(cmd, label + " (TCP store)", env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    if err:
        return {"error": err, "oom": False}
    if proc.returncode != 0 or not os.path.exists(out):
        return failure(proc)
    with open(out) as f:
        res = json.load(f)
    os.remove(out)
    return res


def run_driver(runner, variant, shape, mb, acc, steps, warmup, extra, tmp):
    out = os.path.join(tmp, f"driver-{os.getpid()}-{time.time_ns()}.json")
    flags = driver_flags(variant, shape, mb, acc, warmup + steps, extra)
    return run_worker(runner, "driver", [flags, warmup, out], f"{variant} mb={mb} acc={acc}")


# ---- the Hugging Face reference ------------------------------------------------------------------
def hf_worker(shape, mb, acc, steps, warmup, out_path):
    """Runs in its own process; writes its figures to ``out_path``."""
    import resource

    import torch.nn.functional as F
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    L, h, heads, groups, ffn, seq = shape
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=ffn, num_hidden_layers=L,
                         num_attention_heads=heads, num_key_value_heads=groups, max_position_embeddings=seq,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(dev)
    returns_tuple = int(transformers.__version__.split(".")[0]) < 5

    # ProRes / GPAS as the papers' code does it: a host-side float per block and an eager GPAS
    def make_forward(layer):
        layer.gpas_gate = torch.nn.Parameter(torch.zeros(1, device=dev))
        layer.prores_alpha = 0.0

        def gpas(x):
            return x - F.silu(layer.gpas_gate) * x.detach()

        def forward(hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=False, position_embeddings=None, **kwargs):
            kwargs.pop("past_key_value", None)
            a = layer.prores_alpha
            attn = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), attention_mask=attention_mask,
                                   position_ids=position_ids, position_embeddings=position_embeddings, **kwargs)[0]
            x = gpas(hidden_states + a * attn)
            x = gpas(x + a * layer.mlp(layer.post_attention_layernorm(x)))
            return (x,) if returns_tuple else x

        layer.forward = forward

    for layer in model.model.layers:
        make_forward(layer)
    warm = 10 ** 6  # mid-warmup, as the prores_mid variant
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    times = []
    for step in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for l, layer in enumerate(model.model.layers, start=1):
            layer.prores_alpha = min(1.0, step / (warm * l / L))
        for _ in range(acc):
            tokens = torch.randint(0, VOCAB, (mb, seq), generator=gen).to(dev)
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss / acc
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
    with open(out_path, "w") as f:
        json.dump({"times_ms": [1000 * t for t in times[warmup:]], "peak_gib": peak}, f)


def run_hf(runner, shape, mb, acc, steps, warmup, tmp):
    out = os.path.join(tmp, f"hf-{os.getpid()}-{time.time_ns()}.json")
    return run_worker(runner, "hf", [shape, mb, acc, steps, warmup, out], f"hf mb={mb} acc={acc}")


# ---- driver of the benchmark ---------------------------------------------------------------------
def run_variant(runner, variant, shape, mb, acc, args):
    if variant == "hf":
        return run_hf(runner, shape, mb, acc, args.steps, args.warmup, args.out)
    return run_driver(runner, variant, shape, mb, acc, args.steps, args.warmup, args.extra, args.out)


def largest_micro_batch(runner, shape, args) -> int:
    """Peak memory at micro batch 1 and 2 (ProRes+GPAS, 3 steps) -> the largest power of two whose
    extrapolated peak stays under 90% of the device, confirmed by a run (halved until it fits)."""
    total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    peaks = {}
    for mb in (1, 2):
        res = run_driver(runner, "prores_mid", shape, mb, 1, 2, 1, args.extra, args.out)
        print(f"  micro batch {mb}: " + (res["error"] if "error" in res else f"peak {res['peak_gib']:.2f} GiB"),
              flush=True)
        if "error" in res:
            if mb == 1:
                raise SystemExit(f"error: the driver fails at micro batch 1: {res['error']} (see the log)")
            return 1
        peaks[mb] = res["peak_gib"]
    per_mb = max(peaks[2] - peaks[1], 1e-3)
    mb = 2
    while mb < 256 and peaks[1] + (2 * mb - 1) * per_mb < 0.9 * total:
        mb *= 2
    while mb > 2:
        res = run_driver(runner, "prores_mid", shape, mb, 1, 2, 1, args.extra, args.out)
        print(f"  micro batch {mb}: {res.get('error') or 'fits'}", flush=True)
        if "error" not in res:
            return mb
        mb //= 2  # out of memory, or any failure near the limit: does not fit
    return mb


def summarize(rows, shape, fpt, peak, measured):
    """Medians, tokens/s, TFLOP/s, MFU per variant and the target ratios of one shape."""
    for res in rows.values():
        if "error" not in res and res["times_ms"]:
            res["step_ms"] = statistics.median(res["times_ms"])
            tokens = res["micro_batch"] * res["accumulation"] * shape[5]
            res["tokens_per_s"] = tokens / (res["step_ms"] / 1000)
            res["tflops"] = res["tokens_per_s"] * fpt / 1e12
            res["mfu"] = res["tflops"] / peak
            res["mfu_of_measured_matmul"] = res["tflops"] / measured
    checks = []
    for what, a, b, kind, bound in TARGETS:
        if any(v not in rows or "step_ms" not in rows[v] for v in (a, b)):
            continue
        if kind == "time":
            value = rows[a]["step_ms"] / rows[b]["step_ms"]
        elif kind == "memory":
            value = rows[a]["peak_gib"] / rows[b]["peak_gib"]
        else:
            value = rows[a]["tokens_per_s"] / rows[b]["tokens_per_s"]
        ok = value >= bound if kind == "speedup" else value <= bound
        check = {"what": what, "value": value, "target": bound, "met": ok}
        if kind != "memory":
            lo, hi = ratio_interval(rows[a]["times_ms"], rows[b]["times_ms"], invert=kind == "speedup")
            check.update(interval_95=[lo, hi], resolved=not lo <= bound <= hi)
        checks.append(check)
    return checks


def ratio_interval(a_ms, b_ms, invert=False, draws=2000):
    """95% bootstrap interval of median(a) / median(b) (b over a with ``invert``, a speed ratio)
    from the timed steps: how far a ratio of two medians can move by the steps' own noise alone."""
    rng, ratios = random.Random(0), []
    for _ in range(draws):
        ra = statistics.median(rng.choices(a_ms, k=len(a_ms)))
        rb = statistics.median(rng.choices(b_ms, k=len(b_ms)))
        ratios.append(rb / ra if invert else ra / rb)
    ratios.sort()
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


def print_table(results):
    print(f"device {results['device']}, MFU against {results['mfu_peak_tflops']:.1f} TFLOP/s "
          f"({results['mfu_peak']}; measured matmul {results['matmul_peak_tflops']:.1f} TFLOP/s), "
          f"{results['accumulation']} microbatches per step, median of "
          f"{results['steps']} steps x {results['rounds']} round(s), extra flags: {results['extra_flags'] or '-'}")
    for name, shp in results["shapes"].items():
        print(f"\nshape {name} {shp['shape']}")
        print(f"{'variant':<12} {'mb':>3} {'step ms':>10} {'tokens/s':>11} {'TFLOP/s':>9} {'MFU':>7} {'peak GiB':>9}")
        for v, r in shp["variants"].items():
            if "step_ms" not in r:
                print(f"{v:<12} {r['micro_batch']:>3} error: {r.get('error', 'not run')}")
            else:
                print(f"{v:<12} {r['micro_batch']:>3} {r['step_ms']:>10.1f} {r['tokens_per_s']:>11.0f} "
                      f"{r['tflops']:>9.2f} {100 * r['mfu']:>6.1f}% {r['peak_gib']:>9.2f}")
        for c in shp["ratios"]:
            cmp = ">=" if "over" in c["what"] else "<="
            noise = ""
            if "interval_95" in c:
                lo, hi = c["interval_95"]
                noise = f"; 95% interval {lo:.4f}-{hi:.4f}" + ("" if c["resolved"] else ": the target is inside it")
            print(f"  {c['what']:<24} {c['value']:.4f}  (target {cmp} {c['target']}: "
                  f"{'met' if c['met'] else 'NOT met'}{noise})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gpu = torch.cuda.is_available()
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["1.3b", "48x512"] if gpu else ["cpu"])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    p.add_argument("--micro-batch-size", default="auto" if gpu else "2",
                   help="an integer, or auto (GPU): the largest that fits the prores_mid variant")
    p.add_argument("--accumulation", type=int, default=4 if gpu else 2, help="microbatches per step")
    p.add_argument("--hf-micro-batch-size", type=int, default=None,
                   help="micro batch of the hf variant when smaller than the others' (its eager layers keep more "
                        "activations: the 1.3B shape at micro batch 8 needs ~89 GiB), at the same global batch")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=5 if gpu else 3, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=1 if gpu else 3,
                   help="run every variant this many times, round-robin; medians over all timed steps")
    p.add_argument("--extra", default="", help="more driver flags for the megatron variants")
    p.add_argument("--timeout", type=int, default=900, help="seconds per variant process")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole benchmark: what is done by then is written (e.g. under a "
                        "wall-clock limit); results are also written after every variant")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--driver-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.driver_worker:
        flags, warmup, out = json.loads(args.driver_worker)
        driver_worker(flags, warmup, out)
        return 0
    if args.hf_worker:
        shape, mb, acc, steps, warmup, out = json.loads(args.hf_worker)
        hf_worker(tuple(shape), mb, acc, steps, warmup, out)
        return 0
    if args.steps < 20:
        print(f"note: --steps {args.steps} is below the 20 timed steps the issue asks for", flush=True)
    os.makedirs(args.out, exist_ok=True)

    sys.path.insert(0, os.path.dirname(HERE))
    from megatron_prores.metrics import peak_tflops

    measured = matmul_peak_tflops()
    datasheet = peak_tflops()
    peak = datasheet or measured
    if gpu:
        torch.cuda.empty_cache()  # leave the device to the variants' processes
    dev = device_name()
    stamp = f"{dev}-{datetime.date.today().isoformat()}"
    path = os.path.join(args.out, f"{stamp}-step-time.json")
    runner = Runner(os.path.join(args.out, f"{stamp}-step-time.log"), args.budget, args.timeout)
    print(f"device {dev}: measured {'bf16' if gpu else 'fp32'} matmul {measured:.1f} TFLOP/s, datasheet bf16 "
          f"peak {datasheet or '-'} TFLOP/s (MFU against {peak:.1f}); "
          f"every process's output goes to {runner.log_path}", flush=True)
    results = {"device": dev, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
               "matmul_peak_tflops": measured, "mfu_peak_tflops": peak,
               "mfu_peak": "datasheet dense bf16" if datasheet else "measured matmul", "extra_flags": args.extra, "accumulation": args.accumulation,
               "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "shapes": {}}

    def write():
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    for name in args.shapes:
        shape = SHAPES[name]
        mb = largest_micro_batch(runner, shape, args) if args.micro_batch_size == "auto" else int(args.micro_batch_size)
        fpt = flops_per_token(shape)
        rows = {v: {"micro_batch": mb, "accumulation": args.accumulation, "times_ms": [], "peak_gib": 0.0}
                for v in args.variants}
        if "hf" in rows and args.hf_micro_batch_size and args.hf_micro_batch_size < mb:
            if mb * args.accumulation % args.hf_micro_batch_size:
                sys.exit(f"--hf-micro-batch-size {args.hf_micro_batch_size} does not divide the global batch "
                         f"{mb * args.accumulation}: pass a divisor of it")
            rows["hf"].update(micro_batch=args.hf_micro_batch_size,  # same global batch, smaller microbatches
                              accumulation=mb * args.accumulation // args.hf_micro_batch_size)
        entry = {"shape": dict(zip(["layers", "hidden", "heads", "query_groups", "ffn", "seq"], shape)),
                 "flops_per_token": fpt, "variants": rows, "ratios": []}
        results["shapes"][name] = entry
        for rnd in range(args.rounds):  # round-robin over the variants: drift hits all alike
            for variant in args.variants:
                row = rows[variant]
                if "error" in row:
                    continue
                while True:
                    print(f"{name}: {variant} at micro batch {row['micro_batch']} x {row['accumulation']} "
                          f"(round {rnd + 1}) ...", flush=True)
                    res = run_variant(runner, variant, shape, row["micro_batch"], row["accumulation"], args)
                    if res.get("oom") and row["micro_batch"] > 1 and not row["times_ms"]:
                        # same global batch in more, smaller microbatches
                        row["micro_batch"] //= 2
                        row["accumulation"] *= 2
                        continue
                    break
                if "error" in res:
                    row["error"] = res["error"]
                    print(f"  error: {res['error']}", flush=True)
                else:
                    row["times_ms"] += res["times_ms"]
                    row["peak_gib"] = max(row["peak_gib"], res["peak_gib"])
                    print(f"  median {statistics.median(res['times_ms']):.1f} ms, peak {res['peak_gib']:.2f} GiB",
                          flush=True)
                entry["ratios"] = summarize(rows, shape, fpt, peak, measured)
                write()

    write()
    print(f"\nresults written to {path}\n")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

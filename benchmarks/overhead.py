"""Per-step cost of ProRes + GPAS against the same megatron-core model without them.

    python benchmarks/overhead.py            # CPU: small shape, fp32; GPU: 1.3B shape, bf16
    python benchmarks/overhead.py --shape small --steps 30
    python benchmarks/overhead.py --shape host --steps 50   # the host's share: tiny tensors, 24 blocks
    python benchmarks/overhead.py --shape host --residual-op compiled   # ... of the GPU's compiled call path

Forward + backward of one micro batch (no optimizer), variants measured round-robin so that
drift hits all alike; the median over the timed steps is reported. Variants:
  megatron    megatron-core's own local GPT layer spec (get_gpt_layer_local_spec), with the same
              core attention as the others (--attention-backend; SDPA by default)
  off         this project's layer with every method off (pre-LN, no ProRes, no GPAS)
  prores      ProRes mid-warmup, GPAS off
  prores+gpas ProRes mid-warmup and GPAS (the target configuration)
  done+gpas   ProRes after its warmup (multiply skipped) and GPAS
Memory: bytes of activations saved for backward (unique storages, parameters excluded), counted
with saved-tensor hooks on any device; on CUDA also the peak allocated memory of the step.
Results go to benchmarks/results/<device>-<date>-overhead.json and a table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import time

import torch

SHAPES = {
    # name: (layers, hidden, heads, ffn, seq, micro batch)
    "small": (8, 256, 4, 688, 256, 4),
    "1.3b": (24, 2048, 16, 5632, 2048, 1),
    # the 1.3B depth at a size where the arithmetic is negligible: the step time is the host's
    # work (Python, dispatch, autograd, compiled-function guards), the part a GPU does not hide
    # when it waits for the host (see the H200 profile in benchmarks/results)
    "host": (24, 32, 4, 64, 8, 1),
}
VARIANTS = ["megatron", "off", "prores", "prores+gpas", "done+gpas"]


def build(variant, shape, bf16, warmup, attention_backend="auto", fused=None):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_prores.config import MethodConfig, ModelConfig
    from megatron_prores.layer import set_prores_step
    from megatron_prores.model import build_model
    from megatron_prores.parallel import seed_everything

    L, h, heads, ffn, seq, _ = shape
    method = {
        "megatron": MethodConfig(),
        "off": MethodConfig(),
        "prores": MethodConfig(prores_schedule="linear", prores_warmup_steps=warmup),
        "prores+gpas": MethodConfig(prores_schedule="linear", prores_warmup_steps=warmup, gpas=True),
        "done+gpas": MethodConfig(prores_schedule="linear", prores_warmup_steps=warmup, gpas=True),
    }[variant]
    cfg = ModelConfig(num_layers=L, hidden_size=h, num_attention_heads=heads, ffn_hidden_size=ffn,
                      vocab_size=32000, seq_length=seq, bf16=bf16, method=method,
                      attention_backend=attention_backend)
    seed_everything(0)
    if variant == "megatron":
        tcfg = cfg.transformer_config()
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        if attention_backend not in ("unfused", "local"):  # the same core attention as the others
            from megatron_prores.attention import sdpa_attention

            spec.submodules.self_attention.submodules.core_attention = sdpa_attention(attention_backend)
        model = GPTModel(tcfg, spec, vocab_size=32000,
                         max_sequence_length=seq, position_embedding_type="rope")
    else:
        [model] = build_model(cfg)
        set_prores_step(model, warmup // 2 if variant != "done+gpas" else warmup)
    if fused is not None:  # what megatron passes as ``fused`` to every residual op (bias-dropout-add)
        model.config.bias_dropout_fusion = fused
    if torch.cuda.is_available():
        model = model.cuda()
    if bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    return model


def step(model, tokens, positions, labels, count_activations=False):
    params = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.data_ptr() not in params and t.numel() > 0:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    if count_activations:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens, positions, None, labels=labels).float().mean()
    else:
        loss = model(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    return sum(saved.values())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default=None, help="default: 1.3b on GPU, small on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps per variant")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "flash", "fused", "unfused"],
                   help="core attention of every variant (megatron's spec gets the same one)")
    p.add_argument("--residual-op", choices=["default", "compiled", "eager"], default="default",
                   help="residual ops of every variant (megatron's and this project's) compiled or eager; "
                        "default: compiled on GPUs, eager on CPUs (the driver's choice). 'compiled' on a CPU "
                        "with --shape host measures the host cost of the GPU's call path")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    shape_name = args.shape or ("1.3b" if cuda else "small")
    steps = args.steps or (20 if cuda else 30)
    shape = SHAPES[shape_name]
    bf16 = cuda
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    from megatron_prores import parallel

    parallel.initialize()
    L, h, heads, ffn, seq, mbs = shape
    dev = "cuda" if cuda else "cpu"
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32000, (mbs, seq), generator=g).to(dev)
    labels = torch.randint(0, 32000, (mbs, seq), generator=g).to(dev)
    positions = torch.arange(seq, device=dev)[None].expand(mbs, seq)
    warmup = 1000 * L

    fused = {"default": None, "compiled": True, "eager": False}[args.residual_op]
    models = {v: build(v, shape, bf16, warmup, args.attention_backend, fused) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    act = {v: step(models[v], tokens, positions, labels, count_activations=True) for v in VARIANTS}
    peak = {}
    for v in VARIANTS:
        for _ in range(args.warmup_steps):
            step(models[v], tokens, positions, labels)
    for _ in range(steps):
        for v in VARIANTS:
            models[v].zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step(models[v], tokens, positions, labels)
            if cuda:
                torch.cuda.synchronize()
                peak[v] = max(peak.get(v, 0), torch.cuda.max_memory_allocated())
            times[v].append(time.perf_counter() - t0)

    device = torch.cuda.get_device_name() if cuda else f"cpu-{platform.machine()}-{os.cpu_count()}cores"
    base = statistics.median(times["megatron"])
    rows = []
    for v in VARIANTS:
        med = statistics.median(times[v])
        rows.append({
            "variant": v, "median_ms": 1000 * med, "time_vs_megatron": med / base,
            "tokens_per_s": mbs * seq / med, "activation_bytes": act[v],
            "activation_vs_megatron": act[v] / act["megatron"],
            "peak_bytes": peak.get(v), "peak_vs_megatron": (peak[v] / peak["megatron"]) if cuda else None,
        })
    result = {
        "device": device, "date": datetime.date.today().isoformat(), "shape": shape_name,
        "layers": L, "hidden": h, "heads": heads, "ffn": ffn, "seq": seq, "micro_batch": mbs,
        "dtype": "bf16" if bf16 else "fp32", "attention_backend": args.attention_backend,
        "residual_op": args.residual_op, "timed_steps": steps, "torch": torch.__version__,
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    tag = "" if args.residual_op == "default" else f"-{args.residual_op}"
    name = f"{device.replace(' ', '_').replace('/', '_')}-{result['date']}-overhead-{shape_name}{tag}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{device} | shape {shape_name} (L={L}, h={h}, seq={seq}, mbs={mbs}, {result['dtype']}) "
          f"| median of {steps} fwd+bwd steps")
    print(f"{'variant':<12} {'ms/step':>9} {'time/megatron':>14} {'tokens/s':>10} "
          f"{'act MiB':>8} {'act/megatron':>13}" + (f" {'peak GiB':>9} {'peak/megatron':>14}" if cuda else ""))
    for r in rows:
        line = (f"{r['variant']:<12} {r['median_ms']:9.1f} {r['time_vs_megatron']:14.3f} "
                f"{r['tokens_per_s']:10.0f} {r['activation_bytes'] / 2**20:8.1f} {r['activation_vs_megatron']:13.3f}")
        if cuda:
            line += f" {r['peak_bytes'] / 2**30:9.2f} {r['peak_vs_megatron']:14.3f}"
        print(line)
    print(f"written: {os.path.join(args.out, name)}")


if __name__ == "__main__":
    main()

"""How much do bf16 GPAS gates change the model, next to bf16 weights? (CPU, float64 arithmetic)

    python benchmarks/gate_precision.py
    python benchmarks/gate_precision.py --layers 48 --norm-type sandwich --gate-range -1 1.2

Under --bf16, megatron-core's Float16Module keeps a bf16 copy of every parameter for the forward
(the optimizer's master copy stays fp32), the GPAS gates included; the papers' code keeps the
gates fp32 (autocast leaves parameters fp32). This measures what the bf16 rounding of the gates
does to the output, against what the bf16 rounding of the other weights does (which every bf16
run accepts): the same float64 model with (a) exact weights, (b) gates rounded to bf16, (c) the
other weights rounded to bf16, (d) both. Gates are drawn uniformly from --gate-range (trained
gates move away from 0; 1 - SiLU(g) stays positive below g ~ 1.278). Reported: the relative
error of the logits and of each block's output stream against (a), the median over --seeds.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics

import torch


def round_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--norm-type", default="pre")
    p.add_argument("--gate-range", type=float, nargs=2, default=[-1.0, 1.2])
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args(argv)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    from megatron_prores import parallel
    from megatron_prores.config import MethodConfig, ModelConfig
    from megatron_prores.layer import prores_layers
    from megatron_prores.model import build_model
    from megatron_prores.parallel import seed_everything

    parallel.initialize()
    seq, batch, vocab = 64, 2, 512
    cfg = ModelConfig(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=4, ffn_hidden_size=4 * a.hidden,
                      vocab_size=vocab, seq_length=seq, params_dtype=torch.float64,
                      method=MethodConfig(norm_type=a.norm_type, gpas=True))
    errs = {k: [] for k in ("gates bf16", "weights bf16", "both bf16")}
    stream = {k: [] for k in errs}
    for seed in range(a.seeds):
        seed_everything(seed)
        [model] = build_model(cfg)
        g = torch.Generator().manual_seed(seed)
        lo, hi = a.gate_range
        for layer in prores_layers(model):
            layer.gpas_gate.data.copy_(lo + (hi - lo) * torch.rand(layer.gpas_gate.shape, generator=g,
                                                                  dtype=torch.float64))
        tokens = torch.randint(0, vocab, (batch, seq), generator=g)
        positions = torch.arange(seq)[None].expand(batch, seq)
        exact = {n: p.detach().clone() for n, p in model.named_parameters()}

        def run(gates: bool, weights: bool):
            for n, p in model.named_parameters():
                is_gate = n.endswith("gpas_gate")
                p.data.copy_(round_bf16(exact[n]) if (gates if is_gate else weights) else exact[n])
            outs = []
            hooks = [l.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
                     for l in prores_layers(model)]
            with torch.no_grad():
                logits = model(tokens, positions, None)
            for h in hooks:
                h.remove()
            return logits, outs

        ref, ref_streams = run(False, False)
        for key, (gates, weights) in {"gates bf16": (True, False), "weights bf16": (False, True),
                                      "both bf16": (True, True)}.items():
            got, streams = run(gates, weights)
            errs[key].append(((got - ref).norm() / ref.norm()).item())
            stream[key].append(max(((s - r).norm() / r.norm()).item() for s, r in zip(streams, ref_streams)))
    print(f"{a.norm_type}, {a.layers} blocks, hidden {a.hidden}, gates ~ U({a.gate_range[0]}, {a.gate_range[1]}), "
          f"median of {a.seeds} seeds; relative error against float64 with exact weights")
    print(f"{'rounded to bf16':<16} {'logits':>10} {'worst block output':>20}")
    for k in errs:
        print(f"{k:<16} {statistics.median(errs[k]):10.2e} {statistics.median(stream[k]):20.2e}")


if __name__ == "__main__":
    main()

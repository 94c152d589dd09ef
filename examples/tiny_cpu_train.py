"""Train a tiny ProRes + GPAS GPT on CPU with tensor parallelism over 2 gloo processes.

A stand-in for the training driver: real megatron-core pieces (DDP, the 1F1B/no-pipelining
schedules, megatron's Adam with grad clipping) on byte-level tokens of real text (the Python
standard library's own source, present on every machine). It spawns its own ranks:

    python examples/tiny_cpu_train.py                       # TP=2, 2 processes
    python examples/tiny_cpu_train.py --pipeline-model-parallel-size 2 --tensor-model-parallel-size 1
"""

from __future__ import annotations

import argparse
import glob
import os
import socket
import sys
import sysconfig
import time

import torch
import torch.multiprocessing as mp


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--num-microbatches", type=int, default=2)
    p.add_argument("--train-iters", type=int, default=150)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--tensor-model-parallel-size", type=int, default=2)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--norm-type", default="pre")
    p.add_argument("--prores-schedule", default="linear")
    p.add_argument("--prores-warmup-steps", type=float, default=80)
    p.add_argument("--gpas", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def corpus_bytes(limit: int = 4_000_000) -> torch.Tensor:
    """Bytes of the standard library's source files (real text, no download)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    data = bytearray()
    for f in files:
        with open(f, "rb") as fh:
            data += fh.read()
        if len(data) >= limit:
            break
    return torch.frombuffer(bytes(data[:limit]), dtype=torch.uint8).long()


def model_config(args):
    from megatron_prores.config import MethodConfig, ModelConfig

    return ModelConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, vocab_size=256, seq_length=args.seq_length,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        method=MethodConfig(norm_type=args.norm_type, prores_schedule=args.prores_schedule,
                            prores_warmup_steps=args.prores_warmup_steps, gpas=args.gpas),
    )


def train(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prores import parallel
    from megatron_prores.gpas import gpas_scale
    from megatron_prores.layer import prores_layers, set_prores_step
    from megatron_prores.model import build_model

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cfg = model_config(args)
    parallel.initialize(tp, pp, seed=args.seed)
    chunks = build_model(cfg)
    ddp = DistributedDataParallelConfig(overlap_grad_reduce=False, use_distributed_optimizer=False)
    model = [DistributedDataParallel(c.config, ddp, c) for c in chunks]
    model[0].config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.1, adam_beta1=0.9,
                        adam_beta2=0.95, clip_grad=1.0, params_dtype=torch.float32), model,
        use_gloo_process_groups=torch.cuda.is_available())

    data = corpus_bytes()
    dp_rank = parallel_state.get_data_parallel_rank()
    gen = torch.Generator().manual_seed(args.seed + dp_rank)
    s, b = args.seq_length, args.micro_batch_size
    split = int(0.95 * len(data))

    def batch(lo, hi, g):
        starts = torch.randint(lo, hi - s - 1, (b,), generator=g)
        win = torch.stack([data[i:i + s + 1] for i in starts.tolist()])
        return win[:, :-1], win[:, 1:]

    def forward_step(data_iterator, chunk):
        tokens, labels = next(data_iterator)
        out = chunk(tokens, torch.arange(s)[None].expand(b, s), None, labels=labels)

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"lm loss": loss.detach()}

        return out, loss_func

    fwd_bwd = get_forward_backward_func()
    is_last = parallel_state.is_pipeline_last_stage()
    start, window = time.time(), []
    for it in range(args.train_iters):
        t0 = time.time()
        set_prores_step(model, it)  # once per step, before the forward/backward call
        for m in model:
            m.zero_grad_buffer()
        opt.zero_grad()
        batches = iter([batch(0, split, gen) for _ in range(args.num_microbatches)])
        losses = fwd_bwd(forward_step_func=forward_step, data_iterator=batches, model=model,
                         num_microbatches=args.num_microbatches, seq_length=s, micro_batch_size=b)
        _, grad_norm, _ = opt.step()
        if is_last:
            window.append(sum(l["lm loss"].item() for l in losses) / len(losses))
        if (it + 1) % args.log_interval == 0 and is_last and parallel_state.get_tensor_model_parallel_rank() == 0:
            print(f" iteration {it + 1:5d}/{args.train_iters} | lm loss: {sum(window) / len(window):.4f} | "
                  f"grad norm: {grad_norm:.3f} | elapsed time per iteration (ms): {1000 * (time.time() - t0):.1f}",
                  flush=True)
            window = []
    layers = list(prores_layers(model))
    if is_last and parallel_state.get_tensor_model_parallel_rank() == 0:
        print(f"done in {time.time() - start:.1f}s; per-block ProRes values: "
              f"{[round(l.prores_scale.item(), 3) if l.prores_scale is not None else 1.0 for l in layers]}")
        if args.gpas:
            print(f"per-block GPAS scales 1-SiLU(g): {[round(gpas_scale(l.gpas_gate).item(), 3) for l in layers]}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    from megatron_prores.config import ConfigError

    try:
        model_config(args).validate()  # before any process starts
    except ConfigError as e:
        sys.exit(f"error: {e}")
    world = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(train, args=(world, port, args), nprocs=world, join=True)


if __name__ == "__main__":
    main()

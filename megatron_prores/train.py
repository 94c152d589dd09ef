"""The pretraining driver: data -> train -> checkpoint -> exact resume.

    torchrun --nproc-per-node N -m megatron_prores.train --num-layers ... (or megatron-prores-train)
    srun python -m megatron_prores.train ...     (ranks from SLURM_* when torchrun's are absent)

Reads top to bottom: set up, build, resume, loop (set the ProRes step, forward/backward, skip
non-finite steps, optimizer step, log, evaluate, save on interval/signal/time limit), finish.
Without CUDA it runs on CPU with gloo.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time

# SLURM's --signal=USR1 can arrive while the imports below still run (seconds); SIGUSR1's default
# action would kill the process. When run as the driver, record it from the first moment; the
# ExitRequest below turns it into a save-and-exit (or restores the default without the flag).
_early_signals: list = []
if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "megatron-prores-train":
    signal.signal(signal.SIGUSR1, lambda signum, frame: _early_signals.append(signum))

import torch  # noqa: E402
import torch.distributed as dist

from megatron_prores.config import ConfigError


class ExitRequest:
    """SIGTERM/SIGUSR1 (SLURM preemption, --signal) -> save at the next step boundary, exit 0."""

    def __init__(self, enabled: bool):
        self.received = enabled and bool(_early_signals)
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handler)
        elif signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL:
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    def _handler(self, signum, frame):
        self.received = True

    def any_rank(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def model_args_for_checkpoint(cfg) -> dict:
    m = cfg.method
    return dict(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.query_groups,
                ffn_hidden_size=cfg.ffn_size, vocab_size=cfg.vocab_size, normalization=cfg.normalization,
                norm_type=m.norm_type, gpas=m.gpas, gpas_gate=m.gpas_gate,
                mix_post_layers=m.post_layers(cfg.num_layers) if m.norm_type == "mix" else None)


def flops_per_token(cfg) -> float:
    """Training FLOPs per token (forward + backward = 3x forward) of the dense GPT."""
    L, h, s = cfg.num_layers, cfg.hidden_size, cfg.seq_length
    kv = cfg.query_groups * (h // cfg.num_attention_heads)
    per_layer = 2 * h * (h + 2 * kv) + 2 * h * h + 2 * 3 * h * cfg.ffn_size + 2 * 2 * s * h
    return 3 * (L * per_layer + 2 * h * cfg.vocab_size)


def spike_score(losses, window: int = 1000, sigmas: float = 7.0) -> float:
    """OLMo's loss-spike score: share of points >= 7 sigma above the rolling mean of the previous
    ``window`` steps, over 10-90% of training."""
    n = len(losses)
    lo, hi = int(0.1 * n), int(0.9 * n)
    spikes = total = 0
    for i in range(max(lo, 2), hi):
        prev = losses[max(0, i - window):i]
        mean = sum(prev) / len(prev)
        std = math.sqrt(sum((x - mean) ** 2 for x in prev) / len(prev))
        total += 1
        spikes += std > 0 and losses[i] - mean >= sigmas * std
    return spikes / total if total else 0.0


def main(argv=None) -> int:
    from megatron_prores.arguments import parse_args

    try:
        args = parse_args(argv)
        return train(args)
    except ConfigError as e:
        from megatron_prores.parallel import rank_and_world

        if rank_and_world()[0] == 0:  # one line, from one rank
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def build_optimizer(args, model):
    """AdamW (megatron-core's plain or distributed optimizer) and its LR/WD scheduler.

    Weight decay skips 1-D parameters (norm gains, GPAS gates) through megatron-core's ``wd_mult``
    0, which only the scheduler turns into a group weight decay of 0: the two are built together.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                        clip_grad=args.clip_grad, bf16=args.bf16,
                        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
                        use_distributed_optimizer=args.use_distributed_optimizer),
        model, use_gloo_process_groups=torch.cuda.is_available())
    gbs = args.global_batch_size  # megatron's scheduler counts samples
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs,
        lr_decay_steps=(args.lr_decay_iters or args.train_iters) * gbs,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs, wd_incr_style="constant",
        wsd_decay_steps=args.lr_wsd_decay_iters * gbs if args.lr_wsd_decay_iters else None,
        lr_wsd_decay_style=args.lr_wsd_decay_style)
    return optimizer, scheduler


def train(args) -> int:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prores import checkpointing, data, parallel
    from megatron_prores.arguments import check_layout, model_config
    from megatron_prores.config import config_to_dict
    from megatron_prores.gpas import gpas_scale
    from megatron_prores.layer import prores_layers, set_prores_step
    from megatron_prores.model import build_model
    from megatron_prores.tokenizer import build_tokenizer

    start_time = time.time()
    exit_request = ExitRequest(args.exit_signal_handler)  # first: a signal during set-up is kept
    # ---- configuration (fails before any process group or model exists) -------------------
    tokenizer_type = "NullTokenizer" if args.mock_data and not args.tokenizer_model else args.tokenizer_type
    tokenizer = build_tokenizer(tokenizer_type, args.tokenizer_model, args.vocab_size)
    vocab = args.vocab_size or tokenizer.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but --vocab-size is {vocab}; "
                          f"raise --vocab-size or drop it to use the tokenizer's")
    cfg = model_config(args, vocab)
    cfg.validate()
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    dp, num_micro = check_layout(args, cfg, world)
    if args.save:
        try:
            os.makedirs(args.save, exist_ok=True)
            probe = os.path.join(args.save, f".write_test_{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            raise ConfigError(f"--save {args.save!r} is not writable ({e.strerror}); pick another directory") from None

    # ---- processes, model, optimizer -----------------------------------------------------
    parallel.initialize(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                        cfg.virtual_pipeline_size, cfg.context_parallel_size, seed=args.seed)
    rank = dist.get_rank()
    chunks = build_model(cfg)
    if torch.cuda.is_available():
        chunks = [c.cuda() for c in chunks]
    if args.bf16:
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(c.config, c) for c in chunks]
    tcfg = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16, overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer)
    model = [DistributedDataParallel(tcfg, ddp_config, c, disable_bucketing=i > 0)
             for i, c in enumerate(chunks)]
    tcfg.finalize_model_grads_func = finalize_model_grads
    optimizer, scheduler = build_optimizer(args, model)

    # ---- resume --------------------------------------------------------------------------
    state = {"iteration": 0, "consumed_samples": 0, "skipped_iters": 0, "losses": []}
    arch = model_args_for_checkpoint(cfg)
    export_config = dict(config_to_dict(cfg), tokenizer_type=tokenizer_type,  # for the HF export
                         tokenizer_model=os.path.abspath(args.tokenizer_model) if args.tokenizer_model else None)
    if args.load:
        loaded = checkpointing.load_checkpoint(args.load, model, optimizer, scheduler, arch)
        if loaded is not None:
            state.update(loaded)
            if rank == 0:
                print(f"resumed from {args.load} at iteration {state['iteration']}", flush=True)
        elif rank == 0:
            print(f"no checkpoint under {args.load}: starting from scratch", flush=True)

    # ---- data ------------------------------------------------------------------------------
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    eval_runs = (args.train_iters // args.eval_interval + 1) if args.eval_interval else 1
    sizes = [args.train_iters * args.global_batch_size,
             eval_runs * args.eval_iters * args.global_batch_size if args.eval_iters else 0, 0]
    train_ds, valid_ds, _ = data.build_datasets(args, tokenizer, sizes)
    mbs, s = args.micro_batch_size, args.seq_length
    train_iter = data.batches(train_ds, state["consumed_samples"], mbs, dp_rank, dp_size)

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        out = chunk(batch["tokens"].to(dev), batch["position_ids"].to(dev), None,
                    labels=batch["labels"].to(dev))
        loss_mask = batch["loss_mask"].to(dev).float()

        def loss_func(per_token):
            total = (per_token.float() * loss_mask).sum()
            count = loss_mask.sum().clamp_min(1)
            return total / count, {"lm loss": (total / count).detach()}

        return out, loss_func

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    fwd_bwd = get_forward_backward_func()
    is_last = ps.is_pipeline_last_stage(ignore_virtual=True)
    log_rank = is_last and ps.get_tensor_model_parallel_rank() == 0 and dp_rank == 0
    # One TensorBoard writer per pipeline stage (its TP rank 0 of data-parallel replica 0): the
    # per-block series come from the stage holding the block; run-level scalars from the last.
    tb = None
    if args.tensorboard_dir and ps.get_tensor_model_parallel_rank() == 0 and dp_rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(args.tensorboard_dir, filename_suffix=f".stage{ps.get_pipeline_model_parallel_rank()}")
    writer = tb if is_last else None

    def run(iterator, forward_only):
        iters = [iterator] * len(model) if len(model) > 1 else iterator
        losses = fwd_bwd(forward_step_func=forward_step, data_iterator=iters, model=model,
                         num_microbatches=num_micro, seq_length=s, micro_batch_size=mbs,
                         decoder_seq_length=s, forward_only=forward_only)
        # one host sync for all microbatch losses, after the step's forward/backward
        loss = (torch.stack([x["lm loss"].float() for x in losses]).sum().cpu().view(1) / num_micro
                if losses else torch.zeros(1))
        dist.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())  # only the last stage has it
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
        return loss.item() / dp_size

    def evaluate(iteration):
        if not args.eval_iters:
            return None
        for m in model:
            m.eval()
        it = data.batches(valid_ds, 0, mbs, dp_rank, dp_size)
        with torch.no_grad():
            loss = sum(run(it, True) for _ in range(args.eval_iters)) / args.eval_iters
        for m in model:
            m.train()
        if rank == 0:
            print(f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | "
                  f"lm loss PPL: {math.exp(min(loss, 50)):.6E}", flush=True)
        if writer:
            writer.add_scalar("lm-loss-validation/lm loss", loss, iteration)
            writer.add_scalar("lm-loss-validation/lm loss ppl", math.exp(min(loss, 50)), iteration)
        return loss

    saver = checkpointing.CheckpointSaver(args.save, args.keep_last_n, args.async_save) if args.save else None

    def saved(iteration, t0):
        if rank == 0:
            how = "in the background" if args.async_save else f"in {time.time() - t0:.2f}s"
            print(f"saved checkpoint at iteration {iteration} to {args.save} {how}", flush=True)

    def save(iteration):
        t0 = time.time()
        train_state = {k: state[k] for k in ("consumed_samples", "skipped_iters", "losses")}
        if saver.save(iteration, model, optimizer, scheduler, train_state, arch, export_config):
            saved(iteration, t0)
        elif rank == 0:
            print(f"writing checkpoint {iteration} in the background (training paused {time.time() - t0:.2f}s)",
                  flush=True)

    def poll_saving(blocking=False):  # publish a finished background checkpoint (collective)
        if saver is not None and saver.in_flight is not None:
            done = saver.poll(blocking)
            if done is not None:
                saved(done, 0.0)

    stream_rms = StreamRMS(model)
    peak = peak_tflops()
    gates = [l.gpas_gate for l in prores_layers(model)] if args.gpas else []
    tokens_per_iter = args.global_batch_size * s
    fpt = flops_per_token(cfg)
    nonfinite_in_a_row, window = 0, {"loss": 0.0, "n": 0, "time": 0.0}
    if rank == 0:
        print(f"training {cfg.num_layers} layers, hidden {cfg.hidden_size}, {num_micro} microbatches "
              f"x {mbs} x DP {dp_size}, norm {cfg.method.norm_type}, ProRes {cfg.method.prores_schedule}, "
              f"GPAS {'on' if cfg.method.gpas else 'off'}, on {world} {'GPU' if dev.type == 'cuda' else 'CPU'} "
              f"process(es)", flush=True)

    # ---- the loop --------------------------------------------------------------------------
    while state["iteration"] < args.train_iters:
        iteration = state["iteration"]
        t0 = time.time()
        set_prores_step(model, iteration)  # once per step, before forward/backward
        logging_step = (iteration + 1) % args.log_interval == 0
        if logging_step and args.tensorboard_dir:  # same decision on every rank (collective below)
            stream_rms.start()
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        loss = run(train_iter, False)
        rms = stream_rms.stop() if stream_rms.handles else {}
        # one flag for the loss and every gradient buffer: a single host sync per step
        flags = [torch.isfinite(b.grad_data).all() for m in model for b in m.buffers]
        finite = torch.tensor([float(math.isfinite(loss) and bool(torch.stack(flags).all()))])
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        gate_norm = None
        if finite.item():
            if gates and (args.clip_gate_grad > 0 or logging_step):
                gate_norm = _gate_grad_norm(gates, args.clip_gate_grad, optimizer)
            _, grad_norm, _ = optimizer.step()
            scheduler.step(increment=args.global_batch_size)
            nonfinite_in_a_row = 0
        else:
            grad_norm = float("nan")
            state["skipped_iters"] += 1
            nonfinite_in_a_row += 1
            if rank == 0:
                print(f"iteration {iteration + 1}: non-finite loss or gradient, step skipped "
                      f"({nonfinite_in_a_row} in a row)", flush=True)
            if nonfinite_in_a_row >= args.max_nonfinite_iters:
                if rank == 0:
                    print(f"error: {nonfinite_in_a_row} consecutive non-finite steps "
                          f"(--max-nonfinite-iters {args.max_nonfinite_iters}); stopping without saving: "
                          f"the last good checkpoint stays the latest", file=sys.stderr, flush=True)
                poll_saving(blocking=True)
                return 3
        state["iteration"] = iteration = iteration + 1
        state["consumed_samples"] += args.global_batch_size
        state["losses"].append(loss)
        dt = time.time() - t0
        window["loss"] += loss if math.isfinite(loss) else 0.0
        window["n"] += 1
        window["time"] += dt

        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            avg_t = window["time"] / window["n"]
            tps = tokens_per_iter / avg_t
            tflops = fpt * tps / world / 1e12
            lr = scheduler.get_lr(optimizer.param_groups[0])
            if log_rank:
                line = (f" iteration {iteration:8d}/{args.train_iters:8d} | consumed samples: "
                        f"{state['consumed_samples']:12d} | elapsed time per iteration (ms): {1000 * avg_t:.1f} | "
                        f"learning rate: {lr:.6E} | global batch size: {args.global_batch_size:5d} | "
                        f"lm loss: {window['loss'] / window['n']:.6E} | grad norm: {grad_norm:.3f} | "
                        f"skipped iterations: {state['skipped_iters']:3d} | tokens/s: {tps:.0f} | "
                        f"TFLOP/s per device: {tflops:.3f}" + (f" | MFU: {100 * tflops / peak:.1f}%" if peak else "")
                        + (f" | gate grad norm: {gate_norm.item():.6E}" if gate_norm is not None else "")
                        + f" | peak memory (GiB): {peak_memory_gib():.2f}")
                print(line, flush=True)
            if writer:
                writer.add_scalar("lm-loss-training/lm loss", window["loss"] / window["n"], iteration)
                writer.add_scalar("learning-rate", lr, iteration)
                writer.add_scalar("grad-norm", grad_norm, iteration)
                writer.add_scalar("throughput/tokens per second", tps, iteration)
                if gate_norm is not None:
                    writer.add_scalar("gpas/gate grad norm", gate_norm.item(), iteration)
                if peak:
                    writer.add_scalar("throughput/MFU", tflops / peak, iteration)

            if tb:
                _log_blocks(tb, model, iteration, gpas_scale)
                for block, value in rms.items():
                    tb.add_scalar(f"stream-rms/block {block:03d}", value, iteration)
            window = {"loss": 0.0, "n": 0, "time": 0.0}
        poll_saving()
        if args.eval_interval and iteration % args.eval_interval == 0:
            evaluate(iteration)
        stop = exit_request.any_rank() if args.exit_signal_handler else False
        if args.exit_duration_in_mins is not None:
            over = torch.tensor([1.0 if (time.time() - start_time) / 60 > args.exit_duration_in_mins else 0.0])
            dist.all_reduce(over, op=dist.ReduceOp.MAX)
            stop = stop or bool(over.item())
        if args.exit_interval and iteration % args.exit_interval == 0 and iteration < args.train_iters:
            stop = True
        if args.save and (stop or (args.save_interval and iteration % args.save_interval == 0)):
            save(iteration)
        if stop:
            poll_saving(blocking=True)
            if rank == 0:
                print(f"exiting at iteration {iteration} (signal, time limit or --exit-interval)"
                      + ("; checkpoint saved" if args.save else ""), flush=True)
            return 0

    if not (args.eval_interval and state["iteration"] % args.eval_interval == 0):
        evaluate(state["iteration"])
    if args.save and not (args.save_interval and state["iteration"] % args.save_interval == 0):
        save(state["iteration"])
    poll_saving(blocking=True)
    score = spike_score(state["losses"])
    if rank == 0:
        print(f"loss-spike score: {score:.4f}", flush=True)
    if writer:
        writer.add_scalar("loss-spike-score", score, state["iteration"])
    if tb:
        tb.close()
    return 0


class StreamRMS:
    """RMS of the residual stream after each block, measured on logging iterations only (forward
    hooks added for that step; values stay on the device until the log line)."""

    def __init__(self, model):
        from megatron_prores.layer import prores_layers

        self.layers = list(prores_layers(model))
        self.handles, self.sums = [], {}

    def start(self):
        def hook(layer):
            def fn(module, args, output):
                out = output[0] if isinstance(output, tuple) else output
                ms = out.detach().float().pow(2).mean()
                s, n = self.sums.get(layer.layer_number, (0.0, 0))
                self.sums[layer.layer_number] = (s + ms, n + 1)
            return fn

        self.sums = {}
        self.handles = [l.register_forward_hook(hook(l)) for l in self.layers]

    def stop(self) -> dict:
        """{global block: RMS}, averaged over microbatches and tensor-parallel ranks (SP shards)."""
        from megatron.core import parallel_state as ps

        for h in self.handles:
            h.remove()
        self.handles = []
        if not self.sums:
            return {}
        blocks = sorted(self.sums)
        ms = torch.stack([torch.as_tensor(self.sums[b][0]) / self.sums[b][1] for b in blocks]).float()
        dist.all_reduce(ms, group=ps.get_tensor_model_parallel_group())
        ms /= ps.get_tensor_model_parallel_world_size()
        return {b: v for b, v in zip(blocks, ms.sqrt().tolist())}


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def peak_memory_gib() -> float:
    """Peak memory of this process so far: allocated CUDA memory on a GPU, resident set on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def peak_tflops() -> float | None:
    """Dense bf16 peak of this GPU, for MFU (None on CPU or an unknown device)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _gate_grad_norm(gates, clip: float, optimizer=None) -> torch.Tensor:
    """L2 norm of all GPAS gate gradients (over every pipeline stage), clipped to ``clip`` > 0 on
    the device (no host sync; read the returned tensor only when logging).

    With the plain optimizer every data-parallel rank holds the all-reduced gradient. With the
    distributed optimizer the gradient buffer has been reduce-scattered: a rank holds the reduced
    values only inside its own shard (the rest of the buffer keeps its local, unreduced gradients),
    so each rank sums the squares of the gate elements it owns and the sum is all-reduced over the
    data-parallel group. Scaling the whole gate gradient then scales every owned element.
    """
    from megatron.core import parallel_state as ps

    owned, dp_groups = [], []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if type(opt).__name__ == "DistributedOptimizer":
            if opt.data_parallel_group not in dp_groups:  # same order on every rank
                dp_groups.append(opt.data_parallel_group)
            for g in gates:
                if g in opt.model_param_gbuf_map:  # this rank owns part of this gate
                    r = opt._get_model_param_range_map(g)["param"]
                    owned.append(g.main_grad.view(-1)[r.start:r.end])
    if not dp_groups:
        owned = [g.main_grad for g in gates]
    sq = torch.zeros(1, dtype=torch.float32, device=gates[0].main_grad.device)
    for o in owned:
        sq += o.float().pow(2).sum()
    for group in dp_groups:
        dist.all_reduce(sq, group=group)
    dist.all_reduce(sq, group=ps.get_pipeline_model_parallel_group())
    norm = sq.sqrt()
    if clip > 0:
        scale = (clip / (norm + 1e-6)).clamp(max=1.0)
        for g in gates:
            g.main_grad.mul_(scale.to(g.main_grad.dtype))
    return norm


def _log_blocks(writer, model, iteration, gpas_scale):
    from megatron_prores.layer import prores_layers

    for layer in prores_layers(model):
        l = layer.layer_number
        if layer.prores_scale is not None:
            writer.add_scalar(f"prores/block {l:03d}", layer.prores_scale.item(), iteration)
        if layer.gpas_gate is not None:
            for j, v in enumerate(gpas_scale(layer.gpas_gate.detach()).tolist()):
                writer.add_scalar(f"gpas-scale/block {l:03d}" + (f" sub{j}" if layer.gpas_gate.numel() == 2 else ""),
                                  v, iteration)


def cli():
    code = main()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    cli()

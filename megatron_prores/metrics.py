"""What the driver measures and reports: the Megatron-style log line, TensorBoard (and wandb) scalars,
throughput and MFU, the residual-stream RMS per block, and OLMo's loss-spike score."""

from __future__ import annotations

import math
import os
from collections import deque
from typing import Optional

import numpy
import torch
import torch.distributed as dist

from megatron_prores.config import ConfigError

# Datasheet dense (no sparsity) bf16 peak per GPU, TFLOP/s, matched in order against the CUDA device
# name: the PCIe/NVL variants and GB200 come before the names they contain ("NVIDIA H100 PCIe" is
# not an SXM H100; "NVIDIA GB200" contains "B200").
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H100": 989.0, "H200": 989.0,
                    "A100": 312.0, "GB200": 2500.0, "B200": 2250.0}


def flops_per_token(cfg) -> float:
    """Model FLOPs per trained token: forward + backward = 3x the forward matmul FLOPs (2 per
    multiply-add), as PaLM's MFU, llm-foundry and the Megatron-LM paper (Narayanan et al. 2021)
    count them (Megatron-LM's current code halves the causal attention term; this does not).

    Per layer: the Q, K, V projections (K and V of ``query_groups`` heads: GQA-aware), the output
    projection, the MLP (three h x ffn matrices with SwiGLU, two without) and the attention scores
    QK^T and their product with V, counted over the full s x s square (causal masking not halved);
    then the logit layer over the padded vocabulary (the rows the output matmul computes, as
    Megatron-LM's padded_vocab_size). Not counted: the embedding lookup, norms, softmax, RoPE,
    ProRes/GPAS and other elementwise work, and activation recompute (model FLOPs, not hardware
    FLOPs: recompute does not change this number)."""
    L, h, s = cfg.num_layers, cfg.hidden_size, cfg.seq_length
    d = h // cfg.num_attention_heads  # head size (kv_channels)
    q, kv = cfg.num_attention_heads * d, cfg.query_groups * d
    mlp_matrices = 3 if cfg.swiglu else 2
    per_layer = (2 * h * (q + 2 * kv)  # QKV projection
                 + 2 * q * h  # output projection
                 + 2 * mlp_matrices * h * cfg.ffn_size  # MLP
                 + 2 * 2 * s * q)  # QK^T and AV, the full s x s square
    return 3 * (L * per_layer + 2 * h * cfg.padded_vocab_size)


def peak_memory_gib() -> float:
    """Peak memory of this process so far: allocated CUDA memory on a GPU, resident set on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def peak_tflops() -> Optional[float]:
    """Dense bf16 peak of this GPU, for MFU (None on CPU or an unknown device)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class SpikeScore:
    """OLMo's loss-spike score, kept online: the share of steps in [10%, 90%) of a ``total``-step
    run whose loss is >= ``sigmas`` standard deviations above the mean of the previous ``window``
    losses. State is bounded: the last ``window`` losses and two counters (checkpointed)."""

    def __init__(self, total: int, window: int = 1000, sigmas: float = 7.0):
        self.lo, self.hi = max(int(0.1 * total), 2), int(0.9 * total)
        self.sigmas = sigmas
        self.recent: deque = deque(maxlen=window)
        self.spikes = self.counted = 0
        self.step = 0  # index of the next loss

    def update(self, loss: float) -> None:
        """The loss of the next step (a skipped, non-finite step counts as a step, not a loss)."""
        if not math.isfinite(loss):
            self.step += 1
            return
        if self.lo <= self.step < self.hi and self.recent:
            prev = numpy.fromiter(self.recent, dtype=numpy.float64)
            mean, std = prev.mean(), prev.std()
            self.counted += 1
            self.spikes += bool(std > 0 and loss - mean >= self.sigmas * std)
        self.recent.append(loss)
        self.step += 1

    def score(self) -> float:
        return self.spikes / self.counted if self.counted else 0.0

    def state_dict(self) -> dict:
        return {"losses": list(self.recent), "spike_counts": [self.spikes, self.counted, self.step]}

    def load_state_dict(self, state: dict) -> None:
        losses = list(state.get("losses", []))
        if "spike_counts" in state:
            self.spikes, self.counted, self.step = state["spike_counts"]
            self.recent.clear()
            self.recent.extend(losses)
        else:  # a checkpoint of an earlier version: the whole history, replayed
            self.spikes = self.counted = self.step = 0
            self.recent.clear()
            for loss in losses:
                self.update(loss)


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
        """{global block: RMS}, averaged over microbatches and the tensor- and context-parallel
        ranks (sequence-parallel and context-parallel shards hold equal numbers of tokens)."""
        from megatron.core import parallel_state as ps

        if not self.handles:
            return {}
        for h in self.handles:
            h.remove()
        self.handles = []
        if not self.sums:
            return {}
        blocks = sorted(self.sums)
        ms = torch.stack([torch.as_tensor(self.sums[b][0]) / self.sums[b][1] for b in blocks]).float()
        group = ps.get_tensor_and_context_parallel_group()
        dist.all_reduce(ms, group=group)
        ms /= group.size()
        return {b: v for b, v in zip(blocks, ms.sqrt().tolist())}


def _num(x: float, fmt: str) -> str:
    """A logged number; NaN/inf as 'nan'/'inf' (a skipped step must not look like a loss)."""
    return format(x, fmt) if math.isfinite(x) else str(x)


class MetricsLogger:
    """The training log line every --log-interval steps and the scalars: TensorBoard and (the
    optional extra) Weights & Biases, each a writer with ``add_scalar(tag, value, step)``.

    Owns the averaging window: time over every step, loss over the steps that were not skipped
    (a non-finite step has no loss to average). One TensorBoard writer per pipeline stage (its TP
    rank 0 of data-parallel replica 0): per-block series come from the stage holding the block,
    run-level scalars from the last stage. One wandb run, written by the last stage's first rank
    (``wandb_here``): the other stages' first ranks (``block_group``, the pipeline group) send it
    their per-block series at each log step (megatron_prores/wandb_writer.py).
    """

    def __init__(self, args, cfg, world: int, prints: bool, tb_dir: Optional[str], run_scalars: bool,
                 stage: int, wandb_run_id: Optional[str] = None, wandb_here: bool = False, block_group=None):
        self.args, self.world, self.prints = args, world, prints
        self.tokens_per_iter = args.global_batch_size * args.seq_length
        self.fpt = flops_per_token(cfg)
        self.peak = peak_tflops()
        self.tb = self.wandb = None
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tb_dir, filename_suffix=f".stage{stage}")
        self.wandb_rank = self.block_group = None
        if wandb_run_id:  # collective: every rank, once
            self.wandb = self._open_wandb(args, wandb_run_id, wandb_here)
            if block_group is not None and dist.get_world_size(block_group) > 1:
                self.block_group = block_group
        # run-level scalars: the last stage's TensorBoard writer and the wandb run
        self.run_writers = [w for w in (self.tb if run_scalars else None, self.wandb) if w is not None]
        self._reset()

    def _open_wandb(self, args, run_id: str, here: bool):
        """Start the wandb run on the one process that writes it; a failure there ends every rank
        with its one-line reason (a ConfigError)."""
        from megatron_prores import wandb_writer

        rank = torch.tensor([dist.get_rank() if here else -1])
        dist.all_reduce(rank, op=dist.ReduceOp.MAX)
        self.wandb_rank = int(rank.item())
        writer, box = None, [None]
        if here:
            try:
                writer = wandb_writer.open_run(args, run_id)
            except Exception as e:  # wandb's errors have no common base class
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                box[0] = (f"--wandb-project {args.wandb_project}: wandb could not start run {run_id} ({reason})"
                          + ("" if os.environ.get("WANDB_MODE") == "offline" else
                             "; without network access set WANDB_MODE=offline (and upload later with wandb sync)"))
        dist.broadcast_object_list(box, src=self.wandb_rank)
        if box[0]:
            raise ConfigError(box[0])
        return writer

    def _reset(self):
        self.loss_sum, self.loss_n, self.time_sum, self.steps = 0.0, 0, 0.0, 0

    def add(self, loss: float, finite: bool, seconds: float) -> None:
        if finite:
            self.loss_sum += loss
            self.loss_n += 1
        self.time_sum += seconds
        self.steps += 1

    @property
    def reads_model(self) -> bool:
        """log() reads per-block values from the model (the same answer on every rank)."""
        return bool(self.args.tensorboard_dir or self.args.wandb_project)

    def log(self, iteration: int, state, lr: float, grad_norm: float, gate_norm, model, rms: dict) -> None:
        a = self.args
        avg_t = self.time_sum / max(self.steps, 1)
        tps = self.tokens_per_iter / avg_t
        tflops = self.fpt * tps / self.world / 1e12
        loss = self.loss_sum / self.loss_n if self.loss_n else float("nan")
        if self.prints:
            line = (f" iteration {iteration:8d}/{a.train_iters:8d} | consumed samples: "
                    f"{state.consumed_samples:12d} | elapsed time per iteration (ms): {1000 * avg_t:.1f} | "
                    f"learning rate: {lr:.6E} | global batch size: {a.global_batch_size:5d} | "
                    f"lm loss: {_num(loss, '.6E')} | grad norm: {_num(grad_norm, '.3f')} | "
                    f"skipped iterations: {state.skipped_iters:3d} | tokens/s: {tps:.0f} | "
                    f"TFLOP/s per device: {tflops:.3f}"
                    + (f" | MFU: {100 * tflops / self.peak:.1f}%" if self.peak else "")
                    + (f" | gate grad norm: {gate_norm.item():.6E}" if gate_norm is not None else "")
                    + f" | peak memory (GiB): {peak_memory_gib():.2f}")
            print(line, flush=True)
        for w in self.run_writers:
            w.add_scalar("lm-loss-training/lm loss", loss, iteration)
            w.add_scalar("learning-rate", lr, iteration)
            w.add_scalar("grad-norm", grad_norm, iteration)
            w.add_scalar("throughput/tokens per second", tps, iteration)
            if gate_norm is not None:
                w.add_scalar("gpas/gate grad norm", gate_norm.item(), iteration)
            if self.peak:
                w.add_scalar("throughput/MFU", tflops / self.peak, iteration)
        if self.tb or self.wandb or self.block_group is not None:
            blocks = block_scalars(model, rms)
            if self.tb:
                for tag, value in blocks.items():
                    self.tb.add_scalar(tag, value, iteration)
            if self.block_group is not None:  # this stage's blocks to the wandb process (collective)
                parts = [None] * dist.get_world_size(self.block_group) if self.wandb else None
                dist.gather_object(blocks, parts, dst=self.wandb_rank, group=self.block_group)
                blocks = {tag: v for part in parts for tag, v in part.items()} if self.wandb else {}
            if self.wandb:
                for tag in sorted(blocks):
                    self.wandb.add_scalar(tag, blocks[tag], iteration)
                self.wandb.flush()
        self._reset()

    def validation(self, iteration: int, loss: float, name: Optional[str] = None) -> None:
        """The validation loss of the --split part of --data-path, or of the --valid-data-path set ``name``."""
        ppl = math.exp(min(loss, 50))
        if dist.get_rank() == 0:
            of = f" ({name})" if name else ""
            print(f" validation loss{of} at iteration {iteration} | lm loss value: {loss:.6E} | "
                  f"lm loss PPL: {ppl:.6E}", flush=True)
        tag = f"lm-loss-validation/{name + ' ' if name else ''}lm loss"
        for w in self.run_writers:
            w.add_scalar(tag, loss, iteration)
            w.add_scalar(tag + " ppl", ppl, iteration)
        if self.wandb:
            self.wandb.flush()

    def finish(self, iteration: int, spike_score: float) -> None:
        """The end of training: the loss-spike score, then the writers are closed."""
        if dist.get_rank() == 0:
            print(f"loss-spike score: {spike_score:.4f}", flush=True)
        for w in self.run_writers:
            w.add_scalar("loss-spike-score", spike_score, iteration)
        if self.wandb:
            self.wandb.summary("loss-spike-score", spike_score)
        self.close()

    def close(self, exit_code: int = 0) -> None:
        """Close the writers (every exit: the end, an early exit with a checkpoint, an error);
        no collective. Idempotent."""
        tb, wb = self.tb, self.wandb
        self.tb = self.wandb = None
        self.run_writers = []
        if tb:
            tb.close()
        if wb:
            wb.close(exit_code=exit_code)


def block_scalars(model, rms: dict) -> dict:
    """{tag: value} of the blocks this rank holds: ProRes value, GPAS scale (per sublayer with
    sublayer gates), and the residual-stream RMS when it was measured."""
    from megatron_prores.gpas import gpas_scale
    from megatron_prores.layer import prores_layers

    out = {}
    for layer in prores_layers(model):
        l = layer.layer_number
        if layer.prores_scale is not None:
            out[f"prores/block {l:03d}"] = layer.prores_scale.item()
        if layer.gpas_gate is not None:
            sub = layer.gpas_gate.numel() == 2
            for j, v in enumerate(gpas_scale(layer.gpas_gate.detach()).tolist()):
                out[f"gpas-scale/block {l:03d}" + (f" sub{j}" if sub else "")] = v
    for block, value in rms.items():
        out[f"stream-rms/block {block:03d}"] = value
    return out

"""Run one model configuration under a parallel layout and return loss and full gradients.

Used in-process (TP=PP=1, the baseline) and in real multi-process gloo groups. Weights come
from a dist checkpoint saved by the baseline; gradients go back through dist_checkpointing
(the gradient of every parameter written in place of its weight), so a sharded layout's
gradients are compared in the full, layout-independent form.
"""

from __future__ import annotations

import functools
import os
import traceback

import torch

from megatron_prores.config import MethodConfig, ModelConfig

SEQ, MBS, MICROBATCHES, VOCAB = 8, 1, 4, 64
STEP = 37

LAYOUTS = {
    "tp1": dict(),
    "tp2": dict(tensor_model_parallel_size=2),
    "pp2": dict(pipeline_model_parallel_size=2),
    "pp2-vpp2": dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1),
    "tp2-sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "tp2-pp2": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
    "cp2": dict(context_parallel_size=2),
}


def model_config(method: MethodConfig, layout: str) -> ModelConfig:
    return ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=48, vocab_size=VOCAB, seq_length=SEQ,
                       params_dtype=torch.float64, method=method, **LAYOUTS[layout])


def batches():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (MICROBATCHES, MBS, SEQ), generator=g)
    probe = torch.randn(MICROBATCHES, MBS, SEQ, VOCAB, generator=g, dtype=torch.float64)
    return [(tokens[i], probe[i]) for i in range(MICROBATCHES)]


def driver_batches():
    """Micro batches as the driver's data gives them, with a loss mask that is not all ones (so
    that normalizing by a rank's own tokens and by the whole sequence's would differ)."""
    g = torch.Generator().manual_seed(6)
    out = []
    for _ in range(MICROBATCHES):
        tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
        mask = (torch.rand(MBS, SEQ, generator=g) < 0.6).float()
        mask[:, 0] = 1.0
        out.append(dict(tokens=tokens, labels=torch.randint(0, VOCAB, (MBS, SEQ), generator=g), loss_mask=mask,
                        position_ids=torch.arange(SEQ)[None].expand(MBS, SEQ)))
    return out


def build(cfg, parallel_output=False):
    from megatron_prores import parallel
    from megatron_prores.model import build_model

    parallel.initialize(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                        cfg.virtual_pipeline_size, cfg.context_parallel_size, seed=7)
    return build_model(cfg, parallel_output=parallel_output)


def make_baseline_weights(method: MethodConfig, directory: str) -> None:
    """TP=PP=1 model with non-zero GPAS gates and perturbed norm gains, saved to ``directory``."""
    from megatron_prores.checkpointing import save_model

    chunks = build(model_config(method, "tp1"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in chunks[0].named_parameters():
            if "gpas_gate" in name:
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 2 - 1)
            elif "layernorm" in name:
                p.add_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 0.5)
    save_model(chunks, directory)


def loss_and_grads(method: MethodConfig, layout: str, weights: str, grads_out: str, loss: str = "probe") -> float:
    """Forward/backward of all microbatches under ``layout``; writes full grads to ``grads_out``.
    ``loss``: "probe" (the logits against a random probe, every logit's gradient non-zero) or
    "driver" (the driver's own ``Trainer.forward_step``: its split of the batch over context-parallel
    ranks and its masked mean language-model loss, on ``driver_batches``)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prores.checkpointing import load_model, save_model
    from megatron_prores.context_parallel import split_sequence
    from megatron_prores.layer import set_prores_step

    cfg = model_config(method, layout)
    chunks = build(cfg)
    load_model(chunks, weights)
    tcfg = chunks[0].config
    ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=False, use_distributed_optimizer=False)
    model = [DistributedDataParallel(tcfg, ddp_config, c, disable_bucketing=i > 0)
             for i, c in enumerate(chunks)]
    set_prores_step(model, STEP)

    cp_rank, cp = parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_world_size()

    def forward_step(data_iterator, chunk):
        # under context parallelism this rank's part of each sequence, as the driver splits it
        tokens, probe = (split_sequence(t, cp_rank, cp) for t in next(data_iterator))
        positions = split_sequence(torch.arange(SEQ)[None].expand(MBS, SEQ), cp_rank, cp)
        logits = chunk(tokens, positions, None)

        def loss_func(output):
            loss = (output * probe).sum()
            return loss, {"loss": loss.detach().clone()}  # megatron scales the loss in place

        return logits, loss_func

    data = batches()
    if loss == "driver":
        from types import SimpleNamespace

        from megatron_prores.trainer import Trainer

        driver = SimpleNamespace(cp_rank=cp_rank, cp_size=cp, device=torch.device("cpu"))
        forward_step = functools.partial(Trainer.forward_step, driver)  # noqa: F811 - the driver's step instead
        data = driver_batches()
    iters = [iter(data) for _ in model] if len(model) > 1 else iter(data)
    for m in model:
        m.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters, model=model,
        num_microbatches=MICROBATCHES, seq_length=SEQ, micro_batch_size=MBS,
        decoder_seq_length=SEQ, forward_only=False,
    )
    finalize_model_grads(model)
    total = sum(next(iter(x.values())).item() for x in losses) if losses else 0.0
    # The last pipeline stage has the loss: share it with every rank.
    t = torch.tensor([total], dtype=torch.float64)
    torch.distributed.all_reduce(t, group=parallel_state.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(t, group=parallel_state.get_context_parallel_group())  # parts of each sequence
    with torch.no_grad():
        for m in model:
            for p in m.module.parameters():
                p.copy_(p.main_grad)
    save_model(chunks, grads_out)
    return t.item()


def read_full(method: MethodConfig, directory: str) -> dict:
    """Load a checkpoint into a TP=PP=1 model and return its parameters by name."""
    from megatron_prores.checkpointing import load_model

    chunks = build(model_config(method, "tp1"))
    load_model(chunks, directory)
    return {n: p.detach().clone() for n, p in chunks[0].named_parameters()}


def worker(rank: int, world: int, port: int, jobs: list, result_dir: str) -> None:
    """Entry of a spawned rank: runs every (method, layout) job and records the losses."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    losses = {}
    try:
        for key, method, layout, weights, *loss in jobs:
            losses[key] = loss_and_grads(method, layout, weights, os.path.join(result_dir, key), *loss)
    except Exception:
        with open(os.path.join(result_dir, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    if rank == 0:
        torch.save(losses, os.path.join(result_dir, "losses.pt"))

"""Process-group setup: torch.distributed (NCCL on GPUs, gloo on CPU) and megatron's groups.

Rank and world size come from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or, when those are absent,
from SLURM (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID). Without CUDA the CPU runtime is enabled.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_prores import cpu_runtime


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name, "")
        digits = re.match(r"\d+", value)  # SLURM writes some counts as "8(x2)"
        if digits:
            return int(digits.group())
    return default


def rank_and_world():
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    return rank, world, local


def device_of(local: int, visible: int) -> int:
    """The GPU of the task with local rank ``local`` among ``visible`` GPUs: its own when each task
    sees only its own (SLURM's --gpus-per-task/--gpu-bind), else the one of its local rank. More
    tasks than GPUs on a node would put two on one GPU (NCCL then fails at its first collective)."""
    if visible > 1 and local >= visible:
        from megatron_prores.config import ConfigError

        raise ConfigError(f"this node runs a task of local rank {local} but has {visible} GPUs: start one task per "
                          f"GPU (--ntasks-per-node {visible} under SLURM, --nproc-per-node {visible} with torchrun)")
    return local % visible


_layout = None


def initialize(tensor_parallel: int = 1, pipeline_parallel: int = 1,
               virtual_pipeline: int | None = None, context_parallel: int = 1,
               seed: int = 1234, timeout_minutes: int = 30) -> None:
    """Start torch.distributed (if not yet) and megatron's model-parallel groups; seed RNGs."""
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        cpu_runtime.enable()
        # ranks of one machine share its cores: no oversubscription of torch's thread pool
        per_task = _env_int("SLURM_CPUS_PER_TASK", default=0)
        local_world = _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=0)
        if per_task > 0:
            torch.set_num_threads(per_task)
        elif local_world > 0:
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    if not dist.is_initialized():
        rank, world, local = rank_and_world()
        if use_cuda:
            torch.cuda.set_device(device_of(local, torch.cuda.device_count()))
        # NCCL for CUDA tensors; gloo beside it for the few host-side values the driver and the
        # checkpointing reduce (loss, finite flags, exit flags): NCCL alone rejects them.
        kw = dict(backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                  timeout=timedelta(minutes=timeout_minutes))
        if world == 1 and "MASTER_ADDR" not in os.environ:
            kw["store"] = dist.HashStore()  # one process: no port (two runs on one machine would clash)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        try:
            dist.init_process_group(**kw)
        except dist.DistNetworkError as e:
            from megatron_prores.config import ConfigError

            raise ConfigError(f"torch.distributed could not start on {os.environ['MASTER_ADDR']}:"
                              f"{os.environ['MASTER_PORT']} ({str(e).splitlines()[-1][-80:]}); set MASTER_PORT "
                              f"to a free port") from None
    from megatron.core import parallel_state

    layout = (tensor_parallel, pipeline_parallel, virtual_pipeline, context_parallel)
    global _layout
    if parallel_state.model_parallel_is_initialized() and _layout != layout:
        # Process groups are not freed by megatron (their threads stay): re-create them only
        # when the layout really changes.
        parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            virtual_pipeline_model_parallel_size=virtual_pipeline,
            context_parallel_size=context_parallel,
            distributed_timeout_minutes=timeout_minutes,
            # the default backend is gloo already on CPU: no second set of gloo groups
            create_gloo_process_groups=use_cuda,
        )
        _layout = layout
    # Megatron-LM's rule: each pipeline stage draws from its own stream
    seed_everything(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def seed_dropout_per_context_rank(seed: int) -> None:
    """After the model is built (its weights alike on every context-parallel rank): give each CP
    rank its own random streams, so that dropout draws other masks for the other chunks of a
    sequence (megatron-core seeds by pipeline and tensor rank only, so CP ranks would repeat one
    mask on every chunk). No-op without context parallelism."""
    from megatron.core import parallel_state

    if parallel_state.get_context_parallel_world_size() > 1:
        seed_everything(seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
                        + 7919 * parallel_state.get_context_parallel_rank())

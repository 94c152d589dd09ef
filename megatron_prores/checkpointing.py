"""Checkpoints in megatron-core's dist_checkpointing format (layout-independent).

Layout, like Megatron-LM's:

    SAVE/latest_checkpointed_iteration.txt       the last COMPLETE checkpoint
    SAVE/iter_0000100/                           model, optimizer (sharded), common state
    SAVE/iter_0000100/rng_rank00000.pt           per-rank RNG states

A checkpoint is written into ``iter_XXXXXXX.tmp``, renamed when every rank has finished, and
only then named in the latest file: a crash or a full disk mid-save leaves the previous
checkpoint the latest. ProRes values are not stored: they are derived from the iteration.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import List, Optional

import numpy
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from megatron_prores.config import ConfigError

LATEST = "latest_checkpointed_iteration.txt"
DISTRIB_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> dict:
    """{'model0': ..., 'model1': ...} like Megatron-LM (one entry per virtual pipeline chunk)."""
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _save_strategy():
    # thread_count=1: the default writer starts worker processes (slow to spawn on CPU).
    strategy = dist_checkpointing.serialization.get_default_save_sharded_strategy("torch_dist")
    if hasattr(strategy, "thread_count"):
        strategy.thread_count = 1
    return strategy


def save_model(chunks: List[torch.nn.Module], directory: str) -> None:
    """Model weights only (no optimizer, no training state)."""
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(chunks), directory, sharded_strategy=_save_strategy())


def _load(sharded: dict, directory: str) -> dict:
    # LOG_ALL: keys the checkpoint lacks are left out instead of failing here; _load_model then
    # accepts only Transformer Engine's _extra_state (FP8 metadata) among them, so a local-spec
    # checkpoint loads into a TE model.
    return dist_checkpointing.load(sharded, directory, strict=StrictHandling.LOG_ALL)


def _load_model(chunks, state: dict, where: str) -> None:
    for i, chunk in enumerate(chunks):
        missing, unexpected = _unwrap(chunk).load_state_dict(state[f"model{i}"], strict=False)
        bad = [k for k in missing if not k.endswith("_extra_state")] + list(unexpected)
        if bad:
            raise ConfigError(f"checkpoint {where!r} does not match the model ({bad[0]} "
                              f"{'missing' if bad[0] in missing else 'unexpected'}); load a checkpoint "
                              f"of this architecture")


def load_model(chunks: List[torch.nn.Module], directory: str) -> None:
    _load_model(chunks, _load(model_sharded_state_dict(chunks), directory), directory)


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest(root: str) -> Optional[int]:
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ConfigError(f"--load {root!r}: {LATEST} holds {text!r}, not an iteration number")
    return int(text)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


@torch.no_grad()
def _prime_distributed_optimizer(optimizer) -> None:
    """Give a fresh DistributedOptimizer its Adam state before loading into it.

    Without apex/TE, megatron-core's DistributedOptimizer.state_dict() reads the Adam 'step' of
    existing state (and asserts on a fresh optimizer). One step at lr 0 with zero gradients creates
    the state and leaves every parameter bit-identical; loading then overwrites the state.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(opt).__name__ != "DistributedOptimizer" or inner is None or inner.state:
            continue
        lrs = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        for g, lr in zip(inner.param_groups, lrs):
            g["lr"] = lr
            for p in g["params"]:
                p.grad = None


def _restore_adam_step(optimizer, steps: int) -> None:
    """Set Adam's step count (bias correction) of a DistributedOptimizer after loading.

    megatron-core's dp_reshardable optimizer format, without apex/TE, does not bring back torch
    Adam's per-parameter 'step' (it stays what the fresh optimizer had). It is derivable: the number
    of optimizer steps taken, i.e. iterations minus skipped (non-finite) iterations.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(opt).__name__ != "DistributedOptimizer" or inner is None:
            continue
        for state in inner.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(steps), dtype=torch.float32)


def _training_state(model, optimizer, is_loading: bool) -> dict:
    model_sd = model_sharded_state_dict(model)
    state = dict(model_sd)
    if optimizer is not None:
        if is_loading:
            _prime_distributed_optimizer(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                          metadata=DISTRIB_OPTIM_METADATA)
    return state


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, train_state: dict,
                    model_args: dict, keep_last_n: Optional[int] = None) -> str:
    """Save everything needed to resume exactly; returns the checkpoint directory."""
    rank = dist.get_rank()
    final, tmp = iteration_dir(root, iteration), iteration_dir(root, iteration) + ".tmp"
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)  # left by an interrupted save
            os.makedirs(tmp)
            ok = torch.ones(1)
        except OSError as e:
            print(f"error: --save {root!r} is not writable ({e.strerror}); the previous checkpoint "
                  f"stays the latest", flush=True)
            ok = torch.zeros(1)
    else:
        ok = torch.ones(1)
    ok = _all_min(ok)
    if not ok:
        raise ConfigError(f"--save {root!r} is not writable; the previous checkpoint stays the latest")
    state = _training_state(model, optimizer, is_loading=False)
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["train_state"] = dict(train_state, iteration=iteration)
    state["model_args"] = model_args
    try:
        dist_checkpointing.save(state, tmp, sharded_strategy=_save_strategy())
        torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank:05d}.pt"))
        ok = torch.ones(1)
    except (Exception, CheckpointException) as e:  # disk full, quota, I/O error
        print(f"error: saving checkpoint {iteration} failed on rank {rank} ({type(e).__name__}: {e}); "
              f"the previous checkpoint stays the latest", flush=True)
        ok = torch.zeros(1)
    if not _all_min(ok):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        raise ConfigError(f"saving checkpoint {iteration} to {root!r} failed (see the line above); "
                          f"the previous checkpoint stays the latest")
    if rank == 0:
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker = os.path.join(root, LATEST + ".tmp")
        with open(marker, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker, os.path.join(root, LATEST))
        if keep_last_n:
            old = sorted(d for d in os.listdir(root) if d.startswith("iter_") and not d.endswith(".tmp"))
            for d in old[:-keep_last_n]:
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    dist.barrier()
    return final


def _all_min(flag: torch.Tensor) -> bool:
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def check_model_args(saved: dict, current: dict, where: str) -> None:
    diff = [k for k in current if k in saved and saved[k] != current[k]]
    if diff:
        k = diff[0]
        raise ConfigError(
            f"--load {where!r} holds a different model: {k} is {saved[k]!r} there but {current[k]!r} "
            f"now; load a checkpoint of this architecture or change the flags to match"
        )


def load_checkpoint(root: str, model, optimizer, scheduler, model_args: dict) -> Optional[dict]:
    """Resume from the latest complete checkpoint under ``root``; None when there is none."""
    if not os.path.isdir(root):
        return None
    iteration = read_latest(root)
    if iteration is None:
        return None
    directory = iteration_dir(root, iteration)
    if not os.path.isdir(directory):
        raise ConfigError(f"--load {root!r}: {LATEST} names iteration {iteration} but "
                          f"{directory} is missing")
    common = dist_checkpointing.load_common_state_dict(directory)
    check_model_args(common.get("model_args", {}), model_args, root)
    state = _load(_training_state(model, optimizer, is_loading=True), directory)
    _load_model(model, state, directory)
    if optimizer is not None:
        with torch.no_grad():  # the distributed optimizer copies into views of the parameters
            optimizer.load_state_dict(state["optimizer"])
        train_state = common["train_state"]
        _restore_adam_step(optimizer, train_state["iteration"] - train_state.get("skipped_iters", 0))
    if scheduler is not None and common.get("scheduler") is not None:
        scheduler.load_state_dict(common["scheduler"])
    rng = os.path.join(directory, f"rng_rank{dist.get_rank():05d}.pt")
    if os.path.isfile(rng):  # absent when resuming into a larger layout: keep the fresh seed
        _set_rng_state(torch.load(rng, weights_only=False))
    return common["train_state"]

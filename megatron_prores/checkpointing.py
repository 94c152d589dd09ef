"""Checkpoints in megatron-core's dist_checkpointing format (layout-independent).

Layout, like Megatron-LM's:

    SAVE/latest_checkpointed_iteration.txt       the last COMPLETE checkpoint
    SAVE/iter_0000100/                           model, optimizer (sharded), common state
    SAVE/iter_0000100/rng_rank00000.pt           per-rank RNG states

A checkpoint is written into ``iter_XXXXXXX.tmp``, renamed when every rank has finished, and
only then named in the latest file: a crash or a full disk mid-save leaves the previous
checkpoint the latest. With --async-save the same holds for the background writer: the rename
and the marker happen only after every rank's writer has finished. ProRes values are not stored: they are derived from the iteration.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.managers
import os
import random
import shutil
import signal
import threading
import time
from typing import List, Optional

import numpy
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from megatron_prores import checkpoint_check, lifetime, mcore_compat
from megatron_prores.block_styles import MIXED
from megatron_prores.config import ConfigError

LATEST = checkpoint_check.LATEST
DISTRIB_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> dict:
    """{'model0': ..., 'model1': ...} like Megatron-LM (one entry per virtual pipeline chunk)."""
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


_EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


_queue_lock = threading.Lock()
_starting: list = []  # the manager whose start is under way (its process exists, it does not serve yet)
# what the writers put on the queue (torch.distributed.checkpoint's WriteResults): the manager
# imports torch to unpickle them, which paused the first save for seconds, unless it did at start
_WRITER_RESULTS = ("torch.distributed.checkpoint.filesystem",)


def _signal_proof_writer_queue() -> None:
    """Start dist_checkpointing's result queue in a manager process that ignores SIGTERM/SIGUSR1.

    megatron-core's writer reports through a multiprocessing manager that it spawns at the first
    save and keeps. SLURM signals EVERY process of a job on preemption or requeue: the manager
    would die of that SIGTERM and the save that the same signal asked for would fail with a broken
    pipe. Started here first, the manager ignores those signals (it still ends with the training).
    It is started with them blocked, which it inherits: a signal that comes while its interpreter
    starts, before it can ignore them, waits instead of killing it (the first save of a job that
    was told to stop at once failed so). Here they wait too, and are handled once it runs. Deaf to
    TERM/INT, it ends with the training process (a kill -9 of it included) through
    ``lifetime.deaf_helper``.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    with _queue_lock:  # started by start_writer_queue's thread, or here by the first save
        if getattr(filesystem_async, "_results_queue", "absent") is None:
            manager = multiprocessing.managers.SyncManager(ctx=multiprocessing.get_context("spawn"))
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _EXIT_SIGNALS)
            _starting.append(manager)
            try:
                manager.start(lifetime.deaf_helper, (os.getpid(), _EXIT_SIGNALS, _WRITER_RESULTS))
            finally:
                _starting.remove(manager)
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            filesystem_async._results_queue = manager.Queue()
            filesystem_async._prores_manager = manager  # keep it alive with the module


def start_writer_queue() -> None:
    """Start the checkpoint writer's queue manager now, in the background. It is a new interpreter
    that takes seconds to start, and the first save of every run paused training for it (10-13 s
    on the H200 machine, 4-5 s on CPU, whatever the model's size). The thread that starts it stays,
    idle, as long as the process: the manager ends when the thread that started it ends
    (PR_SET_PDEATHSIG). Should the start fail here, the first save starts it and reports why."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is not None:  # running, or not this megatron-core
        return

    settled = threading.Event()  # the start is over: the manager serves, or it failed

    def run():
        try:
            _signal_proof_writer_queue()
        except Exception:  # noqa: BLE001 - the first save tries again in the main thread
            return
        finally:
            settled.set()
        threading.Event().wait()

    atexit.register(_end_unfinished_start, settled)  # runs before multiprocessing's own exit hook
    threading.Thread(target=run, name="checkpoint-writer-queue", daemon=True).start()


def _end_unfinished_start(settled: threading.Event, patience: float = 30.0) -> None:
    """At exit, a manager still starting (a run that ended within seconds, e.g. on a bad flag) is
    killed: multiprocessing's exit hook would otherwise wait for it forever, since the stop that
    ends a manager is set up only once its start is complete."""
    deadline = time.monotonic() + patience
    while not settled.is_set() and time.monotonic() < deadline:
        for manager in list(_starting):
            process = getattr(manager, "_process", None)
            if process is not None and process.pid is not None:
                process.kill()
        settled.wait(0.1)


def _save_strategy():
    _signal_proof_writer_queue()
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
    mcore_compat.tolerate_tensor_strides()
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


read_latest = checkpoint_check.read_latest


def _rng_state() -> dict:
    """This process's random streams; on GPUs also megatron's CUDA RNG tracker (the
    tensor-parallel stream that attention dropout forks into, as Megatron-LM saves it)."""
    state = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        state["cuda"] = torch.cuda.get_rng_state()
        state["cuda_tracker"] = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()
                                 if torch.is_tensor(v)}
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    if torch.cuda.is_available() and state.get("cuda_tracker"):
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        tracker = get_cuda_rng_tracker()
        tracker.set_states({**tracker.get_states(), **state["cuda_tracker"]})


def set_adam_hyperparameters(optimizer, betas: tuple, eps: float) -> Optional[dict]:
    """Give every parameter group of ``optimizer`` (its inner torch/TE Adam, every chained part)
    these betas and eps; returns the values the groups held before when they differed (a loaded
    optimizer state brings its run's values, which megatron's scheduler does not manage)."""
    before = None
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for g in getattr(getattr(opt, "optimizer", None), "param_groups", []):
            held = {"betas": tuple(float(b) for b in g["betas"]), "eps": float(g["eps"])}
            if held != {"betas": tuple(betas), "eps": eps}:
                before = before or held
            g["betas"], g["eps"] = tuple(betas), eps
    return before


def _torch_adam_distributed(optimizer) -> list:
    """The DistributedOptimizers among ``optimizer``'s parts whose inner optimizer is torch's
    Adam/AdamW: the fix-ups below are for torch's Adam state only (Transformer Engine's FusedAdam,
    used where TE is installed, keeps its own state and must not get them)."""
    return [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            if type(opt).__name__ == "DistributedOptimizer"
            and isinstance(getattr(opt, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW))]


@torch.no_grad()
def _prime_distributed_optimizer(optimizer) -> None:
    """Give a fresh DistributedOptimizer its Adam state before loading into it.

    Without apex/TE, megatron-core's DistributedOptimizer.state_dict() reads the Adam 'step' of
    existing state (and asserts on a fresh optimizer). One step at lr 0 with zero gradients creates
    the state and leaves every parameter bit-identical; loading then overwrites the state.
    """
    for opt in _torch_adam_distributed(optimizer):
        inner = opt.optimizer
        if inner.state:
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
    Adam's per-parameter 'step' (it stays what the fresh optimizer had). The train state records it
    (``adam_steps``: the optimizer steps since the Adam state was last fresh).
    """
    for opt in _torch_adam_distributed(optimizer):
        for state in opt.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(steps), dtype=torch.float32)


def _mixed_float16_sharded_state(self, model_sharded_state_dict, is_loading: bool = False, metadata=None):
    """Float16OptimizerWithFloat16Params.sharded_state_dict for groups that also hold fp32
    parameters (a bf16 model's GPAS gates, kept fp32): megatron-core's numbers the optimizer state
    by the bf16 parameters alone, which shifts every id after an fp32 one (the save fails, or maps
    state to the wrong tensors). The same checkpoint entries, each id mapped through its own
    model parameter (a bf16 parameter's fp32 main copy, or the fp32 parameter itself)."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map, make_sharded_optimizer_tensor, optim_state_to_sharding_state)

    if is_loading:
        self.init_state_fn(self.optimizer, self.config)
    state = self.state_dict()
    model_of = {id(main): p for g16, g32 in zip(self.float16_groups, self.fp32_from_float16_groups)
                for p, main in zip(g16, g32)}
    groups = self.optimizer.param_groups
    id_map = get_param_id_to_sharded_param_map(
        model_sharded_state_dict, [model_of.get(id(p), p) for g in groups for p in g["params"]])
    state["fp32_from_fp16_params"] = [  # per group: the bf16 parameters' main copies, in order
        [make_sharded_optimizer_tensor(id_map[i], main, prefix="optimizer.state.fp32_param")
         for i, main in zip([i for i, p in zip(saved["params"], g["params"]) if id(p) in model_of], mains)]
        for saved, g, mains in zip(state["optimizer"]["param_groups"], groups, state["fp32_from_fp16_params"])]
    step = self._extract_common_per_param_step(state["optimizer"])
    optim_state_to_sharding_state(state["optimizer"], id_map, exclude_keys="step")
    if step:
        state["optimizer"]["state"]["common_step"] = step
    return state


def fix_mixed_float16_checkpointing(optimizer) -> None:
    """Checkpointing of megatron-core's bf16/fp16 optimizers whose parameter groups also hold fp32
    parameters (a bf16 model's GPAS gates), broken upstream in 0.16 and 0.19 alike:
    - the plain optimizer gets the sharded state dict above;
    - the distributed optimizer puts each group's fp32 parameters first in the torch group but
      indexes them (model_param_group_index_map, read only by checkpointing) in the model's
      order: a save then fails (or pairs states with other parameters); the index is made to
      follow the groups' real order."""
    import types

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        kind = type(opt).__name__
        if kind == "Float16OptimizerWithFloat16Params" and any(opt.fp32_from_fp32_groups):
            opt.sharded_state_dict = types.MethodType(_mixed_float16_sharded_state, opt)
        elif kind == "DistributedOptimizer" and any(opt.model_fp32_groups) and any(opt.model_float16_groups):
            opt.model_param_group_index_map = {
                p: (i, j) for i, (fp32, f16) in enumerate(zip(opt.model_fp32_groups, opt.model_float16_groups))
                for j, p in enumerate([*fp32, *f16])}


def _training_state(model, optimizer, is_loading: bool) -> dict:
    model_sd = model_sharded_state_dict(model)
    state = dict(model_sd)
    if optimizer is not None:
        if is_loading:
            _prime_distributed_optimizer(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                          metadata=DISTRIB_OPTIM_METADATA)
    return state


def _prepare(root: str, iteration: int) -> str:
    """Rank 0 makes a fresh ``iter_XXXXXXX.tmp``; every rank learns whether that worked."""
    tmp = iteration_dir(root, iteration) + ".tmp"
    ok = torch.ones(1)
    if dist.get_rank() == 0:
        try:
            os.makedirs(root, exist_ok=True)
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)  # left by an interrupted save
            os.makedirs(tmp)
        except OSError as e:
            print(f"error: --save {root!r} is not writable ({e.strerror}); the previous checkpoint "
                  f"stays the latest", flush=True)
            ok = torch.zeros(1)
    if not _all_min(ok):
        raise ConfigError(f"--save {root!r} is not writable; the previous checkpoint stays the latest")
    return tmp


def _abandon(root: str, iteration: int) -> None:
    if dist.get_rank() == 0:
        shutil.rmtree(iteration_dir(root, iteration) + ".tmp", ignore_errors=True)
    dist.barrier()
    raise ConfigError(f"saving checkpoint {iteration} to {root!r} failed (see the line above); "
                      f"the previous checkpoint stays the latest: remove that cause (a full disk: free space, "
                      f"or point --save elsewhere) and resume with --load")


def _publish(root: str, iteration: int, keep_last_n: Optional[int]) -> None:
    """Every rank has written its part: rename the .tmp, then (and only then) name it the latest."""
    if dist.get_rank() == 0:
        final = iteration_dir(root, iteration)
        if os.path.isdir(final):  # an older save of this iteration (after a --ckpt-step resume)
            os.replace(final, final + ".replaced")
        os.replace(final + ".tmp", final)
        shutil.rmtree(final + ".replaced", ignore_errors=True)
        marker = os.path.join(root, LATEST + ".tmp")
        with open(marker, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker, os.path.join(root, LATEST))
        if keep_last_n and keep_last_n > 0:
            # the newest keep_last_n up to this (latest) one; newer directories left by a run that
            # was resumed with --ckpt-step are not this run's to delete
            kept = [i for i in checkpoint_check.iterations(root) if i <= iteration]
            for i in kept[:-keep_last_n]:
                shutil.rmtree(iteration_dir(root, i), ignore_errors=True)
    dist.barrier()


class CheckpointSaver:
    """Saves everything needed to resume exactly, synchronously or in the background.

    With ``async_save`` the state is handed to a writer process (megatron-core's async
    dist_checkpointing) and training goes on; ``poll()`` at each step boundary publishes a finished
    checkpoint (rename + latest marker), and a new save or ``wait()`` first finishes the one in
    flight. Until it is published, the previous checkpoint stays the latest: a crash during a
    background write loses nothing that was complete.
    """

    def __init__(self, root: str, keep_last_n: Optional[int] = None, async_save: bool = False):
        self.root, self.keep_last_n = root, keep_last_n
        self.queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.queue = AsyncCallsQueue()
        self.in_flight: Optional[int] = None

    def save(self, iteration: int, model, optimizer, scheduler, train_state: dict, model_args: dict,
             model_config: Optional[dict] = None, run_flags: Optional[dict] = None) -> bool:
        """Write checkpoint ``iteration``; True when it is already complete (always, unless async).
        ``model_config`` (config.config_to_dict) lets tools rebuild the model (HF export);
        ``run_flags`` (resume.run_flags) lets a resume check its flags against the run's."""
        self.wait()
        tmp = _prepare(self.root, iteration)
        state = _training_state(model, optimizer, is_loading=False)
        state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        state["train_state"] = dict(train_state, iteration=iteration)
        state["model_args"] = model_args
        state["model_config"] = model_config
        state["run_flags"] = run_flags
        request = None
        try:
            request = dist_checkpointing.save(state, tmp, sharded_strategy=_save_strategy(),
                                              async_sharded_save=self.queue is not None,
                                              **(mcore_compat.async_save_kwargs() if self.queue is not None else {}))
            torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{dist.get_rank():05d}.pt"))
            ok = torch.ones(1)
        except (Exception, CheckpointException) as e:  # disk full, quota, I/O error
            _report(iteration, e)
            ok = torch.zeros(1)
        if not _all_min(ok):
            _abandon(self.root, iteration)
        if request is None:
            _publish(self.root, iteration, self.keep_last_n)
            return True
        request.add_finalize_fn(lambda: _publish(self.root, iteration, self.keep_last_n))
        self.queue.schedule_async_request(request)
        self.in_flight = iteration
        return False

    def poll(self, blocking: bool = False) -> Optional[int]:
        """Publish the background checkpoint if every rank has written it (collective; call on
        every rank). Returns its iteration when it was published by this call."""
        if self.in_flight is None:
            return None
        iteration = self.in_flight
        try:
            done = self.queue.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, CheckpointException) as e:
            self.in_flight = None
            _report(iteration, e)
            _abandon(self.root, iteration)
        if not done:
            return None
        self.in_flight = None
        return iteration

    def wait(self) -> Optional[int]:
        return self.poll(blocking=True)

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()


def _report(iteration: int, error: BaseException) -> None:
    # CheckpointException's text carries the remote traceback: keep its last line (the cause)
    lines = [l.strip() for l in str(error).splitlines() if l.strip()] or [type(error).__name__]
    print(f"error: saving checkpoint {iteration} failed on rank {dist.get_rank()} ({lines[-1][:200]}); "
          f"the previous checkpoint stays the latest", flush=True)


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, train_state: dict,
                    model_args: dict, keep_last_n: Optional[int] = None, model_config: Optional[dict] = None) -> str:
    """Save synchronously; returns the checkpoint directory."""
    CheckpointSaver(root, keep_last_n).save(iteration, model, optimizer, scheduler, train_state, model_args,
                                            model_config)
    return iteration_dir(root, iteration)


def _all_min(flag: torch.Tensor) -> bool:
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def model_args_for_checkpoint(cfg) -> dict:
    """The architecture recorded in a checkpoint: a --load of another one is refused."""
    m = cfg.method
    return dict(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.query_groups,
                ffn_hidden_size=cfg.ffn_size, vocab_size=cfg.vocab_size, normalization=cfg.normalization,
                norm_epsilon=cfg.norm_epsilon, rotary_base=cfg.rotary_base, rope_scaling_factor=cfg.rope_scaling_factor,
                norm_type=m.norm_type, gpas=m.gpas, gpas_gate=m.gpas_gate,
                mix_post_layers=m.post_layers(cfg.num_layers) if m.norm_type in MIXED else None,
                final_norm=m.has_final_norm, lns_gain=m.lns_gain, tie_embeddings=cfg.tie_embeddings)


_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "normalization",
          "norm_epsilon", "rotary_base")


def _flag_for(k: str, v, diff: list):
    """How to give recorded value ``v`` of ``k``: ("with", flags), ("without", flag), None when
    it follows from another differing flag, False when no flag sets it."""
    if k in _SHAPE + ("norm_type", "gpas_gate", "lns_gain", "vocab_size"):
        return "with", f"--{k.replace('_', '-')} {v}"
    if k == "rope_scaling_factor":
        return ("without", "--use-rope-scaling") if v is None else ("with", f"--use-rope-scaling --rope-scaling-factor {v}")
    if k == "gpas":
        return ("with" if v else "without"), "--gpas"
    if k == "tie_embeddings":
        return ("with" if v else "without"), "--tie-embeddings-and-output-weights"
    if k == "mix_post_layers":
        return None if v is None else ("with", f"--mix-post-layers {v}")
    if k == "final_norm":  # Post-LN/DeepNorm: --post-final-norm; otherwise the norm type's
        return None if "norm_type" in diff else (("with" if v else "without"), "--post-final-norm")
    return False


def architecture_flags(model_args: dict) -> str:
    """The model flags that give the driver the recorded architecture, e.g. for an imported model."""
    fixes = [_flag_for(k, model_args[k], []) for k in _SHAPE + ("rope_scaling_factor", "tie_embeddings")
             if k in model_args]
    return " ".join(text for how, text in fixes if how == "with")


def _in_effect(model_args: dict) -> dict:
    """The recorded architecture without the flags that change nothing in it: --gpas-gate without
    --gpas, --lns-gain without --norm-type lns (a preset such as slurm/official_code.args gives
    them for every run)."""
    args = dict(model_args)
    if not args.get("gpas", True):
        args.pop("gpas_gate", None)
    if args.get("norm_type", "lns") != "lns":
        args.pop("lns_gain", None)
    return args


def check_model_args(saved: dict, current: dict, where: str) -> None:
    """Only the recorded keys in effect are compared (older checkpoints lack some)."""
    saved, current = _in_effect(saved), _in_effect(current)
    diff = [k for k in current if k in saved and saved[k] != current[k]]
    if diff:
        what = ", ".join(f"{k} is {saved[k]!r} there but {current[k]!r} now" for k in diff)
        fixes = [f for f in (_flag_for(k, saved[k], diff) for k in diff) if f is not None]
        fix = "load a checkpoint of this architecture or change the flags to match"
        if fixes and all(fixes):
            given = [text for how, text in fixes if how == "with"]
            dropped = [text for how, text in fixes if how == "without"]
            fix = "train it " + " and ".join((["with " + " ".join(given)] if given else [])
                                             + (["without " + " ".join(dropped)] if dropped else []))
        raise ConfigError(f"--load {where!r} holds a different model: {what}; {fix}")


def load_checkpoint(directory: str, model, optimizer, scheduler, model_args: dict, common: dict,
                    load_optim: bool = True, load_rng: bool = True) -> dict:
    """Load checkpoint ``directory`` (verified by checkpoint_check, its common state ``common``):
    the model, then (``load_optim``) the optimizer state, the scheduler's state, this rank's RNG
    states (``load_rng``, when the checkpoint has this rank's file). Returns its train state."""
    # Checkpoints before rotary_base/norm_epsilon were recorded: their model config (kept for the
    # HF export) has them, e.g. a Llama 3 import's RoPE theta. Before tie_embeddings: never tied.
    saved = {**{k: v for k, v in (common.get("model_config") or {}).items() if k in ("rotary_base", "norm_epsilon")},
             **({"tie_embeddings": False} if common.get("model_args") else {}), **common.get("model_args", {})}
    check_model_args(saved, model_args, os.path.dirname(directory))
    has_optim = "optimizer" in common  # absent e.g. when imported from Hugging Face: fresh optimizer
    use_optim = optimizer is not None and has_optim and load_optim
    state = _load(_training_state(model, optimizer if use_optim else None, is_loading=True), directory)
    _load_model(model, state, directory)
    train_state = common["train_state"]
    if use_optim:
        mcore_compat.match_groups_without_lr_bounds()  # another --lr under the schedule flags' overrides
        with torch.no_grad():  # the distributed optimizer copies into views of the parameters
            optimizer.load_state_dict(state["optimizer"])
        # the steps this Adam state has taken (older checkpoints: all steps, as they had no fresh restart)
        _restore_adam_step(optimizer, train_state.get("adam_steps",
                                                      train_state["iteration"] - train_state.get("skipped_iters", 0)))
    else:
        train_state = dict(train_state, adam_steps=0)  # the Adam state starts fresh
        if optimizer is not None:  # bf16: the fp32 main copies were taken from the initial weights
            optimizer.reload_model_params()
    if scheduler is not None and common.get("scheduler") is not None and has_optim:
        scheduler.load_state_dict(common["scheduler"])
    rng = os.path.join(directory, f"rng_rank{dist.get_rank():05d}.pt")
    if load_rng and os.path.isfile(rng):  # absent when resuming into a larger layout
        _set_rng_state(checkpoint_check.safe_torch_load(rng, "RNG state"))
    return train_state

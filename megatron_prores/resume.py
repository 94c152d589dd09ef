"""Where a run starts, and whether a checkpoint may be resumed with the flags given.

Starting point (``starting_point``), decided before anything is written:
- ``--load DIR`` holding a checkpoint: its latest complete one (``--ckpt-step N``: iteration N).
- ``--load`` equal to ``--save`` and holding nothing yet (the usual ``--save D --load D`` of a
  first SLURM submission): a fresh start.
- Anything else is refused with one line: a ``--load`` that does not exist or holds no checkpoint,
  iteration directories without the latest marker, a damaged latest checkpoint (the newest
  complete older one is named, to be chosen with ``--ckpt-step``), a ``--save`` that already holds
  another run's checkpoints while the run would start elsewhere.

Flags on resume (``check_flags``), Megatron-LM's policy made explicit:
- schedule flags (LR, weight decay, ProRes; ``--train-iters`` where it sets the decay length):
  a change is refused unless ``--override-opt-param-scheduler`` (the new schedule applies from
  the checkpoint's iteration on) or ``--use-checkpoint-opt-param-scheduler`` (the checkpoint's
  LR/WD schedule is kept, the flags are ignored; ProRes changes need the override);
- data-order flags (batch size, sequence length, seed, data path, split): a change is refused
  unless ``--override-data-flags`` (the position in samples is kept: samples may repeat or be
  skipped);
- plain <-> distributed optimizer: refused unless ``--no-load-optim`` (model weights and the
  schedule's position are loaded, the Adam state starts fresh).
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Tuple

import torch.distributed as dist

from megatron_prores import checkpoint_check
from megatron_prores.checkpoint_check import LATEST, CheckpointDamaged
from megatron_prores.config import ConfigError

SCHEDULE_FLAGS = ("lr", "min_lr", "lr_decay_style", "lr_warmup_iters", "lr_warmup_fraction", "lr_decay_iters",
                  "lr_wsd_decay_iters", "lr_wsd_decay_style", "weight_decay", "lr_warmup_samples", "lr_decay_samples",
                  "lr_wsd_decay_samples", "lr_warmup_init")
# Run flags added after checkpoints were written: the value such a checkpoint was trained with.
_ADDED_LATER = {"lr_warmup_fraction": None, "lr_warmup_samples": 0, "lr_decay_samples": None,
                "lr_wsd_decay_samples": None, "lr_warmup_init": 0.0}
PRORES_FLAGS = ("prores_schedule", "prores_warmup_steps", "prores_warmup_spacing")
DATA_FLAGS = ("global_batch_size", "seq_length", "seed", "data_path", "split", "mock_data")


def run_flags(args) -> dict:
    """The flags that define a run's schedules and data order, as a checkpoint records them (the
    decay length resolved: ``lr_decay_iters`` defaults to ``--train-iters``, ``lr_decay_samples``
    with ``--train-samples`` to that)."""
    flags = {k: getattr(args, k) for k in SCHEDULE_FLAGS + PRORES_FLAGS + DATA_FLAGS}
    if args.train_samples is None:
        flags["lr_decay_iters"] = args.lr_decay_iters or args.train_iters
    else:
        flags["lr_decay_samples"] = args.lr_decay_samples or args.train_samples
    flags["data_path"] = data_path_key(args.data_path)
    flags["use_distributed_optimizer"] = bool(args.use_distributed_optimizer)
    flags["bf16"] = bool(args.bf16)  # what the optimizer state holds (fp32 main copies or the weights)
    flags["weight_decay_groups"] = args.weight_decay_groups
    return flags


def data_path_key(data_path):
    """--data-path as a checkpoint records and compares it: each prefix resolved (relative to this
    working directory; links followed), each weight as a number. The same files spelled another way
    compare equal; another directory's files under the same relative name do not."""
    if not data_path:
        return data_path
    from megatron_prores.arguments import parse_data_path

    prefixes, weights = parse_data_path(data_path)
    prefixes = [os.path.realpath(p) for p in prefixes]
    if weights is None:
        return prefixes
    return [x for w, p in zip(weights, prefixes) for x in (repr(w), p)]


def schedule_in_samples(flags: dict) -> dict:
    """The LR schedule's lengths in samples (as megatron's scheduler counts them) from run flags
    in steps or in samples: warmup (--lr-warmup-fraction x decay, unrounded), decay, WSD's final
    decay (None without one)."""
    if flags.get("lr_decay_samples") is not None:  # --train-samples
        decay, warmup, wsd = flags["lr_decay_samples"], flags.get("lr_warmup_samples") or 0, flags.get("lr_wsd_decay_samples")
    else:
        gbs = flags["global_batch_size"]
        decay, warmup = flags["lr_decay_iters"] * gbs, (flags.get("lr_warmup_iters") or 0) * gbs
        wsd = flags["lr_wsd_decay_iters"] * gbs if flags.get("lr_wsd_decay_iters") else None
    if flags.get("lr_warmup_fraction") is not None:
        warmup = flags["lr_warmup_fraction"] * decay
    return {"warmup": warmup, "decay": decay, "wsd": wsd}


# the schedule's lengths, in steps or in samples (a run gives them in the unit of its training length)
_LENGTH_FLAGS = ("lr_warmup_iters", "lr_warmup_fraction", "lr_decay_iters", "lr_wsd_decay_iters",
                 "lr_warmup_samples", "lr_decay_samples", "lr_wsd_decay_samples")
_LENGTH_NAMES = {"warmup": "warmup", "decay": "decay length", "wsd": "WSD decay length"}


def _counted_in(flags: dict) -> str:
    if flags.get("lr_decay_samples") is not None:
        return "samples"
    return f"steps of {flags['global_batch_size']} samples"


def _recounted_schedule(saved: dict, now: dict, changed: list, iteration: int) -> str:
    """A resume whose schedule lengths count other samples than the checkpoint's (the training
    length in the other unit, --train-iters <-> --train-samples, or another global batch with
    --override-data-flags): compared in samples, as megatron's scheduler counts them. '' when the
    schedule is the same; else the changes, in one line."""
    was, new = schedule_in_samples(saved), schedule_in_samples(now)
    if saved.get("lr_decay_style") != "WSD" and now.get("lr_decay_style") != "WSD":
        was["wsd"] = new["wsd"] = None
    others = [k for k in changed if k not in _LENGTH_FLAGS]
    if not others and was == new:
        return ""
    parts = [_describe(others, saved, now)] if others else []
    n = lambda v: "none" if v is None else f"{v:g}"  # noqa: E731
    lengths = [f"the LR {_LENGTH_NAMES[k]} {n(was[k])} -> {n(new[k])}" for k in was if was[k] != new[k]]
    if lengths:
        parts.append(f"in samples, {', '.join(lengths)} (the checkpoint's lengths in {_counted_in(saved)}, this "
                     f"run's in {_counted_in(now)})")
    target = ", ".join(f"{_LENGTH_NAMES[k]} {n(v)}" for k, v in was.items() if v is not None)
    return (f"{'; '.join(parts)}: that changes the LR schedule of the checkpoint (iteration {iteration}); give its "
            f"schedule (in samples: {target}; --train-samples and --lr-*-samples give lengths in samples)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def on_rank0(fn: Callable):
    """Run ``fn`` on rank 0 and give its result, or its ConfigError, to every rank."""
    box = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except ConfigError as e:
            box[1] = (type(e), str(e))
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1][0](box[1][1])
    return box[0]


def _same_dir(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def _holds_checkpoints(root: Optional[str]) -> Optional[int]:
    """The newest iteration that ``root`` holds (marker or iter_* directory), if any."""
    if not root or not os.path.isdir(root):
        return None
    latest = checkpoint_check.read_latest(root)
    its = checkpoint_check.iterations(root)
    found = ([latest] if latest is not None else []) + its
    return max(found) if found else None


def ckpt_step(it) -> str:
    """The flags that resume a run's own checkpoint ``it`` (its --load is given)."""
    return f"--ckpt-step {it}"


def _fallback_hint(root: str, below: int, how: Callable = ckpt_step) -> str:
    """Names the newest complete checkpoint under ``root`` older than ``below`` and the flags that
    resume from it (``how(it)``)."""
    for it in reversed([i for i in checkpoint_check.iterations(root) if i < below]):
        try:
            checkpoint_check.verify(os.path.join(root, f"iter_{it:07d}"))
        except ConfigError:
            continue
        return f"; the newest complete older checkpoint is iteration {it}: resume from it with {how(it)}"
    return "; no complete older checkpoint exists under it"


def starting_point(args, how: Callable = ckpt_step) -> Optional[Tuple[str, int]]:
    """(checkpoint directory, iteration) to resume from, or None for a fresh start (``how``: the
    flags that resume from an older checkpoint, named when the newest is damaged)."""
    load, save, step = args.load, args.save, args.ckpt_step
    if not load:  # (--ckpt-step without --load is refused by arguments.check_args)
        held = _holds_checkpoints(save)
        if held is not None:
            raise ConfigError(f"--save {save!r} already holds checkpoints (up to iteration {held}) and no --load "
                              f"was given: resume that run with --load {save}, or choose an empty --save")
        return None
    if os.path.isfile(load):
        raise ConfigError(f"--load {load!r} is a file; give the run's checkpoint directory (the one that holds "
                          f"{LATEST} and iter_* directories)")
    if checkpoint_check.is_legacy_megatron(load):
        raise checkpoint_check.legacy_error(load)
    if not os.path.isdir(load):
        if _same_dir(os.path.abspath(load), os.path.abspath(save or "")) and step is None:
            return None  # the run's own directory, first start
        raise ConfigError(f"--load {load!r} does not exist; correct the path (or drop --load to start a new run)")
    if not _same_dir(load, save):
        held = _holds_checkpoints(save)
        if held is not None:
            raise ConfigError(f"--save {save!r} already holds checkpoints (up to iteration {held}) but --load names "
                              f"another directory ({load!r}): to resume that run give --load {save}; to start a "
                              f"new run from {load!r}, choose an empty --save")
    its = checkpoint_check.iterations(load)
    if step is not None:
        if step not in its:
            raise ConfigError(f"--ckpt-step {step}: {load!r} has no iter_{step:07d}; it holds iterations "
                              f"{', '.join(map(str, its)) or 'none'}")
        iteration = step
    else:
        iteration = checkpoint_check.read_latest(load)
        if iteration is None:
            if its:
                raise ConfigError(f"--load {load!r} holds checkpoints (newest iter_{its[-1]:07d}) but no {LATEST}; "
                                  f"resume from one with {how('N')} (e.g. {how(its[-1])}) after checking it")
            if _same_dir(load, save):
                return None  # the run's own directory, nothing saved yet
            raise ConfigError(f"--load {load!r} holds no checkpoint ({LATEST} and iter_* are absent); correct the "
                              f"path (or drop --load to start a new run)")
    directory = os.path.join(load, f"iter_{iteration:07d}")
    if not os.path.isdir(directory):
        raise CheckpointDamaged(f"{os.path.join(load, LATEST)} names iteration {iteration} but {directory} is "
                                f"missing{_fallback_hint(load, iteration, how)}")
    return directory, iteration


def finetune_resumes(args) -> Optional[str]:
    """--finetune: None when the new run starts from --load's weights; when --save already holds
    checkpoints (a requeued fine-tuning job), the line saying that the run resumes from them."""
    held = _holds_checkpoints(args.save)
    if held is None:
        return None
    return (f"--finetune: --save {args.save} already holds checkpoints (up to iteration {held}): resuming them as "
            f"this fine-tuning run ({args.load} is not read again)")


def check_rewind(load: str, step: int) -> Optional[str]:
    """--ckpt-step STEP older than --load's latest checkpoint: the line that says so; refused when
    the latest checkpoint already continues a run resumed from STEP (a requeued job that kept
    --ckpt-step in its command would go back to STEP at every requeue and overwrite what it trained
    since). A damaged latest checkpoint is what going back is for: no refusal."""
    from megatron_prores import mcore_compat

    latest = checkpoint_check.read_latest(load)
    if latest is None or latest <= step:
        return None
    newest = os.path.join(load, f"iter_{latest:07d}")
    try:
        checkpoint_check.verify(newest, None)
        flags = mcore_compat.load_common_state(newest).get("run_flags") or {}
    except (CheckpointDamaged, checkpoint_check.UnsafeCheckpoint):
        return f"--ckpt-step {step}: going back from the latest checkpoint {latest}, which is damaged"
    if flags.get("rewound_to") == step:
        raise ConfigError(f"--ckpt-step {step}: the latest checkpoint (iteration {latest}) already continues the run "
                          f"resumed from iteration {step}; going back again would overwrite iterations {step + 1}-"
                          f"{latest}. Drop --ckpt-step to resume from {latest} (a requeued job keeps its command: "
                          f"take --ckpt-step out of the job script)")
    return (f"--ckpt-step {step}: going back from the latest checkpoint ({latest}); the run overwrites the "
            f"checkpoints after {step} as it passes them")


def verify_or_hint(directory: str, iteration: int, world_size: Optional[int] = None,
                   only_rng: bool = False, how: Callable = ckpt_step) -> None:
    """checkpoint_check.verify (``only_rng``: just the RNG files of ``world_size`` processes), with
    the older complete checkpoint named when this one is damaged."""
    try:
        if only_rng:
            checkpoint_check.check_rng_files(directory, world_size)
        else:
            checkpoint_check.verify(directory, world_size)
    except CheckpointDamaged as e:
        rng = ("; or resume this one with --no-load-rng (the RNG states start from --seed: other dropout masks "
               "than an uninterrupted run)") if only_rng else ""
        raise CheckpointDamaged(f"checkpoint iteration {iteration} is damaged: {e}"
                                f"{_fallback_hint(os.path.dirname(directory), iteration, how)}{rng}") from None


def _describe(changed: list, saved: dict, now: dict) -> str:
    return ", ".join(f"{_flag(k)} {saved[k]!r} -> {now[k]!r}" for k in changed)


def optimizer_shards(cfg, bucket_size, use_distributed_optimizer: bool) -> Optional[dict]:
    """What the distributed optimizer's saved state is laid out by: megatron-core's dp_reshardable
    format keeps it per gradient bucket of each TP/PP rank's model chunk, so it loads only where
    these are the same (the data-parallel size may change). ``bucket_size``: the DDP's effective
    one (None: one bucket per buffer, i.e. no --overlap-grad-reduce)."""
    if not use_distributed_optimizer:
        return None
    return dict(tp=cfg.tensor_model_parallel_size, pp=cfg.pipeline_model_parallel_size,
                layers_per_virtual_stage=cfg.num_layers_per_virtual_pipeline_stage, bucket_size=bucket_size,
                bf16=cfg.bf16)  # bf16: the buffers' dtypes name the saved state


_SHARD_FLAGS = {  # how to resume with the saved value
    "tp": lambda v: f"with --tensor-model-parallel-size {v}",
    "pp": lambda v: f"with --pipeline-model-parallel-size {v}",
    "layers_per_virtual_stage": lambda v: ("without --num-layers-per-virtual-pipeline-stage" if v is None
                                           else f"with --num-layers-per-virtual-pipeline-stage {v}"),
    "bucket_size": lambda v: ("without --overlap-grad-reduce" if v is None
                              else f"with --overlap-grad-reduce --ddp-bucket-size {v}"),
    "bf16": lambda v: "with --bf16" if v else "without --bf16",
}


def check_optimizer_shards(saved: Optional[dict], now: Optional[dict], args) -> None:
    """Refuse (one line) to load distributed-optimizer state into other shards than it was saved
    from; ``saved``: the checkpoint's run flags. Checkpoints before the shards were recorded give
    their TP/PP layout (they had one bucket per buffer)."""
    if not saved or not now or not saved.get("use_distributed_optimizer") or args.no_load_optim:
        return
    was = saved.get("optimizer_shards")
    if was is None and saved.get("layout"):
        was = dict(tp=saved["layout"]["tp"], pp=saved["layout"]["pp"], bucket_size=None)
    changed = [k for k in _SHARD_FLAGS if was and k in was and was[k] != now[k]]
    if changed:
        raise ConfigError(
            "the checkpoint's distributed-optimizer state is laid out by TP/PP rank and gradient bucket "
            "(megatron-core's dp_reshardable format; only the data-parallel size may change): resume "
            + " and ".join(_SHARD_FLAGS[k](was[k]) for k in changed)
            + " as it was saved, or pass --no-load-optim to load the weights and the schedule's position "
              "with a fresh Adam state")


def check_flags(saved: Optional[dict], args, iteration: int) -> str:
    """Compare the checkpoint's run flags with this run's; returns how the LR/WD schedule loads:
    'same', 'override' (flags apply) or 'checkpoint' (the checkpoint's). Raises ConfigError
    (one line naming the flag and the way out) for a change the user did not allow."""
    if not saved:  # a checkpoint of an earlier version, or imported from Hugging Face
        return "override" if args.override_opt_param_scheduler else "same"
    now = run_flags(args)
    # a flag newer than the checkpoint: recorded as its value then (no --lr-warmup-fraction)
    saved = {**{k: v for k, v in _ADDED_LATER.items() if "lr" in saved}, **saved}
    if saved.get("data_path"):  # recorded as typed before it was resolved
        saved["data_path"] = data_path_key(saved["data_path"])
    changed = lambda keys: [k for k in keys if k in saved and saved[k] != now[k]]  # noqa: E731
    data = changed(DATA_FLAGS)
    if "global_batch_size" in data and args.train_samples is not None:
        raise ConfigError(f"--global-batch-size is {now['global_batch_size']} but the checkpoint was trained with "
                          f"{saved['global_batch_size']}; with --train-samples the training length in steps follows "
                          f"it: give {saved['global_batch_size']} again")
    if data and not args.override_data_flags:
        if "mock_data" in data or "data_path" in data:
            data_flags = lambda f: "--mock-data" if f.get("mock_data") else "--data-path " + " ".join(f.get("data_path") or ())  # noqa: E731
            raise ConfigError(f"this run reads {data_flags(now)} but the checkpoint (iteration {iteration}) was trained "
                              f"on {data_flags(saved)}, which sets the data order; give that again, or pass "
                              f"--override-data-flags to keep the checkpoint's data position with the new data")
        k = data[0]
        raise ConfigError(f"{_flag(k)} is {now[k]!r} but the checkpoint (iteration {iteration}) was trained with "
                          f"{saved[k]!r}, which sets the data order; give {saved[k]!r} again, or pass "
                          f"--override-data-flags to keep the checkpoint's data position with the new value")
    if (saved.get("use_distributed_optimizer") is not None
            and saved["use_distributed_optimizer"] != now["use_distributed_optimizer"] and not args.no_load_optim):
        kinds = {True: "the distributed optimizer", False: "the plain optimizer"}
        raise ConfigError(f"the checkpoint was saved with {kinds[saved['use_distributed_optimizer']]} and this run "
                          f"uses {kinds[now['use_distributed_optimizer']]}; use the same setting of "
                          f"--use-distributed-optimizer, or pass --no-load-optim to load the weights with a fresh "
                          f"Adam state")
    if changed(["bf16"]) and not args.no_load_optim:
        was = "with" if saved["bf16"] else "without"
        raise ConfigError(f"the checkpoint was trained {was} --bf16 (its optimizer state is laid out for that); "
                          f"resume {was} --bf16, or pass --no-load-optim to load the weights with a fresh Adam state")
    if changed(["weight_decay_groups"]) and not args.no_load_optim:
        raise ConfigError(f"--weight-decay-groups is {now['weight_decay_groups']!r} but the checkpoint was saved with "
                          f"{saved['weight_decay_groups']!r} (other optimizer parameter groups); give "
                          f"{saved['weight_decay_groups']!r} again, or pass --no-load-optim to load the weights with a "
                          f"fresh Adam state")
    prores = changed(PRORES_FLAGS)
    if prores and not args.override_opt_param_scheduler:
        raise ConfigError(f"{_describe(prores, saved, now)} changes the ProRes schedule of the checkpoint "
                          f"(iteration {iteration}); give the checkpoint's value, or pass "
                          f"--override-opt-param-scheduler to follow the new schedule from iteration {iteration}")
    sched = changed(SCHEDULE_FLAGS)
    if args.override_opt_param_scheduler:
        return "override"
    if args.use_checkpoint_opt_param_scheduler:
        return "checkpoint"
    if _counted_in(saved) != _counted_in(now):
        recounted = _recounted_schedule(saved, now, sched, iteration)
        if not recounted:
            return "same"
        raise ConfigError(f"{recounted}, or pass --override-opt-param-scheduler (the new schedule applies from "
                          f"iteration {iteration}) or --use-checkpoint-opt-param-scheduler (keep the checkpoint's "
                          f"schedule)")
    if sched:
        k = sched[0]
        default = {"lr_decay_iters": ("--train-iters", args.train_iters, args.lr_decay_iters),
                   "lr_decay_samples": ("--train-samples", args.train_samples, args.lr_decay_samples)}.get(k)
        what = (f"{default[0]} {default[1]} sets the LR decay length ({_flag(k)} defaults to it) to "
                f"{now[k]}, the checkpoint's is {saved[k]}: that"
                if default and default[1] is not None and not default[2] else _describe(sched, saved, now))
        raise ConfigError(f"{what} changes the LR schedule of the checkpoint (iteration "
                          f"{iteration}); give the checkpoint's values (None: leave the flag out), or pass --override-opt-param-scheduler (the "
                          f"new schedule applies from iteration {iteration}) or --use-checkpoint-opt-param-scheduler "
                          f"(keep the checkpoint's schedule)")
    return "same"

"""The Trainer: built from the parsed flags, it owns the model chunks, optimizer, data and the
parts (metrics, evaluation, checkpointing, exit policy, profiler, host GC); ``train_step`` is the one training step
that the driver, the tests and the benchmarks all run.

A step (``train_step``): set the ProRes step, forward/backward over the microbatches (megatron's
pipeline schedule), one non-finite check for the loss and every gradient, the optimizer step.
The loop (``train``): step, log, evaluate, save on interval / signal / time limit, finish.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_prores.config import ConfigError
from megatron_prores.host_gc import ManualGC
from megatron_prores.metrics import MetricsLogger, SpikeScore, StreamRMS
from megatron_prores.profiling import StepProfiler


@dataclass
class TrainState:
    """Progress that a checkpoint carries: iteration, samples consumed, skipped steps, the optimizer
    steps the Adam state has taken (0 again after a fresh Adam state: --no-load-optim, a model-only
    checkpoint), the loss history the spike score needs (bounded), the run's wandb run id (a
    requeued job continues it), the losses of the log window under way (the first line after a
    resume averages the same steps as the uninterrupted run's)."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_iters: int = 0
    adam_steps: int = 0
    spike: SpikeScore = field(default_factory=lambda: SpikeScore(0))
    wandb_run_id: Optional[str] = None
    log_window: tuple = (0.0, 0)  # lm-loss sum and count of the steps since the last log line

    def state_dict(self) -> dict:
        return dict(consumed_samples=self.consumed_samples, skipped_iters=self.skipped_iters, adam_steps=self.adam_steps,
                    log_window=list(self.log_window),
                    **self.spike.state_dict(), **({"wandb_run_id": self.wandb_run_id} if self.wandb_run_id else {}))

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.consumed_samples = int(state["consumed_samples"])
        self.skipped_iters = int(state.get("skipped_iters", 0))
        self.adam_steps = int(state.get("adam_steps", self.iteration - self.skipped_iters))  # older: derived
        self.spike.load_state_dict(state)
        self.wandb_run_id = state.get("wandb_run_id")
        self.log_window = tuple(state.get("log_window", (0.0, 0)))


@dataclass
class StepResult:
    loss: float  # mean lm loss of the step's global batch (NaN/inf when skipped)
    finite: bool  # False: non-finite loss or gradient, the optimizer step was skipped
    grad_norm: float
    gate_norm: Optional[torch.Tensor]  # GPAS gate gradient norm (device tensor), when measured
    rms: dict  # residual-stream RMS per block, when measured
    seconds: float


class Checkpointer:
    """Saves (sync or async) and publishes background checkpoints; reports each one."""

    def __init__(self, args, arch: dict, export_config: dict, run_flags: dict):
        from megatron_prores.checkpointing import CheckpointSaver

        self.args, self.arch, self.export_config, self.run_flags = args, arch, export_config, run_flags
        self.saver = CheckpointSaver(args.save, args.keep_last_n, args.async_save) if args.save else None

    def _saved(self, iteration: int, t0: float) -> None:
        if dist.get_rank() == 0:
            how = "in the background" if self.args.async_save else f"in {time.time() - t0:.2f}s"
            print(f"saved checkpoint at iteration {iteration} to {self.args.save} {how}", flush=True)

    def save(self, trainer: "Trainer", last_step_finite: bool = True) -> bool:
        """Save unless the state is unsound: after a skipped (non-finite) step nothing is written
        (True: training may go on); with non-finite weights or optimizer state nothing is written
        and False is returned (the run must stop). The latest checkpoint stays as it was."""
        t0, it = time.time(), trainer.state.iteration
        if not last_step_finite:
            trainer._say(f"not saving at iteration {it}: its step was skipped (non-finite loss or gradient); "
                         f"the latest checkpoint stays the last good one")
            return True
        trainer.state.log_window = (trainer.metrics.loss_sum, trainer.metrics.loss_n)  # the next log line's part
        with trainer.whole_params():
            return self._save(trainer, t0, it)

    def _save(self, trainer: "Trainer", t0: float, it: int) -> bool:
        if not state_is_finite(trainer.model, trainer.optimizer):
            if dist.get_rank() == 0:
                print(f"error: the weights or optimizer state are non-finite at iteration {it} (the update itself "
                      f"produced NaN/inf, e.g. --adam-eps 0 or a too large --lr); not saving: the latest checkpoint "
                      f"stays the last good one", file=sys.stderr, flush=True)
            self.poll(blocking=True)
            return False
        self.poll(blocking=True)  # a background checkpoint still in flight is finished and reported first
        if self.saver.save(it, trainer.model, trainer.optimizer, trainer.scheduler, trainer.state.state_dict(),
                           self.arch, self.export_config, self.run_flags):
            self._saved(it, t0)
        elif dist.get_rank() == 0:
            print(f"writing checkpoint {it} in the background (training paused {time.time() - t0:.2f}s)",
                  flush=True)
        return True

    def poll(self, blocking: bool = False) -> None:
        """Publish a finished background checkpoint (collective)."""
        if self.saver is not None and self.saver.in_flight is not None:
            done = self.saver.poll(blocking)
            if done is not None:
                self._saved(done, 0.0)


def _check_writable_dir(flag: str, path: str) -> None:
    """One line, before the model is built, when the directory ``path`` (given as ``flag``) cannot be
    created or written to."""
    if os.path.isfile(path):
        raise ConfigError(f"{flag} {path!r} is a file; give a directory")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {path!r} is not writable ({e.strerror}); pick another directory") from None


class Trainer:
    def __init__(self, args, exit_policy=None):
        from megatron_prores.exits import ExitPolicy

        self.args = args
        self.exit = exit_policy or ExitPolicy(args)  # first: a signal during set-up is kept
        self.lock = self.checkpointer = self.profiler = self.host_gc = None
        self.resumed_flags = None  # the run flags of the checkpoint this run resumes (not a --finetune source)
        try:
            self._configure()
            self._build_model()
            self.state = TrainState(spike=SpikeScore(args.train_iters))
            self._resume()
            self._build_data()
            self._build_parts()
        except BaseException:
            self.close()
            raise

    # ---- set-up ---------------------------------------------------------------------------
    def _configure(self) -> None:
        """Checks that need no process group or model: tokenizer, model config, layout, --save."""
        from megatron_prores.arguments import check_layout, model_config
        from megatron_prores.tokenizer import build_tokenizer, model_vocab_size

        a = self.args
        self.tokenizer_type = "NullTokenizer" if a.mock_data and not a.tokenizer_model else a.tokenizer_type
        self.tokenizer = build_tokenizer(self.tokenizer_type, a.tokenizer_model, a.vocab_size)
        vocab = model_vocab_size(self.tokenizer.vocab_size, a.vocab_size)
        self.cfg = model_config(a, vocab)
        self.cfg.validate()
        self.world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        self.dp_size, self.num_micro = check_layout(a, self.cfg, self.world)
        for flag, path in (("--save", a.save), ("--tensorboard-dir", a.tensorboard_dir),
                           ("--data-cache-path", a.data_cache_path)):
            if path:
                _check_writable_dir(flag, path)
        if a.save:  # its start overlaps the model's build instead of pausing the first save
            from megatron_prores.checkpointing import start_writer_queue

            start_writer_queue()

    def _build_model(self) -> None:
        """Process groups, model chunks (one per virtual pipeline stage) in DDP, optimizer."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        from megatron_prores import checkpointing, parallel
        from megatron_prores.model import build_model

        a, cfg = self.args, self.cfg
        parallel.initialize(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                            cfg.virtual_pipeline_size, cfg.context_parallel_size, seed=a.seed,
                            timeout_minutes=a.distributed_timeout_minutes)
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        chunks = [c.to(self.device) for c in build_model(cfg)]
        parallel.seed_dropout_per_context_rank(a.seed)
        if a.bf16:
            from megatron.core.transformer.module import Float16Module

            chunks = [Float16Module(c.config, c) for c in chunks]
        tcfg = chunks[0].config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=a.bf16, overlap_grad_reduce=a.overlap_grad_reduce,
            overlap_param_gather=a.overlap_param_gather, bucket_size=a.ddp_bucket_size,
            use_distributed_optimizer=a.use_distributed_optimizer)
        self.model = [DistributedDataParallel(tcfg, ddp_config, c, disable_bucketing=i > 0)
                      for i, c in enumerate(chunks)]
        tcfg.finalize_model_grads_func = finalize_model_grads  # waits for the reductions, all-reduces the rest
        if a.overlap_grad_reduce:
            # the schedule's hooks (as Megatron-LM sets them): no reduction before the last
            # microbatch; each chunk's reduction starts after its last backward (pipeline schedules)
            one = len(self.model) == 1
            tcfg.no_sync_func = self.model[0].no_sync if one else [m.no_sync for m in self.model]
            tcfg.grad_sync_func = self.model[0].start_grad_sync if one else [m.start_grad_sync for m in self.model]
        self.optimizer, self.scheduler = build_optimizer(a, self.model)
        checkpointing.fix_mixed_float16_checkpointing(self.optimizer)
        from megatron_prores.layer import prores_layers

        self.gates = [l.gpas_gate for l in prores_layers(self.model)] if cfg.method.gpas else []
        self.gate_clip_after = (GateClipAfterGlobal(self.optimizer, self.gates, a.clip_gate_grad)
                                if self.gates and a.clip_gate_grad > 0 and a.clip_gate_grad_order == "after" else None)

    def _resume(self) -> None:
        """Lock --save, find the starting point, verify the checkpoint, check the flags, load."""
        from megatron_prores import checkpointing, resume
        from megatron_prores.config import config_to_dict
        from megatron_prores.run_lock import RunLock

        a = self.args
        self.arch = checkpointing.model_args_for_checkpoint(self.cfg)
        self.export_config = dict(config_to_dict(self.cfg), tokenizer_type=self.tokenizer_type,  # HF export
                                  tokenizer_model=os.path.abspath(a.tokenizer_model) if a.tokenizer_model else None,
                                  max_position_embeddings=a.max_position_embeddings)
        self.shards = resume.optimizer_shards(self.cfg, self.model[0].ddp_config.bucket_size,
                                              a.use_distributed_optimizer)
        self.run_flags = dict(resume.run_flags(a), world_size=self.world, layout=self._layout(),
                              optimizer_shards=self.shards,
                              finetune_from=os.path.realpath(a.load) if a.finetune else None,
                              finetune_step=None)  # the iteration of --load it started from
        self.lock = RunLock(a.save) if a.save else None
        if self.lock is not None:
            self._say(resume.on_rank0(self.lock.acquire))
        finetune, asked, how = a.finetune, None, resume.ckpt_step
        if finetune:
            requeued = resume.on_rank0(lambda: resume.finetune_resumes(a))
            if requeued:  # the fine-tuning run's own checkpoints, as any resume (flags checked)
                self._say(requeued)
                asked = a.ckpt_step  # --ckpt-step still names the source's iteration
                own = shlex.quote(a.save)
                how = lambda it: f"--load {own} --ckpt-step {it} and without --finetune (it stays this fine-tuning run)"  # noqa: E731
                a.load, a.ckpt_step, finetune = a.save, None, False
        start = resume.on_rank0(lambda: resume.starting_point(a, how))
        if start is None:
            if a.load:
                self._say(f"no checkpoint under {a.load} yet: starting a new run")
            return
        directory, iteration = start
        common = resume.on_rank0(lambda: self._checked_common(directory, iteration, finetune, how, asked))
        if a.ckpt_step is not None and not finetune:  # a run taken back to an older checkpoint
            self._say(resume.on_rank0(lambda: resume.check_rewind(a.load, iteration)))
            self.run_flags["rewound_to"] = iteration
        self._inherit_export_facts(common.get("model_config") or {})
        if finetune:
            self.run_flags["finetune_step"] = iteration
            checkpointing.load_checkpoint(directory, self.model, self.optimizer, None, self.arch, common,
                                          load_optim=False, load_rng=False)
            self._say(f"--finetune: model weights from {directory}; a new run starts at iteration 0 (fresh "
                      f"optimizer, LR schedule, data position and RNG states from --seed)"
                      + (f"; the ProRes warmup ({a.prores_schedule}) restarts too: every block starts at its "
                         f"step-0 value" if a.prores_schedule != "none" else ""))
            return
        saved = common.get("run_flags") or {}
        self.resumed_flags = saved if "optimizer" in common else None  # an imported model has no data order
        if saved.get("finetune_from"):  # resumed with or without --finetune, it stays a fine-tuning run of its source
            self.run_flags.update(finetune_from=saved["finetune_from"], finetune_step=saved.get("finetune_step"))
        if self.run_flags.get("rewound_to") is None:  # its later checkpoints still continue that rewind
            self.run_flags["rewound_to"] = saved.get("rewound_to")
        mode = common.pop("_schedule_mode")
        if mode == "override":
            self.scheduler.override_opt_param_scheduler = True
            self.scheduler.use_checkpoint_opt_param_scheduler = False
        else:  # same values, or the checkpoint's on purpose
            self.scheduler.use_checkpoint_opt_param_scheduler = True
            if mode == "checkpoint":  # not in megatron's scheduler state: the checkpoint's run flags
                self.scheduler.init_lr = saved.get("lr_warmup_init", 0.0)
                wsd = resume.schedule_in_samples(saved)["wsd"]  # in its own samples per step
                if wsd:
                    self.scheduler.wsd_decay_steps = wsd
                    self.scheduler.lr_wsd_decay_style = saved["lr_wsd_decay_style"]
        saved_world = saved.get("world_size")
        same_ranks = self._same_ranks(saved)
        loaded = checkpointing.load_checkpoint(directory, self.model, self.optimizer, self.scheduler, self.arch,
                                               common, load_optim=not a.no_load_optim,
                                               load_rng=same_ranks and not a.no_load_rng)
        self.state.load_state_dict(loaded)
        # Adam's betas and eps came back with the optimizer state: the flags decide (as for a fresh run)
        betas = (a.adam_beta1, a.adam_beta2)
        before = checkpointing.set_adam_hyperparameters(self.optimizer, betas, a.adam_eps)
        if before is not None:
            self._say(f"Adam from the flags, not the checkpoint: betas {before['betas']} -> {betas}, eps "
                      f"{before['eps']:g} -> {a.adam_eps:g} (the moments are kept)")
        # megatron's scheduler takes the LR bounds from the optimizer's groups: the loaded optimizer
        # brought the checkpoint's, a fresh one (--no-load-optim) has the flags'
        bounds = {"override": (a.lr, a.min_lr),  # the flags'
                  "checkpoint": (self.scheduler.max_lr, self.scheduler.min_lr)}.get(mode)  # its scheduler's
        if bounds is not None:
            for g in self.optimizer.param_groups:
                g["max_lr"], g["min_lr"] = bounds
            self.scheduler.step(increment=0)
        lr = self.scheduler.get_lr(self.optimizer.param_groups[0])
        self._say(f"resumed from {a.load} at iteration {self.state.iteration} (learning rate {lr:.6E}"
                  + {"override": ", schedule from the new flags: --override-opt-param-scheduler",
                     "checkpoint": ", the checkpoint's schedule: --use-checkpoint-opt-param-scheduler"}.get(mode, "")
                  + ")")
        if a.no_load_optim and "optimizer" in common:
            self._say("--no-load-optim: the Adam state starts fresh (moments zero) at this iteration")
        if saved_world is not None and not same_ranks and not a.no_load_rng:
            saved_layout = saved.get("layout")
            self._say(f"the checkpoint was written by {saved_world} processes"
                      + (f" ({_layout_text(saved_layout)})" if saved_layout else "")
                      + f", this run has {self.world} ({_layout_text(self._layout())}): RNG states start from "
                      f"--seed (dropout masks differ from an uninterrupted run)")

    def _inherit_export_facts(self, saved: dict) -> None:
        """What an imported model's checkpoint records for its Hugging Face export and training cannot
        change: its BOS/EOS/pad ids and its context length (the longer of the two). The checkpoints this
        run writes carry them on: a model trained from an import exports them as the import did."""
        if "hf_token_ids" in saved:
            self.export_config["hf_token_ids"] = saved["hf_token_ids"]
        if saved.get("max_position_embeddings"):
            self.export_config["max_position_embeddings"] = max(
                saved["max_position_embeddings"], self.export_config.get("max_position_embeddings") or 0)

    def _checked_common(self, directory: str, iteration: int, finetune: bool = False,
                        how: Optional[Callable] = None, asked: Optional[int] = None) -> dict:
        """Rank 0: verify every file of the checkpoint, read its common state, check the flags
        (``finetune``: only what the model weights need; ``how``: the flags that resume from an
        older checkpoint, named when this one is damaged; ``asked``: the source iteration a
        requeued fine-tuning job names with --ckpt-step)."""
        from megatron_prores import checkpoint_check, mcore_compat, resume

        a = self.args
        how = how or resume.ckpt_step
        resume.verify_or_hint(directory, iteration, None, how=how)
        if iteration > a.train_iters and not finetune:
            length = "--train-iters" if a.train_samples is None else "--train-samples"
            raise ConfigError(f"{training_length(a)} is below the checkpoint's iteration {iteration}: "
                              f"nothing to train; raise {length} (and see --override-opt-param-scheduler)")
        rows = getattr(checkpoint_check.read_index(directory).state_dict_metadata.get(
            "embedding.word_embeddings.weight"), "size", [self.cfg.padded_vocab_size])[0]
        if rows != self.cfg.padded_vocab_size:
            raise ConfigError(
                f"the checkpoint's embedding has {rows} rows (padded vocabulary) but this layout pads to "
                f"{self.cfg.padded_vocab_size} (--make-vocab-size-divisible-by {a.make_vocab_size_divisible_by} x TP "
                f"{self.cfg.tensor_model_parallel_size}); set --make-vocab-size-divisible-by so that the padded "
                f"size stays {rows} (it pads to a multiple of that value x TP)")
        common = mcore_compat.load_common_state(directory)
        if finetune:
            return common
        saved = common.get("run_flags")
        source = (saved or {}).get("finetune_from")
        if a.finetune and source != self.run_flags["finetune_from"]:  # a requeued fine-tuning job's --save
            ft = self.run_flags["finetune_from"]
            raise ConfigError(f"--save {a.save!r} holds a fine-tuning run of {source}, not of {ft}; choose an empty "
                              f"--save for this one" if source else
                              f"--save {a.save!r} holds a run not started with --finetune, not a fine-tuning run of "
                              f"{ft}; choose an empty --save for this one, or resume that run without --finetune")
        was = (saved or {}).get("finetune_step")
        if a.finetune and None not in (was, asked) and was != asked:
            raise ConfigError(f"--save {a.save!r} holds a fine-tuning run of {source} iteration {was}, not of "
                              f"iteration {asked} (--ckpt-step); requeue it with --ckpt-step {was}, or choose an "
                              f"empty --save for a fine-tuning run of iteration {asked}")
        world = (saved or {}).get("world_size")
        if self._same_ranks(saved) and not a.no_load_rng:  # each process restores its own RNG file
            resume.verify_or_hint(directory, iteration, world, only_rng=True, how=how)
        if "optimizer" not in common:  # model-only (imported, or an initial checkpoint): nothing to keep
            saved = None
        common["_schedule_mode"] = resume.check_flags(saved, a, iteration)
        resume.check_optimizer_shards(saved, self.shards, a)
        return common

    def _layout(self) -> dict:
        c = self.cfg
        return dict(tp=c.tensor_model_parallel_size, pp=c.pipeline_model_parallel_size, cp=c.context_parallel_size,
                    dp=self.dp_size)

    def _same_ranks(self, saved_flags: Optional[dict]) -> bool:
        """Whether each process of this run is the process of the same rank in the checkpoint's run,
        so that its RNG file continues its streams: same world size and (when recorded) the same
        layout; data-parallel replicas hold identical streams, which a resume into other roles (DP
        ranks becoming context-parallel ranks) would turn into repeated dropout masks."""
        saved_flags = saved_flags or {}
        layout = saved_flags.get("layout")
        return saved_flags.get("world_size") == self.world and (layout is None or layout == self._layout())

    def _prores_past_the_end(self) -> Optional[str]:
        """A note when the ProRes warmup does not finish within --train-iters (the model keeps scaled
        residual branches: a warmup meant per block given as the total, or a recipe run shortened)."""
        from megatron_prores.schedules import unfinished_at

        m, last = self.cfg.method, self.args.train_iters - 1
        left = unfinished_at(last, m.prores_schedule, self.cfg.num_layers, m.prores_warmup_steps,
                             m.prores_warmup_spacing)
        if not left:
            return None
        lo, hi = min(v for _, v in left), max(v for _, v in left)
        what = (f"block {left[0][0]} of {self.cfg.num_layers} is" if len(left) == 1 else
                f"blocks {left[0][0]}-{left[-1][0]} of {self.cfg.num_layers} are")
        return (f"note: the ProRes warmup (--prores-warmup-steps {m.prores_warmup_steps:g}) outlasts the run: at its "
                f"last step ({last}) {what} still warming up (a = {lo:.3g}" + (f" to {hi:.3g}" if hi > lo else "")
                + "), which its checkpoints and exports keep; lengthen --train-iters or shorten "
                  "--prores-warmup-steps if that is not meant")

    def _say(self, line: Optional[str]) -> None:
        if line and dist.get_rank() == 0:
            print(line, flush=True)

    def _build_data(self) -> None:
        from megatron.core import parallel_state as ps

        from megatron_prores import data

        a = self.args
        self.dp_rank = ps.get_data_parallel_rank()  # the CP ranks of a replica read the same samples
        self.cp_rank, self.cp_size = ps.get_context_parallel_rank(), ps.get_context_parallel_world_size()
        # every evaluation reads the same first --eval-iters batches: the validation order must not
        # depend on the run's length (megatron-core shuffles over the epochs the size asks for)
        sizes = [a.train_iters * a.global_batch_size, a.eval_iters * a.global_batch_size, 0]
        self.train_ds, self.valid_ds, _ = data.build_datasets(
            self.tokenizer, sizes, data_path=a.data_path, split=a.split, seq_length=a.seq_length, seed=a.seed,
            cache_path=a.data_cache_path, mock=a.mock_data, eod_mask_loss=a.eod_mask_loss, vocab_size=self.cfg.vocab_size)
        self.named_valid_sets = [  # --valid-data-path: held-out sets evaluated and logged on their own
            (name, data.build_validation_set(self.tokenizer, prefix, sizes[1], seq_length=a.seq_length, seed=a.seed,
                                             cache_path=a.data_cache_path, eod_mask_loss=a.eod_mask_loss,
                                             vocab_size=self.cfg.vocab_size))
            for name, prefix in data.validation_sets(a.valid_data_path)]
        self._check_data_order(data.order_fingerprint(self.train_ds))
        self.train_iter = self.chunk_iterators(self.train_ds, self.state.consumed_samples)

    def _check_data_order(self, order: str) -> None:
        """The training samples come in the checkpoint's run's order: megatron-core builds another
        order when a resume changes the number of samples the run needs (--train-iters or
        --train-samples) and the dataset is smaller than the run (it shuffles over all epochs)."""
        a, saved = self.args, self.resumed_flags
        self.run_flags.update(data_order=order, data_samples=a.train_iters * a.global_batch_size)
        if not saved or saved.get("data_order") in (None, order) or a.override_data_flags:
            return
        if saved.get("data_samples") == a.train_iters * a.global_batch_size:  # same length: other files
            raise ConfigError(
                f"the training data under --data-path is not the checkpoint's: its samples come in another order "
                f"(other documents or document sizes, e.g. files tokenized again); give the checkpoint's data, or "
                f"--override-data-flags to go on from its position with this data")
        raise ConfigError(
            f"this run's length ({training_length(a)}: {a.train_iters * a.global_batch_size} samples) makes "
            f"megatron-core shuffle the training data over another number of epochs than the checkpoint's run "
            f"({saved.get('data_samples')} samples), so its samples would come in another order (repeated or "
            f"skipped ones); resume with the checkpoint's training length, or give --override-data-flags to "
            f"accept the new order")

    def chunk_iterators(self, dataset, consumed: int):
        """One iterator per model chunk (virtual pipeline stage), each over the same samples:
        megatron's interleaved schedule draws once per chunk for every microbatch, so a shared
        iterator would give each chunk (first stage's tokens, last stage's labels) other samples."""
        from megatron_prores import data

        iters = [data.batches(dataset, consumed, self.args.micro_batch_size, self.dp_rank, self.dp_size)
                 for _ in self.model]
        return iters if len(iters) > 1 else iters[0]

    def _build_parts(self) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_prores import resume, wandb_writer

        a = self.args
        self.fwd_bwd = get_forward_backward_func()
        first_of_stage = (ps.get_tensor_model_parallel_rank() == 0 and self.dp_rank == 0
                          and ps.get_context_parallel_rank() == 0)
        is_last = ps.is_pipeline_last_stage(ignore_virtual=True)
        if not resume._same_dir(a.load, a.save):  # no checkpoint, or another run's: not its wandb run
            self.state.wandb_run_id = None
        if a.wandb_project and not self.state.wandb_run_id:
            self.state.wandb_run_id = resume.on_rank0(wandb_writer.new_run_id)
        self.metrics = MetricsLogger(a, self.cfg, self.world, prints=is_last and first_of_stage,
                                     tb_dir=a.tensorboard_dir if first_of_stage else None, run_scalars=is_last,
                                     stage=ps.get_pipeline_model_parallel_rank(),
                                     wandb_run_id=self.state.wandb_run_id if a.wandb_project else None,
                                     wandb_here=is_last and first_of_stage,
                                     block_group=ps.get_pipeline_model_parallel_group() if first_of_stage else None)
        self.metrics.loss_sum, self.metrics.loss_n = self.state.log_window  # a resume's first line: the whole window
        self.stream_rms = StreamRMS(self.model)
        self.checkpointer = Checkpointer(a, self.arch, self.export_config, self.run_flags)
        self.profiler = StepProfiler(a, dist.get_rank(), self.device.type == "cuda")
        self.host_gc = ManualGC(a.manual_gc, a.manual_gc_interval, a.manual_gc_eval)  # last: after the set-up

    # ---- the step -------------------------------------------------------------------------
    def forward_step(self, data_iterator, chunk):
        from megatron_prores.context_parallel import split_batch

        whole = next(data_iterator)
        # the mean is over the whole sequences' tokens: under context parallelism each rank adds
        # its part's sum, and megatron-core's schedule multiplies by CP against the gradient
        # average over data-parallel x CP ranks
        count = max(float(whole["loss_mask"].sum()), 1.0)
        batch = to_device(split_batch(whole, self.cp_rank, self.cp_size), self.device)
        out = chunk(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        loss_mask = batch["loss_mask"].float()

        def loss_func(per_token):
            # at least fp32 (a bf16 model's per-token losses), float64 kept (the float64 layout tests)
            loss = (per_token.to(torch.promote_types(per_token.dtype, torch.float32)) * loss_mask).sum() / count
            # a copy: megatron-core scales the returned loss in place (x CP / microbatches)
            return loss, {"lm loss": loss.detach().clone()}

        return out, loss_func

    def forward_backward(self, iterator, forward_only: bool) -> float:
        """Mean lm loss over the global batch of one step (every rank gets it)."""
        from megatron.core import parallel_state as ps

        a = self.args
        losses = self.fwd_bwd(forward_step_func=self.forward_step, data_iterator=iterator, model=self.model,
                              num_microbatches=self.num_micro, seq_length=a.seq_length,
                              micro_batch_size=a.micro_batch_size, decoder_seq_length=a.seq_length,
                              forward_only=forward_only)
        # one host sync for all microbatch losses, after the step's forward/backward
        loss = (torch.stack([x["lm loss"].float() for x in losses]).sum().cpu().view(1) / self.num_micro
                if losses else torch.zeros(1))
        dist.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())  # only the last stage has it
        if self.cp_size > 1:  # each CP rank has its part of every sequence's sum
            dist.all_reduce(loss, group=ps.get_context_parallel_group())
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
        return loss.item() / self.dp_size

    def train_step(self, step: int, measure: bool = False) -> StepResult:
        """Training step ``step`` (0-based: the weights after ``step`` steps are updated); with
        ``measure``, also the GPAS gate gradient norm and (with TensorBoard) the stream RMS."""
        from megatron_prores.layer import set_prores_step

        a, t0 = self.args, time.time()
        set_prores_step(self.model, step)  # once per step, before forward/backward
        if measure and (a.tensorboard_dir or a.wandb_project):  # same on every rank (collective in stop())
            self.stream_rms.start()
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self.forward_backward(self.train_iter, forward_only=False)
        rms = self.stream_rms.stop()
        # one flag for the loss and every gradient buffer: a single host sync per step
        flags = [torch.isfinite(b.grad_data).all() for m in self.model for b in m.buffers]
        finite = torch.tensor([float(math.isfinite(loss) and bool(torch.stack(flags).all()))])
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        finite = bool(finite.item())
        gate_norm, grad_norm = None, float("nan")
        if finite:
            if self.gate_clip_after is None and self.gates and (a.clip_gate_grad > 0 or measure):
                gate_norm = gate_grad_norm(self.gates, a.clip_gate_grad, self.optimizer)
            _, grad_norm, _ = self.optimizer.step()
            if self.gate_clip_after is not None:
                gate_norm = self.gate_clip_after.norm
            self.scheduler.step(increment=a.global_batch_size)
            self.state.adam_steps += 1
        else:
            self.state.skipped_iters += 1
        self.state.iteration = step + 1
        self.state.consumed_samples += a.global_batch_size
        self.state.spike.update(loss)
        return StepResult(loss, finite, grad_norm, gate_norm, rms, time.time() - t0)

    @contextlib.contextmanager
    def whole_params(self):
        """Under --overlap-param-gather the distributed optimizer's updated parameters reach the
        model during the next training forward (each module's pre-hook waits for its bucket's
        all-gather): what reads the model otherwise (evaluation, saving, logged gate values)
        gathers them all first, as Megatron-LM does around evaluation and saving."""
        if not self.args.overlap_param_gather:
            yield
            return
        for m in self.model:
            m.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for m in self.model:
                m.enable_forward_pre_hook()

    def evaluate(self) -> Optional[float]:
        """Validation loss of the current weights (ProRes values of the current iteration)."""
        from megatron_prores.layer import set_prores_step

        a, it = self.args, self.state.iteration
        if not a.eval_iters:
            return None
        set_prores_step(self.model, it)  # the values of the weights after `it` steps
        for m in self.model:
            m.eval()
        losses = {}
        main = [(None, self.valid_ds)] if self.valid_ds is not None else []  # none with a 0 share in --split
        with self.whole_params(), self.host_gc.evaluation():
            for name, dataset in main + self.named_valid_sets:
                iterator = self.chunk_iterators(dataset, 0)  # the same first samples at every evaluation
                with torch.no_grad():
                    losses[name] = sum(self.forward_backward(iterator, True)
                                       for _ in range(a.eval_iters)) / a.eval_iters
                self.metrics.validation(it, losses[name], name)
        for m in self.model:
            m.train()
        return losses.get(None)

    # ---- the loop -------------------------------------------------------------------------
    def train(self) -> int:
        """Train to --train-iters (or an exit request); returns the process exit code."""
        a, s = self.args, self.state
        if dist.get_rank() == 0:
            print(f"training {self.cfg.num_layers} layers, hidden {self.cfg.hidden_size}, {self.num_micro} "
                  f"microbatches x {a.micro_batch_size} x DP {self.dp_size} (TP {self.cfg.tensor_model_parallel_size}, "
                  f"PP {self.cfg.pipeline_model_parallel_size}, CP {self.cfg.context_parallel_size}), "
                  f"norm {self.cfg.method.norm_type}, "
                  f"ProRes {self.cfg.method.prores_schedule}, GPAS {'on' if self.cfg.method.gpas else 'off'}, "
                  f"on {self.world} {'GPU' if self.device.type == 'cuda' else 'CPU'} process(es)", flush=True)
        self._say(self._prores_past_the_end())
        if s.iteration >= a.train_iters:
            self._say(f"already trained to iteration {s.iteration} ({training_length(a)}): nothing to do")
            return 0
        nonfinite_in_a_row = 0
        while s.iteration < a.train_iters:
            step = s.iteration
            logging = (step + 1) % a.log_interval == 0 or step + 1 == a.train_iters
            self.profiler.before_step(step)
            r = self.train_step(step, measure=logging)
            self.profiler.after_step(step)
            self.host_gc.after_step(s.iteration)
            nonfinite_in_a_row = 0 if r.finite else nonfinite_in_a_row + 1
            if not r.finite and self._nonfinite_stop(nonfinite_in_a_row):
                return 3
            self.metrics.add(r.loss, r.finite, r.seconds)
            if logging:
                with self.whole_params() if self.metrics.reads_model else contextlib.nullcontext():
                    self.metrics.log(s.iteration, s, self.scheduler.get_lr(self.optimizer.param_groups[0]),
                                     r.grad_norm, r.gate_norm, self.model, r.rms)
            self.checkpointer.poll()
            if a.eval_interval and s.iteration % a.eval_interval == 0:
                self.evaluate()
            stop = self.exit.should_exit(s.iteration)
            if a.save and (stop or (a.save_interval and s.iteration % a.save_interval == 0)):
                if not self.checkpointer.save(self, r.finite):
                    return 3
            if stop:
                self.checkpointer.poll(blocking=True)
                if dist.get_rank() == 0:
                    print(f"exiting at iteration {s.iteration} (signal, time limit or --exit-interval)"
                          + ("; checkpoint saved" if a.save else ""), flush=True)
                return 0
        return self._finish(nonfinite_in_a_row == 0)

    def _nonfinite_stop(self, in_a_row: int) -> bool:
        a = self.args
        if dist.get_rank() == 0:
            print(f"iteration {self.state.iteration}: non-finite loss or gradient, step skipped "
                  f"({in_a_row} in a row)", flush=True)
        if in_a_row < a.max_nonfinite_iters:
            return False
        if dist.get_rank() == 0:
            print(f"error: {in_a_row} consecutive non-finite steps (--max-nonfinite-iters "
                  f"{a.max_nonfinite_iters}); stopping without saving: the last good checkpoint stays the "
                  f"latest", file=sys.stderr, flush=True)
        self.checkpointer.poll(blocking=True)
        return True

    def _finish(self, last_step_finite: bool) -> int:
        # the last checkpoint is written before the last evaluation (Megatron-LM's order): an
        # evaluation that fails (a validation set the model cannot read) loses no training
        a, it = self.args, self.state.iteration
        if not last_step_finite:
            if dist.get_rank() == 0:
                print(f"error: the run ended in non-finite steps (iteration {it}); not saving: the latest checkpoint "
                      f"stays the last good one", file=sys.stderr, flush=True)
            self.checkpointer.poll(blocking=True)
            if not (a.eval_interval and it % a.eval_interval == 0):
                self.evaluate()
            return 3
        if a.save and not (a.save_interval and it % a.save_interval == 0):
            if not self.checkpointer.save(self):
                return 3
        if not (a.eval_interval and it % a.eval_interval == 0):
            self.evaluate()
        self.checkpointer.poll(blocking=True)
        self.metrics.finish(it, self.state.spike.score())
        return 0

    def close(self, exit_code: Optional[int] = None) -> None:
        """Finish a background save, release --save's lock, close the TensorBoard writer and the
        wandb run with the process's exit code (1 after an error, when ``exit_code`` is None)."""
        if exit_code is None:
            exit_code = 1 if sys.exc_info()[0] is not None else 0  # called while an exception propagates
        try:
            for part in (self.profiler, self.host_gc):
                if part is not None:
                    part.close()
            if self.checkpointer is not None and self.checkpointer.saver is not None:
                self.checkpointer.saver.close()
            if self.lock is not None:
                self.lock.release()
        finally:
            if getattr(self, "metrics", None) is not None:
                self.metrics.close(exit_code)


def _layout_text(layout: dict) -> str:
    return ", ".join(f"{k.upper()} {v}" for k, v in layout.items())


def to_device(batch: dict, device: torch.device) -> dict:
    """A host micro batch on ``device`` without a host sync: on a GPU through pinned memory and
    asynchronous copies (``.to()`` from pageable memory waits until the GPU has drained its queue,
    once per tensor and micro batch, which leaves the GPU idle while the next launches queue up)."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def state_is_finite(model, optimizer) -> bool:
    """Every parameter, main (fp32) parameter and Adam moment is finite, on every rank."""
    flags = [torch.isfinite(p).all() for m in model for p in m.parameters()]
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        flags += [torch.isfinite(p).all() for g in inner.param_groups for p in g["params"]]
        flags += [torch.isfinite(v).all() for st in inner.state.values() for v in st.values()
                  if torch.is_tensor(v) and v.is_floating_point()]
    # one reduction per device (Adam's step counts stay on the CPU while the moments are on the GPU),
    # then one host copy per device; the all-reduce runs on gloo (the CPU half of the default group)
    per_device = {}
    for f in flags:
        per_device.setdefault(f.device, []).append(f)
    ok = torch.ones(1)
    for fs in per_device.values():
        ok = torch.minimum(ok, torch.stack(fs).all().float().cpu().view(1))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def training_length(args) -> str:
    """The training length as given: '--train-iters N' or '--train-samples S (N steps)'."""
    if args.train_samples is None:
        return f"--train-iters {args.train_iters}"
    return f"--train-samples {args.train_samples} ({args.train_iters} steps)"


def build_optimizer(args, model):
    """AdamW (megatron-core's plain or distributed optimizer) and its LR/WD scheduler.

    Weight decay skips 1-D parameters (norm gains, GPAS gates) and biases through megatron-core's
    ``wd_mult`` 0, which only the scheduler turns into a group weight decay of 0: the two are built
    together. ``--weight-decay-groups official`` takes the official ProRes code's groups instead:
    the word embeddings are not decayed either, and the final norm's gain is.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                        clip_grad=args.clip_grad, bf16=args.bf16,
                        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
                        use_distributed_optimizer=args.use_distributed_optimizer),
        model, config_overrides=weight_decay_overrides(args.weight_decay_groups),
        use_gloo_process_groups=torch.cuda.is_available())
    from megatron_prores.arguments import schedule_samples

    lengths = schedule_samples(args)  # megatron's scheduler counts samples
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=lengths["warmup"], lr_decay_steps=lengths["decay"],
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * args.global_batch_size, wd_incr_style="constant",
        wsd_decay_steps=lengths["wsd"], lr_wsd_decay_style=args.lr_wsd_decay_style)
    return optimizer, scheduler


def official_no_weight_decay(param: torch.Tensor, name: str) -> bool:
    """The official ProRes code's parameters without weight decay: biases, norm gains (except the
    final norm's) and the word embeddings (with tied embeddings under pipeline parallelism, the last
    stage's copy too: megatron-core marks both ``shared_embedding``); GPAS gates (1-D) are not decayed
    either."""
    if "word_embeddings" in name or getattr(param, "shared_embedding", False) or name.endswith(".bias"):
        return True
    return param.dim() == 1 and "final_layernorm" not in name


def weight_decay_overrides(groups: str):
    """megatron-core's parameter-group overrides for ``--weight-decay-groups`` (None: its default,
    no weight decay for 1-D parameters and biases)."""
    if groups == "megatron":
        return None
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    key = ParamKey(with_name_predicate=ParamWithNamePredicate(name="official_no_wd", fn=official_no_weight_decay))
    return {key: {"wd_mult": 0.0}}


class GateClipAfterGlobal:
    """``--clip-gate-grad-order after`` (the official GPAS code): the separate gate clip runs inside
    megatron-core's ``optimizer.step()``, after its global gradient clip and before the update.

    megatron-core's step (0.16 and 0.19, every optimizer class) is prepare_grads -> global norm and
    clip -> ``self.step_with_ready_grads()``; this part wraps the optimizer's
    ``step_with_ready_grads`` to clip the gates first. The gate gradients the update reads are the
    gates' fp32 ``main_grad`` (or views of it): the gradient buffers are fp32 in every precision here
    (``grad_reduce_in_fp32`` under bf16), and megatron's ``.float()`` copies to the main parameters'
    grads then return the same storage. ``norm`` is the gate norm the clip saw (after the global
    clip), None until a step ran.
    """

    def __init__(self, optimizer, gates, clip: float):
        assert all(g.main_grad.dtype == torch.float32 for g in gates), "gate gradient buffers must be fp32"
        self.norm: Optional[torch.Tensor] = None
        update = optimizer.step_with_ready_grads

        def clip_gates_then_update():
            self.norm = gate_grad_norm(gates, clip, optimizer)
            return update()

        optimizer.step_with_ready_grads = clip_gates_then_update


def gate_grad_norm(gates, clip: float, optimizer=None) -> torch.Tensor:
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

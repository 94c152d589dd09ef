"""The pretraining driver: data -> train -> checkpoint -> exact resume.

    torchrun --nproc-per-node N -m megatron_prores.train --num-layers ... (or megatron-prores-train)
    srun python -m megatron_prores.train ...     (ranks from SLURM_* when torchrun's are absent)

Parse the flags, build the Trainer (megatron_prores/trainer.py), train, close. Without CUDA it
runs on CPU with gloo. Bad input ends with one ``error: ...`` line and exit code 2.
"""

import os
import sys

from megatron_prores import early_signals

# SLURM's --signal=USR1 can arrive while the imports below still run: record it from the first
# moment when run as the driver (exits.ExitRequest turns it into a save-and-exit).
if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "megatron-prores-train":
    early_signals.record()

import torch.distributed as dist  # noqa: E402

from megatron_prores.config import ConfigError  # noqa: E402


def main(argv=None) -> int:
    from megatron_prores import lifetime
    from megatron_prores.arguments import parse_args
    from megatron_prores.exits import ExitPolicy

    lifetime.end_forked_children_with_me()  # e.g. megatron-core's checkpoint writers
    lifetime.end_with_launcher()
    try:
        args = parse_args(argv)
        exit_policy = ExitPolicy(args)  # before the heavy set-up: a signal during it is kept
        from megatron_prores.trainer import Trainer

        trainer = Trainer(args, exit_policy)
        code = None  # None while an exception propagates: close() reports the run failed
        try:
            code = trainer.train()
            return code
        finally:
            trainer.close(code)
    except ConfigError as e:
        from megatron_prores.parallel import rank_and_world

        if rank_and_world()[0] == 0:  # one line, from one rank
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C without --exit-signal-handler (or twice): one line, not a traceback
        from megatron_prores.parallel import rank_and_world

        if rank_and_world()[0] == 0:
            print("interrupted (Ctrl-C): stopped without saving; the latest checkpoint is the last one written "
                  "(with --exit-signal-handler a first Ctrl-C saves, then exits)", file=sys.stderr, flush=True)
        return 130


def cli():
    code = main()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    cli()

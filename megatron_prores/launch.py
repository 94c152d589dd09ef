"""torchrun, with the driver's promise kept: a bad flag or a refused checkpoint ends with the
driver's one ``error:`` line and its exit code (2), not torchrun's ChildFailedError traceback.

    megatron-prores-torchrun --nproc-per-node N -m megatron_prores.train FLAGS...
    python -m megatron_prores.launch --nproc-per-node N -m megatron_prores.train FLAGS...

Takes exactly torchrun's arguments (torch.distributed.run), runs it in this process, and turns a
failed worker into that worker's exit code; the workers print their own error line.
"""

from __future__ import annotations

import logging
import sys


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    # the elastic agent's own report of a failed worker repeats what the worker printed
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values() if f.exitcode and f.exitcode > 0]
        if not codes:  # killed by a signal: say so, the workers could not
            print(f"error: a worker ended by signal ({e.get_first_failure()[1].signal_name()})", file=sys.stderr)
            return 1
        return max(codes)
    return 0


def cli():
    sys.exit(main())


if __name__ == "__main__":
    cli()

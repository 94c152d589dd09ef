"""Command-line tools (also installed as console scripts; thin wrappers live in tools/)."""

import sys

from megatron_prores.errors import ConfigError


def run(main, argv=None) -> int:
    """Run a tool's main; bad input ends with one line on stderr and exit code 2."""
    try:
        main(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of wherever it landed
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return 0

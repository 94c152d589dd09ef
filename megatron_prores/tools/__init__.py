"""Command-line tools (also installed as console scripts; thin wrappers live in tools/)."""

import os
import sys
import tempfile

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


def check_output(flag: str, path: str, example: str, suffixes=("",)) -> None:
    """One line, before any work, when the files ``path`` + each of ``suffixes`` (``path`` given as
    ``flag``) cannot be written: one is a directory, a parent is not a directory, or their directory
    cannot be created or written to. Creates the missing directories."""
    in_it = f"give a file name in it, e.g. {flag} {os.path.join(path, example)}"
    if not os.path.basename(path):
        raise ConfigError(f"{flag} {path!r} names a directory; {in_it}")
    for name in (path + suffix for suffix in suffixes):
        if os.path.isdir(name):
            raise ConfigError(f"{flag} {path!r} is a directory; {in_it}" if name == path else
                              f"{flag} {path!r}: {name!r} is a directory; give another {flag}")
    parent = os.path.dirname(os.path.abspath(path))
    above = parent
    while not os.path.lexists(above):  # the nearest existing ancestor must be a directory
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise ConfigError(f"{flag} {path!r}: {above!r} is not a directory; give {flag} in a directory")
    try:
        os.makedirs(parent, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {path!r}: cannot write in {parent!r} ({e.strerror}); give {flag} in a "
                          f"writable directory") from None

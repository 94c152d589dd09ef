#!/usr/bin/env python3
"""See megatron_prores/tools/plot_run.py (also installed as a console script)."""

from megatron_prores.tools.plot_run import cli

if __name__ == "__main__":
    cli()

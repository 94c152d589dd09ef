#!/usr/bin/env python3
"""See megatron_prores/tools/estimate_memory.py (also installed as a console script)."""

from megatron_prores.tools.estimate_memory import cli

if __name__ == "__main__":
    cli()

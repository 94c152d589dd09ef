#!/usr/bin/env python3
"""See megatron_prores/tools/preprocess_data.py (also installed as a console script)."""

from megatron_prores.tools.preprocess_data import cli

if __name__ == "__main__":
    cli()

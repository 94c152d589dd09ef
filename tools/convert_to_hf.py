#!/usr/bin/env python3
"""See megatron_prores/tools/convert_to_hf.py (also installed as a console script)."""

from megatron_prores.tools.convert_to_hf import cli

if __name__ == "__main__":
    cli()

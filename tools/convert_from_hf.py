#!/usr/bin/env python3
"""See megatron_prores/tools/convert_from_hf.py (also installed as a console script)."""

from megatron_prores.tools.convert_from_hf import cli

if __name__ == "__main__":
    cli()

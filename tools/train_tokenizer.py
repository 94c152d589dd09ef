#!/usr/bin/env python3
"""See megatron_prores/tools/train_tokenizer.py (also installed as a console script)."""

from megatron_prores.tools.train_tokenizer import cli

if __name__ == "__main__":
    cli()

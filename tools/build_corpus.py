#!/usr/bin/env python3
"""See megatron_prores/tools/build_corpus.py (also installed as a console script)."""

from megatron_prores.tools.build_corpus import cli

if __name__ == "__main__":
    cli()

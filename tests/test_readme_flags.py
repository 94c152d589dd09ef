"""README names every flag of the driver and of each tool: a flag added without its README line
fails here."""

import argparse
import importlib
import re

import pytest

from megatron_prores.arguments import build_parser

TOOLS = ["build_corpus", "convert_from_hf", "convert_to_hf", "estimate_memory", "plot_run", "preprocess_data",
         "train_tokenizer"]


def readme() -> str:
    import os

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        return f.read()


def flags(parser) -> set:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


def mentioned(flag: str, text: str) -> bool:
    return re.search(re.escape(flag) + r"(?![a-z0-9-])", text) is not None


def test_every_driver_flag_is_in_the_readme():
    text = readme()
    assert [f for f in sorted(flags(build_parser())) if not mentioned(f, text)] == []


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_flag_is_in_the_readme(tool, monkeypatch):
    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed):
        importlib.import_module(f"megatron_prores.tools.{tool}").main([])
    text = readme()
    assert len(flags(seen[0])) > 0
    assert [f for f in sorted(flags(seen[0])) if not mentioned(f, text)] == []

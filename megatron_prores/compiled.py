"""torch.compile for the fused elementwise ops (the residual op, RoPE): each plain function is
compiled once and shared by every layer (one generated kernel per variant on GPUs).

A shared function's variants (training/eval, ProRes on/after warmup, keep z or not, bias,
dropout, query and key shapes) must not exceed dynamo's recompile limit (8 by default), or the
op silently falls back to eager: the limit is raised to RECOMPILE_LIMIT once.
"""

from __future__ import annotations

from typing import Callable

import torch

RECOMPILE_LIMIT = 64
_compiled = {}


def kernel(fn: Callable, compiled: bool) -> Callable:
    """``fn`` through torch.compile (cached), or ``fn`` itself when ``compiled`` is False."""
    if not compiled:
        return fn
    if fn not in _compiled:
        import torch._dynamo.config as dynamo_config

        name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]

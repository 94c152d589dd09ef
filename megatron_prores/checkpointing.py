"""Model weights in megatron-core's dist_checkpointing format (layout-independent).

A checkpoint saved from any TP/PP/VPP layout loads into any other. ProRes values are not
stored: they are derived from the iteration (``set_prores_step``).
"""

from __future__ import annotations

import os
from typing import List

import torch

from megatron.core import dist_checkpointing


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> dict:
    """{'model0': ..., 'model1': ...} like Megatron-LM (one entry per virtual pipeline chunk)."""
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_model(chunks: List[torch.nn.Module], directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    # thread_count=1: the default writer starts worker processes (slow to spawn on CPU).
    strategy = dist_checkpointing.serialization.get_default_save_sharded_strategy("torch_dist")
    if hasattr(strategy, "thread_count"):
        strategy.thread_count = 1
    dist_checkpointing.save(model_sharded_state_dict(chunks), directory, sharded_strategy=strategy)


def load_model(chunks: List[torch.nn.Module], directory: str) -> None:
    sharded = model_sharded_state_dict(chunks)
    state = dist_checkpointing.load(sharded, directory)
    for i, chunk in enumerate(chunks):
        _unwrap(chunk).load_state_dict(state[f"model{i}"], strict=True)

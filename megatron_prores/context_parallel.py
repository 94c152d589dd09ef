"""Context parallelism: each sequence split over the context-parallel (CP) ranks.

Megatron's load-balanced layout: the sequence is cut into 2 x CP equal chunks, and CP rank r
holds chunks r and 2CP-1-r, so that under causal attention every rank attends over the same
number of keys (chunk c sees c+1 chunks of keys). megatron-core's rotary embedding slices its
positions the same way (``get_pos_emb_on_this_cp_rank``), and its pipeline schedules divide the
activation shape by CP; what is left to the driver is this split of each batch, one all-gather
of K/V per attention layer (``gather_keys``, a reduce-scatter of their gradient in backward),
and the loss over the whole sequence (the driver divides each rank's loss sum by the whole
sequence's token count; megatron-core multiplies by CP to undo the data-parallel-and-CP
gradient average).
"""

from __future__ import annotations

import torch


def local_chunks(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two global chunk indices (of 2 x cp_size) that CP rank ``cp_rank`` holds, in order."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def split_sequence(t: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> torch.Tensor:
    """The part of ``t`` (whole sequences along ``dim``) that CP rank ``cp_rank`` holds."""
    if cp_size == 1:
        return t
    s = t.shape[dim]
    if s % (2 * cp_size):
        raise ValueError(f"sequence length {s} is not divisible by 2 x context-parallel size {cp_size}")
    parts = t.chunk(2 * cp_size, dim=dim)
    first, second = local_chunks(cp_rank, cp_size)
    return torch.cat([parts[first], parts[second]], dim=dim)


def split_batch(batch: dict, cp_rank: int, cp_size: int) -> dict:
    """A [batch, sequence] micro batch's part on this CP rank (every tensor split alike)."""
    return {k: split_sequence(v, cp_rank, cp_size) for k, v in batch.items()}


def gather_keys(x: torch.Tensor, group) -> torch.Tensor:
    """[s/CP, ...] keys (or values) of every CP rank -> [s, ...] in sequence order, differentiable
    (megatron-core's sequence-parallel all-gather, whose backward reduce-scatters the gradient)."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    cp = group.size()
    if cp == 1:
        return x
    everyone = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)
    half = x.shape[0] // 2
    # rank j's block holds chunks j and 2CP-1-j: the first halves in rank order are chunks
    # 0..CP-1, the second halves in reverse rank order are chunks CP..2CP-1
    blocks = everyone.view(cp, 2, half, *x.shape[1:])
    return torch.cat([blocks[:, 0].reshape(cp * half, *x.shape[1:]),
                      blocks[:, 1].flip(0).reshape(cp * half, *x.shape[1:])], dim=0)

"""Rotary position embedding in one pass each way, for GPUs without Transformer Engine.

megatron-core applies RoPE to the queries and keys of every layer either through Transformer
Engine's fused kernel (``config.apply_rope_fusion``) or eagerly: slice, cos, sin, casts, a
rotate-half (neg + cat), two products, a sum and a final cat, each its own kernel and most of them
again in backward. Without TE this module provides the fused function megatron-core looks for
(``rope_utils.fused_apply_rotary_pos_emb``, same signature), so that ``apply_rope_fusion`` works
as it does with TE. With t1, t2 the two halves of the rotated part of a head, c = cos(freqs),
s = sin(freqs) (megatron's layout: freqs = cat(theta, theta) per position):

    forward:  y1 = t1 * c1 - t2 * s1,   y2 = t2 * c2 + t1 * s2      (t * cos + rotate_half(t) * sin)
    backward: dt1 = dy1 * c1 + dy2 * s2,   dt2 = dy2 * c2 - dy1 * s1  (the transpose)

Each direction is one compiled function (one generated kernel on GPUs, as megatron-core's own
bias-dropout-add is compiled) of the input and the cos and sin tables of ``freqs``, which are
computed once per angle tensor and shared by every layer (``tables``); the autograd.Function
saves only those shared tables: no activation is kept for backward. The math runs in fp32 and
rounds once to the input's dtype (TE's kernel does the same; megatron's eager path rounds cos,
sin and each product to bf16 first). The
part of a head beyond ``freqs``' width (``--rotary-percent`` < 1) passes through unchanged.
Interleaved RoPE is not a layout this model has (megatron-core refuses it with the fusion without
TE >= 2.3); packed (thd) sequences, MLA and mscale != 1 take megatron-core's eager path before
the hook.
"""

from __future__ import annotations

import torch

from megatron_prores.compiled import kernel


_tables: dict = {}
_TABLES_KEPT = 8
_last = [None]  # (angle tensor, its version, dtype, tables) of the last call


def tables(freqs: torch.Tensor, dtype: torch.dtype):
    """cos and sin of the angles ``freqs`` in ``dtype``, computed once per angle tensor and shared
    by every call that rotates by it: every layer's queries and keys (megatron-core computes the
    angles once per sequence length and keeps them). Computing them inside each call cost each
    element of every query and key a precise cos and sin: on the H200 (2026-11-30) the kernel took
    about 5x its memory-bound time. The angle tensor is held with its tables, so its memory cannot
    be reused by other angles under the same key; an in-place change of it (its version) is a new
    key. An inference tensor (made under torch.inference_mode) has no version counter: its tables
    are computed per call, not kept."""
    if freqs.is_inference():
        f = freqs.to(dtype)
        return torch.cos(f), torch.sin(f)
    last = _last[0]
    if last is not None and last[0] is freqs and last[1] == freqs._version and last[2] == dtype:
        return last[3]  # the same angle tensor as the call before: no key to build (host time)
    key = (freqs.untyped_storage().data_ptr(), freqs.storage_offset(), tuple(freqs.shape), tuple(freqs.stride()),
           freqs.dtype, freqs.device, freqs._version, dtype)
    hit = _tables.pop(key, None)  # put back last: the least recently used goes first
    if hit is None:
        f = freqs.detach().to(dtype)
        hit = (freqs, (torch.cos(f), torch.sin(f)))
        while len(_tables) >= _TABLES_KEPT:
            _tables.pop(next(iter(_tables)))  # the least recently used
    _tables[key] = hit
    _last[0] = (freqs, freqs._version, dtype, hit[1])
    return hit[1]


def _forward(t: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    rot, half = c.shape[-1], c.shape[-1] // 2
    x = t[..., :rot].to(c.dtype)  # fp32 math (fp64 for fp64 tensors)
    y = torch.cat((x[..., :half] * c[..., :half] - x[..., half:] * s[..., :half],
                   x[..., half:] * c[..., half:] + x[..., :half] * s[..., half:]), dim=-1).to(t.dtype)
    return y if rot == t.shape[-1] else torch.cat((y, t[..., rot:]), dim=-1)


def _backward(g: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    rot, half = c.shape[-1], c.shape[-1] // 2
    d = g[..., :rot].to(c.dtype)
    dt = torch.cat((d[..., :half] * c[..., :half] + d[..., half:] * s[..., half:],
                    d[..., half:] * c[..., half:] - d[..., :half] * s[..., :half]), dim=-1).to(g.dtype)
    return dt if rot == g.shape[-1] else torch.cat((dt, g[..., rot:]), dim=-1)


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, c, s, compiled):
        ctx.compiled = compiled
        ctx.save_for_backward(c, s)  # the shared tables: nothing per call
        return kernel(_forward, compiled)(t, c, s)

    @staticmethod
    def backward(ctx, g):
        c, s = ctx.saved_tensors
        return kernel(_backward, ctx.compiled)(g, c, s), None, None, None


def rope(t: torch.Tensor, freqs: torch.Tensor, compiled: bool = True) -> torch.Tensor:
    """RoPE of ``t`` [s, b, heads, dim] by ``freqs`` [s, 1 or b, 1, rot] (fp32 angles, rot <= dim,
    megatron's non-interleaved layout)."""
    c, s = tables(freqs.detach() if freqs.requires_grad else freqs, torch.promote_types(t.dtype, torch.float32))
    return _RoPE.apply(t, c, s, compiled)


def fused_apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, transpose_output_memory: bool = False,
                               interleaved: bool = False) -> torch.Tensor:
    """megatron-core's fused-RoPE entry point (the signature of its TE wrapper), compiled."""
    if interleaved:  # not a layout of this model; megatron-core refuses it with fusion unless TE >= 2.3
        raise ValueError("fused_rope: interleaved RoPE is not supported; pass --no-rope-fusion")
    return rope(t, freqs)


def install() -> str:
    """Make ``apply_rope_fusion`` usable: TE's fused RoPE where megatron-core found it, else this
    module's. Returns which one megatron-core's layers will call ('transformer_engine' or
    'compiled')."""
    from megatron.core.models.common.embeddings import rope_utils

    current = rope_utils.fused_apply_rotary_pos_emb
    if current is None or current is fused_apply_rotary_pos_emb:
        rope_utils.fused_apply_rotary_pos_emb = fused_apply_rotary_pos_emb
        return "compiled"
    return "transformer_engine"

"""The residual op of a ProRes/GPAS block in one pass: bias + dropout + ProRes + residual add + GPAS.

With F the sublayer output, b its bias, D dropout (mask M, keep probability q), r the residual
stream, a the ProRes value, c the DeepNorm shortcut factor and s = 1 - SiLU(g) the GPAS scale:

    pre styles  (GPAS on the sum):      y = s * z,          z = r + a * D(F + b)
    post styles (GPAS on the shortcut): y = c * s * r + a * D(F + b)

GPAS passes gradients through unscaled (y = x - SiLU(g) * stopgrad(x)), so

    dF = a * M / q * dy,   db = sum(dF),   dr = dy (pre) or c * dy (post),
    dg = -SiLU'(g) * sum(dy * z) (pre)  or  -SiLU'(g) * c * sum(dy * r) (post).

Memory. The gate gradient needs the pre-GPAS value z. Autograd's unfused graph keeps z next to
y (two activations per residual add). This op keeps only y, which the next layer's norm keeps
anyway (one shared storage), and recomputes z = y / s in the backward. That needs |s| safely
away from 0; the caller decides once per step, on the host, with ``recompute_safe`` (the gates
change only at the optimizer step), and the op keeps z instead when it is not. Post styles keep
r, which is the layer input and kept by the first linear anyway.

Speed. The forward and backward math are plain functions; ``compiled=True`` runs them through
torch.compile (one generated kernel each way on GPUs, as megatron-core's own fused
bias-dropout-add), ``compiled=False`` runs them eagerly (same formulas, more kernels). They are
compiled as plain functions, called from the autograd.Function: compiling the autograd.Function
whole (one compiled call, AOTAutograd's backward) gave zero gradients on torch 2.11 (its backward
was traced with a zero tangent; tests/test_fused_residual.py fails there), though right on 2.13.
They use dynamo's default shape handling (static first, dynamic after a shape change): the
``dynamic=False`` used before patches dynamo's config on every call, 35-45 us of host time per
op call (benchmarks/residual_op_host.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_prores.compiled import kernel
from megatron_prores.gpas import gpas_scale

# |s| below this: keep z rather than recompute it. The relative error of y / s does not depend on
# |s| (y = s * z is rounded once), but at s = 0 z is lost, and near 0 fp16's s * z turns subnormal.
MIN_RECOMPUTE_SCALE = 2.0 ** -6


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the compute precision: fp32, or fp64 for fp64 tensors."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def recompute_safe(gates) -> list:
    """For each gate, whether y / s recovers the pre-GPAS value (one host sync for all)."""
    if not gates:
        return []
    s = torch.cat([gpas_scale(g.detach()).reshape(-1) for g in gates])
    ok = (s.abs() >= MIN_RECOMPUTE_SCALE).tolist()
    out, i = [], 0
    for g in gates:
        out.append(all(ok[i:i + g.numel()]))
        i += g.numel()
    return out


# ---- the math (compiled or eager) ---------------------------------------------------------------
def _branch(f, bias, mask, keep: float, a):
    """a * D(F + b) in fp32."""
    f = _wide(f)
    if bias is not None:
        f = f + _wide(bias)
    if mask is not None:
        f = f * mask / keep
    if a is not None:
        f = f * a
    return f


def _pre_forward(r, f, bias, mask, keep: float, a, gate, keep_z: bool):
    z = _wide(r) + _branch(f, bias, mask, keep, a)
    y = z if gate is None else z * gpas_scale(gate)
    y = y.to(f.dtype)
    return (y, z.to(f.dtype)) if keep_z else (y, None)


def _post_forward(r, f, bias, mask, keep: float, a, gate, c: Optional[float]):
    shortcut = _wide(r)
    if gate is not None:
        shortcut = shortcut * gpas_scale(gate)
    if c is not None:
        shortcut = shortcut * c
    return (shortcut + _branch(f, bias, mask, keep, a)).to(f.dtype)


def _backward(dy, saved, gate, mask, keep: float, a, c: Optional[float], divide: bool,
              need_bias: bool, need_gate: bool):
    """dF, db and dg in one function (one pass over dy on GPUs).

    dF = a * M / q * dy; db = sum(dF); dg = -SiLU'(g) * c * sum(dy * v), v = saved (/ s)."""
    df = dy
    if mask is not None or a is not None:
        df = _wide(dy)
        if mask is not None:
            df = df * mask / keep
        if a is not None:
            df = df * a
        df = df.to(dy.dtype)
    db = _wide(df).sum(dim=tuple(range(df.dim() - 1))) if need_bias else None
    dg = None
    if need_gate:
        g = _wide(gate)
        sig = torch.sigmoid(g)
        total = (_wide(dy) * _wide(saved)).sum()
        if divide:
            total = total / (1.0 - g * sig)
        if c is not None:
            total = total * c
        dg = (-(sig * (1.0 + g * (1.0 - sig))) * total).to(gate.dtype)
    return df, db, dg


# ---- autograd --------------------------------------------------------------------------------
class _ResidualOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, f, bias, gate, a, mask, keep, c, post, recompute, compiled):
        # detached inputs: the compiled kernels see the same tensor properties in training and eval
        r_, f_ = r.detach(), f.detach()
        bias_ = None if bias is None else bias.detach()
        gate_ = None if gate is None else gate.detach()
        gate_grad = gate is not None and ctx.needs_input_grad[3]  # not in eval, not for a frozen gate
        if post:
            y = kernel(_post_forward, compiled)(r_, f_, bias_, mask, keep, a, gate_, c)
            saved = r_ if gate_grad else None
            ctx.divide = False
        else:
            keep_z = gate_grad and not recompute
            y, z = kernel(_pre_forward, compiled)(r_, f_, bias_, mask, keep, a, gate_, keep_z)
            saved = (z if keep_z else y) if gate_grad else None
            ctx.divide = gate_grad and not keep_z
        ctx.save_for_backward(saved, gate_, a, mask)
        ctx.keep, ctx.c, ctx.post, ctx.compiled = keep, c, post, compiled
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.r_dtype = r.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        saved, gate, a, mask = ctx.saved_tensors
        c = ctx.c
        need_bias = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        need_gate = gate is not None and ctx.needs_input_grad[3]
        df, db, dg = kernel(_backward, ctx.compiled)(
            dy, saved, gate, mask, ctx.keep, a, c if ctx.post else None, ctx.divide, need_bias, need_gate)
        dr = dy if not ctx.post or c is None else dy * c
        dr = dr.to(ctx.r_dtype)
        if db is not None:
            db = db.to(ctx.bias_dtype)
        return dr, df, db, dg, None, None, None, None, None, None, None


def dropout_mask(like: torch.Tensor, prob: float) -> torch.Tensor:
    """Keep mask of dropout with drop probability ``prob``, drawn from the current generator (as
    megatron's bias-dropout-add: outside the tensor-parallel RNG fork, since TP ranks hold copies
    of the same hidden states, or their sequence shards under sequence parallelism)."""
    return torch.empty_like(like, dtype=torch.bool).bernoulli_(1.0 - prob)


def residual_op(r, f, bias=None, *, prob: float = 0.0, training: bool = True,
                prores: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                shortcut: Optional[float] = None, post: bool = False, recompute: bool = False,
                compiled: bool = False) -> torch.Tensor:
    """The fused residual op (see the module docstring). ``prores`` is the 0-d fp32 value a
    (None: 1), ``gate`` the 1-element GPAS gate (None: no GPAS), ``shortcut`` the DeepNorm c
    (post styles only), ``recompute`` whether the pre-GPAS value may be recomputed as y / s."""
    mask = dropout_mask(f, prob) if training and prob > 0.0 else None
    return _ResidualOp.apply(r, f, bias, gate, prores, mask, 1.0 - prob, shortcut, post, recompute, compiled)

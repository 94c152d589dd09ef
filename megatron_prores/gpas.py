"""GPAS: gradient-preserving activation scaling.

    y = x - SiLU(g) * stopgrad(x)

Forward value: (1 - SiLU(g)) * x. Backward: dy/dx is the identity (the scaled part is
detached), and dL/dg = -SiLU'(g) * sum(dL/dy * x). The gate g is a learnable scalar
initialized to 0, so GPAS starts as an exact identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gpas(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Apply GPAS with a 0-d or 1-element ``gate`` to ``x``.

    One fused multiply-add: x + (-SiLU(g)) * stopgrad(x). Autograd keeps ``x`` (shared storage
    with the input, no copy): it is exactly what the gate gradient needs.
    """
    return torch.addcmul(x, F.silu(gate).neg().to(x.dtype), x.detach())


def gpas_scale(gate: torch.Tensor) -> torch.Tensor:
    """The forward scale 1 - SiLU(g) (for logging and export)."""
    return 1.0 - F.silu(gate.float())

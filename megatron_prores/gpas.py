"""GPAS: gradient-preserving activation scaling.

    y = x - SiLU(g) * stopgrad(x)

Forward value: (1 - SiLU(g)) * x. Backward: dy/dx is the identity (the scaled part is
detached), and dL/dg = -SiLU'(g) * sum(dL/dy * x). The gate g is a learnable scalar
initialized to 0, so GPAS starts as an exact identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gpas_scale(gate: torch.Tensor) -> torch.Tensor:
    """The forward scale 1 - SiLU(g), in fp32 (fp64 for an fp64 gate). The op itself, with its
    memory-saving backward, is fused_residual.residual_op."""
    return 1.0 - F.silu(gate.to(torch.promote_types(gate.dtype, torch.float32)))

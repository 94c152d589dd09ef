"""The local spec's normalization module and the LNS output scale.

``Norm`` is RMSNorm or LayerNorm (``config.normalization``) over the hidden dimension, with its
parameters in ``config.params_dtype``. Unlike megatron-core's torch fallback (WrappedTorchNorm)
it supports sequence parallelism: its parameters carry ``sequence_parallel`` so that their
gradients are all-reduced over the tensor-parallel group by ``finalize_model_grads``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Norm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.normalization = config.normalization
        self.shape = (hidden_size,)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        if self.normalization == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        else:
            self.register_parameter("bias", None)
        for p in self.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalization == "RMSNorm":
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


def scale_output(module: torch.nn.Module, scale: float) -> None:
    """Multiply the output of ``module`` (a norm, local or Transformer Engine) by ``scale``.

    LayerNorm Scaling (LNS) multiplies each pre-norm's output by the fixed 1/sqrt(l); doing it
    with a forward hook keeps the norm module itself (and its checkpoint keys) unchanged.
    """

    def hook(_module, _inputs, output):
        return output * scale

    module.register_forward_hook(hook)

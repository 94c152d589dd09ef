"""ProResTransformerLayer: megatron-core's TransformerLayer with ProRes, GPAS and norm placement.

The layer reuses megatron-core's forward unchanged. It only replaces the two residual adds
(the ``self_attn_bda`` / ``mlp_bda`` calls, megatron's bias-dropout-add seam) with the residual
op of its block style. With F the sublayer output (bias added, dropout applied), a the ProRes
value of the block and G the GPAS op of the block:

| style     | input norm | residual op                         |
|-----------|------------|-------------------------------------|
| pre, lns  | yes        | G(x + a F)                          |
| sandwich  | yes        | G(x + a Norm(F))                    |
| post      | no         | Norm(G(x) + a F)   (G only in Mix-LN)|
| deepnorm  | no         | Norm(c G(x) + a F), c = (2L)**0.25  |

LNS additionally scales both pre-norm outputs by 1/sqrt(l) (see norms.scale_output). Mix-LN
blocks are built as ``post`` (first k) or ``pre`` (the rest) by the spec.

The residual op itself is fused_residual.residual_op (one pass, and a backward that keeps no
extra activation for the gate gradient).

ProRes: ``prores_scale`` is a 0-d fp32 buffer written in place by ``set_prores_step`` once per
step, before the forward/backward call; it is derived from the step (not checkpointed). Once
the block's value is 1 for good, the multiply is skipped. With a pre style, GPAS off and ProRes
off or finished, the residual op is megatron-core's own bias-dropout-add.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_prores import fused_residual
from megatron_prores.block_styles import STYLES
from megatron_prores.config import MethodConfig
from megatron_prores.initialization import apply_depth_init, deepnorm_shortcut
from megatron_prores.norms import scale_output

HALF = (torch.bfloat16, torch.float16)  # the dtypes the schedule value and the GPAS gates never take


@dataclass
class ProResLayerSubmodules(TransformerLayerSubmodules):
    """megatron-core's layer submodules plus the norms that follow each sublayer
    (Sandwich-LN: on the branch; Post-LN/DeepNorm: on the sum)."""

    post_self_attn_layernorm: Union[ModuleSpec, type] = IdentityOp
    post_mlp_layernorm: Union[ModuleSpec, type] = IdentityOp


class ProResTransformerLayer(TransformerLayer):
    def __init__(
        self,
        config,
        submodules: ProResLayerSubmodules,
        layer_number: int = 1,
        hidden_dropout: Optional[float] = None,
        pg_collection=None,
        vp_stage: Optional[int] = None,
        *,
        method: MethodConfig,
        style: str,
    ):
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            hidden_dropout=hidden_dropout,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        assert style in STYLES, style
        self.method = method
        self.style = style
        s = STYLES[style]
        L, l = config.num_layers, self.layer_number

        norm_args = dict(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.post_self_attn_layernorm = build_module(submodules.post_self_attn_layernorm, **norm_args)
        self.post_mlp_layernorm = build_module(submodules.post_mlp_layernorm, **norm_args)
        assert s.post_norm == (not isinstance(self.post_mlp_layernorm, IdentityOp)), (
            f"spec of block {l} does not match its style {style}"
        )

        if s.depth_scaled_pre_norm:
            for norm in (self.input_layernorm, self.pre_mlp_layernorm):
                scale_output(norm, l ** -0.5)
        self.shortcut_scale = deepnorm_shortcut(L) if s.deepnorm else None

        # GPAS gates: shape [1] (one per block) or [2] (attention, MLP). 1-D, so megatron-core's
        # optimizer gives them no weight decay. Under sequence parallelism each TP rank sees a
        # slice of the stream: the attribute makes finalize_model_grads all-reduce the gradient.
        # fp32 under bf16/fp16 (see _apply), as the papers' code keeps them.
        if method.gpas:
            n = 2 if method.gpas_gate == "sublayer" else 1
            dtype = torch.float32 if config.params_dtype in HALF else config.params_dtype
            self.gpas_gate = torch.nn.Parameter(torch.zeros(n, dtype=dtype))
            setattr(self.gpas_gate, "sequence_parallel", config.sequence_parallel)
        else:
            self.register_parameter("gpas_gate", None)

        # ProRes value a(l, t): fp32 0-d device buffer, written in place each step.
        self.prores_active = method.prores
        if method.prores:
            start = method.prores_value(0, l, L)
            self.register_buffer(
                "prores_scale", torch.tensor(start, dtype=torch.float32), persistent=False
            )
        else:
            self.register_buffer("prores_scale", None, persistent=False)

        # Whether the fused residual op may recompute the pre-GPAS values from its outputs
        # output (decided per step by set_prores_step; keeping it is always correct).
        self.gpas_recompute = False

        self.self_attn_bda = functools.partial(self._residual_op, 0)
        self.mlp_bda = functools.partial(self._residual_op, 1)
        apply_depth_init(self, method)

    # ---- ProRes -------------------------------------------------------------------------
    def set_prores_step(self, step: int) -> None:
        """Write a(l, step) into the buffer (no host sync) and drop the multiply once it is 1."""
        if self.prores_scale is None:
            return
        m, L, l = self.method, self.config.num_layers, self.layer_number
        self.prores_scale.fill_(m.prores_value(step, l, L))
        done = m.prores_final_step(l, L)
        self.prores_active = done is None or step < done

    def _apply(self, fn, *args, **kwargs):
        # Float16Module casts every parameter and buffer to bf16/fp16: keep the schedule value
        # and the GPAS gates fp32. A bf16 gate would scale the whole stream by a value rounded to
        # 8 bits, block after block: at 24 blocks that alone moves the logits as much as rounding
        # every other weight to bf16 (benchmarks/gate_precision.py); megatron-core keeps fp32
        # parameters of a bf16 model in their own gradient buffer and optimizer group.
        super()._apply(fn, *args, **kwargs)
        if self.prores_scale is not None and self.prores_scale.dtype != torch.float32:
            self.prores_scale = self.prores_scale.float()
        if self.gpas_gate is not None and self.gpas_gate.dtype in HALF:
            self.gpas_gate.data = self.gpas_gate.data.float()
        return self

    # ---- residual op --------------------------------------------------------------------
    def _gate(self, sublayer: int) -> Optional[torch.Tensor]:
        if self.gpas_gate is None:
            return None
        return self.gpas_gate[sublayer:sublayer + 1] if self.gpas_gate.numel() == 2 else self.gpas_gate

    def _residual_op(self, sublayer: int, training: bool, fused: bool):
        """Factory with the signature of megatron's get_bias_dropout_add(training, fused);
        ``fused`` (config.bias_dropout_fusion) compiles the residual op as megatron compiles its own."""
        gate = self._gate(sublayer)
        scale = self.prores_scale if self.prores_active else None
        s = STYLES[self.style]
        if s.plain_residual and gate is None and scale is None:
            return get_bias_dropout_add(training, fused)  # exactly megatron-core's residual add
        post_norm = self.post_self_attn_layernorm if sublayer == 0 else self.post_mlp_layernorm
        post = s.sum_norm  # the sum is normalized next: GPAS scales the shortcut
        recompute = self.gpas_recompute

        def residual_op(x_with_bias, residual, prob):
            x, bias = x_with_bias
            if s.branch_norm:
                x = post_norm(x if bias is None else x + bias)
                bias = None
            out = fused_residual.residual_op(
                residual, x, bias, prob=prob, training=training, prores=scale, gate=gate,
                shortcut=self.shortcut_scale, post=post, recompute=recompute, compiled=fused)
            return post_norm(out) if post else out

        return residual_op


def prores_layers(model):
    """Every ProResTransformerLayer in ``model`` (a module or a list of model chunks)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, ProResTransformerLayer):
                yield module


def _offloads_residual(config) -> bool:
    """megatron's fine-grained activation offloading frees the norm inputs (the residual stream,
    i.e. the op's saved output) in place: the recompute must not rely on them there."""
    return bool(getattr(config, "fine_grained_activation_offloading", False)) and bool(
        {"attn_norm", "mlp_norm"} & set(getattr(config, "offload_modules", None) or ()))


def set_prores_step(model, step: int) -> None:
    """Set every block's ProRes value for optimizer step ``step`` and decide, for every GPAS
    gate, whether the residual op may recompute its input from its output this step.

    Call once per step, before the forward/backward call (never inside forward_step_func): the
    values then stay constant over all microbatches of the step (1F1B, recompute, CUDA graphs).
    The gate check costs one host sync per step (the gates change only at the optimizer step).
    """
    layers = list(prores_layers(model))
    for layer in layers:
        layer.set_prores_step(step)
    gated = [l for l in layers if l.gpas_gate is not None and not _offloads_residual(l.config)]
    safe = fused_residual.recompute_safe([l.gpas_gate for l in gated])
    for layer, ok in zip(gated, safe):
        layer.gpas_recompute = ok

"""ModuleSpecs of ProRes/GPAS layers for the local and the Transformer Engine implementation.

One layer class serves both: a spec only chooses the modules. Per block style:
- a pre-norm that feeds a linear (pre, sandwich, the Pre-LN blocks of Mix-LN) is fused into
  TE's LayerNorm+Linear (``TELayerNormColumnParallelLinear``); the local spec uses a separate
  ``Norm`` whose checkpoint keys are mapped onto the fused ones, so checkpoints are interchangeable;
- LNS scales the norm output before the linear, so its norm stays a separate module in both;
- post and deepnorm blocks have no pre-norm and a norm after each residual add;
- core attention: the local spec uses PyTorch's scaled_dot_product_attention (attention.py)
  unless --attention-backend unfused/local asks for megatron-core's DotProductAttention.
Transformer Engine is imported only when the TE spec is asked for.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_prores.block_styles import STYLES
from megatron_prores.config import ConfigError, MethodConfig
from megatron_prores.layer import ProResLayerSubmodules, ProResTransformerLayer
from megatron_prores.mcore_compat import mlp_spec

_FUSED_NORM_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


class _Modules:
    """The building blocks of one implementation."""

    def __init__(self, impl: str, attention_backend: str = "auto"):
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        megatron_attention = attention_backend in ("unfused", "local")
        if impl == "local":
            from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

            from megatron_prores.attention import sdpa_attention
            from megatron_prores.norms import Norm

            self.norm = Norm
            self.column = ColumnParallelLinear
            self.row = RowParallelLinear
            self.attention = DotProductAttention if megatron_attention else sdpa_attention(attention_backend)
            self.norm_column = None  # no fused norm+linear: separate norm, keys mapped
        elif impl == "transformer_engine":
            from megatron.core.extensions import transformer_engine as te_ext

            if not getattr(te_ext, "HAVE_TE", False):  # megatron defines stubs without TE
                raise ConfigError(
                    "--transformer-impl transformer_engine needs Transformer Engine, which is not "
                    "importable here; install the [te] extra on a CUDA machine or use "
                    "--transformer-impl local"
                )
            from megatron.core.extensions.transformer_engine import (
                TEColumnParallelLinear,
                TEDotProductAttention,
                TELayerNormColumnParallelLinear,
                TENorm,
                TERowParallelLinear,
            )

            self.norm = TENorm
            self.column = TEColumnParallelLinear
            self.row = TERowParallelLinear
            self.attention = DotProductAttention if attention_backend == "local" else TEDotProductAttention
            self.norm_column = TELayerNormColumnParallelLinear
        else:
            raise ConfigError(
                f"--transformer-impl {impl!r} is not valid; choose one of: local, transformer_engine"
            )


def layer_spec(method: MethodConfig, style: str, impl: str = "local",
               attention_backend: str = "auto") -> ModuleSpec:
    """Spec of one ProRes/GPAS layer of the given block style."""
    m = _Modules(impl, attention_backend)
    s = STYLES[style]
    # TE fuses a pre-norm into the next linear, unless LNS scales the norm's output in between
    fusable = s.pre_norm and not s.depth_scaled_pre_norm
    fuse = fusable and m.norm_column is not None
    map_keys = fusable and m.norm_column is None
    input_linear = m.norm_column if fuse else m.column
    norm_in = m.norm if s.pre_norm and not fuse else IdentityOp
    norm_post = m.norm if s.post_norm else IdentityOp
    return ModuleSpec(
        module=ProResTransformerLayer,
        params={"method": method, "style": style},
        submodules=ProResLayerSubmodules(
            input_layernorm=norm_in,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=input_linear,
                    core_attention=m.attention,
                    linear_proj=m.row,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,  # replaced by the layer's residual op
            post_self_attn_layernorm=norm_post,
            pre_mlp_layernorm=norm_in,
            mlp=mlp_spec(MLPSubmodules(linear_fc1=input_linear, linear_fc2=m.row)),
            mlp_bda=get_bias_dropout_add,
            post_mlp_layernorm=norm_post,
            sharded_state_dict_keys_map=dict(_FUSED_NORM_KEYS) if map_keys else {},
        ),
    )


def block_spec(method: MethodConfig, config, impl: str = "local",
               vp_stage: Optional[int] = None, attention_backend: str = "auto") -> TransformerBlockSubmodules:
    """Layer specs of the blocks of this pipeline stage (and virtual stage), plus the final norm.

    Styles depend on the GLOBAL block index (Mix-LN), so the specs are made per block.
    """
    offset = get_transformer_layer_offset(config, vp_stage)
    count = get_num_layers_to_build(config, vp_stage)
    L = config.num_layers
    specs = [layer_spec(method, method.block_style(offset + i + 1, L), impl, attention_backend)
             for i in range(count)]
    final_norm = _Modules(impl).norm if method.has_final_norm else None
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)

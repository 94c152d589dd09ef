"""Depth-dependent initialization, applied as exact rescaling of megatron-core's normal init.

Every weight starts as megatron-core initializes it (normal, std ``init_method_std``; output
projections std/sqrt(2L) with ``--init-method scaled``). Then, per global 1-based block l:
- ``--init-method ds-init``: output projections (attention out-proj, MLP fc2) times 1/sqrt(l),
  i.e. std 0.02/sqrt(l);
- DeepNorm (``--norm-type deepnorm``): the value part of the fused QKV weight, the attention
  out-proj and both MLP matrices (fc1 = [gate; up], fc2) times b = (8L)**-0.25; q and k unscaled.
- ``--lns-gain learnable``: the pre-norm gains times 1/sqrt(l) (LNS as the official code has it).
- ``--embedding-init prores-code|gpas-code``: word embeddings with std ``--init-method-std`` x
  sqrt(hidden) or sqrt(2/5) (the official ProRes / GPAS code) instead of ``--init-method-std``.
- ``--deepnorm-init official``: DeepNorm's xavier-normal init of the official code (gain (8L)**-0.25
  for v, out-projection and MLP, 1 for q and k), for plain DeepNorm only; with ProRes or GPAS the
  official code keeps the plain normal init, and so does this option.
Rescaling (instead of re-drawing) keeps the result independent of the parallel layout.
"""

from __future__ import annotations

import math

import torch

from megatron_prores.block_styles import STYLES


def deepnorm_shortcut(num_layers: int) -> float:
    """DeepNorm's shortcut constant c = (2L)**0.25."""
    return (2.0 * num_layers) ** 0.25


def deepnorm_init_gain(num_layers: int) -> float:
    """DeepNorm's init gain b = (8L)**-0.25."""
    return (8.0 * num_layers) ** -0.25


def _qkv_rows(qkv_weight: torch.Tensor, config) -> tuple:
    """Views of the Q, K and V rows of a (tensor-parallel shard of a) fused QKV weight.

    megatron-core stores QKV per query group: [q_1 .. q_{heads/groups}, k, v] x groups.
    """
    d = config.kv_channels
    per = config.num_attention_heads // config.num_query_groups
    w = qkv_weight.view(-1, per + 2, d, qkv_weight.shape[-1])
    return w[:, :per], w[:, per], w[:, per + 1]


def _value_rows(qkv_weight: torch.Tensor, config) -> torch.Tensor:
    return _qkv_rows(qkv_weight, config)[2]


def _xavier_std(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def _deepnorm_xavier(layer, config) -> None:
    """DeepNorm as the official code initializes it: xavier-normal weights, gain (8L)**-0.25 for v,
    the out-projection and the MLP, gain 1 for q and k (separate q/k/v/gate/up matrices there). Done
    by rescaling megatron-core's normal draw (std ``init_method_std``) to each matrix's xavier std."""
    h, d, sigma = config.hidden_size, config.kv_channels, config.init_method_std
    q_out, kv_out, ffn = config.num_attention_heads * d, config.num_query_groups * d, config.ffn_hidden_size
    b = deepnorm_init_gain(config.num_layers)
    q, k, v = _qkv_rows(layer.self_attention.linear_qkv.weight, config)
    q.mul_(_xavier_std(h, q_out) / sigma)
    k.mul_(_xavier_std(h, kv_out) / sigma)
    v.mul_(_xavier_std(h, kv_out, b) / sigma)
    layer.self_attention.linear_proj.weight.mul_(_xavier_std(q_out, h, b) / sigma)
    layer.mlp.linear_fc1.weight.mul_(_xavier_std(h, ffn, b) / sigma)  # gate and up: each [ffn, h]
    layer.mlp.linear_fc2.weight.mul_(_xavier_std(ffn, h, b) / sigma)


def pre_norm_gains(layer) -> list:
    """The gains of the norms before attention and MLP: the norm modules' weights (local spec), or
    the norm weights Transformer Engine fuses into the following linear (TE spec)."""
    gains = []
    for norm, linear in ((layer.input_layernorm, layer.self_attention.linear_qkv),
                         (layer.pre_mlp_layernorm, layer.mlp.linear_fc1)):
        weight = getattr(norm, "weight", None)
        gains.append(weight if weight is not None else getattr(linear, "layer_norm_weight"))
    return gains


EMBEDDING_STD = {  # --embedding-init: std of the word embeddings, from (init_method_std, hidden)
    "prores-code": lambda std, hidden: std * math.sqrt(hidden),  # the official ProRes code
    "gpas-code": lambda std, hidden: math.sqrt(2.0 / 5.0),  # the official GPAS code
}


@torch.no_grad()
def apply_embedding_init(model, method, config) -> None:
    """Rescale the word embeddings of a model chunk (first pipeline stage) from megatron-core's
    normal init (std ``init_method_std``) to the std ``--embedding-init`` names."""
    if method.embedding_init == "normal" or not config.perform_initialization:
        return
    std = EMBEDDING_STD[method.embedding_init](config.init_method_std, config.hidden_size)
    embedding = getattr(model, "embedding", None)
    if embedding is not None:
        embedding.word_embeddings.weight.mul_(std / config.init_method_std)
    if model.share_embeddings_and_output_weights and model.post_process and not model.pre_process:
        # the last pipeline stage's copy of a tied matrix, already synced from the first stage's
        # unscaled init (megatron-core does that while building the model): scale it alike
        model.output_layer.weight.mul_(std / config.init_method_std)


@torch.no_grad()
def apply_depth_init(layer, method) -> None:
    """Rescale the freshly initialized weights of ``layer`` (a ProResTransformerLayer)."""
    config = layer.config
    if not config.perform_initialization:
        return
    attn, mlp = layer.self_attention, layer.mlp
    if method.init_method == "ds-init":
        s = 1.0 / math.sqrt(layer.layer_number)
        attn.linear_proj.weight.mul_(s)
        mlp.linear_fc2.weight.mul_(s)
    if method.norm_type == "lns" and method.lns_gain == "learnable":
        # LNS as the official code has it: Pre-LN blocks whose norm gains start at 1/sqrt(l)
        for gain in pre_norm_gains(layer):
            gain.mul_(1.0 / math.sqrt(layer.layer_number))
    if STYLES[layer.style].deepnorm and method.deepnorm_init == "official":
        if not method.prores and not method.gpas:  # the official code: plain DeepNorm only
            _deepnorm_xavier(layer, config)
    elif STYLES[layer.style].deepnorm:
        b = deepnorm_init_gain(config.num_layers)
        _value_rows(attn.linear_qkv.weight, config).mul_(b)
        attn.linear_proj.weight.mul_(b)
        mlp.linear_fc1.weight.mul_(b)
        mlp.linear_fc2.weight.mul_(b)

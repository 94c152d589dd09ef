"""ProResForCausalLM: the blocks of megatron-prores as a Hugging Face model (copied into exports).

Notation: x the stream entering a sublayer, F the sublayer (attention or MLP), a the ProRes value
of the block, G the GPAS op y = x - SiLU(g) * stopgrad(x) (forward value (1 - SiLU(g)) x), N a norm.

| style    | each sublayer computes               |
|----------|--------------------------------------|
| pre      | G(x + a F(N(x)))                     |
| lns      | G(x + a F(N(x) / sqrt(l)))           |
| sandwich | G(x + a N'(F(N(x))))                 |
| post     | N'(G(x) + a F(x))                    |
| deepnorm | N'(c G(x) + a F(x)), c = (2L)**0.25  |

Weight names follow LlamaForCausalLM (input_layernorm is the pre-attention norm,
post_attention_layernorm the pre-MLP norm); the extra norms are attn_branch_norm/mlp_branch_norm
(Sandwich-LN) and attn_sum_norm/mlp_sum_norm (Post-LN, DeepNorm).
"""


import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_prores import ProResConfig


class ProResNorm(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.eps = config.rms_norm_eps
        self.weight = nn.Parameter(torch.ones(config.hidden_size))
        if not self.rms:
            self.bias = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        if self.rms:
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        else:
            y = F.layer_norm(x, x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
        return y.to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ProResAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)
        self.rope_theta = float(config.rope_theta)  # no buffers: from_pretrained would leave them empty

    def forward(self, x, positions, cache):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, device=x.device,
                                                           dtype=torch.float32) / self.head_dim))
        freqs = positions.float()[..., None] * inv_freq  # [b, s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] == k.shape[2] and s > 1,
                                             attn_mask=None if q.shape[2] == k.shape[2] else
                                             _causal_mask(s, k.shape[2], q.device))
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


def _causal_mask(s_q, s_k, device):
    """Boolean mask for s_q new queries at the end of s_k keys (decoding with a cache)."""
    i = torch.arange(s_q, device=device)[:, None] + (s_k - s_q)
    return torch.arange(s_k, device=device)[None, :] <= i


class ProResMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ProResBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.style = config.block_styles[layer_idx]
        self.layer = layer_idx + 1  # 1-based, as in the papers
        self.self_attn = ProResAttention(config, layer_idx)
        self.mlp = ProResMLP(config)
        if self.style in ("pre", "lns", "sandwich"):
            self.input_layernorm = ProResNorm(config)
            self.post_attention_layernorm = ProResNorm(config)
        if self.style == "sandwich":
            self.attn_branch_norm = ProResNorm(config)
            self.mlp_branch_norm = ProResNorm(config)
        if self.style in ("post", "deepnorm"):
            self.attn_sum_norm = ProResNorm(config)
            self.mlp_sum_norm = ProResNorm(config)
        if config.gpas:
            self.gpas_gate = nn.Parameter(torch.zeros(2 if config.gpas_gate == "sublayer" else 1))
        else:
            self.gpas_gate = None
        self.prores_value = float(config.prores_values[layer_idx])  # the ProRes value a of this block
        self.shortcut = config.deepnorm_alpha if self.style == "deepnorm" else 1.0

    def _gpas(self, x, sublayer):
        if self.gpas_gate is None:
            return x
        g = self.gpas_gate[sublayer if self.gpas_gate.numel() == 2 else 0]
        return x - F.silu(g).to(x.dtype) * x.detach()

    def _sublayer(self, x, sublayer, fn, positions=None, cache=None):
        a = self.prores_value
        call = (lambda v: fn(v, positions, cache)) if sublayer == 0 else fn
        if self.style in ("pre", "lns", "sandwich"):
            norm = self.input_layernorm if sublayer == 0 else self.post_attention_layernorm
            y = norm(x)
            if self.style == "lns":
                y = y * self.layer ** -0.5
            y = call(y)
            if self.style == "sandwich":
                y = (self.attn_branch_norm if sublayer == 0 else self.mlp_branch_norm)(y)
            return self._gpas(x + a * y, sublayer)
        y = call(x)
        out = self.shortcut * self._gpas(x, sublayer) + a * y
        return (self.attn_sum_norm if sublayer == 0 else self.mlp_sum_norm)(out)

    def forward(self, x, positions, cache):
        x = self._sublayer(x, 0, self.self_attn, positions, cache)
        return self._sublayer(x, 1, self.mlp)


class ProResPreTrainedModel(PreTrainedModel):
    config_class = ProResConfig
    base_model_prefix = "model"
    _no_split_modules = ["ProResBlock"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
        elif isinstance(module, ProResNorm):
            module.weight.data.fill_(1.0)
            if not module.rms:
                module.bias.data.zero_()
        # GPAS gates are created at 0 (identity) and only ever set from the checkpoint


class ProResModel(ProResPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ProResBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = ProResNorm(config) if config.final_norm else None
        self.post_init()

    def forward(self, input_ids, past_key_values=None):
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None].expand(
            input_ids.shape[0], -1)
        x = self.embed_tokens(input_ids)
        for block in self.layers:
            x = block(x, positions, past_key_values)
        return self.norm(x) if self.norm is not None else x


class ProResForCausalLM(ProResPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = ProResModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, labels=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        hidden = self.model(input_ids, past_key_values if use_cache or past_key_values is not None else None)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)


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

Generation depends on no release's internals: ``prepare_inputs_for_generation`` is our own (the
tokens not yet in the cache, the whole 2-D attention mask, their positions), the cache arrives as
``past_key_values`` (transformers 4) or ``cache`` (transformers 5) and is returned under the name
the installed output class declares. With a 2-D ``attention_mask`` (1 = token, 0 = padding, left
padding for batched generation) a query attends to the keys before it that are not padding and the
position of a token is the number of tokens before it (cumsum(mask) - 1).

GPAS gates stay fp32 in a bf16/fp16 model, as in training (the export writes them so): loaded so
(``_keep_in_fp32_modules_strict``; transformers 4.45 keeps them for bf16 by itself and for fp16 by
``_keep_in_fp32_modules``, except that its ``low_cpu_mem_usage``/``device_map`` loading rounds them
to bf16), kept so by ``.to()``/``.half()``, and the scale 1 - SiLU(g) is applied in fp32.
"""


import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_prores import ProResConfig

# transformers 5 renamed the output's past_key_values to cache (the old name only as a deprecated alias)
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# With config.tie_word_embeddings, lm_head is the embedding matrix: transformers 5 reads the pair
# from a mapping, transformers 4 the tied names from a list (and the modules from get_*_embeddings).
TIED_WEIGHTS = ({"lm_head.weight": "model.embed_tokens.weight"} if int(transformers.__version__.split(".")[0]) >= 5
                else ["lm_head.weight"])
HALF = (torch.float16, torch.bfloat16)


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
        x = x.to(torch.promote_types(dtype, torch.float32))  # fp32 at least, fp64 stays fp64
        w = self.weight.to(x.dtype)
        if self.rms:
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w
        else:
            y = F.layer_norm(x, x.shape[-1:], w, self.bias.to(x.dtype), self.eps)
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
        self.rope_factor = getattr(config, "rope_llama3_factor", None)

    def forward(self, x, positions, cache=None, mask=None):
        """Causal attention of x [b, s, h] at ``positions`` [b, s]; ``mask`` [b, 1, s, past + s] (True =
        attend) when there is padding or a cached past, else None (plain causal)."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, device=x.device,
                                                           dtype=torch.float32) / self.head_dim))
        if self.rope_factor is not None:
            inv_freq = llama3_scaled(inv_freq, self.rope_factor)
        freqs = positions.float()[..., None] * inv_freq  # [b, s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and s > 1)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


def llama3_scaled(inv_freq, factor, low=1.0, high=4.0, context=8192):
    """Llama 3.x RoPE scaling: frequencies whose wavelength exceeds context/low are divided by
    ``factor``, those below context/high kept, the ones between interpolated linearly in
    context/wavelength."""
    wavelength = 2 * math.pi / inv_freq
    t = ((context / wavelength - low) / (high - low)).clamp(0, 1)  # 0: long waves, 1: short ones
    return (1 - t) * inv_freq / factor + t * inv_freq


def attention_mask_4d(attention_mask, past, s, device):
    """[b, 1, s, past + s] booleans: query i (index past + i) sees key j iff j <= past + i and key j is
    a token (mask 1). A query always sees itself, so a padding query has one key and stays finite
    (an all-masked row would be NaN, and NaN times a zero attention weight is still NaN)."""
    q = torch.arange(past, past + s, device=device)[:, None]
    k = torch.arange(past + s, device=device)[None, :]
    allowed = k <= q
    if attention_mask is None:
        return allowed[None, None]
    return allowed & (attention_mask.bool()[:, None, None, :] | (k == q))


def position_ids_from_mask(attention_mask, s):
    """Positions of the last s tokens: the number of tokens before each (padding counts 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]


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
            self.gpas_gate = nn.Parameter(torch.zeros(2 if config.gpas_gate == "sublayer" else 1,
                                                      dtype=torch.promote_types(torch.get_default_dtype(),
                                                                                torch.float32)))
        else:
            self.gpas_gate = None
        self.prores_value = float(config.prores_values[layer_idx])  # the ProRes value a of this block
        self.shortcut = config.deepnorm_alpha if self.style == "deepnorm" else 1.0

    def _apply(self, fn, *args, **kwargs):
        # a cast of the model to bf16/fp16 keeps the gate's fp32 value (cast, then widened, it would be rounded)
        gate = self.gpas_gate.data if self.gpas_gate is not None else None
        super()._apply(fn, *args, **kwargs)
        if gate is not None and self.gpas_gate.dtype in HALF and gate.dtype not in HALF:
            new = self.gpas_gate.data
            self.gpas_gate.data = new.float() if gate.is_meta else gate.to(new.device)
        return self

    def _gpas(self, x, sublayer):
        if self.gpas_gate is None:
            return x
        g = self.gpas_gate[sublayer if self.gpas_gate.numel() == 2 else 0]
        wide = x.to(torch.promote_types(x.dtype, g.dtype))  # fp32 for a bf16 stream: the scale is not rounded
        return (wide - F.silu(g.to(wide.dtype)) * wide.detach()).to(x.dtype)

    def _sublayer(self, x, sublayer, fn):
        a = self.prores_value
        if self.style in ("pre", "lns", "sandwich"):
            norm = self.input_layernorm if sublayer == 0 else self.post_attention_layernorm
            y = norm(x)
            if self.style == "lns":
                y = y * self.layer ** -0.5
            y = fn(y)
            if self.style == "sandwich":
                y = (self.attn_branch_norm if sublayer == 0 else self.mlp_branch_norm)(y)
            return self._gpas(x + a * y, sublayer)
        y = fn(x)
        out = self.shortcut * self._gpas(x, sublayer) + a * y
        return (self.attn_sum_norm if sublayer == 0 else self.mlp_sum_norm)(out)

    def forward(self, x, positions, cache=None, mask=None):
        x = self._sublayer(x, 0, lambda y: self.self_attn(y, positions, cache, mask))
        return self._sublayer(x, 1, self.mlp)


class ProResPreTrainedModel(PreTrainedModel):
    config_class = ProResConfig
    base_model_prefix = "model"
    _no_split_modules = ["ProResBlock"]
    _keep_in_fp32_modules_strict = ["gpas_gate"]  # loaded fp32 in a bf16 or fp16 model
    _keep_in_fp32_modules = ["gpas_gate"]  # the same for fp16 in transformers 4.x
    _supports_cache_class = True  # transformers 4.x: accept and create DynamicCache instances

    @torch.no_grad()
    def _init_weights(self, module):
        # torch.nn.init, looked up at call time: transformers 5 runs this on every module after loading
        # and guards these functions to skip loaded tensors (in-place tensor methods would overwrite them)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        elif isinstance(module, ProResNorm):
            nn.init.ones_(module.weight)
            if not module.rms:
                nn.init.zeros_(module.bias)
        # GPAS gates are created at 0 (identity) and only ever set from the checkpoint


class ProResModel(ProResPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ProResBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = ProResNorm(config) if config.final_norm else None
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        """Hidden states of ``input_ids`` [b, s], which follow the ``past`` tokens in ``past_key_values``;
        ``attention_mask`` [b, past + s] covers those too."""
        b, s = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] != past + s:
                raise ValueError(f"attention_mask must be [batch, {past + s}] (cached {past} + new {s} tokens), "
                                 f"got {list(attention_mask.shape)}")
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: plain causal attention (faster kernels)
        if position_ids is None:
            position_ids = (position_ids_from_mask(attention_mask, s) if attention_mask is not None else
                            torch.arange(past, past + s, device=input_ids.device)[None].expand(b, -1))
        # a mask where is_causal cannot say it: padding, or several new queries after a cached past
        mask = attention_mask_4d(attention_mask, past, s, input_ids.device) \
            if attention_mask is not None or (past and s > 1) else None
        x = self.embed_tokens(input_ids)
        for block in self.layers:
            x = block(x, position_ids, past_key_values, mask)
        return self.norm(x) if self.norm is not None else x


class ProResForCausalLM(ProResPreTrainedModel, GenerationMixin):
    _tied_weights_keys = TIED_WEIGHTS

    def __init__(self, config):
        super().__init__(config)
        self.model = ProResModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new):
        self.lm_head = new

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, labels=None,
                use_cache=None, logits_to_keep=0, **kwargs):
        """Logits of the tokens ``input_ids`` (the last ``logits_to_keep`` only, when not 0); with ``labels``
        the mean cross entropy of token t+1 given tokens <= t over the labels that are not -100.
        ``use_cache`` starts a DynamicCache when none is given (transformers 5 passes it as ``cache``);
        a ``cache_position`` (transformers 4) is ignored: the cache's length says where the tokens go."""
        if input_ids is None:
            raise ValueError("ProResForCausalLM takes input_ids (inputs_embeds is not supported)")
        cache = past_key_values if past_key_values is not None else kwargs.get("cache")
        if use_cache and cache is None:
            cache = DynamicCache()
        hidden = self.model(input_ids, attention_mask, position_ids, cache)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:  # a tensor of sequence indices
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(**{"loss": loss, "logits": logits, CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      position_ids=None, use_cache=True, **kwargs):
        """One step of ``generate``: ``input_ids`` [b, t] is the whole sequence so far (prompt and
        generated tokens; only the new ones when ``attention_mask`` is longer), the cache holds the first
        ``past`` of the t tokens: feed the other t - past with the full mask and their positions."""
        cache = past_key_values if past_key_values is not None else kwargs.get("cache")
        past = cache.get_seq_length() if cache is not None else 0
        total = attention_mask.shape[1] if attention_mask is not None else input_ids.shape[1]
        new = total - past
        if not 0 < new <= input_ids.shape[1]:  # without a mask, a call that gave only the new tokens
            new = input_ids.shape[1]
        inputs = {"input_ids": input_ids[:, -new:], "attention_mask": attention_mask,
                  "position_ids": position_ids[:, -new:] if position_ids is not None else None,
                  "past_key_values": cache, "use_cache": use_cache}
        if kwargs.get("logits_to_keep") is not None:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

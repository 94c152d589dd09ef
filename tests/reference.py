"""An independent float64 reference of the model, written from the papers' formulas.

Plain PyTorch, batch-first, no megatron code. It reads the weights of a megatron model by name
(undoing megatron's storage layouts: QKV interleaved per query group, fc1 = [gate; up]) and
computes logits with its own attention, RoPE, SwiGLU, norms, ProRes and GPAS.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def prores_linear(step: float, l: int, L: int, total_warmup: float) -> float:
    """ProRes 'linear': a(l,t) = min(t / (T l), 1) with T = W / L."""
    T = total_warmup / L
    return min(step / (T * l), 1.0)


def gpas_ref(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """y = x - SiLU(g) * stopgrad(x)."""
    return x - (g * torch.sigmoid(g)) * x.detach()


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) * torch.rsqrt((x - mu).pow(2).mean(-1, keepdim=True) + eps) * w + b


def rope_tables(seq: int, dim: int, base: float, dtype):
    # megatron-core computes its rotary table (angles, cos, sin) in float32 and casts it to the
    # activation dtype; the reference uses the same float32 table so that the comparison isolates
    # the layer math from the rounding of a constant table.
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    ang = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Reference:
    def __init__(self, params: dict, *, num_layers, hidden, heads, groups, ffn, norm_type,
                 gpas, gpas_gate="block", prores_values=None, mix_k=None, eps=1e-5,
                 normalization="RMSNorm"):
        self.p = {k: v.detach().to(torch.float64).clone().requires_grad_(True) for k, v in params.items()}
        self.L, self.h, self.heads, self.groups, self.ffn = num_layers, hidden, heads, groups, ffn
        self.d = hidden // heads
        self.norm_type, self.gpas, self.gpas_gate = norm_type, gpas, gpas_gate
        self.a = prores_values or [1.0] * num_layers
        self.mix_k = mix_k if mix_k is not None else num_layers // 4
        self.eps = eps
        self.normalization = normalization

    def w(self, name):
        return self.p[name]

    def norm(self, x, prefix):
        if self.normalization == "LayerNorm":
            return layer_norm(x, self.w(prefix + ".weight"), self.w(prefix + ".bias"), self.eps)
        return rms_norm(x, self.w(prefix + ".weight"), self.eps)

    def attention(self, i, x):
        b, s, _ = x.shape
        hpg = self.heads // self.groups
        qkv = x @ self.w(f"decoder.layers.{i}.self_attention.linear_qkv.weight").T
        qkv = qkv.view(b, s, self.groups, hpg + 2, self.d)
        q = qkv[:, :, :, :hpg].reshape(b, s, self.heads, self.d)
        k = qkv[:, :, :, hpg].repeat_interleave(hpg, dim=2)
        v = qkv[:, :, :, hpg + 1].repeat_interleave(hpg, dim=2)
        cos, sin = rope_tables(s, self.d, 10000.0, x.dtype)
        cos, sin = cos[None, :, None], sin[None, :, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # b, heads, s, d
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d)
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(mask, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        out = out.transpose(1, 2).reshape(b, s, self.heads * self.d)
        return out @ self.w(f"decoder.layers.{i}.self_attention.linear_proj.weight").T

    def mlp(self, i, x):
        fc1 = self.w(f"decoder.layers.{i}.mlp.linear_fc1.weight")
        gate, up = fc1[: self.ffn], fc1[self.ffn:]
        hmid = F.silu(x @ gate.T) * (x @ up.T)
        return hmid @ self.w(f"decoder.layers.{i}.mlp.linear_fc2.weight").T

    def gate(self, i, sub):
        g = self.w(f"decoder.layers.{i}.gpas_gate")
        return g[sub] if self.gpas_gate == "sublayer" else g[0]

    def block(self, i, x):
        l, L, a = i + 1, self.L, self.a[i]
        style = self.norm_type
        if style == "mix":
            style = "post" if l <= self.mix_k else "pre"
        pfx = f"decoder.layers.{i}."
        sublayers = [(self.attention, "input_layernorm", "post_self_attn_layernorm"),
                     (self.mlp, "pre_mlp_layernorm", "post_mlp_layernorm")]
        for sub, (fn, pre_norm, post_norm) in enumerate(sublayers):
            G = (lambda t: gpas_ref(t, self.gate(i, sub))) if self.gpas else (lambda t: t)
            if style == "pre":  # x + a F(Norm(x)), GPAS after the add
                x = G(x + a * fn(i, self.norm(x, pfx + pre_norm)))
            elif style == "lns":  # x + a F(Norm(x) / sqrt(l))
                n = self.norm(x, pfx + pre_norm) / math.sqrt(l)
                x = G(x + a * fn(i, n))
            elif style == "sandwich":  # x + a Norm2(F(Norm1(x)))
                n = self.norm(x, pfx + pre_norm)
                x = G(x + a * self.norm(fn(i, n), pfx + post_norm))
            elif style == "post":  # Norm(G(x) + a F(x)); G only in Mix-LN
                x = self.norm(G(x) + a * fn(i, x), pfx + post_norm)
            elif style == "deepnorm":  # Norm(c G(x) + a F(x)), c = (2L)^(1/4)
                c = (2 * L) ** 0.25
                x = self.norm(c * G(x) + a * fn(i, x), pfx + post_norm)
            else:
                raise ValueError(style)
        return x

    def logits(self, tokens):
        x = self.w("embedding.word_embeddings.weight")[tokens]
        for i in range(self.L):
            x = self.block(i, x)
        if self.norm_type not in ("post", "deepnorm"):
            x = self.norm(x, "decoder.final_layernorm")
        return x @ self.w("output_layer.weight").T

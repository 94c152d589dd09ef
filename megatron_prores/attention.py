"""Core attention of the local spec through PyTorch's scaled_dot_product_attention.

A drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward signature,
same [s, b, heads, dim] -> [s, b, heads * dim] layout), so a run without Transformer Engine gets
flash / memory-efficient attention kernels on GPUs instead of the materialized s x s softmax:

- causal masking with no mask tensor (``is_causal``), or an explicit megatron mask (True = masked);
- grouped-query attention without copying K/V where the flash kernel runs (``enable_gqa``), with
  K/V repeated per head (as DotProductAttention does) where it cannot (explicit mask, fp32 on GPUs,
  the memory-efficient kernel);
- attention dropout inside the tensor-parallel RNG fork (as DotProductAttention: each TP rank holds
  other heads, so it draws its own mask), or outside it under sequence parallelism;
- ``backend`` restricts the kernel choice: "auto" lets PyTorch pick, "flash" and "fused" force the
  flash / memory-efficient kernel (an error where that kernel cannot run these inputs);
- context parallelism (causal attention only): each CP rank holds two chunks of the sequence
  (megatron_prores/context_parallel.py); K/V of all ranks are all-gathered, and each local query
  chunk attends to the keys up to its own end with a bottom-right-aligned causal mask
  (``causal_lower_right``, which the flash kernel takes without a mask tensor).
A query row whose keys are all masked gives zeros (DotProductAttention: the mean of the values);
causal language modelling never has one. Megatron's query-key layer scaling is a numerical device of the fp16 softmax that leaves the math
unchanged, so the scale here is always softmax_scale (default 1/sqrt(head dim)).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

_KERNELS = {"auto": None, "flash": "FLASH_ATTENTION", "fused": "EFFICIENT_ATTENTION"}


class SDPAttention(MegatronModule):
    backend = "auto"

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        self.cp_group = None
        if config.context_parallel_size > 1:
            from megatron.core import parallel_state

            self.cp_group = getattr(pg_collection, "cp", None) or parallel_state.get_context_parallel_group()
        if getattr(config, "window_size", None) is not None or getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError("SDPAttention supports full causal attention with the vanilla softmax only")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale

    def _kernel(self):
        name = _KERNELS[self.backend]
        if name is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, name))

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor an attention bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b, heads, dim = query.shape
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.cp_group is not None:
            if attention_mask is not None or mask_type != AttnMaskType.causal:
                raise ValueError("SDPAttention under context parallelism supports causal attention without a mask only")
            out = self._context_parallel(q, key, value)
        else:
            mask = None
            causal = mask_type == AttnMaskType.causal and attention_mask is None
            if causal and key.shape[0] != sq:
                raise ValueError("SDPAttention: causal attention without a mask needs as many keys as queries")
            if attention_mask is not None:
                mask = ~attention_mask  # megatron: True = masked; SDPA: True = attend
            out = self._attend(q, k, v, mask, causal)
        # [b, n, s, d] -> [s, b, n * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)

    def _context_parallel(self, q, key, value):
        """This rank's two query chunks [b, n, 2L, d] against the whole sequence's keys."""
        from torch.nn.attention.bias import causal_lower_right

        from megatron_prores.context_parallel import gather_keys, local_chunks

        k, v = (gather_keys(t, self.cp_group).permute(1, 2, 0, 3) for t in (key, value))
        L = q.shape[2] // 2
        outs = []
        for i, chunk in enumerate(local_chunks(self.cp_group.rank(), self.cp_group.size())):
            end = (chunk + 1) * L  # chunk c's queries see keys 0 .. (c+1)L-1, the last L causally
            outs.append(self._attend(q[:, :, i * L:(i + 1) * L], k[:, :, :end], v[:, :, :end],
                                     causal_lower_right(L, end), False))
        return torch.cat(outs, dim=2)

    def _attend(self, q, k, v, mask, causal: bool):
        heads, groups = q.shape[1], k.shape[1]
        gqa = groups != heads
        if gqa and not self._grouped_kv(q, k, v, mask):
            # the kernel cannot read grouped K/V: give it one K/V per head
            k, v = (t.repeat_interleave(heads // groups, dim=1) for t in (k, v))
            gqa = False
        p = self.dropout_p if self.training else 0.0
        rng = (tensor_parallel.get_cuda_rng_tracker().fork()
               if p > 0.0 and not self.config.sequence_parallel else contextlib.nullcontext())
        with rng, self._kernel():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, scale=self.scale, enable_gqa=gqa)

    def _grouped_kv(self, q, k, v, mask) -> bool:
        """Whether the kernel that will run takes grouped K/V (``enable_gqa``) directly: the flash
        kernel does, the memory-efficient one and an explicit mask tensor do not."""
        if self.backend == "fused" or not _flash_dtype(q):
            return False
        if mask is None:
            return True
        from torch.nn.attention.bias import CausalBias

        if not isinstance(mask, CausalBias):
            return False
        if not q.is_cuda:
            return True  # CPU: the mask is materialized and the math kernel groups K/V itself
        # a bottom-right causal bias runs on flash where flash takes the inputs, else on the
        # memory-efficient kernel (which needs one K/V per head)
        from torch.backends.cuda import SDPAParams, can_use_flash_attention

        p = self.dropout_p if self.training else 0.0
        return can_use_flash_attention(SDPAParams(q, k, v, None, p, False, True))


def _flash_dtype(t: torch.Tensor) -> bool:
    """Inputs the flash kernel takes (fp16/bf16 on GPUs; any float on CPU)."""
    return t.dtype in (torch.float16, torch.bfloat16) or not t.is_cuda


def sdpa_attention(backend: str) -> type:
    """SDPAttention with a fixed kernel choice (a class, as ModuleSpec needs)."""
    if backend not in _KERNELS:
        raise ValueError(f"unknown SDPA backend {backend!r}")
    if backend == "auto":
        return SDPAttention
    return type(f"SDPAttention_{backend}", (SDPAttention,), {"backend": backend})

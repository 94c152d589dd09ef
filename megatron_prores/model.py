"""Build the GPT model chunks of this rank (one per virtual pipeline stage)."""

from __future__ import annotations

from typing import List

import torch

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_prores import mcore_compat
from megatron_prores.config import ModelConfig
from megatron_prores.initialization import apply_embedding_init
from megatron_prores.specs import block_spec


def build_model(cfg: ModelConfig, parallel_output: bool = True) -> List[GPTModel]:
    """The model chunks of this rank, on its device, unwrapped (no DDP, no Float16Module).

    Needs ``parallel.initialize`` (torch.distributed + megatron parallel state) first. The
    configuration is validated before anything is built. ``parallel_output=False`` gathers the
    vocabulary-parallel logits on every tensor-parallel rank.
    """
    tcfg = cfg.transformer_config()
    if tcfg.recompute_granularity == "selective" and "layernorm" in tcfg.recompute_modules:
        mcore_compat.allow_norm_recompute_without_te()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = cfg.virtual_pipeline_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = None if vpp is None else vp_stage
        chunk = GPTModel(
            config=tcfg,
            transformer_layer_spec=block_spec(cfg.method, tcfg, cfg.transformer_impl, stage,
                                              cfg.attention_backend),
            vocab_size=cfg.padded_vocab_size,
            max_sequence_length=cfg.seq_length,
            pre_process=pp_rank == 0 and vp_stage == 0,
            post_process=pp_rank == pp_size - 1 and vp_stage == (vpp or 1) - 1,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=cfg.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=cfg.rotary_base,
            rope_scaling=cfg.rope_scaling_factor is not None,
            rope_scaling_factor=cfg.rope_scaling_factor or 8.0,
            vp_stage=stage,
        )
        apply_embedding_init(chunk, cfg.method, tcfg)
        if torch.cuda.is_available():
            chunk = chunk.cuda()  # norms, gates and schedule buffers too, not only megatron's linears
        chunks.append(chunk)
    return chunks

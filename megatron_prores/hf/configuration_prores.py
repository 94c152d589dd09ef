"""Configuration of ProResForCausalLM (copied into each export; depends on transformers only)."""

from transformers import PretrainedConfig


class ProResConfig(PretrainedConfig):
    """A Llama-style decoder (RoPE, SwiGLU, GQA, no biases; tied embeddings with
    ``tie_word_embeddings``) whose blocks follow
    ``block_styles`` (one of pre, lns, sandwich, post, deepnorm per block) with the current ProRes
    values ``prores_values`` (one per block) and, with ``gpas``, learnable GPAS gates."""

    model_type = "megatron_prores"

    def __init__(self, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, rope_theta=10000.0, normalization="RMSNorm", block_styles=None,
                 prores_values=None, gpas=False, gpas_gate="block", deepnorm_alpha=None, final_norm=True,
                 rope_llama3_factor=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.normalization = normalization
        self.block_styles = list(block_styles or ["pre"] * num_hidden_layers)
        self.prores_values = [float(a) for a in (prores_values or [1.0] * num_hidden_layers)]
        self.gpas = gpas
        self.gpas_gate = gpas_gate
        self.deepnorm_alpha = deepnorm_alpha if deepnorm_alpha is not None else (2 * num_hidden_layers) ** 0.25
        self.final_norm = final_norm
        self.rope_llama3_factor = rope_llama3_factor  # Llama 3.x RoPE scaling factor, None: off
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

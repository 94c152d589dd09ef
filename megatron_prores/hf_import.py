"""Hugging Face Llama checkpoint -> Megatron checkpoint of this project, to continue pretraining.

The result is a model-only checkpoint (iteration 0, no optimizer state) in megatron-core's
layout-independent format: the driver loads it with ``--load`` under any TP/PP layout and starts
a fresh optimizer. The model is Pre-LN (what Llama is), ProRes and GPAS off unless the flags say
otherwise: a ProRes warmup restarts the blocks at identity, which a pretrained model rarely wants.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from megatron_prores.config import LLAMA3_ROPE, ConfigError, MethodConfig, ModelConfig, config_to_dict


DAMAGED = "is damaged or incomplete ({}); download it again"
# LlamaConfig's max_position_embeddings when config.json leaves it out or null
LLAMA_POSITIONS = 2048
# the special token ids the import records for the export to write back
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path} {DAMAGED.format(f'not valid JSON: {e}')}") from None


def _or_default(value, default):
    """A config.json value; null or absent is transformers' default (0 stays 0, and is refused later)."""
    return default if value is None else value


def _llama_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--input {directory!r} has no config.json; give a Hugging Face model directory")
    c = _json(path)
    archs = c.get("architectures")
    if isinstance(archs, list) and archs and "LlamaForCausalLM" not in archs:
        raise ConfigError(f"--input {directory!r} is a {', '.join(map(str, archs))} (config.json: architectures), "
                          f"not a LlamaForCausalLM; give a causal language model's directory")
    if c.get("model_type") != "llama":
        raise ConfigError(f"--input {directory!r} is a {c.get('model_type')!r} model; only Llama models import "
                          f"(export Post-LN/Sandwich/DeepNorm/Mix-LN checkpoints of this project are not Llama)")
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(c.get(key), int) or isinstance(c.get(key), bool) or c[key] <= 0:
            raise ConfigError(f"--input {directory!r}: config.json "
                              + (f"lacks {key!r}" if key not in c else f"has {key} {c[key]!r}, not a positive number")
                              + "; give the model's complete config.json")
    positions = c.get("max_position_embeddings")
    if positions is not None and (not isinstance(positions, int) or isinstance(positions, bool) or positions <= 0):
        raise ConfigError(f"--input {directory!r}: config.json has max_position_embeddings {positions!r}, not a "
                          f"positive number; fix config.json")
    c["max_position_embeddings"] = _or_default(positions, LLAMA_POSITIONS)
    c["token_ids"] = _token_ids(directory, c)
    if not isinstance(c.get("tie_word_embeddings", False), bool):
        raise ConfigError(f"--input {directory!r}: config.json has tie_word_embeddings "
                          f"{c['tie_word_embeddings']!r}, not true or false; fix config.json")
    rope = c.get("rope_parameters") or {}  # transformers >= 5; rope_theta/rope_scaling before
    c["rope_theta"] = _or_default(rope.get("rope_theta"), _or_default(c.get("rope_theta"), 10000.0))
    scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":  # stated: no scaling
        scaling = None
    scaling_type = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    c["rope_scaling_factor"] = scaling.get("factor") if scaling_type == "llama3" else None
    problems = [(c.get("hidden_act", "silu") not in ("silu", "swish"), "hidden_act is not silu"),
                (c.get("attention_bias", False), "attention has biases"),
                (c.get("mlp_bias", False), "the MLP has biases"),
                (scaling and (scaling_type != "llama3" or {k: scaling.get(k) for k in LLAMA3_ROPE} != LLAMA3_ROPE),
                 f"its RoPE scaling ({scaling}) is not Llama 3's with {LLAMA3_ROPE} (megatron-core's)"),
                ((c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
                 != c["hidden_size"] // c["num_attention_heads"], "head_dim differs from hidden/heads")]
    for bad, what in problems:
        if bad:
            raise ConfigError(f"--input {directory!r}: {what}; this project's model cannot hold it")
    return c


def _token_ids(directory: str, c: dict) -> dict:
    """{"config": ..., "generation": ...}: the BOS/EOS/pad ids of config.json and of generation_config.json
    (what generate uses; config.json's when there is none), each key as the file has it (an id, a list
    of EOS ids, or null; a key left out stays out: transformers' default then, as for the source)."""
    def ids(values: dict, name: str) -> dict:
        out = {k: values[k] for k in TOKEN_ID_KEYS if k in values}
        for k, v in out.items():
            if not (v is None or _is_id(v) or (isinstance(v, list) and all(map(_is_id, v)))):
                raise ConfigError(f"--input {directory!r}: {name} has {k} {v!r}, not a token id or a list of "
                                  f"them; fix {name}")
        return out

    config = ids(c, "config.json")
    path = os.path.join(directory, "generation_config.json")
    return {"config": config, "generation": ids(_json(path), "generation_config.json") if os.path.isfile(path)
            else dict(config)}


def _is_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensors(directory: str):
    """name -> lazily opened safetensors handle."""
    from safetensors import SafetensorError, safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{index} {DAMAGED.format('no weight_map')}")
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(directory, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"--input {directory!r} has no safetensors weights (model.safetensors[.index.json])")
    where = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ConfigError(f"--input {directory!r}: {path} is missing (listed in the index); download it again")
        try:  # the header is checked against the file's size: a truncated download fails here
            h = safe_open(path, framework="pt")
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"--input {directory!r}: {path} {DAMAGED.format(str(e).strip() or type(e).__name__)}") \
                from None
        for k in h.keys():
            where[k] = h
    if os.path.isfile(index):  # a tensor the index lists must be in its file (a mixed-up download)
        for k, name in weight_map.items():
            if k not in where:
                raise ConfigError(f"--input {directory!r} lacks the tensor {k} (listed in the index in {name}); "
                                  f"download it again")
    return where


def _stored_dtype(w) -> torch.dtype:
    name = "model.embed_tokens.weight"
    stored = w[name].get_slice(name).get_dtype() if name in w else "F32"
    return {"BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)


def check_input(input_dir: str) -> None:
    """One-line errors for a directory that is not an importable Llama model or whose files are
    damaged, before anything is written (and before torch.distributed starts)."""
    _llama_config(input_dir)
    _tensors(input_dir)


def import_tokenizer(input_dir: str, tokenizer_model: Optional[str] = None) -> tuple:
    """(tokenizer type, absolute path) to record for a later export, or (None, None): --tokenizer-model
    (a SentencePiece .model, or a Hugging Face tokenizer.json or directory), else the model directory
    itself when it holds a tokenizer.json. Loaded once and checked against the model's vocabulary."""
    from megatron_prores.tokenizer import build_tokenizer, guess_tokenizer_type

    if not tokenizer_model:
        if not os.path.isfile(os.path.join(input_dir, "tokenizer.json")):
            return None, None
        tokenizer_model = input_dir
    kind = guess_tokenizer_type(tokenizer_model)
    tok = build_tokenizer(kind, tokenizer_model)
    vocab = _llama_config(input_dir)["vocab_size"]
    if tok.vocab_size > vocab:
        raise ConfigError(f"tokenizer {tokenizer_model!r} has {tok.vocab_size} tokens but the model in {input_dir!r} "
                          f"only {vocab}; give the model's own tokenizer with --tokenizer-model")
    return kind, os.path.abspath(tokenizer_model)


def import_llama(input_dir: str, save: str, seq_length: Optional[int] = None,
                 make_vocab_size_divisible_by: int = 128, method: Optional[MethodConfig] = None,
                 tokenizer_model: Optional[str] = None, log=print, tokenizer_type: Optional[str] = None) -> str:
    """Write ``save/iter_0000000`` (+ latest marker); returns its directory. Needs
    torch.distributed with world size 1 (parallel.initialize()). ``tokenizer_model`` (type from its
    path unless ``tokenizer_type`` says) is recorded for the export (``import_tokenizer`` finds it)."""
    from megatron_prores.tokenizer import guess_tokenizer_type
    from megatron_prores.checkpointing import save_checkpoint
    from megatron_prores.model import build_model
    from megatron_prores.checkpointing import architecture_flags, model_args_for_checkpoint

    c = _llama_config(input_dir)
    method = method or MethodConfig()
    w = _tensors(input_dir)
    # tied (e.g. Llama 3.2 1B/3B): the output layer is the embedding matrix, as in the original
    head, emb_name = "lm_head.weight", "model.embed_tokens.weight"
    tied = c.get("tie_word_embeddings", False) or head not in w
    if tied and c.get("tie_word_embeddings") is False:  # config.json says untied: its output layer is missing
        raise ConfigError(f"--input {input_dir!r} lacks the tensor lm_head.weight (config.json: tie_word_embeddings "
                          f"false); download it again")
    untied_note = ""
    if tied and head in w and emb_name in w and not torch.equal(w[head].get_tensor(head), w[emb_name].get_tensor(emb_name)):
        # transformers keeps both matrices then ("will NOT tie them"): so does the import
        tied, untied_note = False, (" (config.json says tied, but lm_head.weight differs from the embedding: "
                                    "imported untied, as transformers loads it)")
    cfg = ModelConfig(
        num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
        num_attention_heads=c["num_attention_heads"], num_query_groups=c.get("num_key_value_heads"),
        ffn_hidden_size=c["intermediate_size"], vocab_size=c["vocab_size"],
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        seq_length=seq_length or min(c["max_position_embeddings"], 4096),
        norm_epsilon=_or_default(c.get("rms_norm_eps"), 1e-6), rotary_base=c["rope_theta"],
        rope_scaling_factor=c["rope_scaling_factor"], tie_embeddings=tied, method=method)
    try:
        cfg.validate()
    except ConfigError as e:  # named by the driver's flags: say where the values came from
        raise ConfigError(f"--input {input_dir!r}: its config.json gives a model this project cannot build: {e}") \
            from None
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    named = str(c.get("torch_dtype") or c.get("dtype") or "").replace("torch.", "")
    dtype = dtypes.get(named) or _stored_dtype(w)  # "auto", absent or unknown: as the weights are stored
    cfg = cfg.replace(params_dtype=dtype)
    (chunk,) = build_model(cfg)
    state = chunk.state_dict()
    heads, groups, h = cfg.num_attention_heads, cfg.query_groups, cfg.hidden_size
    d = h // heads

    def get(name, shape=None):
        if name not in w:
            raise ConfigError(f"--input {input_dir!r} lacks the tensor {name}")
        t = w[name].get_tensor(name)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ConfigError(f"--input {input_dir!r}: {name} holds NaN or inf (a damaged download, or a model "
                              f"that diverged); download it again")
        if shape is not None and tuple(t.shape) != shape:
            raise ConfigError(f"--input {input_dir!r}: {name} has shape {tuple(t.shape)}, but config.json "
                              f"(hidden {h}, {heads} heads in {groups} key/value groups) asks for {shape}")
        return t

    def put(key, t):
        if key not in state:
            raise ConfigError(f"internal: the model has no parameter {key}")
        if state[key].shape != t.shape:
            raise ConfigError(f"--input {input_dir!r}: {key} has shape {tuple(t.shape)}, expected "
                              f"{tuple(state[key].shape)}")
        state[key].copy_(t)

    V = cfg.vocab_size
    emb = torch.zeros_like(state["embedding.word_embeddings.weight"])
    emb[:V] = get("model.embed_tokens.weight", (V, h))
    put("embedding.word_embeddings.weight", emb)
    if not tied:
        out = torch.zeros_like(state["output_layer.weight"])
        out[:V] = get("lm_head.weight", (V, h))
        put("output_layer.weight", out)
    put("decoder.final_layernorm.weight", get("model.norm.weight"))
    for i in range(cfg.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = get(hf + "self_attn.q_proj.weight", (heads * d, h)).view(groups, heads // groups * d, h)
        k = get(hf + "self_attn.k_proj.weight", (groups * d, h)).view(groups, d, h)
        v = get(hf + "self_attn.v_proj.weight", (groups * d, h)).view(groups, d, h)
        put(mg + "self_attention.linear_qkv.weight", torch.cat([q, k, v], dim=1).reshape(-1, h))
        put(mg + "self_attention.linear_proj.weight", get(hf + "self_attn.o_proj.weight"))
        put(mg + "mlp.linear_fc1.weight", torch.cat([get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")]))
        put(mg + "mlp.linear_fc2.weight", get(hf + "mlp.down_proj.weight"))
        put(mg + "input_layernorm.weight", get(hf + "input_layernorm.weight"))
        put(mg + "pre_mlp_layernorm.weight", get(hf + "post_attention_layernorm.weight"))
    train_state = {"consumed_samples": 0, "skipped_iters": 0, "losses": []}
    if tokenizer_model and not tokenizer_type:
        tokenizer_type = guess_tokenizer_type(tokenizer_model)
    # the source's context and special token ids, which the model configuration does not hold: the
    # export writes them back (hf_export._max_positions, _token_ids)
    export = dict(config_to_dict(cfg), tokenizer_type=tokenizer_type if tokenizer_model else None,
                  tokenizer_model=os.path.abspath(tokenizer_model) if tokenizer_model else None,
                  max_position_embeddings=c["max_position_embeddings"], hf_token_ids=c["token_ids"])
    arch = model_args_for_checkpoint(cfg)
    directory = save_checkpoint(save, 0, [chunk], None, None, train_state, arch, model_config=export)
    log(f"imported {input_dir} ({cfg.num_layers} layers, hidden {h}, vocab {V}) into {directory}: "
        f"train from it with --load {save} {architecture_flags(arch)} (any TP/PP; a fresh optimizer "
        f"starts at iteration 0){untied_note}"
        + (f"; tokenizer recorded for export: --tokenizer-type {tokenizer_type} --tokenizer-model "
           f"{os.path.abspath(tokenizer_model)}" if tokenizer_model else ""))
    return directory

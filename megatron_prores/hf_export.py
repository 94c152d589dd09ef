"""Megatron checkpoint of this project -> Hugging Face model directory, streamed layer by layer.

Pre-LN and LNS models become a plain ``LlamaForCausalLM``: the ProRes values, GPAS scales and LNS
constants are folded into the weights. The GPAS factor s = 1 - SiLU(g) on
the stream is carried as a running product P: a block computes x' = s(x + a F(N(x))); with the
exported stream x/P and RMSNorm's scale invariance, o_proj (and down_proj) take a/P and P becomes
P s. Exact up to the norm epsilon: the folded model is the trained one with epsilon eps P^2 in the
norms it feeds, which matters when the stream's mean square is not far above eps P^2 (e.g. early
in training: small embeddings, small ProRes values). So the export measures it: a calibration
batch (fixed-seed random tokens) runs through the folded and the unfolded model, block by block in
float64, and the fold happens only when the logits agree to FOLD_TOLERANCE (relative). A scale
s <= 0 (a sign flip) is refused without measuring. LNS's 1/sqrt(l) goes into the two norm gains of
block l. Everything else (Post-LN, Sandwich-LN, DeepNorm, Mix-LN, LayerNorm, or ``fold=False``)
exports as ProResForCausalLM (hf/modeling_prores.py, shipped in the directory, loaded with
trust_remote_code=True) with explicit ProRes values and gates.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from typing import Optional

import torch

from megatron_prores import checkpoint_check, mcore_compat
from megatron_prores.block_styles import STYLES, styles_of
from megatron_prores.checkpoint_reader import CheckpointReader
from megatron_prores.checkpointing import LATEST, iteration_dir, read_latest
from megatron_prores.config import LLAMA3_ROPE, ConfigError, config_from_dict

HF_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf")
# fold only when max |folded - unfolded logits| / max |unfolded logits| on the calibration batch is at
# most this: well below what changes a greedy token or a loss in its 4th digit
FOLD_TOLERANCE = 1e-4
CALIBRATION_BATCH, CALIBRATION_TOKENS, CALIBRATION_SEED = 2, 64, 1234
# BOS/EOS ids in config.json without a Hugging Face tokenizer: tools/train_tokenizer.py's SentencePiece ids
DEFAULT_TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2}
# exported in fp32 (fp64 stays fp64) whatever the weights' dtype: the GPAS gates, fp32 in a bf16/fp16
# model (layer.py); a gate rounded to bf16 scales the stream by a rounded value block after block
FP32_TENSORS = (".gpas_gate",)
# what an exported Hugging Face tokenizer must encode exactly like the training one
PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog.", " leading space", "   three leading spaces",
               "\ttab\tseparated\tcolumns", "digits 0123456789 and 3.14159, 1,000,000", "naïve café, Zürich",
               "emoji 😀👍🏽 and ✓", "日本語の文章と中文", "two\n\nlines  double  spaces ", "")


def resolve_iteration(load: str, iteration: Optional[int]) -> str:
    """The checkpoint directory of ``iteration`` (default: the latest complete one)."""
    if not os.path.isdir(load):
        raise ConfigError(f"--load {load!r} {'is a file; give the run directory' if os.path.isfile(load) else 'does not exist'}")
    if checkpoint_check.is_legacy_megatron(load):
        raise checkpoint_check.legacy_error(load)
    name = os.path.basename(os.path.normpath(load))
    if name.startswith("iter_") and name[5:].isdigit() and os.path.isfile(os.path.join(load, ".metadata")):
        raise ConfigError(f"--load {load!r} is one iteration's directory; give the run directory and the "
                          f"iteration: --load {os.path.dirname(os.path.normpath(load)) or '.'} --iteration "
                          f"{int(name[5:])}")
    done = sorted(int(d[5:]) for d in os.listdir(load) if d.startswith("iter_") and d[5:].isdigit())
    if iteration is None:
        try:
            iteration = read_latest(load)
        except ConfigError as e:  # the driver's hint names --ckpt-step; this tool's flag is --iteration
            raise ConfigError(str(e).replace("--ckpt-step N", "--iteration N")) from None
        if iteration is None:
            raise ConfigError(f"--load {load!r} has no {LATEST} (no complete checkpoint); give --iteration N "
                              f"(present: {done or 'none'})")
    directory = iteration_dir(load, iteration)
    if not os.path.isdir(directory):
        hint = "it is still being written or was interrupted" if os.path.isdir(directory + ".tmp") else \
            f"present: {done or 'none'}"
        raise ConfigError(f"--load {load!r} has no complete checkpoint for iteration {iteration} ({hint})")
    return directory


def read_common(directory: str) -> dict:
    """The common (non-sharded) state: common.pt for megatron-core 0.16, inside the torch_dist files for
    0.19; megatron-core's own loader reads either."""
    from megatron.core.dist_checkpointing.core import CheckpointingException

    checkpoint_check.verify(directory)  # every file present, of its length, and safe to read
    try:
        common = mcore_compat.load_common_state(directory)
    except (CheckpointingException, FileNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{directory} is not a complete checkpoint ({first}); pick another --iteration") from None
    if not common.get("model_config"):
        raise ConfigError(f"{directory} does not record its model configuration (saved by an older version); "
                          f"resume it once with the current driver and convert the new checkpoint")
    return common


class _Layers:
    """Per-block tensors of a checkpoint, stacked ([L, ...] keys) or per block (Mix-LN keys)."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader

    def get(self, layer: int, name: str, required: bool = True) -> Optional[torch.Tensor]:
        stacked, single = f"decoder.layers.{name}", f"decoder.layers.{layer}.{name}"
        if single in self.reader:
            return self.reader.read(single)
        if stacked in self.reader:
            return self.reader.read(stacked, layer)
        if required:
            raise ConfigError(f"checkpoint {self.reader.directory} has no {name} for block {layer + 1}; "
                              f"it is incomplete or of another model")
        return None


PRE_NORM = ("self_attention.linear_qkv.layer_norm_", "input_layernorm.")
PRE_MLP_NORM = ("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm.")


def _norm(layers: _Layers, layer: int, prefixes, rms: bool) -> dict:
    for prefix in prefixes:
        w = layers.get(layer, prefix + "weight", required=False)
        if w is not None:
            out = {"weight": w}
            if not rms:
                out["bias"] = layers.get(layer, prefix + "bias")
            return out
    raise ConfigError(f"checkpoint {layers.reader.directory} has no norm {prefixes[0]}weight for block {layer + 1}")


class _ShardWriter:
    """safetensors shards of at most ``max_bytes``, with model.safetensors.index.json."""

    def __init__(self, output: str, max_bytes: int, dtype: Optional[torch.dtype]):
        self.output, self.max_bytes, self.dtype = output, max_bytes, dtype
        self.current, self.size, self.files, self.weight_map, self.total = {}, 0, [], {}, 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach()
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ConfigError(f"the checkpoint's values for {name} hold NaN or inf (the run diverged before this "
                              f"iteration); export an earlier --iteration")
        if self.dtype is not None and t.is_floating_point():
            big = t.abs().max().item() if t.numel() else 0.0
            t = t.to(torch.promote_types(self.dtype, torch.float32) if name.endswith(FP32_TENSORS) else self.dtype)
            if not torch.isfinite(t).all():  # past float16's range (65504): the export would hold inf
                raise ConfigError(f"{name} has values up to {big:.4g}, beyond {str(self.dtype).replace('torch.', '')}'s "
                                  f"range; export with --dtype bfloat16 or float32")
        t = t.contiguous().clone()  # own storage: safetensors refuses views of one buffer (gate/up)
        nbytes = t.numel() * t.element_size()
        if self.current and self.size + nbytes > self.max_bytes:
            self.flush()
        self.current[name] = t
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.current:
            return
        name = f"model-{len(self.files) + 1:05d}.safetensors.tmp"
        save_file(self.current, os.path.join(self.output, name), metadata={"format": "pt"})
        self.files.append(name)
        for k in self.current:
            self.weight_map[k] = name
        self.current, self.size = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.files)
        final = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(self.files)}
        for tmp, name in final.items():
            os.replace(os.path.join(self.output, tmp), os.path.join(self.output, name))
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {k: final[v] for k, v in sorted(self.weight_map.items())}}
        with open(os.path.join(self.output, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)


def fold_decision(cfg, gates: list, want_fold: bool) -> tuple:
    """(may fold?, reason when not) from the configuration and the GPAS gates (one tensor per block)
    alone; a model that may fold is then calibrated (``fold_error``)."""
    m = cfg.method
    if not want_fold:
        return False, "--no-fold"
    if not all(s.llama_equivalent for s in styles_of(m.norm_type)):
        return False, f"--norm-type {m.norm_type} has no Llama equivalent"
    if cfg.normalization != "RMSNorm":
        return False, "LayerNorm models are not Llama models"
    if m.gpas and any(bool((1 - torch.nn.functional.silu(g.double()) <= 0).any()) for g in gates):
        return False, "a GPAS scale 1-SiLU(g) is <= 0 (a sign flip cannot fold into RMSNorm)"
    return True, None


class _Model:
    """What the export needs of a checkpoint besides its tensors."""

    def __init__(self, cfg, reader: CheckpointReader, step: int, out_dtype: Optional[torch.dtype]):
        m, L = cfg.method, cfg.num_layers
        self.cfg, self.reader, self.layers, self.out_dtype = cfg, reader, _Layers(reader), out_dtype
        self.rms = cfg.normalization == "RMSNorm"
        self.prores = [m.prores_value(step, l, L) if m.prores else 1.0 for l in range(1, L + 1)]
        self.styles = [m.block_style(l, L) for l in range(1, L + 1)]
        self.gates = [self.layers.get(i, "gpas_gate").double() for i in range(L)] if m.gpas else []
        self.stored = reader.tensors["embedding.word_embeddings.weight"].properties.dtype
        self._check_shapes()
        # config.json's and generation_config.json's special token ids (_token_ids), config.json's
        # max_position_embeddings (_max_positions)
        self.token_ids, self.generation_ids = dict(DEFAULT_TOKEN_IDS), dict(DEFAULT_TOKEN_IDS)
        self.max_positions = cfg.seq_length

    def _check_shapes(self) -> None:
        """The tensors against the model configuration the checkpoint records (a mismatch exported a
        model without its last blocks, or its vocabulary padding as tokens, or failed in a traceback)."""
        cfg, reader, L = self.cfg, self.reader, self.cfg.num_layers
        heads, groups, h, f = cfg.num_attention_heads, cfg.query_groups, cfg.hidden_size, cfg.ffn_size
        d = h // heads
        want = {"embedding.word_embeddings.weight": (cfg.padded_vocab_size, h)}
        if not cfg.tie_embeddings:
            want["output_layer.weight"] = (cfg.padded_vocab_size, h)
        per_block = {"self_attention.linear_qkv.weight": ((heads + 2 * groups) * d, h),
                     "self_attention.linear_proj.weight": (h, h), "mlp.linear_fc1.weight": (2 * f, h),
                     "mlp.linear_fc2.weight": (h, f)}
        for name, shape in per_block.items():
            stacked = f"decoder.layers.{name}"
            if stacked in reader:
                want[stacked] = (L, *shape)
            for i in range(L):
                if f"decoder.layers.{i}.{name}" in reader:
                    want[f"decoder.layers.{i}.{name}"] = shape
        blocks = {int(k.split(".")[2]) for k in reader.tensors if re.match(r"decoder\.layers\.\d+\.", k)}
        extra = sorted(b for b in blocks if b >= L)
        what = (f"{L} layers, hidden {h}, ffn {f}, {heads} heads in {groups} key/value groups, vocabulary "
                f"{cfg.vocab_size} padded to {cfg.padded_vocab_size}")
        if extra:
            raise ConfigError(f"checkpoint {reader.directory} holds block {extra[0] + 1} but its model configuration "
                              f"says {what}; it is damaged or was edited: export another --iteration")
        for key, shape in want.items():
            if key in reader and reader.shape(key) != shape:
                raise ConfigError(f"checkpoint {reader.directory}: {key} has shape {reader.shape(key)}, but its "
                                  f"model configuration ({what}) asks for {shape}; it is damaged or was edited: "
                                  f"export another --iteration")

    def block(self, i: int) -> dict:
        """Block i's tensors under their Hugging Face names (after model.layers.i.), unfolded."""
        cfg, layers, rms = self.cfg, self.layers, self.rms
        heads, groups, h, f = cfg.num_attention_heads, cfg.query_groups, cfg.hidden_size, cfg.ffn_size
        d = h // heads
        qkv = layers.get(i, "self_attention.linear_qkv.weight").view(groups, (heads // groups + 2) * d, h)
        q, k, v = qkv.split([heads // groups * d, d, d], dim=1)
        fc1 = layers.get(i, "mlp.linear_fc1.weight")
        w = {"self_attn.q_proj.weight": q.reshape(heads * d, h), "self_attn.k_proj.weight": k.reshape(groups * d, h),
             "self_attn.v_proj.weight": v.reshape(groups * d, h),
             "self_attn.o_proj.weight": layers.get(i, "self_attention.linear_proj.weight"),
             "mlp.gate_proj.weight": fc1[:f], "mlp.up_proj.weight": fc1[f:],
             "mlp.down_proj.weight": layers.get(i, "mlp.linear_fc2.weight")}
        style, norms = STYLES[self.styles[i]], {}
        if style.pre_norm:
            norms["input_layernorm"] = _norm(layers, i, PRE_NORM, rms)
            norms["post_attention_layernorm"] = _norm(layers, i, PRE_MLP_NORM, rms)
        if style.branch_norm:
            norms["attn_branch_norm"] = _norm(layers, i, ("post_self_attn_layernorm.",), rms)
            norms["mlp_branch_norm"] = _norm(layers, i, ("post_mlp_layernorm.",), rms)
        if style.sum_norm:
            norms["attn_sum_norm"] = _norm(layers, i, ("post_self_attn_layernorm.",), rms)
            norms["mlp_sum_norm"] = _norm(layers, i, ("post_mlp_layernorm.",), rms)
        w.update({f"{n}.{kind}": t for n, params in norms.items() for kind, t in params.items()})
        if self.gates:  # fp32 (the model's) also in a bf16 checkpoint: FP32_TENSORS
            w["gpas_gate"] = self.gates[i].to(torch.promote_types(self.stored, torch.float32))
        return w

    def fold(self, i: int, w: dict, P: float) -> tuple:
        """(block i's tensors folded, the new running product P): o_proj takes a/P, P becomes P s_attn,
        down_proj takes a/P, P becomes P s_mlp; LNS's 1/sqrt(l) goes into both norm gains."""
        a, w = self.prores[i], dict(w)
        if STYLES[self.styles[i]].depth_scaled_pre_norm:
            for n in ("input_layernorm.weight", "post_attention_layernorm.weight"):
                w[n] = w[n] * (i + 1) ** -0.5
        s = (1 - torch.nn.functional.silu(self.gates[i])).tolist() if self.gates else [1.0]
        w.pop("gpas_gate", None)
        w["self_attn.o_proj.weight"] = _scaled(w["self_attn.o_proj.weight"], a / P)
        P *= s[0]
        w["mlp.down_proj.weight"] = _scaled(w["mlp.down_proj.weight"], a / P)
        return w, P * s[-1]

    def head(self) -> torch.Tensor:
        """The output layer's rows of the vocabulary (the embedding matrix when tied)."""
        name = "embedding.word_embeddings.weight" if self.cfg.tie_embeddings else "output_layer.weight"
        return self.reader.read(name)[:self.cfg.vocab_size]

    def hf_config(self, fold: bool) -> dict:
        """config.json of the folded (Llama) or the custom (ProResForCausalLM) export."""
        cfg, m, L = self.cfg, self.cfg.method, self.cfg.num_layers
        torch_dtype = str(self.out_dtype or self.stored).replace("torch.", "")
        base = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
                    num_hidden_layers=L, num_attention_heads=cfg.num_attention_heads,
                    num_key_value_heads=cfg.query_groups, max_position_embeddings=self.max_positions,
                    rms_norm_eps=cfg.norm_epsilon, rope_theta=float(cfg.rotary_base),
                    rope_parameters={"rope_theta": float(cfg.rotary_base), "rope_type": "default"},
                    **self.token_ids, tie_word_embeddings=cfg.tie_embeddings, torch_dtype=torch_dtype,
                    dtype=torch_dtype)
        if cfg.rope_scaling_factor is not None:  # Llama 3.x (transformers < 5 reads rope_scaling, 5 both)
            scaling = dict(rope_type="llama3", factor=float(cfg.rope_scaling_factor), **LLAMA3_ROPE,
                           rope_theta=float(cfg.rotary_base))
            base.update(rope_scaling=scaling, rope_parameters=scaling)
        if fold:
            return dict(base, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                        attention_bias=False, mlp_bias=False, head_dim=cfg.hidden_size // cfg.num_attention_heads,
                        use_cache=True)
        return dict(base, architectures=["ProResForCausalLM"], model_type="megatron_prores",
                    normalization=cfg.normalization, block_styles=self.styles, prores_values=self.prores,
                    gpas=m.gpas, gpas_gate=m.gpas_gate, deepnorm_alpha=(2 * L) ** 0.25, final_norm=m.has_final_norm,
                    rope_llama3_factor=cfg.rope_scaling_factor,
                    auto_map={"AutoConfig": "configuration_prores.ProResConfig",
                              "AutoModelForCausalLM": "modeling_prores.ProResForCausalLM"})

    @torch.no_grad()
    def fold_error(self) -> float:
        """max |folded - unfolded logits| / max |unfolded logits| on CALIBRATION_BATCH sequences of
        min(CALIBRATION_TOKENS, seq_length) fixed-seed random tokens and one of the tokens with the
        smallest embeddings, in float64. Both models run block
        by block from the checkpoint (one block's weights in memory, twice for o_proj and down_proj)."""
        try:
            from megatron_prores.hf.configuration_prores import ProResConfig
            from megatron_prores.hf.modeling_prores import ProResBlock, ProResNorm
        except ImportError as e:
            raise ConfigError(f"checking the fold needs transformers ({e}); install it, or give --no-fold") from None

        cfg, L = self.cfg, self.cfg.num_layers
        unfolded_cfg = ProResConfig(**self.hf_config(fold=False))
        folded_cfg = ProResConfig(**dict(self.hf_config(fold=False), block_styles=["pre"] * L,
                                         prores_values=[1.0] * L, gpas=False))
        n = min(CALIBRATION_TOKENS, cfg.seq_length)
        tokens = torch.randint(cfg.vocab_size, (CALIBRATION_BATCH, n),
                               generator=torch.Generator().manual_seed(CALIBRATION_SEED))
        embedding = self.reader.read("embedding.word_embeddings.weight")[:cfg.vocab_size]
        # and a sequence of the tokens with the smallest embeddings, smallest first: where the stream
        # is smallest, the fold's epsilon eps P^2 matters most (random tokens missed a rarely trained one)
        smallest = embedding.double().norm(dim=1).argsort()[:n]
        tokens = torch.cat([tokens, smallest.repeat(-(-n // len(smallest)))[:n][None]])
        positions = torch.arange(n)[None].expand(len(tokens), -1)
        unfolded = embedding[tokens].double()
        folded, P = unfolded, 1.0

        def loaded(weights, cls, *args):
            with torch.device("meta"):  # the parameters come from the checkpoint: allocate nothing here
                module = cls(*args)
            module.load_state_dict(weights, assign=True)
            return module

        for i in range(L):
            w = {k: t.double() for k, t in self.block(i).items()}
            unfolded = loaded(w, ProResBlock, unfolded_cfg, i)(unfolded, positions)
            w, P = self.fold(i, w, P)
            folded = loaded(w, ProResBlock, folded_cfg, i)(folded, positions)
        if cfg.method.has_final_norm:
            norm = loaded({"weight": self.reader.read("decoder.final_layernorm.weight").double()},
                          ProResNorm, unfolded_cfg)
            unfolded, folded = norm(unfolded), norm(folded)
        head = self.head()
        diff = ref = 0.0
        for rows in head.split(8192):  # the output layer in float64 a slice at a time
            rows = rows.double()
            lu, lf = unfolded @ rows.T, folded @ rows.T
            diff, ref = max(diff, (lf - lu).abs().max().item()), max(ref, lu.abs().max().item())
        error = diff / ref if ref > 0 else math.inf
        return error if math.isfinite(error) else math.inf  # NaN weights: not folded (the writer names them)


def export(load: str, output: str, iteration: Optional[int] = None, fold: bool = True,
           tokenizer_model: Optional[str] = None, dtype: Optional[str] = None,
           max_shard_bytes: int = 5 * 2 ** 30, progress: bool = True, log=print) -> dict:
    """Convert; returns a report (format, reasons, values)."""
    directory = resolve_iteration(load, iteration)
    common = read_common(directory)
    reader = CheckpointReader(directory)
    cfg = config_from_dict(common["model_config"])
    m, L = cfg.method, cfg.num_layers
    step = int(common["train_state"]["iteration"]) if common.get("train_state") else 0
    out_dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = _Model(cfg, reader, step, out_dtype)
    tok_kind, tok_path = _tokenizer_source(tokenizer_model, common["model_config"])
    hf_tok = _training_tokenizer(tok_kind, tok_path, given=bool(tokenizer_model), vocab=cfg.vocab_size) \
        if tok_kind == "HuggingFaceTokenizer" and tok_path else None
    sp_tok = _training_tokenizer(tok_kind, tok_path, given=bool(tokenizer_model), vocab=cfg.vocab_size) \
        if tok_kind == "SentencePieceTokenizer" and tok_path else None
    model.token_ids, model.generation_ids = _token_ids(hf_tok or sp_tok, tokenizer_model, common["model_config"],
                                                       cfg.vocab_size)
    model.max_positions = _max_positions(common["model_config"], cfg.seq_length)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ConfigError(f"--output {output!r} exists and is not an empty directory; give a new directory")
    tmp = output.rstrip("/") + ".tmp"  # renamed to output when complete; removed on any failure
    _fresh_dir(tmp, output, load)
    try:
        do_fold, reason = fold_decision(cfg, model.gates, fold)
        fold_error = None
        if do_fold:
            fold_error = model.fold_error()
            if fold_error > FOLD_TOLERANCE:
                do_fold, reason = False, (f"folding is inexact here: the calibration logits of the folded model differ "
                                          f"by {fold_error:.1e} (relative; tolerance {FOLD_TOLERANCE:.0e}), the norm "
                                          f"epsilon is not small against this stream")

        writer = _ShardWriter(tmp, max_shard_bytes, out_dtype)
        vocab = cfg.vocab_size
        writer.add("model.embed_tokens.weight", reader.read("embedding.word_embeddings.weight")[:vocab])

        from tqdm import tqdm

        P = 1.0  # running product of the folded GPAS scales
        for i in tqdm(range(L), desc="converting blocks", disable=not progress):
            w = model.block(i)
            if do_fold:
                w, P = model.fold(i, w, P)
            for name, t in w.items():
                writer.add(f"model.layers.{i}.{name}", t)
        if m.has_final_norm:
            writer.add("model.norm.weight", reader.read("decoder.final_layernorm.weight"))
            if not model.rms:
                writer.add("model.norm.bias", reader.read("decoder.final_layernorm.bias"))
        if not cfg.tie_embeddings:  # tied: transformers ties lm_head to the embeddings on load
            writer.add("lm_head.weight", model.head())
        writer.finish()

        config = model.hf_config(do_fold)
        if not do_fold:
            for name in ("configuration_prores.py", "modeling_prores.py"):
                shutil.copy(os.path.join(HF_CODE, name), os.path.join(tmp, name))
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(config, fh, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as fh:
            json.dump(model.generation_ids, fh, indent=2)

        tok_note = _export_tokenizer(tmp, tok_path, tok_kind, hf_tok, sp_tok)
        os.remove(os.path.join(tmp, MARK))
        if os.path.exists(output):
            os.rmdir(output)  # empty (checked above)
        os.replace(tmp, output)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = _write_error(e, output)
        if why:
            raise ConfigError(f"--output {output!r}: cannot write {why}; give --output in a writable directory "
                              f"with free space") from None
        raise
    report = {"iteration": step, "format": "LlamaForCausalLM" if do_fold else "ProResForCausalLM",
              "not_folded_because": reason, "fold_error": fold_error, "prores_values": model.prores,
              "tokenizer": tok_note, "fold_product": P if do_fold else None, "bytes": writer.total}
    log(f"exported iteration {step} of {load} to {output} as {report['format']}"
        + (f" (custom model code: {reason}; load the model and tokenizer with trust_remote_code=True)" if not do_fold else
           f" (ProRes values, GPAS scales and LNS constants folded into the weights; calibration logits "
           f"within {fold_error:.1e} relative)")
        + f"; {tok_note}")
    return report


MARK = ".convert-to-hf-in-progress"  # in the .tmp directory while an export writes it


def _fresh_dir(tmp: str, output: str, load: str) -> None:
    """An empty ``tmp`` marked as this tool's; one that a killed export left (it holds the mark) is
    replaced. Anything else there (the checkpoint being converted, a user's directory) is never
    removed: one line. One line when that fails."""
    if os.path.lexists(tmp):
        real, src = os.path.realpath(tmp), os.path.realpath(load)
        if src == real or src.startswith(real + os.sep):
            raise ConfigError(f"--output {output!r} would be written through {tmp!r}, which holds --load {load!r}; "
                              f"give another --output")
        if not (os.path.isdir(tmp) and not os.path.islink(tmp) and os.path.isfile(os.path.join(tmp, MARK))):
            raise ConfigError(f"--output {output!r}: {tmp!r} exists and was not left by this tool; move it away "
                              f"or give another --output")
        try:
            shutil.rmtree(tmp)
        except OSError as e:
            raise ConfigError(f"--output {output!r}: cannot remove {e.filename or tmp}, left by an earlier convert "
                              f"({e.strerror}); remove it by hand") from None
    try:
        os.makedirs(tmp)
        open(os.path.join(tmp, MARK), "w").close()
    except OSError as e:
        raise ConfigError(f"--output {output!r}: cannot create {e.filename or tmp} ({e.strerror}); give --output "
                          f"in a writable directory") from None


def _write_error(e: BaseException, output: str) -> Optional[str]:
    """The reason, in one line, when ``e`` is a failure to write the export (not to read the checkpoint)."""
    from safetensors import SafetensorError

    if isinstance(e, SafetensorError):
        return f"the safetensors files ({(str(e).strip().splitlines() or [type(e).__name__])[0]})"
    if isinstance(e, OSError):
        out = os.path.abspath(output)
        names = [str(n) for n in (e.filename, e.filename2) if n]
        if any(os.path.abspath(n) == d or os.path.abspath(n).startswith(d + os.sep) for n in names
               for d in (out, out + ".tmp")):
            return f"{names[0]} ({e.strerror or type(e).__name__})"
    return None


def _scaled(w: torch.Tensor, factor: float) -> torch.Tensor:
    return w if factor == 1.0 else (w.double() * factor).to(w.dtype)


def _tokenizer_source(given: Optional[str], model_config: dict) -> tuple:
    """(tokenizer type, path): --tokenizer-model (its type from the path), else the run's."""
    from megatron_prores.tokenizer import guess_tokenizer_type

    if given == "none":  # the weights alone
        return None, None
    if given:
        return guess_tokenizer_type(given), given
    return model_config.get("tokenizer_type"), model_config.get("tokenizer_model")


def _training_tokenizer(kind: str, path: str, given: bool, vocab: int):
    """The training tokenizer (``kind``: SentencePieceTokenizer or HuggingFaceTokenizer), loaded
    and checked against the model's vocabulary (``given``: named by --tokenizer-model)."""
    from megatron_prores import tokenizer

    try:
        tok = getattr(tokenizer, kind)(path)
    except ConfigError as e:
        if given:
            raise
        raise ConfigError(f"the run's tokenizer: {e}; or give --tokenizer-model PATH") from None
    if tok.vocab_size > vocab:
        raise ConfigError(f"tokenizer {path!r} has {tok.vocab_size} tokens but the model only {vocab}; give the "
                          f"tokenizer the run trained with (--tokenizer-model PATH)")
    return tok


def _max_positions(model_config: dict, seq_length: int) -> int:
    """config.json's max_position_embeddings: the context the model was given (an imported model's,
    e.g. 131072 for a Llama 3.1, which training on shorter sequences does not take away), or the
    sequence length it trained on when that is longer. RoPE needs no limit, but serving stacks cap
    prompts at it. Older checkpoints record none: the sequence length."""
    return max(model_config.get("max_position_embeddings") or 0, seq_length)


def _token_ids(tok, given: Optional[str], model_config: dict, vocab: int) -> tuple:
    """(config.json's, generation_config.json's) special token ids. A tokenizer decides BOS and EOS
    (EOS = EOD, what training taught the model to end a document with): the exported one, else (the
    weights alone) the run's. An imported model's own ids (its config.json's and
    generation_config.json's, recorded by the import) are kept where that tokenizer leaves them
    open, unless --tokenizer-model names another: a pad id, several EOS ids that hold its EOD (an
    instruct model's stop ids), all of them when there is no tokenizer. Else the mock data's EOD
    (NullTokenizer: the last id), else DEFAULT_TOKEN_IDS."""
    from megatron_prores.tokenizer import NullTokenizer

    recorded = model_config.get("hf_token_ids") if given in (None, "none") else None
    kind = None
    if tok is None:
        kind, path = _tokenizer_source(None, model_config)
        try:
            if kind in ("SentencePieceTokenizer", "HuggingFaceTokenizer") and path:
                tok = _training_tokenizer(kind, path, given=False, vocab=vocab)
        except ConfigError:  # the run's tokenizer is not here
            pass
    if tok is None:
        if recorded:
            return dict(recorded["config"]), dict(recorded["generation"])
        ids = {"bos_token_id": None, "eos_token_id": NullTokenizer(vocab).eod} if kind == "NullTokenizer" \
            else dict(DEFAULT_TOKEN_IDS)
        return ids, dict(ids)
    if hasattr(tok, "sp"):  # SentencePiece: its own ids (a model may put EOS anywhere)
        bos = tok.sp.bos_id()
        ids = {"bos_token_id": bos if bos >= 0 else None, "eos_token_id": tok.eod}
    else:
        ids = {"bos_token_id": tok.bos, "eos_token_id": tok.eod}
    if not recorded:
        return ids, dict(ids)
    return tuple(_with_tokenizer(recorded[f], ids) for f in ("config", "generation"))


def _with_tokenizer(recorded: dict, ids: dict) -> dict:
    """An imported model's ids with the tokenizer's BOS, and its EOD unless the recorded EOS is it or
    a list that holds it."""
    eos = recorded.get("eos_token_id")
    keep = eos == ids["eos_token_id"] or (isinstance(eos, list) and ids["eos_token_id"] in eos)
    return dict(recorded, bos_token_id=ids["bos_token_id"], eos_token_id=eos if keep else ids["eos_token_id"])


def _export_tokenizer(out: str, model: Optional[str], kind: Optional[str], hf_tok=None, sp_tok=None) -> str:
    if kind == "NullTokenizer" or not model:
        return "no tokenizer exported (the run used NullTokenizer/mock data, or --tokenizer-model none)"
    if kind == "HuggingFaceTokenizer":
        return _export_hf_tokenizer(out, hf_tok)
    import tempfile

    with tempfile.TemporaryDirectory() as alone:  # converted away from config.json, whose custom model
        note = _export_sentencepiece(alone, model)  # code would make transformers ask to trust it
        for name in os.listdir(alone):
            shutil.copy(os.path.join(alone, name), os.path.join(out, name))
    if "tokenizer.json" in os.listdir(out):
        _check_exported_tokenizer(out, sp_tok)
        note += "; ids checked with transformers"
    return note


def _export_sentencepiece(out: str, model: str) -> str:
    shutil.copy(model, os.path.join(out, "tokenizer.model"))
    conf = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True,
            "clean_up_tokenization_spaces": False, "model_max_length": int(1e30)}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    try:  # tokenizer.json (the fast tokenizer), converted by transformers from the SentencePiece model
        from tokenizers import Tokenizer, normalizers
        from transformers import AutoTokenizer
    except ImportError:
        return "tokenizer.model written (install transformers to add tokenizer.json)"
    AutoTokenizer.from_pretrained(out).save_pretrained(out)
    # SentencePiece always adds its dummy prefix "▁", also before leading whitespace; recent
    # LlamaTokenizer classes do not (Metaspace "first"). Pin SentencePiece's behaviour in
    # tokenizer.json and load it as a plain fast tokenizer, so ids equal the training ids.
    path = os.path.join(out, "tokenizer.json")
    tok = Tokenizer.from_file(path)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = None
    tok.save(path)
    conf_path = os.path.join(out, "tokenizer_config.json")
    saved = json.load(open(conf_path))
    saved.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False)
    with open(conf_path, "w") as f:
        json.dump(saved, f, indent=2)
    return "tokenizer exported (SentencePiece model + tokenizer.json, no BOS added, EOS = EOD)"



# tokenizer_config.json keys that make a transformers tokenizer class rebuild or change the
# tokenizer.json pipeline (BOS/EOS templates, prefix spaces): the export loads tokenizer.json as it is
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
REBUILDING_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy", "tokenizer_file", "auto_map")


def _export_hf_tokenizer(out: str, tok) -> str:
    """The training tokenizer's files: tokenizer.json as trained with (copied; written from transformers'
    conversion for a SentencePiece directory), special_tokens_map.json, and tokenizer_config.json with
    tokenizer_class PreTrainedTokenizerFast (loads tokenizer.json unchanged). Checked on PROBE_TEXTS
    when transformers is installed."""
    if tok.json_file is not None:
        shutil.copy(tok.json_file, os.path.join(out, "tokenizer.json"))
    else:
        tok.tok.save(os.path.join(out, "tokenizer.json"))
    special = os.path.join(tok.directory, "special_tokens_map.json")
    if os.path.isfile(special):
        shutil.copy(special, os.path.join(out, "special_tokens_map.json"))
    conf = _tokenizer_config(tok)
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(conf, f, indent=2, ensure_ascii=False)
    checked = _check_exported_tokenizer(out, tok)
    return (f"tokenizer exported (Hugging Face tokenizer.json of {tok.path}, EOS = EOD {tok.eos_token!r} id {tok.eod}"
            + ("; ids checked with transformers)" if checked else "; install transformers to check its ids)"))


def _tokenizer_config(tok) -> dict:
    """The source's tokenizer_config.json (if any) as a PreTrainedTokenizerFast's, its EOS named."""
    path = os.path.join(tok.directory, "tokenizer_config.json")
    conf = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            conf = json.load(f)  # valid: HuggingFaceTokenizer read it
    conf = {k: v for k, v in conf.items() if k not in REBUILDING_KEYS}
    conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    conf.setdefault("eos_token", tok.eos_token)
    conf.setdefault("clean_up_tokenization_spaces", False)
    return conf


def _check_exported_tokenizer(out: str, tok) -> bool:
    """AutoTokenizer on the export encodes PROBE_TEXTS as the training tokenizer does; False when
    transformers is not installed."""
    import tempfile

    try:
        from transformers import AutoTokenizer
    except ImportError:
        return False
    with tempfile.TemporaryDirectory() as alone:  # the tokenizer files only: no config.json whose custom
        for name in TOKENIZER_FILES:              # model code would make transformers ask to trust it
            if os.path.isfile(os.path.join(out, name)):
                shutil.copy(os.path.join(out, name), alone)
        exported = AutoTokenizer.from_pretrained(alone, local_files_only=True)
    for text in PROBE_TEXTS:
        try:
            want = tok.tokenize(text)
        except Exception:  # e.g. a word-level vocabulary without an unknown token
            continue
        got = exported(text)["input_ids"]
        if got != want:
            i = next(k for k in range(max(len(got), len(want))) if got[k:k + 1] != want[k:k + 1])
            raise ConfigError(f"the exported tokenizer encodes {text!r} as ...{got[i:i + 6]} from token {i}, the "
                              f"training one as ...{want[i:i + 6]} (transformers converts this tokenizer "
                              f"differently); export the weights without it (--tokenizer-model none) and this "
                              f"tokenizer by hand")
    eod = tok.eod
    if exported.eos_token_id != eod:
        raise ConfigError(f"the exported tokenizer's EOS id is {exported.eos_token_id}, the training EOD {eod}")
    return True

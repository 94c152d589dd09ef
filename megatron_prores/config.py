"""Configuration of a ProRes/GPAS GPT model, validated before anything is built.

``MethodConfig`` holds what this project adds (normalization placement, ProRes, GPAS, init);
``ModelConfig`` holds the model shape and the parallel layout and turns into a megatron-core
``TransformerConfig``. ``ModelConfig.validate()`` raises ``ConfigError`` with one line that names
the bad value (by its command-line flag) and the valid choices; megatron-core's own asserts are
never the first to see a bad configuration.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_prores.errors import ConfigError  # noqa: F401  (re-exported: megatron_prores.config.ConfigError)
from megatron_prores.block_styles import MIXED, NORM_TYPES, gpas_norm_types, styles_of
from megatron_prores import schedules
from megatron_prores.schedules import SCHEDULES, WARMUP_SPACINGS, needs_warmup

GPAS_GATES = ("block", "sublayer")
INIT_METHODS = ("normal", "scaled", "ds-init")
LNS_GAINS = ("fixed", "learnable")
EMBEDDING_INITS = ("normal", "prores-code", "gpas-code")
DEEPNORM_INITS = ("scaled-normal", "official")
WEIGHT_DECAY_GROUPS = ("megatron", "official")
GATE_CLIP_ORDERS = ("before", "after")  # the --clip-gate-grad clip, relative to the global --clip-grad
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
# megatron-core's selective recompute modules that a dense model has (its default first)
RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")


def _have_te() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None




def _choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{flag} {value!r} is not valid; choose one of: {', '.join(choices)}")


@dataclass(frozen=True)
class MethodConfig:
    """The stability methods of one model (flags in parentheses)."""

    norm_type: str = "pre"  # --norm-type
    prores_schedule: str = "none"  # --prores-schedule
    prores_warmup_steps: float = 0  # --prores-warmup-steps, TOTAL warmup W
    gpas: bool = False  # --gpas
    gpas_gate: str = "block"  # --gpas-gate: one gate per block, or one per sublayer
    mix_post_layers: Optional[int] = None  # --mix-post-layers, k (default floor(L/4))
    init_method: str = "normal"  # --init-method
    # choices of the official ProRes/GPAS code (dandingsky/ProRes, dandingsky/GPAS) where it differs from
    # the papers' text; the defaults follow the text
    prores_warmup_spacing: str = "even"  # --prores-warmup-spacing: block l done at W l / L, or as the official code
    # (the next two change nothing where they do not apply, so that one preset serves every norm type)
    post_final_norm: bool = False  # --post-final-norm: Post-LN/DeepNorm get a final norm too
    lns_gain: str = "fixed"  # --lns-gain: LNS as a fixed 1/sqrt(l) scale, or norm gains initialized to it
    embedding_init: str = "normal"  # --embedding-init: std init_method_std, init_method_std sqrt(hidden), sqrt(2/5)
    deepnorm_init: str = "scaled-normal"  # --deepnorm-init: normal x (8L)**-0.25, or the official xavier init

    @property
    def prores(self) -> bool:
        return self.prores_schedule != "none"

    def prores_value(self, step: int, layer: int, num_layers: int) -> float:
        """a(l, step) of global 1-based block ``layer`` (schedules.prores_value with these flags)."""
        return schedules.prores_value(self.prores_schedule, step, layer, num_layers, self.prores_warmup_steps,
                                      self.prores_warmup_spacing)

    def prores_final_step(self, layer: int, num_layers: int):
        """First step from which block ``layer`` keeps a == 1 (None: never)."""
        return schedules.final_step(self.prores_schedule, layer, num_layers, self.prores_warmup_steps,
                                    self.prores_warmup_spacing)

    def post_layers(self, num_layers: int) -> int:
        """Number of leading Post-LN blocks of Mix-LN."""
        if self.mix_post_layers is not None:
            return self.mix_post_layers
        return num_layers // 4

    def block_style(self, layer: int, num_layers: int) -> str:
        """The style (block_styles.STYLES) of global 1-based block ``layer``: Mix-LN resolves to
        post for its first k blocks and pre for the rest."""
        if self.norm_type in MIXED:
            first, rest = MIXED[self.norm_type]
            return first if layer <= self.post_layers(num_layers) else rest
        if self.norm_type == "lns" and self.lns_gain == "learnable":
            return "pre"  # Pre-LN blocks whose norm gains start at 1/sqrt(l) (initialization.py)
        return self.norm_type

    @property
    def has_final_norm(self) -> bool:
        """A model whose last block normalizes its sum (Post-LN, DeepNorm) ends on a norm already;
        the rest get a final norm."""
        return self.post_final_norm or not styles_of(self.norm_type)[-1].sum_norm

    def validate(self, num_layers: int) -> None:
        _choice("--norm-type", self.norm_type, NORM_TYPES)
        _choice("--prores-schedule", self.prores_schedule, SCHEDULES)
        _choice("--gpas-gate", self.gpas_gate, GPAS_GATES)
        _choice("--init-method", self.init_method, INIT_METHODS)
        _choice("--prores-warmup-spacing", self.prores_warmup_spacing, WARMUP_SPACINGS)
        _choice("--lns-gain", self.lns_gain, LNS_GAINS)
        _choice("--embedding-init", self.embedding_init, EMBEDDING_INITS)
        _choice("--deepnorm-init", self.deepnorm_init, DEEPNORM_INITS)
        if self.deepnorm_init == "official" and self.norm_type == "deepnorm" and self.init_method != "normal":
            raise ConfigError(f"--deepnorm-init official sets every DeepNorm weight's init itself; drop "
                              f"--init-method {self.init_method}")
        w = self.prores_warmup_steps
        if not needs_warmup(self.prores_schedule) and w:
            raise ConfigError(
                f"--prores-warmup-steps {w!r} has no effect with --prores-schedule "
                f"{self.prores_schedule}; choose a warming schedule (e.g. linear), or give --prores-warmup-steps 0 "
                f"(after a recipe's value) or drop the flag"
            )
        if needs_warmup(self.prores_schedule):
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w <= 0:
                raise ConfigError(
                    f"--prores-warmup-steps {w!r} is not valid for --prores-schedule "
                    f"{self.prores_schedule}: give the total warmup as a positive number of steps"
                )
        if self.gpas and self.norm_type not in gpas_norm_types():
            raise ConfigError(
                f"--gpas with --norm-type {self.norm_type} is not defined by the GPAS paper; "
                f"use GPAS with {', '.join(gpas_norm_types()[:-1])} or {gpas_norm_types()[-1]}"
            )
        if self.norm_type in MIXED:
            if num_layers < 2:
                raise ConfigError(f"--norm-type mix needs at least 2 layers (Post-LN blocks, then Pre-LN "
                                  f"ones); --num-layers is {num_layers}")
            k = self.post_layers(num_layers)
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_layers - 1:
                raise ConfigError(
                    f"--mix-post-layers {k!r} is not valid for {num_layers} layers: "
                    f"Mix-LN needs 1 <= k <= {num_layers - 1} Post-LN blocks"
                    + (" (the default floor(L/4) is 0: use at least 4 layers or set k)"
                       if self.mix_post_layers is None else "")
                )
        elif self.mix_post_layers is not None:
            raise ConfigError(
                f"--mix-post-layers {self.mix_post_layers} only applies to --norm-type mix "
                f"(got --norm-type {self.norm_type}); drop it or use --norm-type mix"
            )


# Llama 3.x RoPE scaling as megatron-core implements it (--use-rope-scaling): only the factor is a
# parameter there; these are fixed.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class ModelConfig:
    """Shape, parallel layout and methods of a Llama-style GPT (RMSNorm, SwiGLU, RoPE, no bias)."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    vocab_size: int = 256
    make_vocab_size_divisible_by: int = 1  # the driver uses Megatron's 128
    seq_length: int = 32
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    add_bias_linear: bool = False
    swiglu: bool = True
    tie_embeddings: bool = False  # the output layer is the word embedding matrix (Megatron-LM's default)
    rotary_base: float = 10000  # RoPE theta (Llama 3: 500000)
    rope_scaling_factor: Optional[float] = None  # Llama 3.x RoPE scaling (megatron-core's): None = off
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    transformer_impl: str = "local"
    recompute_granularity: Optional[str] = None  # full | selective
    recompute_method: Optional[str] = None  # full: uniform (default) | block
    recompute_num_layers: Optional[int] = None  # full: layers per recomputed unit / per model chunk (default 1)
    recompute_modules: Optional[tuple] = None  # selective: of RECOMPUTE_MODULES (default core_attn)
    fp8_format: Optional[str] = None  # hybrid | e4m3 (Transformer Engine)
    fp8_recipe: str = "delayed"  # delayed | tensorwise (current scaling) | mxfp8 | blockwise
    attention_backend: str = "auto"  # auto | flash | fused | unfused | local
    bias_dropout_fusion: bool = True  # compiled residual ops on GPUs
    rope_fusion: bool = True  # fused RoPE on GPUs: Transformer Engine's, else fused_rope's compiled one
    params_dtype: torch.dtype = torch.float32
    bf16: bool = False
    method: MethodConfig = field(default_factory=MethodConfig)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def ffn_size(self) -> int:
        return 4 * self.hidden_size if self.ffn_hidden_size is None else self.ffn_hidden_size

    @property
    def query_groups(self) -> int:
        return self.num_attention_heads if self.num_query_groups is None else self.num_query_groups

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up to a multiple of make_vocab_size_divisible_by x TP (Megatron-LM's
        rule), so the vocabulary-parallel embedding splits evenly; padded rows are never targets."""
        m = self.make_vocab_size_divisible_by * self.tensor_model_parallel_size
        return -(-self.vocab_size // m) * m

    @property
    def virtual_pipeline_size(self) -> Optional[int]:
        if self.num_layers_per_virtual_pipeline_stage is None:
            return None
        return self.num_layers // (
            self.pipeline_model_parallel_size * self.num_layers_per_virtual_pipeline_stage
        )

    def _check_kernel_runs_here(self) -> None:
        """A forced PyTorch attention kernel that cannot run this model on this machine is refused
        now, not by an error at the first step: the memory-efficient kernel on a CPU, flash with
        attention dropout on a CPU, flash on a GPU without --bf16 (it takes fp16/bf16 only)."""
        import torch

        gpu = torch.cuda.is_available()
        if self.attention_backend == "fused" and not gpu:
            raise ConfigError("--attention-backend fused (the memory-efficient kernel) needs a GPU; on the CPU use "
                              "--attention-backend auto")
        if self.attention_backend == "flash" and not gpu and self.attention_dropout > 0:
            raise ConfigError(f"--attention-backend flash on the CPU takes no --attention-dropout "
                              f"({self.attention_dropout}); use --attention-backend auto or --attention-dropout 0")
        if self.attention_backend == "flash" and gpu and not self.bf16:
            raise ConfigError("--attention-backend flash (or --use-flash-attn) needs --bf16 on a GPU: the flash "
                              "kernel takes fp16/bf16 inputs only")

    def validate(self, check_installed: bool = True) -> None:
        """Raise ConfigError for the first bad value; call before building any model.
        ``check_installed=False`` skips what depends on this machine (Transformer Engine present)."""
        def positive(flag, v):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{flag} {v!r} is not valid; it must be a positive integer")

        for flag, v in (
            ("--num-layers", self.num_layers),
            ("--hidden-size", self.hidden_size),
            ("--num-attention-heads", self.num_attention_heads),
            ("--num-query-groups", self.query_groups),
            ("--ffn-hidden-size", self.ffn_size),
            ("--vocab-size", self.vocab_size),
            ("--make-vocab-size-divisible-by", self.make_vocab_size_divisible_by),
            ("--seq-length", self.seq_length),
            ("--tensor-model-parallel-size", self.tensor_model_parallel_size),
            ("--pipeline-model-parallel-size", self.pipeline_model_parallel_size),
            ("--context-parallel-size", self.context_parallel_size),
        ):
            positive(flag, v)
        _choice("--normalization", self.normalization, NORMALIZATIONS)
        _choice("--transformer-impl", self.transformer_impl, TRANSFORMER_IMPLS)
        _choice("--attention-backend", self.attention_backend, ATTENTION_BACKENDS)
        _choice("--fp8-recipe", self.fp8_recipe, FP8_RECIPES)
        if self.fp8_format is not None:
            _choice("--fp8-format", self.fp8_format, FP8_FORMATS)
            if self.transformer_impl != "transformer_engine":
                raise ConfigError("--fp8-format needs --transformer-impl transformer_engine "
                                  "(FP8 GEMMs come from Transformer Engine)")
            if not self.bf16:
                raise ConfigError("--fp8-format needs --bf16 (FP8 GEMMs run inside a bf16 model)")
        if check_installed and self.transformer_impl == "local":
            self._check_kernel_runs_here()
        if check_installed and self.transformer_impl == "transformer_engine" and not _have_te():
            raise ConfigError(
                "--transformer-impl transformer_engine needs Transformer Engine, which is not "
                "installed; install the [te] extra on a CUDA machine or use --transformer-impl local"
            )
        if self.rope_scaling_factor is not None and not (math.isfinite(self.rope_scaling_factor)
                                                         and self.rope_scaling_factor >= 1):
            raise ConfigError(f"--rope-scaling-factor {self.rope_scaling_factor!r} is not valid; it must be >= 1")
        for flag, v in (("--rotary-base", self.rotary_base), ("--norm-epsilon", self.norm_epsilon)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{flag} {v!r} is not valid; it must be a positive number")
        for flag, p in (("--hidden-dropout", self.hidden_dropout),
                        ("--attention-dropout", self.attention_dropout)):
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"{flag} {p!r} is not valid; it must be in [0, 1)")
        self.method.validate(self.num_layers)

        L, tp, pp = self.num_layers, self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        heads, groups = self.num_attention_heads, self.query_groups
        if self.hidden_size % heads:
            raise ConfigError(
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads {heads}"
            )
        if (self.hidden_size // heads) % 2:  # RoPE rotates pairs of channels (it failed at step 1)
            raise ConfigError(
                f"the head size {self.hidden_size // heads} (--hidden-size {self.hidden_size} / "
                f"--num-attention-heads {heads}) is odd, and RoPE rotates pairs of channels; pick sizes "
                f"whose quotient is even"
            )
        if heads % groups:
            raise ConfigError(
                f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}"
            )
        for flag, v in (("--num-attention-heads", heads), ("--num-query-groups", groups),
                        ("--ffn-hidden-size", self.ffn_size)):
            if v % tp:
                raise ConfigError(
                    f"{flag} {v} is not divisible by --tensor-model-parallel-size {tp}; "
                    f"pick a tensor-parallel size that divides it"
                )
        if self.fp8_format is not None:
            for flag, v in (("--hidden-size", self.hidden_size),
                            ("--ffn-hidden-size / TP", self.ffn_size // tp)):
                if v % 16:
                    raise ConfigError(f"{flag} {v} is not a multiple of 16, which FP8 GEMMs need; "
                                      f"pick a multiple of 16 or drop --fp8-format")
        if L % pp:
            raise ConfigError(
                f"--num-layers {L} is not divisible by --pipeline-model-parallel-size {pp}; "
                f"use a pipeline size that divides the number of layers"
            )
        vl = self.num_layers_per_virtual_pipeline_stage
        if vl is not None:
            positive("--num-layers-per-virtual-pipeline-stage", vl)
            if pp < 2:
                raise ConfigError(
                    "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size >= 2"
                )
            if (L // pp) % vl:
                raise ConfigError(
                    f"--num-layers-per-virtual-pipeline-stage {vl} does not divide the {L // pp} "
                    f"layers of each pipeline stage (--num-layers {L} / pipeline size {pp})"
                )
            if vl == L // pp:  # one chunk per stage: megatron-core's interleaved schedule failed at step 1
                raise ConfigError(
                    f"--num-layers-per-virtual-pipeline-stage {vl} is all {L // pp} layers of each pipeline "
                    f"stage (--num-layers {L} / pipeline size {pp}): no virtual pipeline; drop the flag or "
                    f"give a smaller divisor"
                )
        if self.sequence_parallel and tp < 2:
            raise ConfigError(
                "--sequence-parallel needs --tensor-model-parallel-size >= 2; drop the flag at TP=1"
            )
        if self.sequence_parallel and self.seq_length % tp:
            raise ConfigError(
                f"--seq-length {self.seq_length} is not divisible by --tensor-model-parallel-size "
                f"{tp}, which --sequence-parallel needs"
            )
        self._validate_recompute()
        cp = self.context_parallel_size
        if cp > 1:
            if self.seq_length % (2 * cp):
                raise ConfigError(
                    f"--seq-length {self.seq_length} is not divisible by 2 x --context-parallel-size {cp} "
                    f"(each sequence is cut into 2 x CP chunks); pick a CP size that divides it"
                )
            if self.sequence_parallel and (self.seq_length // cp) % tp:
                raise ConfigError(
                    f"--seq-length {self.seq_length} / --context-parallel-size {cp} is not divisible by "
                    f"--tensor-model-parallel-size {tp}, which --sequence-parallel needs"
                )
            if self.attention_backend in ("unfused", "local"):
                raise ConfigError(
                    f"--attention-backend {self.attention_backend} (megatron-core's DotProductAttention) has no "
                    f"context parallelism; use --attention-backend auto, flash or fused"
                )

    @property
    def layers_per_chunk(self) -> int:
        """Blocks per model chunk (a pipeline stage, or a virtual one)."""
        return self.num_layers_per_virtual_pipeline_stage or self.num_layers // self.pipeline_model_parallel_size

    def recompute_unit(self) -> tuple:
        """(method, layers) of full recompute, defaults filled in; (None, None) otherwise."""
        if self.recompute_granularity != "full":
            return None, None
        n = self.recompute_num_layers
        return self.recompute_method or "uniform", 1 if n is None else n

    def _validate_recompute(self) -> None:
        granularity, method, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if granularity is not None:
            _choice("--recompute-granularity", granularity, RECOMPUTE_GRANULARITIES)
        if granularity != "full":
            for flag, v in (("--recompute-method", method), ("--recompute-num-layers", n)):
                if v is not None:
                    raise ConfigError(f"{flag} is for --recompute-granularity full; drop it or give "
                                      f"--recompute-granularity full")
        if self.recompute_modules is not None:
            if granularity != "selective":
                raise ConfigError("--recompute-modules is for --recompute-granularity selective; drop it or give "
                                  "--recompute-granularity selective")
            for m in self.recompute_modules:
                _choice("--recompute-modules", m, RECOMPUTE_MODULES)
            if "layernorm" in self.recompute_modules and not any(s.pre_norm for s in styles_of(self.method.norm_type)):
                raise ConfigError(f"--recompute-modules layernorm recomputes the norms on the sublayer inputs, which "
                                  f"--norm-type {self.method.norm_type} blocks do not have (their norms follow the "
                                  f"residual add), so it would save nothing; drop layernorm")
        if granularity != "full":
            return
        method, n = self.recompute_unit()
        _choice("--recompute-method", method, RECOMPUTE_METHODS)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"--recompute-num-layers {n!r} is not valid; it must be a positive integer")
        k = self.layers_per_chunk
        if n > k or (method == "uniform" and k % n):
            chunk = "virtual pipeline stage" if self.num_layers_per_virtual_pipeline_stage else "pipeline stage"
            what = "divide" if method == "uniform" else "be at most"
            raise ConfigError(f"--recompute-num-layers {n} must {what} {k}, the layers of each {chunk} "
                              f"(--recompute-method {method})")

    def transformer_config(self):
        """The megatron-core TransformerConfig of this model (validates first)."""
        self.validate()
        from megatron.core.transformer.enums import AttnBackend
        from megatron.core.transformer.transformer_config import TransformerConfig
        from megatron.core.utils import init_method_normal, scaled_init_method_normal

        init = init_method_normal(self.init_method_std)
        if self.method.init_method == "scaled":
            out_init = scaled_init_method_normal(self.init_method_std, self.num_layers)
        else:  # normal; ds-init scales the per-layer output projections after the build
            out_init = init_method_normal(self.init_method_std)
        on_cpu = not torch.cuda.is_available()
        if self.rope_fusion and not on_cpu:  # megatron-core checks that a fused RoPE exists
            from megatron_prores import fused_rope

            fused_rope.install()
        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.query_groups,
            ffn_hidden_size=self.ffn_size,
            kv_channels=self.hidden_size // self.num_attention_heads,
            normalization=self.normalization,
            layernorm_epsilon=self.norm_epsilon,
            init_method_std=self.init_method_std,
            init_method=init,
            output_layer_init_method=out_init,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            add_bias_linear=self.add_bias_linear,
            gated_linear_unit=self.swiglu,
            activation_func=torch.nn.functional.silu if self.swiglu else torch.nn.functional.gelu,
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_size,
            sequence_parallel=self.sequence_parallel,
            context_parallel_size=self.context_parallel_size,
            params_dtype=torch.bfloat16 if self.bf16 else self.params_dtype,
            bf16=self.bf16,
            pipeline_dtype=torch.bfloat16 if self.bf16 else self.params_dtype,
            use_cpu_initialization=on_cpu,
            # Fusions that need CUDA kernels, off on CPU.
            bias_activation_fusion=not on_cpu and self.swiglu,
            bias_dropout_fusion=self.bias_dropout_fusion and not on_cpu,
            masked_softmax_fusion=False,
            apply_rope_fusion=self.rope_fusion and not on_cpu,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
            # gloo mismatches batched isend/irecv pairs that go both ways to one peer
            # (interleaved 1F1B at PP=2): use the unbatched p2p path on CPU.
            batch_p2p_comm=not on_cpu,
            recompute_granularity=self.recompute_granularity,
            recompute_method=self.recompute_unit()[0],
            recompute_num_layers=self.recompute_unit()[1],
            recompute_modules=list(self.recompute_modules or RECOMPUTE_MODULES[:1]),
            fp8=self.fp8_format,
            fp8_recipe=self.fp8_recipe,
            # The local spec picks its core attention itself (specs.py); megatron's GPTModel
            # turns this into Transformer Engine's NVTE_*_ATTN switches.
            attention_backend=(AttnBackend[self.attention_backend]
                               if self.transformer_impl == "transformer_engine" else AttnBackend.auto),
            # Mix-LN blocks differ (post vs pre norms): checkpoint them per block.
            hetereogenous_dist_checkpoint=self.method.norm_type in MIXED,
        )


def config_to_dict(cfg: ModelConfig) -> dict:
    """The model configuration as plain values (stored in checkpoints; read back by the export)."""
    d = dataclasses.asdict(cfg)
    d["params_dtype"] = str(cfg.params_dtype).replace("torch.", "")
    return d


def config_from_dict(d: dict, **changes) -> ModelConfig:
    """Inverse of config_to_dict; unknown keys (from a newer version) are ignored."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    kw = {k: v for k, v in d.items() if k in names}
    mnames = {f.name for f in dataclasses.fields(MethodConfig)}
    kw["method"] = MethodConfig(**{k: v for k, v in dict(kw.get("method") or {}).items() if k in mnames})
    if isinstance(kw.get("params_dtype"), str):
        kw["params_dtype"] = getattr(torch, kw["params_dtype"])
    kw.update(changes)
    return ModelConfig(**kw)

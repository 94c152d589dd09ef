"""What each block style implies: the one table the layer, the specs, the config checks and the
initialization read (instead of comparing style names).

A block is ``y = residual + branch`` twice (attention, MLP); the styles differ in where the norms
sit and what scales the shortcut. ``--norm-type`` names a style for every block, except Mix-LN
("mix"), whose first k blocks are Post-LN and the rest Pre-LN (``MethodConfig.block_style``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockStyle:
    name: str
    pre_norm: bool  # a norm on each sublayer's input (input_layernorm / pre_mlp_layernorm)
    branch_norm: bool  # a norm on each sublayer's output, before the add (Sandwich-LN)
    sum_norm: bool  # a norm on the sum, after the add (Post-LN, DeepNorm); GPAS then scales the shortcut
    depth_scaled_pre_norm: bool  # LayerNorm Scaling: each pre-norm's output times 1/sqrt(l)
    deepnorm: bool  # DeepNorm: shortcut times alpha(L), branch weights initialized times beta(L)
    gpas_defined: bool  # the GPAS paper defines GPAS for this style
    llama_equivalent: bool  # a Hugging Face Llama block computes the same (HF export without custom code)

    @property
    def post_norm(self) -> bool:
        """A norm after each sublayer (branch or sum): the layer builds its post norms."""
        return self.branch_norm or self.sum_norm

    @property
    def plain_residual(self) -> bool:
        """Without ProRes and GPAS the residual op is megatron-core's own bias-dropout-add."""
        return not self.post_norm


STYLES = {s.name: s for s in (
    #          name        pre    branch  sum    lns    deep   gpas   llama
    BlockStyle("pre",      True,  False,  False, False, False, True,  True),
    BlockStyle("lns",      True,  False,  False, True,  False, True,  True),
    BlockStyle("sandwich", True,  True,   False, False, False, True,  False),
    BlockStyle("post",     False, False,  True,  False, False, False, False),
    BlockStyle("deepnorm", False, False,  True,  False, True,  True,  False),
)}
MIXED = {"mix": ("post", "pre")}  # norm types that mix styles: (first k blocks, the rest)
NORM_TYPES = ("pre", "post", "sandwich", "deepnorm", "lns", "mix")
assert set(NORM_TYPES) == set(STYLES) | set(MIXED)


def gpas_norm_types() -> tuple:
    """Norm types GPAS is defined for: every block style the GPAS paper covers, and Mix-LN (whose
    Post-LN blocks take GPAS on the shortcut, as DeepNorm's do)."""
    return tuple(n for n in NORM_TYPES if n in MIXED or STYLES[n].gpas_defined)


def styles_of(norm_type: str) -> tuple:
    """The block styles a norm type uses."""
    return tuple(STYLES[s] for s in MIXED.get(norm_type, (norm_type,)))

"""The block-style table (block_styles.py) against the placements the papers publish, written out
here, and against the layer specs built from it."""

import pytest
from megatron.core.transformer.identity_op import IdentityOp

from megatron_prores.block_styles import NORM_TYPES, STYLES, gpas_norm_types, styles_of
from megatron_prores.config import MethodConfig

# style: (norm on the sublayer input, norm on the sublayer output, norm on the sum,
#         pre-norm output x 1/sqrt(l), DeepNorm shortcut/init) -- the papers' placements
PUBLISHED = {
    "pre": (True, False, False, False, False),  # x + F(LN(x))
    "lns": (True, False, False, True, False),  # x + F(LN(x) / sqrt(l))
    "sandwich": (True, True, False, False, False),  # x + LN(F(LN(x)))
    "post": (False, False, True, False, False),  # LN(x + F(x))
    "deepnorm": (False, False, True, False, True),  # LN(alpha x + F(x)), weights x beta
}


@pytest.mark.parametrize("style", sorted(PUBLISHED))
def test_table_matches_the_published_placement(style):
    s = STYLES[style]
    assert (s.pre_norm, s.branch_norm, s.sum_norm, s.depth_scaled_pre_norm, s.deepnorm) == PUBLISHED[style]


def test_norm_types_final_norm_and_gpas():
    assert set(NORM_TYPES) == set(PUBLISHED) | {"mix"}
    assert [s.name for s in styles_of("mix")] == ["post", "pre"]  # Mix-LN: Post-LN first, then Pre-LN
    final = {n: MethodConfig(norm_type=n).has_final_norm for n in NORM_TYPES}
    assert final == {"pre": True, "lns": True, "sandwich": True, "post": False, "deepnorm": False, "mix": True}
    assert set(gpas_norm_types()) == set(NORM_TYPES) - {"post"}  # the GPAS paper: no GPAS on plain Post-LN


@pytest.mark.parametrize("style", sorted(PUBLISHED))
def test_spec_builds_the_norms_the_table_names(style):
    from megatron_prores.specs import layer_spec

    sub = layer_spec(MethodConfig(norm_type=style), style).submodules
    assert (sub.input_layernorm is not IdentityOp) == PUBLISHED[style][0]
    assert (sub.pre_mlp_layernorm is not IdentityOp) == PUBLISHED[style][0]
    assert (sub.post_mlp_layernorm is not IdentityOp) == (PUBLISHED[style][1] or PUBLISHED[style][2])

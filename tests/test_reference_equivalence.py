"""The megatron model equals an independent float64 reference for every norm x ProRes x GPAS.

The issue asks for relative error < 1e-6; seen: logits <= 5e-16, gradients <= 2e-11, so the
tests hold the tighter bound 1e-9."""

import pytest
import torch

from megatron_prores.config import MethodConfig, ModelConfig
from megatron_prores.layer import set_prores_step
from megatron_prores.model import build_model
from megatron_prores.parallel import seed_everything
from tests.reference import Reference, prores_linear

L, H, HEADS, GROUPS, FFN, VOCAB, SEQ, BATCH = 4, 32, 4, 2, 48, 64, 8, 2
# Mid-warmup, with values exact in float32 (the schedule buffer is fp32 by design), so that the
# float64 comparison isolates the layer math: T = 32, a = [0.75, 0.375, 0.25, 0.1875].
WARMUP, STEP = 128, 24

COMBOS = [
    (nt, prores, gpas)
    for nt in ("pre", "post", "sandwich", "deepnorm", "lns", "mix")
    for prores in (False, True)
    for gpas in (False, True)
    if not (nt == "post" and gpas)  # not defined by the paper; rejected (test_config)
]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def run_case(norm_type, prores, gpas, gpas_gate="block", init_method="normal", normalization="RMSNorm"):
    method = MethodConfig(
        norm_type=norm_type,
        prores_schedule="linear" if prores else "none",
        prores_warmup_steps=WARMUP if prores else 0,
        gpas=gpas,
        gpas_gate=gpas_gate,
        init_method=init_method,
    )
    cfg = ModelConfig(num_layers=L, hidden_size=H, num_attention_heads=HEADS, num_query_groups=GROUPS,
                      ffn_hidden_size=FFN, vocab_size=VOCAB, seq_length=SEQ,
                      params_dtype=torch.float64, normalization=normalization, method=method)
    seed_everything(7)
    [model] = build_model(cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.decoder.layers:
            if layer.gpas_gate is not None:  # non-zero gates, both signs
                layer.gpas_gate.copy_(torch.rand(layer.gpas_gate.shape, generator=gen, dtype=torch.float64) * 2 - 1)
        for name, p in model.named_parameters():
            if "layernorm" in name:  # non-trivial norm gains (and LayerNorm biases)
                p.add_(torch.rand(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    set_prores_step(model, STEP)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    positions = torch.arange(SEQ)[None].expand(BATCH, SEQ)
    probe = torch.randn(BATCH, SEQ, VOCAB, generator=gen, dtype=torch.float64)

    logits = model(tokens, positions, None)
    (logits * probe).sum().backward()
    params = dict(model.named_parameters())

    a = [prores_linear(STEP, l, L, WARMUP) for l in range(1, L + 1)] if prores else None
    ref = Reference(params, num_layers=L, hidden=H, heads=HEADS, groups=GROUPS, ffn=FFN,
                    norm_type=norm_type, gpas=gpas, gpas_gate=gpas_gate, prores_values=a,
                    normalization=normalization)
    ref_logits = ref.logits(tokens)
    (ref_logits * probe).sum().backward()
    return model, logits.detach(), ref_logits.detach(), params, ref.p


@pytest.mark.parametrize("norm_type,prores,gpas", COMBOS)
def test_matches_float64_reference(single_process, norm_type, prores, gpas):
    model, logits, ref_logits, params, ref_params = run_case(norm_type, prores, gpas)
    assert logits.dtype == torch.float64
    assert rel_err(logits, ref_logits) < 1e-9
    assert ("decoder.final_layernorm.weight" in params) == (norm_type not in ("post", "deepnorm"))
    for name, p in params.items():
        g_ref = ref_params[name].grad
        assert g_ref is not None and g_ref.norm() > 0, f"{name}: reference gradient is zero"
        err = rel_err(p.grad, g_ref)
        assert err < 1e-9, f"{name}: relative gradient error {err:.2e}"
    if gpas:
        assert any("gpas_gate" in n for n in params)


def test_sublayer_gates_match_reference(single_process):
    _, logits, ref_logits, params, ref_params = run_case("sandwich", True, True, gpas_gate="sublayer")
    assert rel_err(logits, ref_logits) < 1e-9
    gate = params["decoder.layers.1.gpas_gate"]
    assert gate.shape == (2,)
    for name, p in params.items():
        assert rel_err(p.grad, ref_params[name].grad) < 1e-9, name


@pytest.mark.parametrize("norm_type", ["pre", "sandwich", "deepnorm", "mix"])
def test_layernorm_models_match_reference(single_process, norm_type):
    _, logits, ref_logits, params, ref_params = run_case(norm_type, True, True, normalization="LayerNorm")
    assert any(n.endswith("layernorm.bias") for n in params)
    assert rel_err(logits, ref_logits) < 1e-9
    for name, p in params.items():
        assert rel_err(p.grad, ref_params[name].grad) < 1e-9, name

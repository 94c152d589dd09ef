"""Layer behaviour: identity at step 0, skipped multiply, fp32 schedule buffer, init, no WD."""

import math

import pytest
import torch

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from megatron_prores.config import MethodConfig, ModelConfig
from megatron_prores.layer import prores_layers, set_prores_step
from megatron_prores.model import build_model
from megatron_prores.parallel import seed_everything

pytestmark = pytest.mark.stack  # CI's Python 3.12 / megatron-core 0.19 leg too

L, H, SEQ, B = 4, 32, 8, 2


def build(norm_type="pre", schedule="linear", warmup=100, gpas=True, init="normal", dtype=torch.float64, **kw):
    method = MethodConfig(norm_type=norm_type, prores_schedule=schedule,
                          prores_warmup_steps=warmup if schedule not in ("none",) else 0,
                          gpas=gpas, init_method=init)
    cfg = ModelConfig(num_layers=L, hidden_size=H, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                      vocab_size=64, seq_length=SEQ, params_dtype=dtype, method=method, **kw)
    seed_everything(11)
    return build_model(cfg)[0]


def layer_io(model):
    """Run a forward and record each layer's input and output hidden states."""
    records = []

    def hook(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        records.append((x, out[0] if isinstance(out, tuple) else out))

    hooks = [l.register_forward_hook(hook, with_kwargs=True) for l in model.decoder.layers]
    tokens = torch.randint(0, 64, (B, SEQ))
    model(tokens, torch.arange(SEQ)[None].expand(B, SEQ), None)
    for h in hooks:
        h.remove()
    return records


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("norm_type", ["pre", "lns", "sandwich", "mix"])
def test_step0_every_pre_style_block_is_an_exact_identity(single_process, norm_type):
    model = build(norm_type, gpas=True)  # gates at init (0) -> GPAS is the identity too
    set_prores_step(model, 0)
    for i, (x, y) in enumerate(layer_io(model)):
        if norm_type == "mix" and i == 0:
            continue  # Post-LN block of Mix-LN: checked below
        assert torch.equal(x, y), f"block {i + 1} is not the identity at step 0"


@pytest.mark.parametrize("norm_type", ["post", "deepnorm", "mix"])
def test_step0_post_style_block_is_its_norm_of_the_shortcut(single_process, norm_type):
    model = build(norm_type, gpas=norm_type != "post")
    set_prores_step(model, 0)
    c = (2 * L) ** 0.25 if norm_type == "deepnorm" else 1.0
    for i, (x, y) in enumerate(layer_io(model)):
        layer = model.decoder.layers[i]
        if layer.style not in ("post", "deepnorm"):
            continue
        h = rms(c * x, layer.post_self_attn_layernorm.weight)
        expect = rms(c * h, layer.post_mlp_layernorm.weight)
        torch.testing.assert_close(y, expect, rtol=1e-12, atol=1e-12)


def test_multiply_is_skipped_once_final_and_layer_is_megatrons(single_process):
    model = build("pre", schedule="linear", warmup=100, gpas=False)
    layers = list(prores_layers(model))
    set_prores_step(model, 60)  # T = 25: blocks 1, 2 final (25, 50), blocks 3, 4 not
    assert [l.prores_active for l in layers] == [False, False, True, True]
    assert [l.prores_scale.item() for l in layers] == pytest.approx([1.0, 1.0, 60 / 75, 60 / 100], rel=1e-7)
    set_prores_step(model, 100)
    assert not any(l.prores_active for l in layers)
    # With GPAS off and ProRes done, the residual op IS megatron-core's bias-dropout-add.
    for training in (True, False):
        ours, megatrons = layers[0].self_attn_bda(training, False), get_bias_dropout_add(training, False)
        assert ours.__code__ is megatrons.__code__ and ours.__closure__[0].cell_contents == training
    # fix-* never finish: the multiply stays
    model = build("pre", schedule="fix-sqrt-L", warmup=0, gpas=False)
    set_prores_step(model, 10 ** 6)
    assert all(l.prores_active for l in prores_layers(model))
    assert all(l.prores_scale.item() == pytest.approx(1 / math.sqrt(L)) for l in prores_layers(model))


def test_schedule_buffer_and_gates_stay_fp32_under_bf16_cast_and_the_buffer_is_not_checkpointed(single_process):
    model = build("pre", dtype=torch.float32)
    gates = [l.gpas_gate for l in prores_layers(model)]
    model.bfloat16()  # what Float16Module does
    layers = list(prores_layers(model))
    assert all(l.prores_scale.dtype == torch.float32 for l in layers)
    assert all(l.gpas_gate.dtype == torch.float32 and l.gpas_gate is g for l, g in zip(layers, gates))
    assert layers[0].self_attention.linear_proj.weight.dtype == torch.bfloat16
    # a bf16 stream through fp32 gates: the residual op's output stays bf16, the gate gradient fp32
    tokens = torch.randint(0, 64, (2, SEQ))
    out = model(tokens, torch.arange(SEQ)[None].expand(2, SEQ), None)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(g.grad.dtype == torch.float32 and g.grad.abs().sum() > 0 for g in gates)
    model.double()  # the float64 references keep float64 gates
    assert all(l.gpas_gate.dtype == torch.float64 for l in layers)
    set_prores_step(model, 37)
    assert layers[3].prores_scale.item() == pytest.approx(37 / 100)
    assert not any("prores" in k for k in model.state_dict())


def test_gates_get_no_weight_decay_from_the_drivers_optimizer(single_process):
    """Through the driver's own optimizer (DDP + megatron-core's optimizer and scheduler): with
    zero gradients an AdamW step at lr 1, weight decay 0.5 shrinks a 2-D weight by (1 - 0.5) but
    leaves the gates."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_prores.arguments import parse_args
    from megatron_prores.trainer import build_optimizer

    model = build("deepnorm", gpas=True, dtype=torch.float32)
    with torch.no_grad():
        for layer in prores_layers(model):
            layer.gpas_gate.fill_(0.3)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    args = parse_args(["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "8",
                       "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "10", "--mock-data", "--vocab-size", "64",
                       "--lr", "1.0", "--min-lr", "1.0", "--weight-decay", "0.5"])
    optimizer, _ = build_optimizer(args, [ddp])
    fc2 = model.decoder.layers[0].mlp.linear_fc2.weight
    before = fc2.detach().clone()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    optimizer.step()
    gates = [l.gpas_gate for l in prores_layers(model)]
    assert len(gates) == L and all(g.dim() == 1 for g in gates)
    for g in gates:
        assert torch.equal(g.detach(), torch.full_like(g, 0.3)), "a GPAS gate was weight-decayed"
    torch.testing.assert_close(fc2.detach(), before * 0.5, rtol=1e-6, atol=0)


def test_init_methods_rescale_the_normal_init_exactly(single_process):
    base = build("pre", init="normal")
    ds = build("pre", init="ds-init")
    scaled = build("pre", init="scaled")
    deep = build("deepnorm", init="normal", gpas=False)
    for i in range(L):
        l = i + 1
        b0, d0, s0, n0 = (m.decoder.layers[i] for m in (base, ds, scaled, deep))
        w = lambda layer, name: dict(layer.named_parameters())[name]
        # same seed -> same draws; DS-Init divides the output projections by sqrt(l)
        torch.testing.assert_close(w(d0, "self_attention.linear_proj.weight"),
                                   w(b0, "self_attention.linear_proj.weight") / math.sqrt(l), rtol=1e-15, atol=0)
        torch.testing.assert_close(w(d0, "mlp.linear_fc2.weight"), w(b0, "mlp.linear_fc2.weight") / math.sqrt(l),
                                   rtol=1e-15, atol=0)
        assert torch.equal(w(d0, "self_attention.linear_qkv.weight"), w(b0, "self_attention.linear_qkv.weight"))
        # scaled init: megatron's std/sqrt(2L) for output projections (statistical check)
        std = w(s0, "mlp.linear_fc2.weight").std().item()
        assert std == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.15)
        # DeepNorm: v rows, out-proj, fc1, fc2 times (8L)^-1/4; q and k unchanged
        bgain = (8 * L) ** -0.25
        q0 = w(b0, "self_attention.linear_qkv.weight").view(2, 4, 8, H)  # 2 groups of [q, q, k, v]
        qn = w(n0, "self_attention.linear_qkv.weight").view(2, 4, 8, H)
        assert torch.equal(qn[:, :3], q0[:, :3])
        torch.testing.assert_close(qn[:, 3], q0[:, 3] * bgain, rtol=1e-15, atol=0)
        for name in ("self_attention.linear_proj.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"):
            torch.testing.assert_close(w(n0, name), w(b0, name) * bgain, rtol=1e-15, atol=0)


def test_the_mlp_spec_is_built_as_is_without_a_warning_per_layer(single_process, caplog):
    """megatron-core 0.19 rewraps a ModuleSpec(MLP) with one warning per layer (48 lines for a
    48-layer model); the spec must take the form each release builds directly."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP

    caplog.set_level("WARNING")
    model = build("mix", gpas=True)
    warnings = [r.getMessage() for r in caplog.records if "mlp" in r.getMessage().lower()]
    assert warnings == []
    for layer in model.decoder.layers:
        assert type(layer.mlp) is MLP
        assert type(layer.mlp.linear_fc1) is ColumnParallelLinear and type(layer.mlp.linear_fc2) is RowParallelLinear
        assert tuple(layer.mlp.linear_fc1.weight.shape) == (2 * 48, H)  # SwiGLU: gate and up

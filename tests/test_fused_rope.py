"""The fused RoPE (megatron_prores.fused_rope) that megatron-core's ``apply_rope_fusion`` calls on
GPUs without Transformer Engine: against the rotation written out pair by pair in float64 (compiled
and eager), its gradient against autograd through that rotation, megatron-core's eager RoPE, and
megatron-core's layers routing to it. The GPU counterpart is in test_gpu.py."""

import pytest
import torch

S, B, H, D = 16, 2, 3, 8


def angles(rot, theta=10000.0, positions=S):
    """megatron-core's layout: [s, 1, 1, rot] = cat(pos * inv_freq, pos * inv_freq), fp32."""
    inv = 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    f = torch.arange(positions, dtype=torch.float32)[:, None] * inv[None]
    return torch.cat((f, f), dim=-1)[:, None, None, :]


def rotation64(t, freqs):
    """RoPE in float64, one pair (i, i + rot/2) at a time: each pair turned by its angle; the
    part of a head beyond ``rot`` unchanged. Differentiable (autograd gives the reference gradient)."""
    t, a = t.double(), freqs.double()
    rot = a.shape[-1]
    half = rot // 2
    out = t.clone()
    for i in range(half):
        c, s = torch.cos(a[..., i]), torch.sin(a[..., i])
        x, y = t[..., i], t[..., i + half]
        out[..., i] = x * c - y * s
        out[..., i + half] = y * c + x * s
    return out


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, B, H, D, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rot", [D, D // 2], ids=["full", "partial"])
def test_matches_the_rotation_in_float64(compiled, dtype, rot):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron_prores.fused_rope import rope

    t, freqs = inputs(dtype), angles(rot)
    ref = rotation64(t, freqs)
    y = rope(t, freqs, compiled=compiled)
    assert y.dtype == dtype and y.shape == t.shape
    err = (y.double() - ref).abs().max().item()
    if dtype == torch.bfloat16:  # computed in fp32, rounded once: within half a bf16 ulp (<= 2^-8 relative)
        assert ((y.double() - ref).abs() <= ref.abs() * 2.0 ** -8 + 1e-6).all()
        eager = _apply_rotary_pos_emb_bshd(t, freqs)  # megatron-core's: rounds cos, sin and products first
        assert err <= (eager.double() - ref).abs().max().item()
    else:
        assert err <= {torch.float64: 1e-12, torch.float32: 2e-6}[dtype]
    assert torch.equal(y[..., rot:], t[..., rot:])  # beyond rot: passed through


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("rot", [D, D // 2], ids=["full", "partial"])
def test_gradient_is_the_transposed_rotation(compiled, rot):
    from megatron_prores.fused_rope import rope

    freqs = angles(rot)
    dy = inputs(torch.float64, seed=1)
    t = inputs(torch.float64).requires_grad_()
    (want,) = torch.autograd.grad((rotation64(t, freqs) * dy).sum(), t)
    t2 = inputs(torch.float64).requires_grad_()
    rope(t2, freqs, compiled=compiled).backward(dy)
    torch.testing.assert_close(t2.grad, want, rtol=0, atol=1e-12)
    t3 = inputs(torch.float32).requires_grad_()  # and in fp32 (the GPU kernel's arithmetic)
    rope(t3, freqs, compiled=compiled).backward(dy.float())
    torch.testing.assert_close(t3.grad.double(), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_strided_key_view(compiled):
    """megatron-core hands the keys over as a strided view of the fused QKV projection (GQA: one
    key after each group's queries); the output and gradient are those of a contiguous copy."""
    from megatron_prores.fused_rope import rope

    freqs = angles(D)
    qkv = inputs(torch.float32).reshape(S, B, 1, H * D).expand(S, B, 2, H * D).contiguous()
    k = qkv.view(S, B, 2, H, D)[:, :, :, 1]  # [S, B, 2, D], not contiguous
    assert not k.is_contiguous()
    dy = torch.randn(k.shape, generator=torch.Generator().manual_seed(2))
    k1, k2 = k.contiguous().requires_grad_(), k.detach().requires_grad_()  # a copy, and the view itself
    assert k1.is_contiguous() and not k2.is_contiguous()
    y1, y2 = rope(k1, freqs, compiled=compiled), rope(k2, freqs, compiled=compiled)
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    torch.testing.assert_close(rotation64(k, freqs), y2.double(), rtol=0, atol=2e-6)
    y1.backward(dy), y2.backward(dy)
    torch.testing.assert_close(k2.grad, k1.grad, rtol=0, atol=0)


def test_keeps_no_activation_for_backward():
    """Only the cos and sin tables of the angles are saved, one pair shared by every call with the
    same angles (every layer's queries and keys): nothing per call (megatron's eager RoPE saves cos
    and sin casts per call)."""
    from megatron_prores.fused_rope import rope

    freqs = angles(D)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        for seed in (0, 1, 2):  # three "layers"
            rope(inputs(torch.float32, seed).requires_grad_(), freqs, compiled=False)
    assert len(saved) == 6 and len({x.untyped_storage().data_ptr() for x in saved}) == 2
    assert saved[0].shape == freqs.shape and saved[0].dtype == torch.float32
    torch.testing.assert_close(saved[0], torch.cos(freqs.double()).float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(saved[1], torch.sin(freqs.double()).float(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_tables_follow_the_angles(compiled):
    """The tables are computed once per angle tensor, and never stale: other angles (another
    theta, another length, a copy at another address), the same angles changed in place, and the
    tensors' precision each rotate by their own angles (float64 reference)."""
    from megatron_prores import fused_rope
    from megatron_prores.fused_rope import rope

    t = inputs(torch.float32)
    for freqs in (angles(D), angles(D, theta=500.0), angles(D).clone(), angles(D, positions=2 * S)[:S]):
        torch.testing.assert_close(rope(t, freqs, compiled=compiled).double(), rotation64(t, freqs), rtol=0, atol=2e-6)
    freqs = angles(D)
    rope(t, freqs, compiled=compiled)
    freqs.mul_(0.5)  # in place: the same memory, new angles
    torch.testing.assert_close(rope(t, freqs, compiled=compiled).double(), rotation64(t, freqs), rtol=0, atol=2e-6)
    t64 = inputs(torch.float64)  # float64 tables for float64 tensors, beside the float32 ones
    torch.testing.assert_close(rope(t64, freqs, compiled=compiled), rotation64(t64, freqs), rtol=0, atol=1e-12)
    assert len(fused_rope._tables) <= fused_rope._TABLES_KEPT


def test_tables_keep_the_angles_in_use():
    """At most _TABLES_KEPT pairs are kept, the least recently used going first: angles used again
    (a model chunk's cached angles, between others made per forward) stay."""
    from megatron_prores import fused_rope

    fused_rope._tables.clear()
    kept = fused_rope._TABLES_KEPT
    many = [angles(D, theta=100.0 + i) for i in range(kept + 1)]
    first = fused_rope.tables(many[0], torch.float32)
    for f in many[1:kept]:
        fused_rope.tables(f, torch.float32)
    assert fused_rope.tables(many[0], torch.float32) is first  # used again: now the most recent
    fused_rope.tables(many[kept], torch.float32)  # one more: the least recently used (many[1]) goes
    held = [h for h, _ in fused_rope._tables.values()]
    assert len(held) == kept and any(h is many[0] for h in held) and not any(h is many[1] for h in held)


def test_inference_mode_angles():
    """Under torch.inference_mode (megatron-core's inference engines generate under it), the angles
    megatron-core computes there are inference tensors, which have no version counter: reading it
    raised RuntimeError at the first layer. They rotate by their own angles every time (an inference
    tensor can change in place without a trace, so its tables are not kept)."""
    from megatron_prores import fused_rope
    from megatron_prores.fused_rope import rope

    t = inputs(torch.float32)
    with torch.inference_mode():
        freqs = angles(D)
        torch.testing.assert_close(rope(t, freqs, compiled=False).double(), rotation64(t, freqs), rtol=0, atol=2e-6)
        freqs.mul_(0.5)  # in place, untracked
        torch.testing.assert_close(rope(t, freqs, compiled=False).double(), rotation64(t, freqs), rtol=0, atol=2e-6)
    assert not any(held.is_inference() for held, _ in fused_rope._tables.values())


@pytest.mark.stack  # megatron-core's RoPE hook and its config check differ between releases
def test_megatron_core_layers_route_to_it(single_process, monkeypatch):
    """With apply_rope_fusion on (as on GPUs), megatron-core's attention calls the installed fused
    RoPE for the queries and the keys of every layer, and the model's loss and gradients are those
    of its eager RoPE (fp32: within fp32 rounding)."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron_prores import fused_rope
    from megatron_prores.config import MethodConfig, ModelConfig
    from megatron_prores.layer import set_prores_step
    from megatron_prores.model import build_model
    from megatron_prores.parallel import seed_everything

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", rope_utils.fused_apply_rotary_pos_emb)
    assert fused_rope.install() == "compiled" and rope_utils.fused_apply_rotary_pos_emb is \
        fused_rope.fused_apply_rotary_pos_emb
    calls = []
    real = fused_rope.rope
    monkeypatch.setattr(fused_rope, "rope", lambda t, f, compiled=True: calls.append(t.shape) or real(t, f, compiled))
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=64,
                      seq_length=S, method=MethodConfig(prores_schedule="linear", prores_warmup_steps=10, gpas=True))
    seed_everything(3)
    [model] = build_model(cfg)
    set_prores_step(model, 4)
    tokens = torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(0))
    results = {}
    for fused in (False, True):
        model.config.apply_rope_fusion = fused  # the one TransformerConfig every layer reads
        model.zero_grad()
        loss = model(tokens, torch.arange(S)[None].expand(B, S), None, labels=tokens).sum()
        loss.backward()
        results[fused] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    assert calls == [(S, B, 4, 8), (S, B, 2, 8)] * 2  # q (4 heads) and k (2 groups) of each layer
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=0)
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_flag_and_cpu_default():
    """--no-rope-fusion turns it off; on CPUs megatron-core's eager RoPE runs (as the other fusions)."""
    from megatron_prores.arguments import build_parser, model_config

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1", "--lr", "1e-3"]
    on, off = (model_config(build_parser().parse_args(base + x), 64) for x in ([], ["--no-rope-fusion"]))
    assert on.rope_fusion and not off.rope_fusion
    assert on.transformer_config().apply_rope_fusion is torch.cuda.is_available()
    assert off.transformer_config().apply_rope_fusion is False

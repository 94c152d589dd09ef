"""The fused residual op against the residual formulas written out with autograd (float64), its
recompute backward against its keep-the-input fallback, its saved activations, and its compiled
form (torch.compile on CPU) against its eager form."""

import pytest
import torch
import torch.nn.functional as F

from megatron_prores.fused_residual import MIN_RECOMPUTE_SCALE, recompute_safe, residual_op

S, B, H = 6, 3, 16


def reference(r, f, bias, mask, keep, a, g, c, post):
    """y = x - SiLU(g) * stopgrad(x) applied where each style puts GPAS (the GPAS paper)."""
    branch = f if bias is None else f + bias
    if mask is not None:
        branch = branch * mask / keep
    if a is not None:
        branch = a * branch
    if post:
        shortcut = r if g is None else r - F.silu(g) * r.detach()
        return (shortcut if c is None else c * shortcut) + branch
    z = r + branch
    return z if g is None else z - F.silu(g) * z.detach()


def inputs(dtype, bias, gate_value, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(S, B, H, generator=gen, dtype=dtype).requires_grad_()
    f = torch.randn(S, B, H, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(H, generator=gen, dtype=dtype).requires_grad_() if bias else None
    g = torch.tensor([gate_value], dtype=dtype, requires_grad=True) if gate_value is not None else None
    return r, f, b, g


def grads(out, tensors, seed=1):
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    present = [t for t in tensors if t is not None]
    got = torch.autograd.grad(out, present, dy)
    it = iter(got)
    return [next(it) if t is not None else None for t in tensors]


CASES = [  # style, bias, dropout, ProRes value, gate, DeepNorm c
    ("pre", False, 0.0, 0.37, 0.3, None),
    ("pre", True, 0.25, 0.37, -0.6, None),
    ("pre", False, 0.0, None, 0.9, None),
    ("pre", False, 0.0, 0.2, 2.0, None),  # s = 1 - SiLU(2) < 0: the recompute divides by a negative s
    ("pre", True, 0.1, 0.8, None, None),
    ("post", False, 0.0, 0.5, 0.4, None),
    ("post", True, 0.2, 0.5, 0.4, 1.6818),
    ("post", False, 0.0, None, None, 1.6818),
]


@pytest.mark.parametrize("style,bias,p,a,g,c", CASES)
@pytest.mark.parametrize("recompute", [True, False])
def test_op_matches_the_formula_float64(style, bias, p, a, g, c, recompute):
    r, f, b, gate = inputs(torch.float64, bias, g)
    prores = None if a is None else torch.tensor(a, dtype=torch.float32)
    torch.manual_seed(5)
    y = residual_op(r, f, b, prob=p, prores=prores, gate=gate, shortcut=c, post=style == "post",
                    recompute=recompute)
    # the op draws its keep mask from the current generator: draw the same one for the reference
    torch.manual_seed(5)
    mask = torch.empty_like(f, dtype=torch.bool).bernoulli_(1 - p) if p > 0 else None
    if mask is not None:
        assert 0.4 < mask.double().mean().item() / (1 - p) < 1.6
    expect = reference(r, f, b, mask, 1 - p, None if a is None else prores.double(),  # the fp32 buffer's value
                       gate, c, style == "post")
    torch.testing.assert_close(y, expect, rtol=1e-7, atol=1e-12)
    got, want = grads(y, [r, f, b, gate]), grads(expect, [r, f, b, gate])
    for name, x, w in zip("r f bias gate".split(), got, want):
        if w is not None:
            torch.testing.assert_close(x, w, rtol=1e-7, atol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_recompute_backward_equals_keeping_the_input(dtype, tol):
    """y / s in the backward gives the gate gradient of the saved-input path within rounding;
    every other gradient and the output are bitwise the same."""
    r, f, _, gate = inputs(dtype, False, 0.7)
    a = torch.tensor(0.6)
    outs = {}
    for recompute in (True, False):
        y = residual_op(r, f, prores=a, gate=gate, recompute=recompute)
        outs[recompute] = (y, *grads(y, [r, f, gate]))
    assert torch.equal(outs[True][0], outs[False][0])
    assert torch.equal(outs[True][1], outs[False][1]) and torch.equal(outs[True][2], outs[False][2])
    torch.testing.assert_close(outs[True][3], outs[False][3], rtol=tol, atol=0)
    # and both are the float64 formula's within this dtype's rounding (same dy as grads())
    dy = torch.randn(outs[True][0].shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    r64, f64, g64 = (t.detach().double().requires_grad_() for t in (r, f, gate))
    y64 = reference(r64, f64, None, None, 1.0, a.double(), g64, None, False)
    (dg64,) = torch.autograd.grad(y64, [g64], dy.double())
    torch.testing.assert_close(outs[True][3].double(), dg64, rtol=4 * tol, atol=0)


def test_eval_applies_no_dropout_and_frozen_gate_needs_nothing_saved():
    r, f, b, gate = inputs(torch.float64, True, 0.3)
    a = torch.tensor(0.5)
    with torch.no_grad():
        y = residual_op(r, f, b, prob=0.5, training=False, prores=a, gate=gate)
        expect = reference(r, f, b, None, 1.0, a.double(), gate, None, False)
    torch.testing.assert_close(y, expect, rtol=1e-12, atol=1e-12)
    frozen = gate.detach()
    y, kept = saved_storages(lambda: residual_op(r, f, prores=a, gate=frozen, recompute=False))
    assert not any(n >= S * B * H * 8 for n in kept.values())  # no pre-GPAS copy when g needs no grad
    dr, df = torch.autograd.grad(y, (r, f), torch.ones_like(y))
    assert torch.equal(dr, torch.ones_like(r)) and torch.allclose(df, a.double() * torch.ones_like(f))


def test_fp32_residual_with_bf16_branch():
    """fp32 residual stream (megatron's fp32_residual_connection) with a bf16 sublayer output:
    the op computes in fp32, returns the branch dtype, and gives the residual an fp32 gradient."""
    r, f, _, gate = inputs(torch.float32, False, 0.3)
    fb = f.detach().bfloat16().requires_grad_()
    a = torch.tensor(0.5)
    y = residual_op(r, fb, prores=a, gate=gate, recompute=True)
    assert y.dtype == torch.bfloat16
    dr, df, dg = grads(y, [r, fb, gate])
    assert dr.dtype == torch.float32 and df.dtype == torch.bfloat16
    r64, f64, g64 = (t.detach().double().requires_grad_() for t in (r, fb, gate))
    y64 = reference(r64, f64, None, None, 1.0, a.double(), g64, None, False)
    torch.testing.assert_close(y.double(), y64, rtol=1e-2, atol=1e-2)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
    (dg64,) = torch.autograd.grad(y64, [g64], dy.double())
    torch.testing.assert_close(dg.double(), dg64, rtol=2e-2, atol=0)


def saved_storages(fn):
    """Storages of the activations autograd keeps for backward while ``fn`` runs."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, kept


@pytest.mark.parametrize("compiled", [False, True])
def test_recompute_keeps_no_activation_beyond_the_output(compiled):
    """Unfused GPAS keeps the pre-GPAS sum next to its output; the fused op keeps only the
    output (which the next norm keeps anyway), and the fallback keeps the sum instead; compiled
    as eager."""
    r, f, _, gate = inputs(torch.float32, False, 0.5)
    a = torch.tensor(0.5)
    act = S * B * H * 4

    y, kept = saved_storages(lambda: residual_op(r, f, prores=a, gate=gate, recompute=True, compiled=compiled))
    big = {p: n for p, n in kept.items() if n >= act}
    assert big == {y.untyped_storage().data_ptr(): act}

    y, kept = saved_storages(lambda: residual_op(r, f, prores=a, gate=gate, recompute=False, compiled=compiled))
    big = [p for p, n in kept.items() if n >= act]
    assert len(big) == 1 and big[0] != y.untyped_storage().data_ptr()

    # post styles keep the shortcut input, nothing new
    y, kept = saved_storages(lambda: residual_op(r, f, prores=a, gate=gate, post=True, shortcut=1.5,
                                                 compiled=compiled))
    assert {p for p, n in kept.items() if n >= act} == {r.untyped_storage().data_ptr()}
    if compiled:
        return

    def unfused():
        z = torch.addcmul(r, a, f)
        return torch.addcmul(z, F.silu(gate).neg(), z.detach())

    y, kept = saved_storages(unfused)
    assert sum(n >= act for n in kept.values()) == 1 and y.untyped_storage().data_ptr() not in kept


def test_recompute_is_refused_near_a_zero_scale():
    root = torch.tensor([1.2784645427610738])  # SiLU(g) = 1: the GPAS scale is 0
    assert abs(1 - F.silu(root).item()) < 1e-6
    far = torch.tensor([0.3, -2.0])
    near = torch.tensor([1.2784645427610738 + 1e-3])
    assert recompute_safe([far, root, near, torch.tensor([5.0])]) == [True, False, False, True]
    assert abs(1 - F.silu(torch.tensor(1.2784645427610738 + 0.02)).item()) >= MIN_RECOMPUTE_SCALE


@pytest.mark.parametrize("style", ["pre", "post"])
def test_compiled_op_equals_eager_op(style):
    """torch.compile (inductor's C++ backend on CPU; Triton on GPUs) against the eager math."""
    r, f, b, gate = inputs(torch.float32, True, 0.45)
    a = torch.tensor(0.3)
    res = {}
    for compiled in (False, True):
        torch.manual_seed(3)
        y = residual_op(r, f, b, prob=0.1, prores=a, gate=gate, shortcut=1.3 if style == "post" else None,
                        post=style == "post", recompute=True, compiled=compiled)
        res[compiled] = (y, *grads(y, [r, f, b, gate]))
    for x, w in zip(res[True], res[False]):
        torch.testing.assert_close(x, w, rtol=1e-5, atol=1e-6)


def test_compiled_op_after_a_shape_change_and_without_grad():
    """The compiled op recompiles for a new sequence length (dynamo's dynamic shapes) and for
    no-grad evaluation, and still equals the float64 formula written out here."""
    a = torch.tensor(0.3, dtype=torch.float64)
    for seq in (S, 2 * S + 3):
        gen = torch.Generator().manual_seed(seq)
        r, f = (torch.randn(seq, B, H, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))
        b = torch.randn(H, generator=gen, dtype=torch.float64).requires_grad_()
        g = torch.tensor([0.45], dtype=torch.float64, requires_grad=True)
        s = 1 - 0.45 * torch.sigmoid(torch.tensor(0.45, dtype=torch.float64))  # 1 - SiLU(g)
        z = r.detach() + 0.3 * (f.detach() + b.detach())
        y = residual_op(r, f, b, prores=a, gate=g, recompute=True, compiled=True)
        torch.testing.assert_close(y, s * z, rtol=1e-12, atol=1e-12)
        dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        dr, df, db, dg = torch.autograd.grad(y, [r, f, b, g], dy)
        sig = torch.sigmoid(torch.tensor(0.45, dtype=torch.float64))
        dsilu = sig * (1 + 0.45 * (1 - sig))
        torch.testing.assert_close(dr, dy, rtol=0, atol=0)  # gradient-preserving: unscaled
        torch.testing.assert_close(df, 0.3 * dy, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(db, 0.3 * dy.sum((0, 1)), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dg, (-dsilu * (dy * z).sum()).reshape(1), rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(residual_op(r, f, b, prores=a, gate=g, recompute=True, compiled=True),
                                       s * z, rtol=1e-12, atol=1e-12)


def test_model_with_compiled_residual_ops_equals_eager(single_process):
    """The layer passes megatron's ``fused`` flag (config.bias_dropout_fusion) on to the op: a
    ProRes+GPAS model gives the same loss and gradients compiled and eager."""
    from megatron_prores.config import MethodConfig, ModelConfig
    from megatron_prores.layer import set_prores_step
    from megatron_prores.model import build_model
    from megatron_prores.parallel import seed_everything

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=8,
                      method=MethodConfig(prores_schedule="linear", prores_warmup_steps=10, gpas=True))
    seed_everything(2)
    [model] = build_model(cfg)
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.gpas_gate.fill_(0.35)
    set_prores_step(model, 6)
    assert all(l.gpas_recompute is True for l in model.decoder.layers)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    res = {}
    for fused in (False, True):
        model.config.bias_dropout_fusion = fused  # what megatron passes as ``fused`` (False on CPU)
        model.zero_grad()
        loss = model(tokens, torch.arange(8)[None].expand(2, 8), None, labels=tokens).mean()
        loss.backward()
        res[fused] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    model.config.bias_dropout_fusion = False
    from megatron_prores import compiled, fused_residual

    assert fused_residual._pre_forward in compiled._compiled, "the compiled path was not taken"
    torch.testing.assert_close(res[True][0], res[False][0], rtol=1e-6, atol=0)
    for a, b in zip(res[True][1], res[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

"""SDPAttention (the local spec's core attention) against megatron-core's DotProductAttention:
same outputs and gradients (causal, explicit mask, GQA), dropout semantics, and the spec wiring."""

from unittest import mock

import pytest
import torch

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_prores.attention import SDPAttention, sdpa_attention
from megatron_prores.config import MethodConfig, ModelConfig

SEQ, B, HEADS, DIM = 12, 2, 4, 8


def tconfig(groups, dtype=torch.float32, dropout=0.0):
    cfg = ModelConfig(num_layers=2, hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_query_groups=groups,
                      seq_length=SEQ, attention_dropout=dropout, params_dtype=dtype)
    return cfg.transformer_config()


def qkv(groups, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(SEQ, B, HEADS, DIM, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(SEQ, B, groups, DIM, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(SEQ, B, groups, DIM, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return q, k, v


def run(module, q, k, v, mask=None):
    out = module(q, k, v, mask)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), dy))


@pytest.mark.parametrize("groups", [HEADS, 2, 1])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 3e-2)])
def test_sdpa_equals_dot_product_attention_causal(single_process, groups, dtype, tol):
    cfg = tconfig(groups, dtype)
    ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    new = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    q, k, v = qkv(groups, dtype)
    for name, a, b in zip(["out", "dq", "dk", "dv"], run(new, q, k, v), run(ref, q, k, v)):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, msg=name)


def test_sdpa_equals_dot_product_attention_explicit_mask(single_process):
    """A megatron mask (True = masked), here causal plus two padded key positions."""
    cfg = tconfig(2, torch.float64)
    mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)[None, None].repeat(B, 1, 1, 1)
    mask[1, :, :, -2:] = True
    mask[1, :, -2:, :] = False  # keep every query row attending somewhere
    q, k, v = qkv(2, torch.float64)
    for mtype in (AttnMaskType.causal, AttnMaskType.padding):
        ref = DotProductAttention(cfg, 1, mtype, "self")
        new = SDPAttention(cfg, 1, mtype, "self")
        for a, b in zip(run(new, q, k, v, mask), run(ref, q, k, v, mask)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_dropout_is_unbiased_and_off_in_eval(single_process):
    cfg = tconfig(2, torch.float64, dropout=0.3)
    att = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    q, k, v = (t.detach() for t in qkv(2, torch.float64))
    att.eval()
    clean = att(q, k, v, None)
    torch.testing.assert_close(clean, DotProductAttention(cfg, 1, AttnMaskType.causal, "self").eval()(q, k, v, None))
    att.train()
    torch.manual_seed(0)
    draws = torch.stack([att(q, k, v, None) for _ in range(400)])
    assert not torch.allclose(draws[0], clean)
    # E[dropout(P) V] = P V: the mean of 400 draws is within a few standard errors
    err = (draws.mean(0) - clean).abs() / (draws.std(0) / 20 + 1e-12)
    assert err.median() < 2.0 and err.max() < 6.0


def test_dropout_draws_in_the_tensor_parallel_rng_fork_unless_sequence_parallel(single_process):
    cfg = tconfig(2, torch.float32, dropout=0.1)
    att = SDPAttention(cfg, 1, AttnMaskType.causal, "self").train()
    q, k, v = (t.detach() for t in qkv(2, torch.float32))
    with mock.patch("megatron_prores.attention.tensor_parallel.get_cuda_rng_tracker") as tracker:
        att(q, k, v, None)
        assert tracker.return_value.fork.call_count == 1
        att.config.sequence_parallel = True
        try:
            att(q, k, v, None)
        finally:
            att.config.sequence_parallel = False
        assert tracker.return_value.fork.call_count == 1


def test_softmax_scale(single_process):
    """A given softmax scale is used, the default is 1/sqrt(head dim), for any layer number; causal
    attention without a mask needs square scores."""
    q, k, v = qkv(2, torch.float64)
    cfg = tconfig(2, torch.float64)
    for kw in ({"softmax_scale": 0.05}, {}):
        a = SDPAttention(cfg, 7, AttnMaskType.causal, "self", **kw)
        b = DotProductAttention(cfg, 7, AttnMaskType.causal, "self", **kw)
        torch.testing.assert_close(a(q, k, v, None), b(q, k, v, None), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="as many keys as queries"):
        SDPAttention(cfg, 1, AttnMaskType.causal, "self")(q[:1], k, v, None)


def test_backend_choice(single_process):
    cfg = tconfig(2)
    q, k, v = (t.detach() for t in qkv(2, torch.float32))
    flash = sdpa_attention("flash")(cfg, 1, AttnMaskType.causal, "self")
    torch.testing.assert_close(flash(q, k, v, None), SDPAttention(cfg, 1, AttnMaskType.causal, "self")(q, k, v, None))
    with pytest.raises(ValueError):
        sdpa_attention("cudnn")


def test_spec_wiring_and_model_equality(single_process):
    """--attention-backend auto builds SDPAttention, unfused megatron's; same loss and grads."""
    from megatron_prores.layer import set_prores_step
    from megatron_prores.model import build_model
    from megatron_prores.parallel import seed_everything

    results = {}
    for backend in ("auto", "unfused"):
        cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=64,
                          seq_length=SEQ, params_dtype=torch.float64, attention_backend=backend,
                          method=MethodConfig(prores_schedule="linear", prores_warmup_steps=10, gpas=True))
        seed_everything(3)
        [model] = build_model(cfg)
        core = model.decoder.layers[0].self_attention.core_attention
        assert isinstance(core, SDPAttention) == (backend == "auto")
        set_prores_step(model, 4)
        tokens = torch.randint(0, 64, (B, SEQ), generator=torch.Generator().manual_seed(0))
        loss = model(tokens, torch.arange(SEQ)[None].expand(B, SEQ), None, labels=tokens).sum()
        loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results["auto"][0], results["unfused"][0], rtol=1e-12, atol=0)
    for a, b in zip(results["auto"][1], results["unfused"][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---- context parallelism -----------------------------------------------------------------------

def test_split_sequence_is_megatrons_load_balanced_layout():
    """CP rank r of c holds positions [rL, (r+1)L) and [(2c-1-r)L, (2c-r)L), L = s / 2c."""
    from megatron_prores.context_parallel import split_batch, split_sequence

    s = 24
    x = torch.arange(s)[None].repeat(3, 1)
    for cp in (1, 2, 3):
        L = s // (2 * cp)
        parts = []
        for r in range(cp):
            want = list(range(r * L, (r + 1) * L)) + list(range((2 * cp - 1 - r) * L, (2 * cp - r) * L))
            assert split_sequence(x, r, cp).tolist() == [want] * 3
            parts += want
        assert sorted(parts) == list(range(s))  # every position on exactly one rank
    b = split_batch({"tokens": x, "labels": x + 1}, 1, 2)
    assert b["tokens"].tolist()[0] == list(range(6, 12)) + list(range(12, 18))
    assert b["labels"].tolist()[0] == list(range(7, 13)) + list(range(13, 19))
    with pytest.raises(ValueError, match="sequence length 24 is not divisible by 2 x context-parallel size 5"):
        split_sequence(x, 0, 5)


def _cp_attention_worker(rank, world, port, groups, out_dir):
    import os
    import traceback

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    try:
        from megatron_prores import parallel
        from megatron_prores.context_parallel import split_sequence

        parallel.initialize(context_parallel=world, seed=7)
        cfg = ModelConfig(num_layers=2, hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_query_groups=groups,
                          seq_length=SEQ, params_dtype=torch.float64,
                          context_parallel_size=world).transformer_config()
        module = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
        full = qkv(groups, torch.float64)
        local = [split_sequence(t.detach(), rank, world, dim=0).requires_grad_() for t in full]
        g = torch.Generator().manual_seed(1)
        dy = split_sequence(torch.randn(SEQ, B, HEADS * DIM, generator=g, dtype=torch.float64), rank, world, dim=0)
        out = module(*local, None)
        out.backward(dy)  # (the CPU runtime redirects backward's CUDA requests, not autograd.grad's)
        torch.save([out.detach()] + [t.grad for t in local], os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:
        with open(os.path.join(out_dir, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.mark.parametrize("cp,groups", [(2, 1), (3, 2), pytest.param(2, HEADS, marks=pytest.mark.exhaustive),
                                       pytest.param(3, 1, marks=pytest.mark.exhaustive)])
def test_context_parallel_attention_equals_whole_sequence(single_process, tmp_path, cp, groups):
    """Real CP groups (gloo): each rank's output and its part of dq, dk, dv (K/V all-gathered in
    forward, their gradient reduce-scattered in backward) equal the whole-sequence causal
    attention's, float64. The reference is the one-process SDPAttention, itself checked against
    megatron-core's DotProductAttention above."""
    import os

    import torch.multiprocessing as mp

    from megatron_prores.context_parallel import split_sequence
    from tests.conftest import free_port

    module = SDPAttention(tconfig(groups, torch.float64), 1, AttnMaskType.causal, "self")
    full = qkv(groups, torch.float64)
    dy = torch.randn(SEQ, B, HEADS * DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = module(*full, None)
    ref = [out, *torch.autograd.grad(out, full, dy)]
    try:
        mp.spawn(_cp_attention_worker, args=(cp, free_port(), groups, str(tmp_path)), nprocs=cp, join=True)
    except Exception:
        errors = [open(tmp_path / f).read() for f in os.listdir(tmp_path) if f.startswith("error-")]
        pytest.fail("a context-parallel rank failed:\n" + "\n".join(errors))
    for r in range(cp):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for name, a, b in zip(["out", "dq", "dk", "dv"], got, ref):
            torch.testing.assert_close(a, split_sequence(b.detach(), r, cp, dim=0), rtol=1e-12, atol=1e-12,
                                       msg=f"rank {r}: {name}")

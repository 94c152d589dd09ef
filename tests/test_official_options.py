"""Options that select the official ProRes / GPAS code's choices (dandingsky/ProRes, dandingsky/GPAS), each
against its formula written out here; the defaults (the papers' text) stay as they were."""

import math

import pytest
import torch

from megatron_prores.config import ConfigError, MethodConfig, ModelConfig
from megatron_prores.model import build_model
from megatron_prores.parallel import seed_everything
from megatron_prores.schedules import final_step, prores_value

L, H, SEQ, B, V = 4, 32, 8, 2, 64


def build(**method):
    m = MethodConfig(**method)
    cfg = ModelConfig(num_layers=L, hidden_size=H, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                      vocab_size=V, seq_length=SEQ, params_dtype=torch.float64, method=m)
    seed_everything(5)
    return build_model(cfg)[0]


def logits(model, tokens):
    return model(tokens, torch.arange(SEQ)[None].expand(B, SEQ), None)


# ---- schedules -------------------------------------------------------------------------------------
@pytest.mark.parametrize("Lm", [1, 4, 7])
def test_stagewise_sqrt_L_formula(Lm):
    W = 70.0
    T = W / Lm
    for l in range(1, Lm + 1):
        for t in (0, 3, 10, 17, 40, 69, 70, 100):
            stage = min(max((t - T * (l - 1)) / T, 0.0), 1.0)
            want = stage * (1 - 1 / math.sqrt(Lm)) + 1 / math.sqrt(Lm)
            assert prores_value("stagewise-sqrt-L", t, l, Lm, W) == pytest.approx(want, abs=1e-15)
        assert final_step("stagewise-sqrt-L", l, Lm, W) == (0.0 if Lm == 1 else T * l)


@pytest.mark.parametrize("schedule", ["linear", "linear-sqrt", "reverse", "stagewise-0", "stagewise-L", "equal"])
@pytest.mark.parametrize("W,Lm", [(103, 4), (3, 4), (100, 4), (50, 1)])
def test_official_spacing_of_the_block_warmups(schedule, W, Lm):
    """Block l ends its ramp at E_l = linspace(floor(W/L), W, L)[l] (the official ProRes code)."""
    first = W // Lm
    E = [0.0] + [first + (k * (W - first) / (Lm - 1) if Lm > 1 else 0.0) for k in range(Lm)]  # E_0 = 0
    clip = lambda x: min(max(x, 0.0), 1.0)  # noqa: E731
    for l in range(1, Lm + 1):
        for t in (0, 1, 2, 5, 25, 26, 50, 77, 100, 103, 120):
            ramp = 1.0 if t >= E[l] else (t - E[l - 1]) / (E[l] - E[l - 1])
            want = {"linear": clip(t / E[l]) if E[l] else 1.0,
                    "linear-sqrt": math.sqrt(clip(t / E[l])) if E[l] else 1.0,
                    "reverse": clip(t / E[Lm - l + 1]) if E[Lm - l + 1] else 1.0,
                    "stagewise-0": clip(ramp),
                    "stagewise-L": clip(ramp) * (1 - 1 / Lm) + 1 / Lm,
                    "equal": clip(t / W)}[schedule]
            assert prores_value(schedule, t, l, Lm, W, "official") == pytest.approx(want, abs=1e-15), (l, t)
    if W % Lm == 0:  # L divides W: the same as the even spacing
        for l in range(1, Lm + 1):
            for t in range(0, W + 2):
                assert prores_value(schedule, t, l, Lm, W, "official") == \
                    pytest.approx(prores_value(schedule, t, l, Lm, W), abs=1e-15)


# ---- final norm after Post-LN / DeepNorm ----------------------------------------------------------------
@pytest.mark.parametrize("norm_type", ["post", "deepnorm"])
def test_post_final_norm_is_one_more_rmsnorm_before_the_output_layer(single_process, norm_type):
    plain, extra = build(norm_type=norm_type), build(norm_type=norm_type, post_final_norm=True)
    assert getattr(plain.decoder, "final_layernorm", None) is None
    norm = extra.decoder.final_layernorm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, H, dtype=torch.float64))
    seen = {}
    extra.decoder.layers[-1].register_forward_hook(lambda m, a, out: seen.update(h=out[0] if isinstance(out, tuple) else out))
    tokens = torch.randint(0, V, (B, SEQ))
    out = logits(extra, tokens)
    h = seen["h"]
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight  # RMSNorm written out
    want = (normed @ extra.output_layer.weight.t()).transpose(0, 1)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_official_options_change_nothing_where_they_do_not_apply(single_process):
    """One preset serves every norm type: --post-final-norm on a model with a final norm, and
    --lns-gain learnable without LNS, build the same model."""
    tokens = torch.randint(0, V, (B, SEQ))
    for nt in ("pre", "sandwich", "mix"):
        a, b = build(norm_type=nt), build(norm_type=nt, post_final_norm=True, lns_gain="learnable")
        assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
        torch.testing.assert_close(logits(b, tokens), logits(a, tokens), rtol=0, atol=0)
    assert MethodConfig(norm_type="post", post_final_norm=True).has_final_norm


# ---- LNS with learnable gains ---------------------------------------------------------------------------
def test_lns_learnable_gain_starts_at_one_over_sqrt_l_and_equals_fixed_lns_at_init(single_process):
    fixed, learn = build(norm_type="lns"), build(norm_type="lns", lns_gain="learnable")
    for l, layer in enumerate(learn.decoder.layers, start=1):
        assert layer.style == "pre" and not layer.input_layernorm._forward_hooks
        for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
            torch.testing.assert_close(norm.weight, torch.full((H,), l ** -0.5, dtype=torch.float64), rtol=0, atol=1e-15)
    tokens = torch.randint(0, V, (B, SEQ))
    torch.testing.assert_close(logits(learn, tokens), logits(fixed, tokens), rtol=1e-12, atol=1e-12)


# ---- embedding init ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,std", [("prores-code", 0.02 * math.sqrt(H)), ("gpas-code", math.sqrt(2 / 5))])
def test_embedding_init_std(single_process, kind, std):
    base, other = build(), build(embedding_init=kind)
    a, b = base.embedding.word_embeddings.weight, other.embedding.word_embeddings.weight
    torch.testing.assert_close(b, a * (std / 0.02), rtol=1e-12, atol=0)  # same draw, rescaled to std
    for n, p in base.named_parameters():  # nothing else changes
        if "word_embeddings" not in n:
            assert torch.equal(p, dict(other.named_parameters())[n]), n


# ---- DeepNorm init -----------------------------------------------------------------------------------------
def test_deepnorm_official_init_is_xavier_of_each_matrix(single_process):
    """Plain DeepNorm with --deepnorm-init official: each matrix the official code keeps apart (q, k,
    v, out-proj, gate/up, down) is the same normal draw rescaled to its xavier std, gain (8L)^-1/4
    except q and k; the norms, embeddings and output layer are untouched."""
    base = build(norm_type="deepnorm", init_method="normal")  # normal draw times b for v/proj/MLP
    off = build(norm_type="deepnorm", deepnorm_init="official")
    b, sigma, heads, groups, d, ffn = (8 * L) ** -0.25, 0.02, 4, 2, H // 4, 48

    def xavier(fan_in, fan_out, gain=1.0):
        return gain * math.sqrt(2 / (fan_in + fan_out))

    for lb, lo in zip(base.decoder.layers, off.decoder.layers):
        per = heads // groups
        qb = lb.self_attention.linear_qkv.weight.view(groups, per + 2, d, H)
        qo = lo.self_attention.linear_qkv.weight.view(groups, per + 2, d, H)
        # the same draw: base = draw (q, k) or draw * b (v); official = draw * xavier / sigma
        torch.testing.assert_close(qo[:, :per], qb[:, :per] * xavier(H, heads * d) / sigma, rtol=1e-12, atol=0)
        torch.testing.assert_close(qo[:, per], qb[:, per] * xavier(H, groups * d) / sigma, rtol=1e-12, atol=0)
        torch.testing.assert_close(qo[:, per + 1], qb[:, per + 1] / b * xavier(H, groups * d, b) / sigma,
                                   rtol=1e-12, atol=0)
        for name, fan_in, fan_out in (("self_attention.linear_proj", heads * d, H), ("mlp.linear_fc1", H, ffn),
                                      ("mlp.linear_fc2", ffn, H)):
            wb, wo = lb.get_submodule(name).weight, lo.get_submodule(name).weight
            torch.testing.assert_close(wo, wb / b * xavier(fan_in, fan_out, b) / sigma, rtol=1e-12, atol=0)
    for n in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert torch.equal(base.get_parameter(n), off.get_parameter(n))


def test_deepnorm_official_init_with_prores_or_gpas_is_the_plain_normal_init(single_process):
    plain = build(norm_type="pre")  # no depth scaling at all: megatron-core's normal draw
    for method in (dict(prores_schedule="linear", prores_warmup_steps=40), dict(gpas=True)):
        m = build(norm_type="deepnorm", deepnorm_init="official", **method)
        for n, p in plain.named_parameters():
            if n.endswith("linear_qkv.weight") or n.endswith("linear_proj.weight") or "linear_fc" in n:
                assert torch.equal(p, m.get_parameter(n)), n
    with pytest.raises(ConfigError, match="drop --init-method scaled"):
        MethodConfig(norm_type="deepnorm", deepnorm_init="official", init_method="scaled").validate(4)


# ---- flags -------------------------------------------------------------------------------------------------
def test_flags_reach_the_method_config():
    from megatron_prores.arguments import model_config, parse_args

    args = parse_args(["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "8",
                       "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1", "--lr", "1e-3",
                       "--mock-data", "--vocab-size", "64", "--norm-type", "deepnorm", "--post-final-norm",
                       "--prores-schedule", "stagewise-sqrt-L", "--prores-warmup-steps", "40",
                       "--prores-warmup-spacing", "official", "--embedding-init", "gpas-code"])
    m = model_config(args, 64).method
    assert (m.post_final_norm, m.prores_schedule, m.prores_warmup_spacing, m.embedding_init, m.lns_gain) == \
        (True, "stagewise-sqrt-L", "official", "gpas-code", "fixed")


def test_official_code_preset_selects_every_option():
    import os

    from megatron_prores.arguments import model_config, parse_args

    preset = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "slurm", "official_code.args")
    args = parse_args(["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "8",
                       "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1", "--lr", "1e-3",
                       "--mock-data", "--vocab-size", "64", "--norm-type", "lns", "@" + preset])
    m = model_config(args, 64).method
    assert (m.prores_warmup_spacing, m.post_final_norm, m.lns_gain, m.embedding_init, m.deepnorm_init) == \
        ("official", True, "learnable", "prores-code", "official")
    assert (args.weight_decay_groups, args.clip_gate_grad_order) == ("official", "after")


@pytest.mark.parametrize("groups", ["megatron", "official"])
def test_weight_decay_groups(single_process, groups):
    """The weight decay each parameter gets after a scheduler step, against the rule written out:
    megatron: none for 1-D parameters and biases; official (the ProRes code's AdamW groups): none
    for biases, norm gains other than the final norm's, and the word embeddings."""
    from megatron_prores.arguments import parse_args
    from megatron_prores.trainer import Trainer

    trainer = Trainer(parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                                  "--seq-length", "8", "--micro-batch-size", "1", "--global-batch-size", "1",
                                  "--train-iters", "2", "--lr", "1e-3", "--weight-decay", "0.1", "--mock-data",
                                  "--vocab-size", "64", "--eval-iters", "0", "--gpas",
                                  "--weight-decay-groups", groups]))
    try:
        trainer.scheduler.step(increment=1)
        wd_of = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
        seen = 0
        for name, p in trainer.model[0].named_parameters():
            if groups == "megatron":
                want = 0.0 if p.dim() == 1 or name.endswith(".bias") else 0.1
            else:
                no = "word_embeddings" in name or (p.dim() == 1 and "final_layernorm" not in name)
                want = 0.0 if no else 0.1
            assert wd_of[id(p)] == pytest.approx(want), (name, wd_of[id(p)])
            seen += 1
        assert seen > 10
    finally:
        trainer.close()


@pytest.mark.stack  # wraps megatron-core's optimizer step: both releases
@pytest.mark.parametrize("order", ["before", "after"])
def test_gate_clip_order_through_the_driver_step(single_process, order):
    """--clip-gate-grad-order: the gradients Adam steps with, captured in its step pre-hook after
    one Trainer.train_step, against both clips written out on the raw gradients (g: gates, r: the
    rest; clip(x, m) = min(1, m / (x + 1e-6)), torch's and megatron-core's rule):
      before: s = clip(|g|, gc); c = clip(|(s g, r)|, C); Adam gets s c g and c r
      after (the official GPAS code): c = clip(|(g, r)|, C); Adam gets c g clip(c |g|, gc) and c r."""
    from megatron_prores.arguments import parse_args
    from megatron_prores.trainer import Trainer

    C, gc = 0.05, 1e-5
    trainer = Trainer(parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                                  "--seq-length", "8", "--micro-batch-size", "2", "--global-batch-size", "2",
                                  "--train-iters", "2", "--lr", "1e-3", "--mock-data", "--vocab-size", "64",
                                  "--eval-iters", "0", "--gpas", "--gpas-gate", "sublayer", "--clip-grad", str(C),
                                  "--clip-gate-grad", str(gc), "--clip-gate-grad-order", order]))
    try:
        params = dict(trainer.model[0].named_parameters())
        gate_ids = {id(g) for g in trainer.gates}
        raw, seen = {}, {}
        forward_backward = trainer.forward_backward

        def keep_raw_grads(iterator, forward_only):
            loss = forward_backward(iterator, forward_only)
            raw.update({n: p.main_grad.double().clone() for n, p in params.items()})
            return loss

        def keep_update_grads(opt, args, kwargs):
            seen.update({id(p): p.grad.double().clone() for g in opt.param_groups for p in g["params"]})

        trainer.forward_backward = keep_raw_grads
        for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
            opt.optimizer.register_step_pre_hook(keep_update_grads)
        result = trainer.train_step(0, measure=True)
    finally:
        trainer.close()

    def clip(norm, m):
        return min(1.0, m / (norm + 1e-6))

    gates = [n for n, p in params.items() if id(p) in gate_ids]
    g = math.sqrt(sum(raw[n].pow(2).sum().item() for n in gates))
    r = math.sqrt(sum(raw[n].pow(2).sum().item() for n in params if n not in gates))
    if order == "before":
        s = clip(g, gc)
        c = clip(math.hypot(s * g, r), C)
        gate_factor, logged = s * c, g
    else:
        c = clip(math.hypot(g, r), C)
        gate_factor, logged = c * clip(c * g, gc), c * g
    assert c < 0.5 and gate_factor < 0.5 * c  # both clips active
    assert result.gate_norm.item() == pytest.approx(logged, rel=1e-5)
    assert len(gates) == 2 and len(seen) == len(params)  # a two-element gate per block
    for n, p in params.items():
        want = raw[n] * (gate_factor if n in gates else c)
        torch.testing.assert_close(seen[id(p)], want, rtol=2e-5, atol=1e-12, msg=n)

"""Activation recompute (--recompute-granularity full|selective) through the driver's own step.

Recompute changes what is kept for backward, never the math: the driver's Trainer.train_step with
recompute must give the losses and weights of the same run without it, bitwise (fp32 on CPU, with
dropout on: the recomputed forward must draw the same masks). That alone would also pass if
nothing were recomputed, so every test also counts the forward calls of each block and of its
parts and checks them against what each recompute setting means (Megatron-LM's definitions,
written out in ``expected_calls``)."""

import collections

import pytest
import torch

from megatron_prores.config import ConfigError

STEPS, MICRO, LR = 3, 2, 3e-3
FIRST = 1  # the first step run: every block's ProRes value is then in (0, 1) (0 at step 0 for all)
BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", str(2 * MICRO), "--lr", str(LR),
        "--lr-warmup-iters", "0", "--train-iters", str(FIRST + STEPS), "--mock-data", "--vocab-size", "128",
        "--eval-iters", "0", "--log-interval", "1", "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
        "--prores-schedule", "linear", "--prores-warmup-steps", "10"]
# Post-LN has no GPAS (the GPAS paper does not define it): --gpas off there
NORM_FLAGS = {norm: ["--norm-type", norm] + (["--gpas"] if norm != "post" else [])
              for norm in ("pre", "post", "sandwich", "deepnorm", "lns", "mix")}
PARTS = ("layer", "core_attn", "input_norm", "pre_mlp_norm", "mlp")


def trainer(extra):
    from megatron_prores.arguments import build_parser, check_args
    from megatron_prores.trainer import Trainer

    args = build_parser().parse_args(BASE + list(map(str, extra)))
    check_args(args)
    return Trainer(args)


def parts(layer):
    return {"layer": layer, "core_attn": layer.self_attention.core_attention, "input_norm": layer.input_layernorm,
            "pre_mlp_norm": layer.pre_mlp_layernorm, "mlp": layer.mlp}


def run(extra):
    """Losses, final weights and per-block forward-call counts of STEPS driver steps."""
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_prores.layer import prores_layers

    t = trainer(extra)
    calls, identity, handles = collections.Counter(), set(), []
    try:
        for layer in prores_layers(t.model):
            for name, module in parts(layer).items():
                key = (layer.layer_number, name)
                if isinstance(module, IdentityOp):
                    identity.add(key)
                handles.append(module.register_forward_hook(lambda *_, key=key: calls.update([key])))
        losses, grads = [], []
        for step in range(FIRST, FIRST + STEPS):
            losses.append(t.train_step(step).loss)
            grads.append(torch.cat([b.grad_data.clone() for c in t.model for b in c.buffers]))
        weights = {n: p.detach().clone() for c in t.model for n, p in c.named_parameters()}
    finally:
        for h in handles:
            h.remove()
        t.close(0)
    return losses, weights, calls, identity, grads


def expected_calls(layers: int, chunk_layers: int, granularity=None, method="uniform", n=1, modules=("core_attn",),
                   identity=()):
    """Forward calls per block part in one microbatch: 2 where the part is run again in backward.
    full: every part of a recomputed block (uniform: all blocks, in units of n; block: the first
    n blocks of each model chunk); selective: core_attn, the two pre-norms ("layernorm"; not an
    identity), the MLP ("mlp")."""
    out = {}
    for number in range(1, layers + 1):
        index_in_chunk = (number - 1) % chunk_layers
        whole = granularity == "full" and (method == "uniform" or index_in_chunk < n)
        for part in PARTS:
            again = whole or (granularity == "selective" and (
                (part == "core_attn" and "core_attn" in modules)
                or (part in ("input_norm", "pre_mlp_norm") and "layernorm" in modules
                    and (number, part) not in identity)
                or (part == "mlp" and "mlp" in modules)))
            out[(number, part)] = 2 if again else 1
    return out


def assert_same_run(base, other, exact=True):
    """Bitwise; or, where megatron's norm recompute sums a stream's gradient in another order
    (``exact=False``: its nested backward adds the norm's two input-gradient terms first, autograd
    adds them to the shortcut's one by one), within fp32 rounding: the first step's gradients (same
    weights) relative 1e-6 (a missing or doubled term would be of the order of the ProRes value,
    >= 0.1 here), the later steps' 1e-5 (their weights differ by the earlier steps' rounding), the
    losses relative 1e-6, and every weight within 1% of the learning rate of the other run's after
    the Adam steps (an Adam update moves an element by up to about lr, whatever the gradient's
    size: rounding noise in a near-zero gradient, a gate's, moves it most; seen 2.3e-4 x lr)."""
    if exact:
        assert other[0] == base[0], (base[0], other[0])
        assert all(torch.equal(a, b) for a, b in zip(base[4], other[4]))
    else:
        assert other[0] == pytest.approx(base[0], rel=1e-6, abs=0)
        for step, (a, b) in enumerate(zip(base[4], other[4])):
            assert float((a - b).norm() / a.norm()) <= (1e-6 if step == 0 else 1e-5), step
    assert base[1].keys() == other[1].keys()
    for k in base[1]:
        if exact:
            assert torch.equal(base[1][k], other[1][k]), k
        else:
            assert float((base[1][k] - other[1][k]).abs().max()) <= 0.01 * LR, k


VARIANTS = {
    "full-uniform-1": (["--recompute-granularity", "full"], dict(granularity="full")),
    "full-uniform-2": (["--recompute-granularity", "full", "--recompute-num-layers", "2"],
                       dict(granularity="full", n=2)),
    "full-block-3": (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "3"],
                     dict(granularity="full", method="block", n=3)),
    "selective": (["--recompute-granularity", "selective"], dict(granularity="selective")),
    "selective-all": (["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "layernorm", "mlp"],
                      dict(granularity="selective", modules=("core_attn", "layernorm", "mlp"))),
}


@pytest.fixture(scope="module")
def reference(single_process):
    """The run without recompute, per norm type."""
    cache = {}

    def get(norm):
        if norm not in cache:
            cache[norm] = run(NORM_FLAGS[norm])
        return cache[norm]

    return get


@pytest.mark.stack
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_recompute_gives_the_run_without_it(reference, variant):
    """Mix-LN (post blocks, whose input norms are identities, then pre blocks), ProRes mid-warmup,
    GPAS, dropout: every recompute setting gives the losses and weights of the run without it."""
    flags, meaning = VARIANTS[variant]
    base = reference("mix")
    got = run(NORM_FLAGS["mix"] + flags)
    assert_same_run(base, got, exact="layernorm" not in flags)
    assert base[2] == {k: STEPS * MICRO * v for k, v in expected_calls(4, 4, identity=base[3]).items()}
    assert got[2] == {k: STEPS * MICRO * v for k, v in expected_calls(4, 4, identity=got[3], **meaning).items()}


@pytest.mark.parametrize("norm", ["pre", "post", "sandwich", "deepnorm", "lns"])
def test_recompute_with_every_norm_type(reference, norm):
    """The other norm types (Sandwich-LN's branch norms, LNS's scaled pre-norms, DeepNorm's scaled
    shortcut), with the norms recomputed selectively and then whole blocks."""
    base = reference(norm)
    selective = VARIANTS["selective-all"]
    if norm in ("post", "deepnorm"):  # no norms on the sublayer inputs: layernorm is refused (below)
        selective = (["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"],
                     dict(granularity="selective", modules=("core_attn", "mlp")))
    for flags, meaning in (selective, VARIANTS["full-block-3"]):
        got = run(NORM_FLAGS[norm] + flags)
        assert_same_run(base, got, exact="layernorm" not in flags)
        assert got[2] == {k: STEPS * MICRO * v for k, v in expected_calls(4, 4, identity=got[3], **meaning).items()}


def test_recompute_saves_less_for_backward(single_process):
    """What recompute is for: autograd keeps less while the forward runs. Counted with saved-tensor
    hooks over one microbatch's forward (unique storages, parameters excluded): full recompute
    keeps the blocks' inputs only, selective drops the recomputed parts."""
    from benchmarks.recompute import saved_in_forward

    kept = {}
    for name, flags in (("none", []), ("selective-all", VARIANTS["selective-all"][0]),
                        ("full", VARIANTS["full-uniform-1"][0])):
        t = trainer(["--seq-length", "64", "--gpas"] + flags)
        try:
            kept[name] = saved_in_forward(t)
        finally:
            t.close(0)
    assert kept["full"] < kept["selective-all"] < kept["none"], kept
    # full: a 4-block model keeps 4 block inputs (+ embedding/output-side tensors) instead of
    # every block's activations
    assert kept["full"] < 0.5 * kept["none"], kept


@pytest.mark.parametrize("flags, message", [
    (["--recompute-method", "block"], "--recompute-method is for --recompute-granularity full"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"],
     "--recompute-num-layers is for --recompute-granularity full"),
    (["--recompute-granularity", "full", "--recompute-modules", "mlp"],
     "--recompute-modules is for --recompute-granularity selective"),
    (["--recompute-granularity", "selective", "--recompute-modules", "layernorm", "mlp", "--norm-type", "post"],
     "--recompute-modules layernorm recomputes the norms on the sublayer inputs, which --norm-type post blocks"),
    (["--recompute-granularity", "selective", "--recompute-modules", "layernorm", "--norm-type", "deepnorm"],
     "--recompute-modules layernorm recomputes the norms on the sublayer inputs, which --norm-type deepnorm"),
    (["--recompute-granularity", "full", "--recompute-num-layers", "3"],
     "--recompute-num-layers 3 must divide 4, the layers of each pipeline stage"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "5"],
     "--recompute-num-layers 5 must be at most 4, the layers of each pipeline stage"),
    (["--recompute-granularity", "full", "--recompute-num-layers", "0"],
     "--recompute-num-layers 0 is not valid; it must be a positive integer"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2",
      "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
     "--recompute-num-layers 2 must be at most 1, the layers of each virtual pipeline stage"),
])
def test_bad_recompute_flags_are_refused_in_one_line(flags, message):
    from megatron_prores.arguments import build_parser, check_args, model_config

    args = build_parser().parse_args(BASE + flags)
    with pytest.raises(ConfigError) as e:
        check_args(args)
        model_config(args, 128).validate()
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_a_run_resumes_with_recompute_turned_on(tmp_path, single_process):
    """The usual way out of an out-of-memory error: resume the run's checkpoint with recompute on.
    Recompute is not part of what a checkpoint pins; stopped at 2 without it and resumed to 4 with
    full recompute, the losses and weights are the uninterrupted run's, bitwise."""
    from tests.test_train import checkpoint_model, train_in_process, train_state

    flags = ["--norm-type", "pre", "--gpas", "--train-iters", "4"]

    def train(extra):
        train_in_process(trainer, flags + extra)

    train(["--save", tmp_path / "full"])
    train(["--save", tmp_path / "part", "--exit-interval", "2"])
    train(["--save", tmp_path / "part", "--load", tmp_path / "part", "--recompute-granularity", "full"])
    a, b = train_state(tmp_path / "full")[1]["train_state"], train_state(tmp_path / "part")[1]["train_state"]
    assert len(a["losses"]) == 4 and a["losses"] == b["losses"]
    wa, wb = checkpoint_model(tmp_path / "full", 4), checkpoint_model(tmp_path / "part", 4)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

"""GPU checks (skipped without CUDA). CPU counterparts: test_reference_equivalence (local spec vs
float64 reference), test_layer (fp32 schedule buffer under a bf16 cast), test_parallel_layouts."""

import importlib.util

import pytest
import torch

from megatron_prores.config import MethodConfig, ModelConfig

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_te = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
    reason="needs a CUDA GPU with Transformer Engine installed (pip install .[te])",
)

NORMS = ["pre", "post", "sandwich", "deepnorm", "lns", "mix"]


# The driver command lines of the GPU tests below. test_driver_input_checks parses each of them on
# CPU (without the checks that need a GPU here), so a GPU session is not lost to a flag error.
RECOMPUTE_RUN = ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
                 "--num-query-groups", "2", "--seq-length", "64", "--micro-batch-size", "2",
                 "--global-batch-size", "4", "--mock-data", "--vocab-size", "256", "--bf16",
                 "--prores-schedule", "linear", "--prores-warmup-steps", "10", "--gpas",
                 "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--lr", "3e-3",
                 "--train-iters", "4", "--eval-iters", "0",
                 # flash: the same forward kernel with and without grad (cuDNN builds another graph
                 # without softmax stats under no_grad, as full and core_attn recompute run it)
                 "--attention-backend", "flash"]
RECOMPUTE_FLAGS = [["--recompute-granularity", "full"],
                   ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "layernorm", "mlp"]]
HOST_SYNC_RUN = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                 "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
                 "--mock-data", "--vocab-size", "256", "--bf16", "--lr", "1e-3", "--prores-schedule", "linear",
                 "--prores-warmup-steps", "10", "--gpas", "--train-iters", "2", "--eval-iters", "0"]
PROFILE_RUN = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
               "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--mock-data",
               "--vocab-size", "128", "--eval-iters", "0", "--bf16", "--train-iters", "4", "--gpas",
               "--prores-schedule", "linear", "--prores-warmup-steps", "10",
               "--profile", "--profile-step-start", "1", "--profile-step-end", "3"]
GPU_DRIVER_RUNS = ([RECOMPUTE_RUN + extra for extra in [[]] + RECOMPUTE_FLAGS] + [HOST_SYNC_RUN]
                   + [PROFILE_RUN + ["--use-pytorch-profiler", "--tensorboard-dir", "tb"], PROFILE_RUN])


def config(norm, impl, dtype=torch.float32):
    method = MethodConfig(norm_type=norm, prores_schedule="linear", prores_warmup_steps=100,
                          gpas=norm != "post")
    return ModelConfig(num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=256,
                       vocab_size=256, seq_length=64, transformer_impl=impl, params_dtype=dtype,
                       method=method)


def forward(chunks, step=37):
    from megatron_prores.layer import set_prores_step

    set_prores_step(chunks, step)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 64), generator=g).cuda()
    pos = torch.arange(64, device="cuda")[None].expand(2, 64)
    return chunks[0](tokens, pos, None)


@needs_te
@pytest.mark.parametrize("norm", NORMS)
def test_te_spec_equals_local_spec(single_process, tmp_path, norm):
    """Same weights (through a checkpoint: fused-norm keys map onto the local norms) -> same logits."""
    from megatron_prores.checkpointing import load_model, save_model
    from megatron_prores.model import build_model
    from megatron_prores.parallel import seed_everything

    seed_everything(1)
    local = [c.cuda() for c in build_model(config(norm, "local"))]
    with torch.no_grad():
        for n, p in local[0].named_parameters():
            if "gpas_gate" in n:
                p.fill_(0.4)
    save_model(local, str(tmp_path / "w"))
    te = [c.cuda() for c in build_model(config(norm, "transformer_engine"))]
    load_model(te, str(tmp_path / "w"))
    a, b = forward(local), forward(te)
    torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3)


@needs_cuda
def test_bf16_training_step_keeps_fp32_schedule_buffer(single_process):
    from megatron.core.transformer.module import Float16Module

    from megatron_prores.layer import prores_layers
    from megatron_prores.model import build_model

    cfg = config("pre", "local").replace(bf16=True)
    [model] = build_model(cfg)
    model = Float16Module(model.config, model.cuda())
    assert all(l.prores_scale.dtype == torch.float32 and l.prores_scale.is_cuda
               for l in prores_layers(model))
    assert all(l.gpas_gate.dtype == torch.float32 for l in prores_layers(model))
    logits = forward([model])
    logits.float().mean().backward()
    assert all(l.gpas_gate.grad is not None and l.gpas_gate.grad.dtype == torch.float32
               for l in prores_layers(model))


@needs_cuda
@pytest.mark.parametrize("style", ["pre", "post"])
def test_compiled_residual_op_on_gpu_matches_float64_formula(style):
    """Triton-compiled residual op in bf16 (CPU counterpart: test_fused_residual, inductor C++)."""
    import torch.nn.functional as F

    from megatron_prores.fused_residual import residual_op

    gen = torch.Generator(device="cuda").manual_seed(0)
    r, f = (torch.randn(256, 2, 512, device="cuda", generator=gen).bfloat16().requires_grad_() for _ in range(2))
    gate = torch.tensor([0.4], device="cuda", requires_grad=True)
    a = torch.tensor(0.3, device="cuda")
    y = residual_op(r, f, prores=a, gate=gate, post=style == "post", shortcut=1.5 if style == "post" else None,
                    recompute=True, compiled=True)
    dy = torch.randn(y.shape, device="cuda", generator=gen).bfloat16()
    got = torch.autograd.grad(y, (r, f, gate), dy)
    r64, f64, g64 = (t.detach().double().requires_grad_() for t in (r, f, gate))
    if style == "post":
        y64 = 1.5 * (r64 - F.silu(g64) * r64.detach()) + a.double() * f64
    else:
        z = r64 + a.double() * f64
        y64 = z - F.silu(g64) * z.detach()
    want = torch.autograd.grad(y64, (r64, f64, g64), dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-2, atol=1e-2)
    for x, w in zip(got, want):
        torch.testing.assert_close(x.double(), w, rtol=1e-2, atol=1e-2)


@needs_cuda
def test_compiled_rope_on_gpu_matches_float64_rotation():
    """The Triton-compiled RoPE (fused_rope) in bf16 at the 1.3B layout's head shape, 16 query
    groups: within half a bf16 ulp of the float64 rotation and no worse than megatron-core's eager
    RoPE; its gradient in fp32 against autograd through the float64 rotation; and a model built on
    the GPU turns megatron-core's apply_rope_fusion on with it (CPU counterpart: test_fused_rope)."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_prores.fused_rope import fused_apply_rotary_pos_emb, rope
    from tests.test_fused_rope import angles, rotation64

    gen = torch.Generator(device="cuda").manual_seed(0)
    freqs = angles(64, positions=2048).cuda()
    qkv = torch.randn(2048, 2, 16, 4 * 64, device="cuda", generator=gen).bfloat16()  # 2 queries, k, v per group
    t = qkv[..., 2 * 64:3 * 64]  # the keys: a strided view, as megatron-core hands them over
    ref = rotation64(t, freqs)
    y = rope(t, freqs)
    assert ((y.double() - ref).abs() <= ref.abs() * 2.0 ** -8 + 1e-6).all()
    eager = rope_utils._apply_rotary_pos_emb_bshd(t, freqs)
    assert (y.double() - ref).abs().max() <= (eager.double() - ref).abs().max()
    t32 = t.float().requires_grad_()
    dy = torch.randn(t.shape, device="cuda", generator=gen)
    rope(t32, freqs).backward(dy)
    t64 = t.double().requires_grad_()
    (want,) = torch.autograd.grad((rotation64(t64, freqs) * dy.double()).sum(), t64)
    torch.testing.assert_close(t32.grad.double(), want, rtol=0, atol=1e-5)
    tb = t.detach().requires_grad_()  # bf16 backward: within bf16 rounding of the float64 gradient
    rope(tb, freqs).backward(dy.bfloat16())
    torch.testing.assert_close(tb.grad.double(), want, rtol=2.0 ** -7, atol=2e-2)
    assert config("pre", "local").transformer_config().apply_rope_fusion
    if importlib.util.find_spec("transformer_engine") is None:
        assert rope_utils.fused_apply_rotary_pos_emb is fused_apply_rotary_pos_emb


@needs_cuda
def test_compiled_residual_op_on_gpu_keeps_only_its_output():
    """Compiled with Triton, the op with GPAS recompute keeps the bf16 output alone (CPU
    counterpart: test_recompute_keeps_no_activation_beyond_the_output)."""
    from megatron_prores.fused_residual import residual_op

    gen = torch.Generator(device="cuda").manual_seed(1)
    r, f = (torch.randn(256, 2, 512, device="cuda", generator=gen).bfloat16().requires_grad_() for _ in range(2))
    gate = torch.tensor([0.4], device="cuda", requires_grad=True)
    a = torch.tensor(0.3, device="cuda")
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = residual_op(r, f, prores=a, gate=gate, recompute=True, compiled=True)
    act = r.numel() * r.element_size()
    assert {p: n for p, n in kept.items() if n >= act} == {y.untyped_storage().data_ptr(): act}


@needs_cuda
@pytest.mark.parametrize("backend", ["auto", "flash"])
def test_sdpa_flash_equals_dot_product_attention_bf16(single_process, backend):
    """CPU counterpart: test_attention (fp64/fp32/bf16 on the CPU kernels)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_prores.attention import sdpa_attention

    cfg = ModelConfig(num_layers=2, hidden_size=1024, num_attention_heads=16, num_query_groups=4,
                      seq_length=512, bf16=True).transformer_config()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(512, 2, 16, 64, device="cuda", generator=gen).bfloat16().requires_grad_()
    k, v = (torch.randn(512, 2, 4, 64, device="cuda", generator=gen).bfloat16().requires_grad_() for _ in range(2))
    outs = []
    for module in (sdpa_attention(backend)(cfg, 1, AttnMaskType.causal, "self"),
                   DotProductAttention(cfg, 1, AttnMaskType.causal, "self")):
        y = module(q, k, v, None)
        outs.append((y, *torch.autograd.grad(y, (q, k, v), torch.ones_like(y))))
    for a, b in zip(*outs):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@needs_cuda
@pytest.mark.parametrize("backend", ["auto", "flash"])
def test_context_parallel_chunk_attention_bf16_matches_float64(single_process, backend):
    """The kernel call of a context-parallel query chunk on the GPU: grouped K/V (16 heads, 4
    groups) with a bottom-right causal bias, which runs on the flash kernel without a mask tensor.
    CPU counterpart: test_attention's multi-process context-parallel test (the whole CP path,
    float64)."""
    from megatron.core.transformer.enums import AttnMaskType
    from torch.nn.attention.bias import causal_lower_right

    from megatron_prores.attention import sdpa_attention

    cfg = ModelConfig(num_layers=2, hidden_size=1024, num_attention_heads=16, num_query_groups=4,
                      seq_length=512, bf16=True).transformer_config()
    module = sdpa_attention(backend)(cfg, 1, AttnMaskType.causal, "self")
    gen = torch.Generator(device="cuda").manual_seed(0)
    L, end = 128, 384  # the third of four chunks: its queries see keys 0..383, the last 128 causally
    q = torch.randn(2, 16, L, 64, device="cuda", generator=gen).bfloat16().requires_grad_()
    k, v = (torch.randn(2, 4, end, 64, device="cuda", generator=gen).bfloat16().requires_grad_() for _ in range(2))
    y = module._attend(q, k, v, causal_lower_right(L, end), False)
    got = (y, *torch.autograd.grad(y, (q, k, v), torch.ones_like(y)))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kr, vr = (t.repeat_interleave(4, dim=1) for t in (k64, v64))
    allowed = torch.ones(L, end, dtype=torch.bool, device="cuda").tril(end - L)  # query i: keys <= end-L+i
    scores = (q64 @ kr.transpose(-1, -2)) / 8.0
    y64 = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vr
    want = (y64, *torch.autograd.grad(y64, (q64, k64, v64), torch.ones_like(y64)))
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want):
        torch.testing.assert_close(a.double(), b, rtol=3e-2, atol=3e-2, msg=name)


@needs_cuda
def test_checkpoint_rng_state_includes_the_cuda_rng_tracker(single_process, tmp_path):
    """The per-rank RNG file restores megatron's CUDA RNG tracker (attention dropout's stream
    without sequence parallelism): the draws after a restore repeat those after the save. CPU
    counterpart: the bitwise resume tests of test_train (the CPU tracker forks nothing)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_prores.checkpoint_check import safe_torch_load
    from megatron_prores.checkpointing import _rng_state, _set_rng_state

    torch.save(_rng_state(), tmp_path / "rng.pt")
    with get_cuda_rng_tracker().fork():
        a = torch.rand(64, device="cuda")
    b0 = torch.rand(64, device="cuda")
    _set_rng_state(safe_torch_load(str(tmp_path / "rng.pt"), "RNG state"))
    with get_cuda_rng_tracker().fork():
        b = torch.rand(64, device="cuda")
    assert torch.equal(a, b) and not torch.equal(a, b0)


@needs_cuda
@pytest.mark.parametrize("recompute", RECOMPUTE_FLAGS, ids=["full", "selective-all"])
def test_recompute_on_gpu_gives_the_run_without_it(single_process, recompute):
    """bf16, the compiled residual op, SDPA, dropout (CUDA generator and megatron's tracker, which
    the recompute restores), ProRes mid-warmup + GPAS: through the driver's step, the first loss is
    bitwise the run's without recompute, and the losses of 3 steps agree within bf16 rounding.
    CPU counterpart: tests/test_recompute.py (bitwise in fp32, forward-call counts)."""
    from megatron_prores.arguments import parse_args
    from megatron_prores.trainer import Trainer

    def losses(extra):
        t = Trainer(parse_args(RECOMPUTE_RUN + extra))
        try:
            return [t.train_step(step).loss for step in range(1, 4)]
        finally:
            t.close(0)

    base, got = losses([]), losses(recompute)
    print("losses without / with recompute:", base, got)
    assert got[0] == base[0]
    assert got == pytest.approx(base, rel=2e-2, abs=0)


@needs_te
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
@pytest.mark.parametrize("norm", NORMS)
def test_te_fp8_trains_with_every_norm_type(single_process, norm, recipe):
    """FP8 GEMMs through TE; ProRes/GPAS stay outside them (residual op in bf16/fp32): finite loss
    and gate gradients, logits close to the same model without FP8."""
    from megatron.core.transformer.module import Float16Module

    from megatron_prores.layer import prores_layers
    from megatron_prores.model import build_model
    from megatron_prores.parallel import seed_everything

    outs = []
    for fp8 in (None, "hybrid"):
        seed_everything(5)
        cfg = config(norm, "transformer_engine").replace(bf16=True, fp8_format=fp8, fp8_recipe=recipe)
        [model] = build_model(cfg)
        model = Float16Module(model.config, model.cuda())
        logits = forward([model])
        logits.float().mean().backward()
        assert torch.isfinite(logits).all()
        gates = [l.gpas_gate for l in prores_layers(model) if l.gpas_gate is not None]
        assert all(g.grad is not None and torch.isfinite(g.grad).all() for g in gates)
        outs.append(logits.float())
    rel = (outs[1] - outs[0]).norm() / outs[0].norm()
    assert rel < 0.1, f"FP8 logits differ from bf16 by {rel:.3f}"


@needs_cuda
@pytest.mark.parametrize("plant", [None, "moment"])
def test_state_is_finite_with_cuda_moments_and_cpu_step_counts(single_process, plant):
    """The save-time finite check on the layout of a GPU run: weights and Adam moments on the GPU,
    Adam's step counts on the CPU (the first GPU run's save crashed on this mix)."""
    from megatron_prores.trainer import state_is_finite

    model = torch.nn.Linear(4, 3).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 4, device="cuda")).sum().backward()
    opt.step()
    devices = {v.device.type for st in opt.state.values() for v in st.values()}
    assert devices == {"cpu", "cuda"}
    if plant:
        next(iter(opt.state.values()))["exp_avg"][0] = float("nan")

    class Wrapped:
        optimizer = opt

    assert state_is_finite([model], Wrapped()) is (plant is None)


@needs_cuda
def test_forward_step_has_no_host_sync(single_process, tmp_path):
    """The driver's forward_step (batch to the GPU, forward, loss function) never waits for the GPU:
    torch's sync debug mode raises on any synchronizing call (CPU counterpart: the driver tests,
    which run the same forward_step and check its losses)."""
    from megatron_prores.arguments import parse_args
    from megatron_prores.trainer import Trainer

    trainer = Trainer(parse_args(HOST_SYNC_RUN))
    try:
        trainer.train_step(0)  # compile and allocate first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, loss_func = trainer.forward_step(trainer.train_iter, trainer.model[0])
            loss, _ = loss_func(out)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(loss).item()
    finally:
        trainer.close()


@needs_cuda
def test_profile_on_gpu_records_kernels_and_marks_nsight_window(single_process, tmp_path, capsys):
    """CPU counterpart: test_profile_and_gc (the window, the resumed window, the table)."""
    import gzip
    import json

    from megatron_prores.arguments import parse_args
    from megatron_prores.trainer import Trainer

    for extra in (["--use-pytorch-profiler", "--tensorboard-dir", str(tmp_path / "tb")], []):  # torch / Nsight
        t = Trainer(parse_args(PROFILE_RUN + extra))
        try:
            assert t.train() == 0
        finally:
            t.close(0)
    with gzip.open(tmp_path / "torch_profile" / "rank-0.json.gz") as f:
        events = json.load(f)["traceEvents"]
    # the host-side ranges (Kineto mirrors each on the GPU stream as a gpu_user_annotation)
    assert sorted(e["name"] for e in events if e.get("cat") == "user_annotation"
                  and e.get("name", "").startswith("training step")) == [
        "training step 1", "training step 2"]
    assert sum(1 for e in events if e.get("cat") == "kernel") > 50  # CUDA kernels, not only host ops
    out = capsys.readouterr().out
    assert "operators with the most device self time" in out

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
    logits = forward([model])
    logits.float().mean().backward()
    assert all(l.gpas_gate.grad is not None for l in prores_layers(model))

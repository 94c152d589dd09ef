"""The CPU runtime redirects exactly what megatron-core asks of CUDA."""

import pytest
import torch

pytestmark = pytest.mark.stack  # CI's Python 3.12 / megatron-core 0.19 leg too


def test_cuda_requests_land_on_cpu(single_process):
    from megatron_prores import cpu_runtime

    assert cpu_runtime.is_enabled()
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2, device=torch.device("cuda", 0)).device.type == "cpu"
    x = torch.ones(2)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert x.to(torch.device("cuda")).device.type == "cpu"
    assert x.type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert x.type(torch.float64).dtype == torch.float64  # the converting form is untouched
    torch.cuda.synchronize()  # no-op


def test_backward_runs_under_the_redirect(single_process):
    class AllocatesOnCuda(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            out = torch.empty(g.shape, device=torch.cuda.current_device())
            return out.copy_(g) * 2

    x = torch.ones(3, requires_grad=True)
    AllocatesOnCuda.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))
    y = torch.ones(2, requires_grad=True)
    torch.autograd.backward([AllocatesOnCuda.apply(y).sum()], inputs=[y])
    assert torch.equal(y.grad, torch.full((2,), 2.0))


def test_megatron_rng_tracker_fork_is_a_noop(single_process):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.manual_seed(0)
    with get_cuda_rng_tracker().fork():
        a = torch.rand(2)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(2), a)

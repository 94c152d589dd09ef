"""Run megatron-core on CPU with gloo.

megatron-core has no supported CPU path: it hard-codes CUDA devices, CUDA RNG states and
CUDA tensor type names in a handful of places. This module redirects exactly those, and
nothing else, so that the real megatron-core code (tensor/pipeline parallel layers, the
pipeline schedules, the optimizer, dist_checkpointing) runs unchanged on CPU.

Everything here is a no-op on a machine with CUDA: ``enable()`` is only ever called when
``torch.cuda.is_available()`` is False.

Limits (CPU only, by design): the function mode is per thread, so code that asks for CUDA from a
thread of its own (data-loader threads) is not redirected: the CPU path loads data in the main
thread. (--async-save works: its writer is a process forked from the main thread, which keeps
the mode, and it writes CPU tensors only.) The ``torch.cuda`` replacements stay for
the life of the process. Megatron's RNG tracker forks nothing here, so dropout masks are drawn from
the one CPU generator (identical across tensor-parallel ranks).

The redirects:
1. a ``TorchFunctionMode`` that rewrites a CUDA ``device=`` argument (string, ``torch.device``
   or bare integer index) to the CPU, drops ``pin_memory=True`` (no pinned memory without CUDA),
   and makes ``Tensor.cuda()``/``.to("cuda")`` stay on CPU;
2. ``Tensor.type()`` without arguments names the CUDA type (``torch.cuda.FloatTensor``), which
   megatron's optimizer and grad clipping assert on;
3. ``torch.cuda.current_device``/``synchronize``/``set_device``/``empty_cache``/``current_stream``
   and RNG-state helpers become CPU equivalents (megatron-core 0.19's DDP asks for the current
   stream at every gradient sync; on CPU there is one stream and nothing to wait for);
4. megatron's CUDA RNG tracker is replaced by its inference tracker, whose ``fork()`` is a
   no-op (dropout then draws from the CPU generator);
5. subnormal floats are flushed to zero, as GPUs do (they are very slow on CPUs).
"""

from __future__ import annotations

import importlib
import os

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_enabled = False
_mode: "_CudaToCpuMode | None" = None


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # A bare integer device index means a CUDA device in torch.
    return isinstance(dev, int) and not isinstance(dev, bool)


def _cpu_type_name(tensor: torch.Tensor) -> str:
    name = torch.Tensor.type(tensor)
    if name.startswith("torch.") and not name.startswith("torch.cuda."):
        name = "torch.cuda." + name[len("torch."):]
    return name


def _run_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None):
    """torch.autograd.backward with the redirect active while the engine runs.

    torch switches a mode off while its handler runs, and torch.autograd.backward dispatches to
    the mode; but backward runs megatron's autograd Functions, whose TP/SP backward allocates on
    "cuda". So the handler runs the engine itself, under a fresh mode (same steps as
    torch.autograd.backward after its dispatch check).
    """
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    if inputs is None:
        inputs = ()
    elif isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    else:
        inputs = tuple(inputs)
    grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grad_tensors, len(tensors)),
                        is_grads_batched=False)
    with _CudaToCpuMode():
        _engine_run_backward(tensors, grads, create_graph if retain_graph is None else retain_graph,
                             create_graph, inputs, allow_unreachable=True, accumulate_grad=True)


class _HostStream:
    """The one CPU "stream": work is done in order, so every wait or record is already satisfied."""

    def wait_event(self, event=None):
        return None

    def wait_stream(self, stream=None):
        return None

    def record_event(self, event=None):
        return None

    def synchronize(self):
        return None


_HOST_STREAM = _HostStream()


class _CudaToCpuMode(TorchFunctionMode):
    """Maps every request for a CUDA device to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs) if kwargs else {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):  # staging for a CUDA copy (rotary positions under CP)
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _cpu_type_name(args[0])
        if func is torch.autograd.backward:
            return _run_backward(*args, **kwargs)
        if func is torch.Tensor.backward:  # (self, gradient, retain_graph, create_graph, inputs)
            if "gradient" in kwargs:
                kwargs["grad_tensors"] = kwargs.pop("gradient")
            return _run_backward(*args, **kwargs)
        return func(*args, **kwargs)


def is_enabled() -> bool:
    return _enabled


def enable() -> None:
    """Install the CPU redirects (idempotent). Call before building any megatron module."""
    global _enabled, _mode
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_runtime.enable() called on a machine with CUDA; use the GPU path")
    # torch._dynamo indexes torch.cuda's functions once, by identity: import it first, and give
    # every replacement its own function object.
    importlib.import_module("torch._dynamo")

    def current_device():
        return 0

    def synchronize(device=None):
        return None

    def set_device(device):
        return None

    def empty_cache():
        return None

    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    def manual_seed(seed):
        return None

    def manual_seed_all(seed):
        return None

    def current_stream(device=None):
        return _HOST_STREAM

    for fn in (current_device, synchronize, set_device, empty_cache, get_rng_state,
               set_rng_state, manual_seed, manual_seed_all, current_stream):
        setattr(torch.cuda, fn.__name__, fn)
    torch.cuda.random.get_rng_state = get_rng_state

    from megatron.core.tensor_parallel import random as mrandom

    def set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    # Activation recompute saves and restores "the CUDA RNG state" around each recomputed chunk
    # (megatron's own copy of torch.cuda.set_rng_state); here that is the one CPU generator.
    mrandom._set_cuda_rng_state = set_cuda_rng_state

    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    # megatron's seeding helper re-creates the tracker; keep it the CPU-safe one.
    orig_init = mrandom.initialize_rng_tracker

    def _cpu_tracker(*args, **kwargs):
        kwargs["inference_rng_tracker"] = True
        kwargs.pop("use_te_rng_tracker", None)
        kwargs.pop("use_cudagraphable_rng", None)
        return orig_init(**kwargs)

    mrandom.initialize_rng_tracker = _cpu_tracker

    # Subnormal floats are 10-100x slower on x86 CPUs, and ProRes makes them common: a block
    # whose value a is still near 0 feeds tiny branches and gradients. GPUs flush them anyway.
    torch.set_flush_denormal(True)

    _mode = _CudaToCpuMode()
    _mode.__enter__()
    _enabled = True
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def disable() -> None:
    """Leave the TorchFunctionMode (the module-level patches stay; they are harmless on CPU)."""
    global _enabled, _mode
    if _mode is not None:
        _mode.__exit__(None, None, None)
        _mode = None
    _enabled = False

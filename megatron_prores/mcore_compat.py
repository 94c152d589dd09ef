"""Every difference between the supported megatron-core releases (0.16.1 to 0.19.x), in one place.

The rest of the project calls these helpers instead of testing versions itself. What differs:
- ``dist_checkpointing.save`` gained ``async_strategy`` (0.19), defaulting to NVIDIA's resiliency
  extension ("nvrx"); this project always uses megatron-core's own background writer ("mcore"),
  the one whose result queue ``checkpointing`` makes signal-proof and that the tests exercise.
- 0.19 checkpoints keep the common (non-sharded) state outside ``common.pt``: read it through
  ``dist_checkpointing.load_common_state_dict``, which both releases provide.
- 0.19's DDP asks for ``torch.cuda.current_stream()`` at every gradient sync: the CPU runtime
  (``cpu_runtime``) answers it; nothing to do on GPUs.
- 0.19 builds a layer's MLP through ``MLP.as_mlp_submodule``; a ``ModuleSpec(MLP)`` still works
  there but is rewrapped with a warning per layer (48 lines for a 48-layer model): ``mlp_spec``
  gives each release the form it expects.
- Loading an optimizer state pairs the checkpoint's parameter groups with the current ones by a
  tuple of group settings, which in 0.19 also holds the LR bounds ``max_lr``/``min_lr`` (0.16's
  does not): a resume with another --lr under
  --override-opt-param-scheduler (or --use-checkpoint-opt-param-scheduler) found no group and
  failed with a traceback. ``match_groups_without_lr_bounds`` leaves the bounds out of that tuple;
  the driver sets them itself after a load (the flags' or the checkpoint's). This project gives every
  group the same bounds, so leaving them out never pairs two different groups.
And defects that every supported release has:
- torch 2.15 added a ``strides`` field to DCP's ``TensorProperties``; megatron-core builds a meta
  copy of every saved tensor with ``torch.empty(size, **properties.__dict__)``, which then fails
  (``unexpected keyword argument 'strides'``): no checkpoint loads, whichever torch wrote it.
  ``tolerate_tensor_strides`` hands megatron-core the metadata without that field.
- ``tensor_parallel.CheckpointWithoutOutput(fp8=False)`` sets ``fp8 = fp8 is not None``, i.e. True,
  and its forward then calls Transformer Engine's FP8 state manager: selective recompute of the
  norms (``--recompute-modules layernorm``) dies with a NameError where TE is not installed.
  ``allow_norm_recompute_without_te`` makes that flag False there (without TE there is no FP8).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect

from megatron.core import dist_checkpointing


def async_save_kwargs() -> dict:
    """Keyword arguments that make ``dist_checkpointing.save`` use megatron-core's own async writer."""
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        return {"async_strategy": "mcore"}
    return {}


def load_common_state(directory: str) -> dict:
    """The common (non-sharded) state of a dist_checkpointing checkpoint, any supported release."""
    return dist_checkpointing.load_common_state_dict(directory)


def mlp_spec(submodules):
    """The MLP entry of a TransformerLayer spec, in the form this megatron-core release builds."""
    import functools

    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    if hasattr(MLP, "as_mlp_submodule"):
        return functools.partial(MLP.as_mlp_submodule, submodules=submodules)
    return ModuleSpec(module=MLP, submodules=submodules)


def allow_norm_recompute_without_te() -> None:
    """Without Transformer Engine, megatron's CheckpointWithoutOutput never takes its FP8 path
    (idempotent; nothing changes where TE is installed)."""
    from megatron.core.tensor_parallel import random as mrandom

    cls = mrandom.CheckpointWithoutOutput
    if hasattr(mrandom, "FP8GlobalStateManager") or getattr(cls, "_prores_no_te", False):
        return
    init = cls.__init__

    def __init__(self, fp8=False):
        init(self, fp8)
        self.fp8 = False

    cls.__init__ = __init__
    cls._prores_no_te = True


def _without_strides(metadata):
    """A copy of DCP ``metadata`` whose tensor properties carry no ``strides`` entry (on torch
    2.15, reading the attribute then gives the dataclass default, None); ``metadata`` is unchanged."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = {}
    for key, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            props = copy.copy(item.properties)
            props.__dict__.pop("strides", None)
            item = dataclasses.replace(item, properties=props)
        entries[key] = item
    out = copy.copy(metadata)
    out.state_dict_metadata = entries
    return out


def tolerate_tensor_strides() -> None:
    """Let megatron-core read checkpoint metadata under torch >= 2.15 (idempotent). Installed
    whatever the torch (nothing to drop before 2.15), so every load takes the same path. Only the
    shapes and dtypes of that metadata are used there; torch reads the tensors themselves."""
    from megatron.core.dist_checkpointing.strategies import torch as strategies

    cls = strategies.TorchDistLoadShardedStrategy
    if getattr(cls, "_prores_strides", False):
        return
    original = cls.load_tensors_metadata

    @functools.wraps(original)
    def load_tensors_metadata(self, checkpoint_dir, metadata=None):
        if metadata is None:
            metadata = strategies._get_filesystem_reader(checkpoint_dir).read_metadata()
        return original(self, checkpoint_dir, _without_strides(metadata))

    cls.load_tensors_metadata = load_tensors_metadata
    cls._prores_strides = True


def match_groups_without_lr_bounds() -> None:
    """Pair saved and current optimizer parameter groups without their LR bounds (see the module
    docstring); idempotent."""
    import importlib

    for name in ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.distrib_optimizer"):
        module = importlib.import_module(name)
        keys = getattr(module, "param_group_identifier_keys", None)
        if keys is not None:
            module.param_group_identifier_keys = tuple(k for k in keys if k not in ("max_lr", "min_lr"))

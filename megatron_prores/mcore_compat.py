"""Every difference between the supported megatron-core releases (0.16.1 to 0.19.x), in one place.

The rest of the project calls these helpers instead of testing versions itself. What differs:
- ``dist_checkpointing.save`` gained ``async_strategy`` (0.19), defaulting to NVIDIA's resiliency
  extension ("nvrx"); this project always uses megatron-core's own background writer ("mcore"),
  the one whose result queue ``checkpointing`` makes signal-proof and that the tests exercise.
- 0.19 checkpoints keep the common (non-sharded) state outside ``common.pt``: read it through
  ``dist_checkpointing.load_common_state_dict``, which both releases provide.
- 0.19's DDP asks for ``torch.cuda.current_stream()`` at every gradient sync: the CPU runtime
  (``cpu_runtime``) answers it; nothing to do on GPUs.
"""

from __future__ import annotations

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

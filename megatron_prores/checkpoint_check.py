"""Is a checkpoint directory complete, and safe to read? Checked before any of it is loaded.

Every file of a checkpoint that this project reads is opened here first, without running code:

- ``.metadata`` (torch.distributed.checkpoint's index, a pickle that torch itself unpickles with
  no restriction) through an unpickler that admits only the checkpoint-index classes;
- ``common.pt`` and ``rng_rank*.pt`` with ``torch.load(weights_only=True)`` (plain containers,
  numbers, strings, tensors; numpy's RNG-state array for RNG files of earlier versions);
- the shard files ``*.distcp``: each must exist and be as long as the index says.

A file that fails any of these makes the checkpoint damaged (``CheckpointDamaged``, one line naming
the file). What is not checked: flipped bits inside a shard of the right length (no checksums).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from typing import Dict, List, Optional

import numpy
import torch

from megatron_prores.config import ConfigError

LATEST = "latest_checkpointed_iteration.txt"
_ITER = re.compile(r"^iter_(\d{7})$")


class CheckpointDamaged(ConfigError):
    """A checkpoint directory is incomplete or holds a file this project would not write."""


class UnsafeCheckpoint(ConfigError):
    """A checkpoint file holds objects that loading would execute: refused, never run."""


# .metadata of torch.distributed.checkpoint: these classes, torch.Size, dtypes and torch's layout
# decoder, nothing else (no functions that could be called with chosen arguments).
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if "." not in name:
            if module in _DCP_MODULES:
                obj = getattr(__import__(module, fromlist=[name]), name, None)
                if isinstance(obj, type):
                    return obj
            if module == "torch":
                obj = getattr(torch, name, None)
                if obj is torch.Size or isinstance(obj, torch.dtype):
                    return obj
            if module == "torch.serialization" and name == "_get_layout":
                return torch.serialization._get_layout
            if module == "collections" and name == "OrderedDict":
                import collections

                return collections.OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed")


def _numpy_rng_globals() -> list:
    """What numpy's RNG state (an ndarray of uint32) needs under weights-only loading."""
    allowed = [numpy.ndarray, numpy.dtype]
    core = getattr(numpy, "_core", None) or numpy.core
    allowed.append(core.multiarray._reconstruct)
    if hasattr(numpy, "dtypes"):
        allowed.append(numpy.dtypes.UInt32DType)
    return allowed


def safe_torch_load(path: str, what: str):
    """``torch.load`` that never executes code: plain data and tensors only."""
    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not found:  # not a refused object but bytes that are no pickle (e.g. "Unsupported operand")
            raise CheckpointDamaged(f"{path} ({what}) is damaged or truncated (not a torch.save file: "
                                    f"{_weights_only_reason(e)})") from None
        raise UnsafeCheckpoint(f"{path} ({what}) holds objects this project never writes"
                               f"{' (' + found.group(1) + ')' if found else ''}; refusing to load it: "
                               f"use a checkpoint from a source you trust") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointDamaged(f"{path} ({what}) is damaged or truncated ({_first_line(e)})") from None
    except Exception as e:  # garbage that parses as opcodes: a memo key or a stack entry that is not there
        raise CheckpointDamaged(f"{path} ({what}) is damaged or truncated (not a torch.save file: "
                                f"{type(e).__name__} {_first_line(e)})") from None


def read_index(directory: str):
    """The torch.distributed.checkpoint index (``.metadata``) of a checkpoint, read safely."""
    path = os.path.join(directory, ".metadata")
    if not os.path.isfile(path):
        raise CheckpointDamaged(f"{path} is missing: the checkpoint is incomplete")
    try:
        with open(path, "rb") as f:
            index = _IndexUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if "is not allowed" in str(e):
            raise UnsafeCheckpoint(f"{path} holds objects a checkpoint index never has ({e}); refusing "
                                   f"to load it: use a checkpoint from a source you trust") from None
        raise CheckpointDamaged(f"{path} is damaged or truncated ({_first_line(e)})") from None
    except (EOFError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointDamaged(f"{path} is damaged or truncated ({_first_line(e)})") from None
    except Exception as e:  # garbage that parses as opcodes: a memo key or a stack entry that is not there
        raise CheckpointDamaged(f"{path} is damaged or truncated ({type(e).__name__} {_first_line(e)})") from None
    if not hasattr(index, "storage_data") or not hasattr(index, "state_dict_metadata"):
        raise CheckpointDamaged(f"{path} is not a torch.distributed.checkpoint index")
    return index


def _weights_only_reason(e: BaseException) -> str:
    """What torch's weights-only unpickler stumbled on (its message starts with general advice)."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    reason = [l for l in lines if not l.startswith(("Weights only load failed", "Please file an issue",
                                                    "Check the documentation"))]
    return (reason[0] if reason else _first_line(e))[:160]


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return (lines[0].split(". ")[0] if lines else type(e).__name__)[:160]


def is_legacy_megatron(directory: str) -> bool:
    """A Megatron-LM 'torch' format checkpoint (mp_rank_XX/model_optim_rng.pt)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    return any(n.startswith("mp_rank_") for n in names) or "model_optim_rng.pt" in names


def legacy_error(directory: str) -> ConfigError:
    return ConfigError(f"{directory} is a Megatron-LM legacy checkpoint (mp_rank_*/model_optim_rng.pt), which "
                       f"this project does not read; re-save it in torch_dist format with Megatron-LM "
                       f"(--ckpt-convert-format torch_dist --ckpt-convert-save DIR) and use that")


def verify(directory: str, world_size: Optional[int] = None) -> None:
    """Raise CheckpointDamaged/UnsafeCheckpoint (one line naming the file) unless every file of
    checkpoint ``directory`` is present, of the indexed length and safe to read. ``world_size``:
    the number of processes that wrote it, when known (each wrote an RNG file)."""
    if is_legacy_megatron(directory):
        raise legacy_error(directory)
    if not os.path.isdir(directory):
        raise CheckpointDamaged(f"{directory} is missing")
    meta = os.path.join(directory, "metadata.json")
    try:
        with open(meta) as f:
            backend = json.load(f).get("sharded_backend")
    except FileNotFoundError:
        raise CheckpointDamaged(f"{meta} is missing: the checkpoint is incomplete") from None
    except (ValueError, AttributeError, OSError) as e:
        raise CheckpointDamaged(f"{meta} is damaged ({_first_line(e)})") from None
    if backend != "torch_dist":
        raise CheckpointDamaged(f"{meta} names the {backend!r} format; this project reads torch_dist checkpoints")
    index = read_index(directory)
    ends: Dict[str, int] = {}
    for info in index.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise CheckpointDamaged(f"{path} is missing (a shard of the checkpoint)")
        size = os.path.getsize(path)
        if size < end:
            raise CheckpointDamaged(f"{path} is truncated ({size} of at least {end} bytes)")
    common = os.path.join(directory, "common.pt")
    if os.path.exists(common):  # megatron-core < 0.19 keeps the common state there
        safe_torch_load(common, "the checkpoint's common state")
    elif not any(str(k).startswith("common_state") for k in index.state_dict_metadata):  # 0.19: in the shards
        raise CheckpointDamaged(f"{common} is missing (the checkpoint's common state)")
    rng_files = sorted(n for n in os.listdir(directory) if re.fullmatch(r"rng_rank\d{5}\.pt", n))
    for n in rng_files:
        safe_torch_load(os.path.join(directory, n), "RNG state")
    if world_size is not None:
        check_rng_files(directory, world_size)


def check_rng_files(directory: str, world_size: int) -> None:
    """One RNG file per process that saved the checkpoint (each restores its own)."""
    present = set(os.listdir(directory))
    for r in range(world_size):
        if f"rng_rank{r:05d}.pt" not in present:
            raise CheckpointDamaged(f"{os.path.join(directory, f'rng_rank{r:05d}.pt')} is missing "
                                    f"(written by each of the {world_size} processes that saved it)")


def iterations(root: str) -> List[int]:
    """Iterations of the finished checkpoint directories (``iter_XXXXXXX``, not ``.tmp``) under root."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return sorted(int(m.group(1)) for m in map(_ITER.match, names)
                  if m and os.path.isdir(os.path.join(root, m.group(0))))


def read_latest(root: str) -> Optional[int]:
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ConfigError(f"{path} holds {text[:40]!r}, not an iteration number; write the iteration to "
                          f"resume from into it, or choose one with --ckpt-step N")
    return int(text)

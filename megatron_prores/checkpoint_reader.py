"""Read a megatron-core dist checkpoint (torch_dist format) one tensor, or one layer, at a time.

megatron-core stores each ShardedTensor as a global tensor (layout-independent: the same keys and
shapes whatever TP/PP saved it), the Transformer blocks stacked on a leading layer axis, and every
rank's piece as its own chunk (one chunk per layer and tensor-parallel shard). Reading only the
chunks that overlap layer l gives layer l without loading the rest: the export streams a model
layer by layer in little more memory than one layer.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem

from megatron_prores.config import ConfigError


class _IntoTarget(LoadPlanner):
    """Copies each requested chunk into its place in one preallocated tensor."""

    def __init__(self, target: torch.Tensor, base: tuple):
        self.target, self.base = target, base

    def set_up_planner(self, *args, **kwargs):
        pass

    def create_local_plan(self):
        raise NotImplementedError

    def create_global_plan(self, plans):
        raise NotImplementedError

    def finish_plan(self, plan):
        return plan

    def load_bytes(self, read_item, value):
        raise NotImplementedError

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        t = self.target
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(dim, start - self.base[dim], length)
        return t

    def commit_tensor(self, read_item, tensor):
        pass


class CheckpointReader:
    """Tensors of one checkpoint directory (``SAVE/iter_XXXXXXX``)."""

    def __init__(self, directory: str):
        if not os.path.isfile(os.path.join(directory, ".metadata")):
            raise ConfigError(f"{directory} is not a complete checkpoint (no .metadata): it was interrupted "
                              f"while saving; pick another --iteration")
        self.directory = directory
        self.reader = FileSystemReader(directory)
        self.metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata)}

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple:
        return tuple(self._meta(key).size)

    def _meta(self, key: str) -> TensorStorageMetadata:
        if key not in self.tensors:
            raise ConfigError(f"checkpoint {self.directory} has no tensor {key!r}; it was saved by a model "
                              f"of another kind")
        return self.tensors[key]

    def read(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """The whole tensor, or index ``layer`` (0-based) of its leading (layer) axis."""
        meta = self._meta(key)
        size = tuple(meta.size)
        if layer is None:
            base, shape = (0,) * len(size), size
        else:
            base, shape = (layer,) + (0,) * (len(size) - 1), (1,) + size[1:]
        target = torch.empty(shape, dtype=meta.properties.dtype)
        items = []
        for chunk in meta.chunks:
            lo = [max(c, b) for c, b in zip(chunk.offsets, base)]
            hi = [min(c + n, b + m) for c, n, b, m in zip(chunk.offsets, chunk.sizes, base, shape)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            items.append(ReadItem(
                type=LoadItemType.TENSOR,
                dest_index=MetadataIndex(key, torch.Size(lo)),
                dest_offsets=torch.Size(lo),
                storage_index=MetadataIndex(key, chunk.offsets),
                storage_offsets=torch.Size([l - c for l, c in zip(lo, chunk.offsets)]),
                lengths=torch.Size([h - l for l, h in zip(lo, hi)]),
            ))
        covered = sum(int(torch.Size(i.lengths).numel()) for i in items)
        if covered != target.numel():
            raise ConfigError(f"checkpoint {self.directory} is incomplete: {key} has {covered} of "
                              f"{target.numel()} values{'' if layer is None else f' for layer {layer}'}")
        self.reader.read_data(LoadPlan(items), _IntoTarget(target, base)).wait()
        return target if layer is None else target[0]

"""Training data: megatron-core's GPTDataset (or its mock) and a deterministic, resumable order.

Sample k of the training run is always ``train_ds[k]``: iteration i, microbatch m, data-parallel
rank r reads samples  i*G + m*(b*D) + r*b + [0, b)  (G global batch, b micro batch, D data
parallel size). Resuming from ``consumed_samples`` therefore continues the exact same order.
"""

from __future__ import annotations

import os
from typing import Iterator, List

import numpy
import torch

from megatron_prores.arguments import parse_data_path
from megatron_prores.config import ConfigError


class _TokenizerForDataset:
    """What GPTDatasetConfig reads of a tokenizer."""

    def __init__(self, tok):
        self.vocab_size = tok.vocab_size
        self.eod = tok.eod
        self.pad = -1
        self.unique_identifiers = {"class": type(tok).__name__}


def check_prefix(prefix: str) -> None:
    """A clear error for a missing or broken .bin/.idx pair."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise ConfigError(
                f"--data-path {prefix!r}: {prefix + ext} does not exist; give the prefix written by "
                f"tools/preprocess_data.py (e.g. data/corpus_text_document)"
            )
    try:
        ds = IndexedDataset(prefix, mmap=True)
        expected = int(ds.sequence_lengths.astype(numpy.int64).sum()) * ds.index.dtype_size
        actual = os.path.getsize(prefix + ".bin")
    except Exception as e:  # corrupt .idx
        raise ConfigError(f"--data-path {prefix!r}: unreadable index ({type(e).__name__}: {e}); "
                          f"re-run tools/preprocess_data.py") from None
    if actual != expected:
        raise ConfigError(
            f"--data-path {prefix!r}: {prefix}.bin has {actual} bytes but its .idx describes "
            f"{expected} (truncated or mismatched pair); re-run tools/preprocess_data.py"
        )


def _check_splits(prefixes, split_matrix, num_samples, split) -> None:
    """A split that must yield samples needs documents (megatron-core would loop forever)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    names = ("training", "validation", "test")
    for prefix in prefixes:
        docs = len(IndexedDataset(prefix, mmap=True).document_indices) - 1
        for name, want, bounds in zip(names, num_samples, split_matrix):
            if not want:
                continue
            got = 0 if bounds is None else int(round(bounds[1] * docs)) - int(round(bounds[0] * docs))
            if got <= 0:
                raise ConfigError(
                    f"--split {split} leaves the {name} split of {prefix!r} ({docs} documents) with no "
                    f"document; give more data or that split a larger share (e.g. --split 90,10,0)"
                )


def build_datasets(args, tokenizer, num_samples: List[int]):
    """(train, valid, test) megatron-core datasets of at least ``num_samples`` samples each."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    blend = None
    if not args.mock_data:
        prefixes, weights = parse_data_path(args.data_path)
        for prefix in prefixes:
            check_prefix(prefix)
        blend = (prefixes, weights)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=_TokenizerForDataset(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    if blend is not None:
        _check_splits(blend[0], config.split_matrix, num_samples, args.split)
    cls = MockGPTDataset if args.mock_data else GPTDataset
    builder = BlendedMegatronDatasetBuilder(cls, num_samples, lambda: True, config)
    try:
        return builder.build()
    except (AssertionError, ValueError) as e:
        raise ConfigError(f"cannot build the datasets from --data-path/--split: {e}") from None


def batches(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
            dp_size: int) -> Iterator[dict]:
    """Micro batches of this data-parallel rank, from ``consumed_samples`` on, forever (wraps)."""
    n = len(dataset)
    k = consumed_samples
    while True:
        start = k + dp_rank * micro_batch_size
        samples = [dataset[(start + j) % n] for j in range(micro_batch_size)]
        yield {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
               for key in ("tokens", "labels", "loss_mask", "position_ids")}
        k += micro_batch_size * dp_size

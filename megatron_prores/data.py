"""Training data: megatron-core's GPTDataset (or its mock) and a deterministic, resumable order.

Sample k of the training run is always ``train_ds[k]``: iteration i, microbatch m, data-parallel
rank r reads samples  i*G + m*(b*D) + r*b + [0, b)  (G global batch, b micro batch, D data
parallel size). Resuming from ``consumed_samples`` therefore continues the exact same order.
"""

from __future__ import annotations

import os
from typing import Iterator, List, Optional

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


IDX_MAGIC = b"MMIDIDX\x00\x00"  # megatron-core's .idx: magic, version 1, dtype code, #sequences, #documents + 1


def check_prefix(prefix: str, flag: str = "--data-path", vocab_size: Optional[int] = None) -> None:
    """A clear error for a missing, empty or broken .bin/.idx pair, found before megatron-core opens it
    (its IndexedDataset, failing half way, adds 'Exception ignored in ... __del__' noise); with
    ``vocab_size``, also for token ids the model has no embedding for (data made with another
    tokenizer: an index error mid-run on the CPU, a device assert on a GPU)."""
    import struct

    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise ConfigError(
                f"{flag} {prefix!r}: {prefix + ext} does not exist; give the prefix written by "
                f"tools/preprocess_data.py (e.g. data/corpus_text_document)"
            )
    idx, rerun = prefix + ".idx", "re-run tools/preprocess_data.py"
    idx_size, actual = os.path.getsize(idx), os.path.getsize(prefix + ".bin")
    if idx_size == 0:
        raise ConfigError(f"{flag} {prefix!r}: {idx} is empty (0 bytes: preprocessing failed or was "
                          f"interrupted); {rerun}")
    try:
        with open(prefix + ".bin", "rb"):
            pass
        with open(idx, "rb") as f:
            head = f.read(34)
            if len(head) < 34 or head[:9] != IDX_MAGIC:
                raise ConfigError(f"{flag} {prefix!r}: {idx} is not an index written by "
                                  f"tools/preprocess_data.py (bad header); {rerun}")
            version, code, sequences, documents = struct.unpack("<QBQQ", head[9:])
            try:
                dtype_size = DType.size(DType.dtype_from_code(code))
            except Exception:
                dtype_size = None
            if version != 1 or dtype_size is None:
                raise ConfigError(f"{flag} {prefix!r}: unreadable index {idx} (version {version}, dtype code "
                                  f"{code}); {rerun}")
            needed = 34 + 12 * sequences + 8 * documents
            if idx_size < needed:
                raise ConfigError(f"{flag} {prefix!r}: {idx} is truncated ({idx_size} bytes, its header "
                                  f"describes {needed}); {rerun}")
            lengths = numpy.fromfile(f, dtype=numpy.int32, count=sequences)
    except OSError as e:
        raise ConfigError(f"{flag} {prefix!r}: cannot read {e.filename} ({e.strerror})") from None
    if sequences == 0 or documents <= 1:
        raise ConfigError(f"{flag} {prefix!r} holds no documents (an empty dataset); preprocess a corpus "
                          f"with at least one document")
    expected = int(lengths.astype(numpy.int64).sum()) * dtype_size
    if expected == 0:
        raise ConfigError(f"{flag} {prefix!r} holds no tokens (every document is empty); preprocess a "
                          f"corpus with text")
    if actual != expected:
        raise ConfigError(
            f"{flag} {prefix!r}: {prefix}.bin has {actual} bytes but its .idx describes "
            f"{expected} (truncated or mismatched pair); {rerun}"
        )
    try:  # what megatron-core itself makes of the pair
        IndexedDataset(prefix, mmap=True)
    except Exception as e:
        raise ConfigError(f"{flag} {prefix!r}: unreadable index ({type(e).__name__}: {e}); {rerun}") from None
    if vocab_size is not None:
        top = largest_token(prefix + ".bin", numpy.dtype(DType.dtype_from_code(code)))
        if top >= vocab_size:
            raise ConfigError(f"{flag} {prefix!r} holds token id {top:,} but the model's vocabulary has {vocab_size:,} "
                              f"ids: it was tokenized with another tokenizer; give the --tokenizer-model it was made "
                              f"with (or re-run tools/preprocess_data.py with this one)")


def largest_token(path: str, dtype, chunks: int = 8, chunk_bytes: int = 256 << 10) -> int:
    """The largest token id in ``chunks`` evenly spaced pieces of a .bin (all of a small file): 2 MB
    read whatever its size. A file from another tokenizer has ids above the vocabulary throughout."""
    tokens = numpy.memmap(path, dtype=dtype, mode="r")
    per = max(1, chunk_bytes // dtype.itemsize)
    if tokens.size <= chunks * per:
        return int(tokens.max())
    starts = numpy.linspace(0, tokens.size - per, chunks).astype(numpy.int64)
    return max(int(tokens[s:s + per].max()) for s in starts)


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


def build_datasets(tokenizer, num_samples: List[int], *, data_path: Optional[List[str]], split: str,
                   seq_length: int, seed: int, cache_path: Optional[str] = None, mock: bool = False,
                   eod_mask_loss: bool = False, vocab_size: Optional[int] = None):
    """(train, valid, test) megatron-core datasets of at least ``num_samples`` samples each, from
    ``data_path`` (--data-path: PREFIX or WEIGHT PREFIX ...) split by ``split`` (--split), or
    megatron-core's mock dataset with ``mock`` (--mock-data). ``eod_mask_loss`` (--eod-mask-loss):
    no loss where the input token is the end-of-document token (megatron-core's rule). ``vocab_size``:
    the model's, which every token id of the files must be below."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    blend = None
    if not mock:
        prefixes, weights = parse_data_path(data_path)
        for prefix in prefixes:
            check_prefix(prefix, vocab_size=vocab_size)
        blend = (prefixes, weights)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=cache_path,
        tokenizer=_TokenizerForDataset(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    if blend is not None:
        _check_splits(blend[0], config.split_matrix, num_samples, split)
    cls = MockGPTDataset if mock else GPTDataset
    builder = BlendedMegatronDatasetBuilder(cls, num_samples, lambda: True, config)
    try:
        return builder.build()
    except (AssertionError, ValueError) as e:
        raise ConfigError(f"cannot build the datasets from --data-path/--split: {e}") from None
    except Exception as e:  # e.g. an index for 10^11 samples: out of memory
        raise ConfigError(f"cannot build the datasets for {num_samples[0]:,} training and {num_samples[1]:,} validation "
                          f"samples (--train-iters/--eval-iters x --global-batch-size): {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None


def validation_sets(valid_data_path: Optional[List[str]]) -> List[tuple]:
    """(name, prefix) of each ``--valid-data-path`` item: NAME=PREFIX, or a PREFIX named by its file name."""
    sets = []
    for item in valid_data_path or []:
        name, sep, prefix = item.partition("=")
        if not sep:
            name, prefix = os.path.basename(item.rstrip("/")), item
        if not name or not prefix:
            raise ConfigError(f"--valid-data-path {item!r} is not valid; give PREFIX or NAME=PREFIX")
        if name in [n for n, _ in sets]:
            raise ConfigError(f"--valid-data-path names two sets {name!r}; name them apart with NAME=PREFIX "
                              f"(e.g. c4={prefix})")
        sets.append((name, prefix))
    return sets


def build_validation_set(tokenizer, prefix: str, num_samples: int, *, seq_length: int, seed: int,
                         cache_path: Optional[str] = None, eod_mask_loss: bool = False,
                         vocab_size: Optional[int] = None):
    """A held-out validation set: every document of ``prefix`` (no split), at least ``num_samples``
    samples (documents repeat in another order when the file holds fewer)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    check_prefix(prefix, "--valid-data-path", vocab_size)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend_per_split=[None, ([prefix], None), None],
        path_to_cache=cache_path, tokenizer=_TokenizerForDataset(tokenizer), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=eod_mask_loss, create_attention_mask=False, mmap_bin_files=True)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [0, num_samples, 0], lambda: True, config)
    try:
        return builder.build()[1]
    except Exception as e:
        raise ConfigError(f"cannot build the validation set from --valid-data-path {prefix!r}: {e}") from None


def order_fingerprint(dataset, head: int = 4096) -> str:
    """A digest of the order in which ``dataset`` yields its samples: for each megatron-core
    GPTDataset under it, the sizes and first ``head`` entries of its document, sample and shuffle
    indices, and a blend's first choices of dataset. megatron-core shuffles a dataset over as many
    epochs as the run's length needs (the length it was built for): a run resumed with another
    length over a dataset smaller than the run gets another order, whose digest differs."""
    import hashlib

    h = hashlib.sha256()
    parts = getattr(dataset, "datasets", None)  # a BlendedDataset (--data-path W1 P1 W2 P2 ...)
    if parts is not None:  # its choice of dataset per sample: the first ones do not depend on its length
        for name in ("dataset_index", "dataset_sample_index"):
            h.update(numpy.ascontiguousarray(getattr(dataset, name)[:head]).tobytes())
    for d in parts if parts is not None else [dataset]:
        if getattr(d, "shuffle_index", None) is None:
            d[0]  # megatron-core memory-maps the indices on the first read
        for name in ("document_index", "sample_index", "shuffle_index"):
            index = getattr(d, name)
            h.update(repr(index.shape).encode())
            h.update(numpy.ascontiguousarray(index[:head]).tobytes())
    return h.hexdigest()[:16]


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

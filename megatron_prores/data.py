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
    """What GPTDatasetConfig reads of a tokenizer. ``data``: the digest of the files read (from
    check_prefix): megatron-core keys its cache of document, sample and shuffle indices by the files'
    paths and the flags, and these identifiers are the one free part of that key, so indices cached
    for the files a re-preprocessed prefix replaced (or for other files at that path) are not read."""

    def __init__(self, tok, data: Optional[str] = None):
        self.vocab_size = tok.vocab_size
        self.eod = tok.eod
        self.pad = -1
        self.unique_identifiers = {"class": type(tok).__name__}
        if data is not None:
            self.unique_identifiers["data"] = data


IDX_MAGIC = b"MMIDIDX\x00\x00"  # megatron-core's .idx: magic, version 1, dtype code, #sequences, #documents + 1


def check_prefix(prefix: str, flag: str = "--data-path", vocab_size: Optional[int] = None) -> str:
    """A clear error for a missing, empty or broken .bin/.idx pair, found before megatron-core opens it
    (its IndexedDataset, failing half way, adds 'Exception ignored in ... __del__' noise); with
    ``vocab_size``, also for token ids the model has no embedding for (data made with another
    tokenizer: an index error mid-run on the CPU, a device assert on a GPU). Returns a digest of the
    .idx header and document lengths: all that megatron-core's GPTDataset indices are made from."""
    import hashlib
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
    return hashlib.sha256(head + lengths.tobytes()).hexdigest()[:16]


def largest_token(path: str, dtype, chunks: int = 8, chunk_bytes: int = 256 << 10) -> int:
    """The largest token id in ``chunks`` evenly spaced pieces of a .bin (all of a small file): 2 MB
    read whatever its size. A file from another tokenizer has ids above the vocabulary throughout."""
    tokens = numpy.memmap(path, dtype=dtype, mode="r")
    per = max(1, chunk_bytes // dtype.itemsize)
    if tokens.size <= chunks * per:
        return int(tokens.max())
    starts = numpy.linspace(0, tokens.size - per, chunks).astype(numpy.int64)
    return max(int(tokens[s:s + per].max()) for s in starts)


_SPLIT_NAMES = ("training", "validation", "test")


def _split_tokens(lengths, bounds) -> int:
    """The tokens of the documents megatron-core puts in the split of ``bounds`` (a row of its
    split matrix; None: no share), with its rounding."""
    if bounds is None:
        return 0
    n = float(len(lengths))
    return int(lengths[int(round(bounds[0] * n)):int(round(bounds[1] * n))].sum(dtype=numpy.int64))


def _split_matrix(split: str, num_samples) -> list:
    """megatron-core's split matrix of ``split``, without the splits the run reads no sample of: it
    builds every split with a share, each of at least one sample (the test split too, which the
    driver never reads)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                         parse_and_normalize_split)

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [bounds if want else None for bounds, want in zip(matrix, num_samples)]


def _check_splits(prefixes, split: str, num_samples) -> None:
    """Every split the run reads has tokens in every file (megatron-core loops forever over the
    epochs of one without: it adds epochs until their tokens cover the samples asked for). The fix
    named is the smallest validation share that gives every split tokens, checked the same way."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = {p: IndexedDataset(p, mmap=True) for p in prefixes}  # alive while their lengths are read
    lengths = {p: d.sequence_lengths for p, d in indexed.items()}

    def empty(matrix):
        return next(((name, p) for p in prefixes for name, bounds in zip(_SPLIT_NAMES, matrix)
                     if bounds is not None and not _split_tokens(lengths[p], bounds)), None)

    found = empty(_split_matrix(split, num_samples))
    if found is None:
        return
    name, prefix = found
    fix = next((f"{100 - s},{s},0" for s in range(1 if num_samples[1] else 0, 100)
                if empty(_split_matrix(f"{100 - s},{s},0", num_samples)) is None), None)
    docs = len(lengths[prefix])
    no_eval = ", or --eval-iters 0 to train without validation" if num_samples[1] else ""
    raise ConfigError(
        f"--split {split} leaves the {name} split of {prefix!r} ({docs} document{'s' if docs != 1 else ''}) "
        f"without a token; " + (f"give --split {fix}{no_eval}" if fix else
                                f"give more documents, or --split 100,0,0 with a held-out --valid-data-path{no_eval}"))


def _cache_error(e: BaseException, cache_path: Optional[str], prefixes) -> Optional[ConfigError]:
    """An OSError of megatron-core's index cache (raised as is, or wrapped by its builder under
    torch.distributed) as one line: a read-only data directory (the cache defaults to the folder
    PREFIX/cache), a full disk, or a cache file another node's rank 0 wrote where this rank cannot
    see it. None for other errors."""
    import errno

    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    roots = [os.path.abspath(r) for r in ([cache_path] if cache_path else prefixes)]
    if e is None or not e.filename or not any(os.path.abspath(e.filename) == r or
                                              os.path.abspath(e.filename).startswith(r + os.sep) for r in roots):
        return None
    where = os.path.dirname(e.filename) if e.filename.endswith((".npy", ".txt")) else e.filename
    shared = "a writable directory that every node sees"
    if e.errno == errno.ENOENT:
        return ConfigError(f"cannot read the index cache {e.filename} ({e.strerror}): rank 0 builds it where every "
                           f"rank reads it; give --data-cache-path DIR, {shared}")
    return ConfigError(f"cannot write the index cache under {where} ({e.strerror}); give --data-cache-path DIR, "
                       f"{shared}" + ("" if cache_path else " (by default it is PREFIX/cache, beside the data)"))


def build_datasets(tokenizer, num_samples: List[int], *, data_path: Optional[List[str]], split: str,
                   seq_length: int, seed: int, cache_path: Optional[str] = None, mock: bool = False,
                   eod_mask_loss: bool = False, vocab_size: Optional[int] = None):
    """(train, valid, test) megatron-core datasets of at least ``num_samples`` samples each, from
    ``data_path`` (--data-path: PREFIX or WEIGHT PREFIX ...) split by ``split`` (--split), or
    megatron-core's mock dataset with ``mock`` (--mock-data); None for a split of no share or of 0
    samples asked (not built). ``eod_mask_loss`` (--eod-mask-loss): no loss where the input token is
    the end-of-document token (megatron-core's rule). ``vocab_size``: the model's, which every token
    id of the files must be below."""
    import hashlib

    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    blend, digest = None, None
    if not mock:
        prefixes, weights = parse_data_path(data_path)
        digests = [check_prefix(prefix, vocab_size=vocab_size) for prefix in prefixes]
        digest = hashlib.sha256(" ".join(digests).encode()).hexdigest()[:16] if len(digests) > 1 else digests[0]
        blend = (prefixes, weights)
        _check_splits(prefixes, split, num_samples)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=cache_path,
        tokenizer=_TokenizerForDataset(tokenizer, digest),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    config.split_matrix = _split_matrix(config.split, num_samples)
    cls = MockGPTDataset if mock else GPTDataset
    builder = BlendedMegatronDatasetBuilder(cls, num_samples, lambda: True, config)
    try:
        return builder.build()
    except (AssertionError, ValueError) as e:
        raise ConfigError(f"cannot build the datasets from --data-path/--split: {e}") from None
    except Exception as e:  # e.g. an index for 10^11 samples: out of memory
        raise _cache_error(e, cache_path, blend[0] if blend else []) or ConfigError(
            f"cannot build the datasets for {num_samples[0]:,} training and {num_samples[1]:,} validation samples "
            f"(--train-iters/--eval-iters x --global-batch-size): {type(e).__name__}: "
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

    digest = check_prefix(prefix, "--valid-data-path", vocab_size)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend_per_split=[None, ([prefix], None), None],
        path_to_cache=cache_path, tokenizer=_TokenizerForDataset(tokenizer, digest), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=eod_mask_loss, create_attention_mask=False, mmap_bin_files=True)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [0, num_samples, 0], lambda: True, config)
    try:
        return builder.build()[1]
    except Exception as e:
        raise _cache_error(e, cache_path, [prefix]) or ConfigError(
            f"cannot build the validation set from --valid-data-path {prefix!r}: {e}") from None


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

"""Tokenizers, by Megatron-LM's ``--tokenizer-type`` names.

- ``SentencePieceTokenizer``: a SentencePiece model (``--tokenizer-model``); the end-of-document
  token appended between documents is the model's EOS.
- ``NullTokenizer``: no text, ids only (``--vocab-size``; the last id is EOD), for --mock-data.
"""

from __future__ import annotations

import os
from typing import List

from megatron_prores.config import ConfigError

TOKENIZER_TYPES = ("SentencePieceTokenizer", "NullTokenizer")


class SentencePieceTokenizer:
    def __init__(self, model_path: str):
        if not model_path or not os.path.isfile(model_path):
            raise ConfigError(
                f"--tokenizer-model {model_path!r} is not a file; give the .model written by "
                f"tools/train_tokenizer.py"
            )
        import sentencepiece

        self.model_path = model_path
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"--tokenizer-model {model_path!r} is not a SentencePiece model ({e})") from None
        if self.sp.eos_id() < 0:
            raise ConfigError(f"--tokenizer-model {model_path!r} has no EOS piece to end documents with")

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def eod(self) -> int:
        return self.sp.eos_id()

    def tokenize(self, text: str) -> List[int]:
        return self.sp.EncodeAsIds(text)

    def detokenize(self, ids: List[int]) -> str:
        return self.sp.DecodeIds(list(ids))


class NullTokenizer:
    def __init__(self, vocab_size: int):
        if not vocab_size or vocab_size < 2:
            raise ConfigError("--tokenizer-type NullTokenizer needs --vocab-size >= 2")
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1

    def tokenize(self, text: str) -> List[int]:
        try:
            ids = [int(x) for x in text.split()]
        except ValueError:
            raise ConfigError(f"NullTokenizer reads whitespace-separated integer ids, not text "
                              f"({text[:30]!r}...); use --tokenizer-type SentencePieceTokenizer") from None
        if any(i < 0 or i >= self.vocab_size for i in ids):
            raise ConfigError(f"NullTokenizer: an id is outside [0, {self.vocab_size}); raise --vocab-size")
        return ids

    def detokenize(self, ids: List[int]) -> str:
        return " ".join(str(i) for i in ids)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str = None, vocab_size: int = None):
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise ConfigError(
        f"--tokenizer-type {tokenizer_type!r} is not valid; choose one of: {', '.join(TOKENIZER_TYPES)}"
    )

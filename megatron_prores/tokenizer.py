"""Tokenizers, by Megatron-LM's ``--tokenizer-type`` names.

- ``SentencePieceTokenizer``: a SentencePiece model (``--tokenizer-model``); the end-of-document
  token appended between documents is the model's EOS.
- ``HuggingFaceTokenizer``: a Hugging Face tokenizer (``--tokenizer-model`` a ``tokenizer.json`` or a
  directory holding one, or holding a SentencePiece ``tokenizer.model``), read offline; EOD is its EOS.
- ``NullTokenizer``: no text, ids only (``--vocab-size``; the last id is EOD), for --mock-data.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional

from megatron_prores.config import ConfigError

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")


class SentencePieceTokenizer:
    def __init__(self, model_path: str):
        fix = "give the .model written by tools/train_tokenizer.py"
        if model_path and os.path.exists(model_path) and guess_tokenizer_type(model_path) == "HuggingFaceTokenizer":
            fix = "a Hugging Face tokenizer.json or tokenizer directory takes --tokenizer-type HuggingFaceTokenizer"
        if not model_path or not os.path.isfile(model_path):
            raise ConfigError(f"--tokenizer-model {model_path!r} is not a file; {fix}")
        import sentencepiece

        self.model_path = model_path
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"--tokenizer-model {model_path!r} is not a SentencePiece model ({_first_line(e)}); "
                              f"{fix}") from None
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


class HuggingFaceTokenizer:
    """A Hugging Face tokenizer read offline: ``tokenizer.json`` (the file, or a directory holding it)
    with the ``tokenizers`` library; or a directory holding only a SentencePiece ``tokenizer.model``
    (and a tokenizer_config.json naming its class), converted by transformers' AutoTokenizer from
    local files. Ids are what the tokenizer's own encode gives, its post-processor's special tokens
    (e.g. a BOS) included: what ``AutoTokenizer(text)["input_ids"]`` gives. EOD is its EOS token."""

    def __init__(self, path: str):
        self.path = path
        self.json_file, self.directory = _locate(path)
        self.config = _special_tokens_config(self.directory)
        self.tok, auto_eos, auto_bos = _load(path, self.json_file, self.directory)
        # a tokenizer.json saved with truncation or padding on would cut every document (or pad it,
        # hiding its EOS from _adds_eod); transformers turns both off for a call without them too
        self.tok.no_truncation()
        self.tok.no_padding()
        self.eos_token = _eos_token(path, self.tok, self.config.get("eos_token") or auto_eos)
        bos = self.config.get("bos_token") or auto_bos
        self.bos = self.tok.token_to_id(bos) if bos else None
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(self.tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        self.eod = self.tok.token_to_id(self.eos_token)
        self.adds_eod = self._adds_eod()

    def _adds_eod(self) -> bool:
        """Whether the post-processor ends every text with the EOS (T5's does): preprocess then appends
        no second one."""
        try:
            return self.tok.encode("a").ids[-1:] == [self.eod]
        except Exception:  # a vocabulary without "a" nor an unknown token
            return False

    def tokenize(self, text: str) -> List[int]:
        return self.tok.encode(text).ids

    def detokenize(self, ids: List[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


# end-of-text tokens of common tokenizers, looked for when the tokenizer names no EOS
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _locate(path: str) -> tuple:
    """(tokenizer.json or None for a SentencePiece directory, the directory of the tokenizer's files)."""
    if not path or not os.path.exists(path):
        raise ConfigError(f"--tokenizer-model {path!r} does not exist; give a tokenizer.json or a Hugging Face "
                          f"tokenizer directory")
    if os.path.isfile(path):
        return path, os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return os.path.join(path, "tokenizer.json"), path
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        return None, path
    raise ConfigError(f"--tokenizer-model {path!r} holds neither tokenizer.json nor tokenizer.model; give a "
                      f"Hugging Face tokenizer directory or file")


def _token_text(value) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _special_tokens_config(directory: str) -> dict:
    """bos_token/eos_token of the directory's tokenizer_config.json (else special_tokens_map.json)."""
    found = {}
    for name in reversed(CONFIG_FILES):  # tokenizer_config.json wins
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                conf = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} is not valid JSON ({_first_line(e)}); repair or remove it") from None
        if not isinstance(conf, dict):
            raise ConfigError(f"{path} is not a JSON object; repair or remove it")
        found.update({k: _token_text(conf.get(k)) for k in ("bos_token", "eos_token") if _token_text(conf.get(k))})
    return found


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _load(path: str, json_file: Optional[str], directory: str) -> tuple:
    """(tokenizers.Tokenizer, the EOS and BOS transformers names or None)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError("--tokenizer-type HuggingFaceTokenizer needs the tokenizers package: "
                          "pip install tokenizers") from None
    if json_file is not None:
        try:
            return Tokenizer.from_file(json_file), None, None
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ConfigError(f"--tokenizer-model {path!r}: {json_file} is not a Hugging Face tokenizer.json "
                              f"({_first_line(e)}); a SentencePiece .model takes --tokenizer-type "
                              f"SentencePieceTokenizer") from None
    return _load_sentencepiece_dir(path, directory)


def _load_sentencepiece_dir(path: str, directory: str) -> tuple:
    """A directory with a SentencePiece tokenizer.model: transformers converts it, local files only."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(f"--tokenizer-model {path!r} holds a SentencePiece tokenizer.model but no tokenizer.json; "
                          f"reading it needs transformers: pip install transformers") from None
    try:
        auto = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # transformers raises many kinds (ValueError, OSError, KeyError...)
        raise ConfigError(f"--tokenizer-model {path!r}: transformers cannot read its tokenizer.model "
                          f"({_first_line(e)}); add a tokenizer_config.json naming the tokenizer_class") from None
    backend = getattr(auto, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"--tokenizer-model {path!r}: transformers gives no fast tokenizer for it; convert it "
                          f"to tokenizer.json (AutoTokenizer(...).save_pretrained)")
    return backend, auto.eos_token, auto.bos_token


def _eos_token(path: str, tok, named: Optional[str]) -> str:
    """The EOS the tokenizer names (checked to be in its vocabulary), else a common end-of-text token."""
    if named:
        if tok.token_to_id(named) is None:
            raise ConfigError(f"--tokenizer-model {path!r}: its eos_token {named!r} is not in its vocabulary; "
                              f"fix eos_token in tokenizer_config.json")
        return named
    for name in EOS_NAMES:
        if tok.token_to_id(name) is not None:
            return name
    raise ConfigError(f"--tokenizer-model {path!r} has no end-of-document token: no eos_token in "
                      f"tokenizer_config.json and none of {', '.join(EOS_NAMES)} in its vocabulary; add one "
                      f"(e.g. tokenizer_config.json with \"eos_token\")")


def guess_tokenizer_type(path: str) -> str:
    """The --tokenizer-type of a tokenizer file or directory: a .json or a directory is Hugging Face's."""
    return "HuggingFaceTokenizer" if os.path.isdir(path) or path.endswith(".json") else "SentencePieceTokenizer"


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


def model_vocab_size(tokenizer_size: int, vocab_size: Optional[int]) -> int:
    """The model's vocabulary, as the driver takes it: --vocab-size, else the tokenizer's size; a
    --vocab-size below the tokenizer's is refused (its top ids would have no embedding)."""
    vocab = vocab_size or tokenizer_size
    if tokenizer_size > vocab:
        raise ConfigError(f"the tokenizer has {tokenizer_size} tokens but --vocab-size is {vocab}; "
                          f"raise --vocab-size or drop it to use the tokenizer's")
    return vocab


def build_tokenizer(tokenizer_type: str, tokenizer_model: str = None, vocab_size: int = None):
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise ConfigError(
        f"--tokenizer-type {tokenizer_type!r} is not valid; choose one of: {', '.join(TOKENIZER_TYPES)}"
    )

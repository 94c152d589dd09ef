"""Hugging Face tokenizers (--tokenizer-type HuggingFaceTokenizer): loading offline, EOD, one-line
errors, preprocess -> megatron-core IndexedDataset (uint16 and, above 65,500 tokens, int32), and
the HF export/import shipping a tokenizer that gives the training ids.

Every tokenizer is built here, offline: byte-level BPEs trained with ``tokenizers`` on a small text,
a 70,000-word WordLevel vocabulary, and Llama/T5-style SentencePiece models (sentencepiece)."""

import json
import os
import sys

import pytest

from megatron_prores.config import ConfigError
from megatron_prores.tokenizer import HuggingFaceTokenizer, build_tokenizer
from megatron_prores.tools import run

tokenizers = pytest.importorskip("tokenizers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDGE_CASES = ["Plain English text, with punctuation.", " one leading space", "    four leading spaces",
              "\ttab\tand\t\ttabs", "digits 0123456789 42 3.14159 1,000,000", "naïve café, Zürich",
              "emoji 😀👍🏽🇫🇷 ✓", "日本語の文章、中文句子。", "trailing spaces   ", "two\n\nlines\r\n", "", " ", "a"]


def training_text():
    """About 60 kB of real prose and code (this repository's docs), plus the edge cases."""
    lines = []
    for name in ("README.md", os.path.join("docs", "results.md")):
        path = os.path.join(ROOT, name)
        if os.path.isfile(path):
            lines += [line for line in open(path, encoding="utf-8") if line.strip()]
    return lines + EDGE_CASES * 3


def byte_level_bpe(directory, vocab=500, special=("<|endoftext|>",), bos=None, config=None):
    """A GPT-2 style byte-level BPE saved as ``directory/tokenizer.json`` (+ tokenizer_config.json);
    with ``bos`` a Llama-3 style post-processor that starts every text with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_text(), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    if config:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    return str(directory)


def word_level(path, words, eos="</s>"):
    """A WordLevel tokenizer.json: one id per word (split on whitespace), then ``eos`` if given."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(words)}
    if eos:
        vocab[eos] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return str(path)


def sentencepiece_dir(directory, style):
    """A directory with a SentencePiece tokenizer.model and a tokenizer_config.json naming its class:
    Llama-style (BPE, byte fallback, unk 0 bos 1 eos 2) or T5-style (unigram, pad 0 eos 1 unk 2)."""
    import sentencepiece as spm

    os.makedirs(directory, exist_ok=True)
    kw = dict(model_type="bpe", vocab_size=400, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True) \
        if style == "llama" else dict(model_type="unigram", vocab_size=300, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(training_text()), model_prefix=os.path.join(directory, "tokenizer"),
                                   minloglevel=2, num_threads=1, **kw)
    os.remove(os.path.join(directory, "tokenizer.vocab"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer" if style == "llama" else "T5Tokenizer"}, f)
    return str(directory)


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    """name -> tokenizer path: "bpe" (a directory with tokenizer.json only: EOS by its name),
    "llama3" (tokenizer.json given as the file; BOS template; EOS from tokenizer_config.json)."""
    root = tmp_path_factory.mktemp("tokenizers")
    llama3 = byte_level_bpe(root / "llama3", special=("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
                            bos="<|begin_of_text|>",
                            config={"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True,
                                    "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    return {"bpe": byte_level_bpe(root / "bpe"), "llama3": os.path.join(llama3, "tokenizer.json")}


def preprocess(*args):
    from megatron_prores.tools.preprocess_data import main

    return run(main, [str(a) for a in args])


def one_error_line(capsys, code) -> str:
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


def read_back(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return ds.index.dtype, [ds[i].tolist() for i in range(len(ds))]


# ---- loading, EOD, vocabulary --------------------------------------------------------------------

def test_eod_and_vocabulary_from_the_tokenizer(tok_dirs, tmp_path):
    from tokenizers import Tokenizer

    bpe = build_tokenizer("HuggingFaceTokenizer", tok_dirs["bpe"])
    raw = Tokenizer.from_file(os.path.join(tok_dirs["bpe"], "tokenizer.json"))
    assert bpe.eos_token == "<|endoftext|>" and bpe.eod == raw.token_to_id("<|endoftext|>")
    assert bpe.vocab_size == raw.get_vocab_size(with_added_tokens=True) == 500 and bpe.bos is None
    same = build_tokenizer("HuggingFaceTokenizer", os.path.join(tok_dirs["bpe"], "tokenizer.json"))
    for text in EDGE_CASES:
        assert bpe.tokenize(text) == same.tokenize(text) == raw.encode(text).ids
        assert bpe.detokenize(bpe.tokenize(text)) == text  # byte-level: lossless

    llama3 = build_tokenizer("HuggingFaceTokenizer", tok_dirs["llama3"])
    raw = Tokenizer.from_file(tok_dirs["llama3"])
    assert llama3.eos_token == "<|end_of_text|>" and llama3.eod == raw.token_to_id("<|end_of_text|>")
    assert llama3.bos == raw.token_to_id("<|begin_of_text|>") and llama3.tokenize("hi")[0] == llama3.bos
    assert not llama3.adds_eod

    raw.add_special_tokens(["<|added_1|>", "<|added_2|>"])  # added tokens count in the vocabulary
    raw.save(str(tmp_path / "added.json"))
    added = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "added.json"))
    assert added.vocab_size == 502 and added.tokenize("x<|added_2|>")[-1] == 501
    # no tokenizer_config.json beside added.json: the EOS is found by its common name
    assert added.eos_token == "<|end_of_text|>"


def test_sentencepiece_directory_through_transformers(tmp_path):
    """A directory holding only a SentencePiece tokenizer.model (+ tokenizer_config.json): the ids
    are transformers' AutoTokenizer's, read from local files; T5's post-processor appends the EOS."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    for style, eos in (("llama", 2), ("t5", 1)):
        d = sentencepiece_dir(tmp_path / style, style)
        ours = build_tokenizer("HuggingFaceTokenizer", d)
        auto = transformers.AutoTokenizer.from_pretrained(d, local_files_only=True)
        assert ours.eod == auto.eos_token_id == eos and ours.eos_token == "</s>"
        assert ours.adds_eod == (style == "t5")
        for text in EDGE_CASES:
            assert ours.tokenize(text) == auto(text)["input_ids"], (style, text)


def test_bad_tokenizers_give_one_line_errors(tok_dirs, tmp_path, monkeypatch):
    good = open(os.path.join(tok_dirs["bpe"], "tokenizer.json"), encoding="utf-8").read()
    (tmp_path / "corrupt.json").write_text(good[: len(good) // 2])
    (tmp_path / "notjson.json").write_text("this is not JSON\n")
    (tmp_path / "sp.model").write_bytes(b"\x0a\x0b\xff\xfe binary")
    (tmp_path / "empty_dir").mkdir()
    word_level(tmp_path / "no_eos.json", ["a", "b", "c"], eos=None)
    (tmp_path / "bad_eos").mkdir()
    word_level(tmp_path / "bad_eos" / "tokenizer.json", ["a", "b"])
    (tmp_path / "bad_eos" / "tokenizer_config.json").write_text('{"eos_token": "<|missing|>"}')
    (tmp_path / "bad_config").mkdir()
    word_level(tmp_path / "bad_config" / "tokenizer.json", ["a", "b"])
    (tmp_path / "bad_config" / "tokenizer_config.json").write_text('{"eos_token": ')
    cases = {
        tmp_path / "missing": "does not exist; give a tokenizer.json or a Hugging Face tokenizer directory",
        tmp_path / "empty_dir": "holds neither tokenizer.json nor tokenizer.model",
        tmp_path / "corrupt.json": "is not a Hugging Face tokenizer.json (",
        tmp_path / "notjson.json": "is not a Hugging Face tokenizer.json (",
        tmp_path / "sp.model": "a SentencePiece .model takes --tokenizer-type SentencePieceTokenizer",
        tmp_path / "no_eos.json": "has no end-of-document token",
        tmp_path / "bad_eos": "its eos_token '<|missing|>' is not in its vocabulary",
        tmp_path / "bad_config": "tokenizer_config.json is not valid JSON",
    }
    for path, message in cases.items():
        with pytest.raises(ConfigError) as e:
            build_tokenizer("HuggingFaceTokenizer", str(path))
        assert message in str(e.value) and "\n" not in str(e.value), (path, str(e.value))
    with pytest.raises(ConfigError, match="choose one of: SentencePieceTokenizer, HuggingFaceTokenizer"):
        build_tokenizer("HFTokenizer", tok_dirs["bpe"])
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # not installed
    with pytest.raises(ConfigError, match="needs the tokenizers package: pip install tokenizers$"):
        HuggingFaceTokenizer(tok_dirs["bpe"])


def test_preprocess_bad_tokenizer_one_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", ["hello"])
    (tmp_path / "tok.json").write_text("{broken")
    code = preprocess("--input", data, "--output-prefix", tmp_path / "out", "--tokenizer-type",
                      "HuggingFaceTokenizer", "--tokenizer-model", tmp_path / "tok.json")
    assert "is not a Hugging Face tokenizer.json" in one_error_line(capsys, code)
    assert [p for p in os.listdir(tmp_path) if p.startswith("out")] == []


# ---- preprocess -> IndexedDataset --------------------------------------------------------------

@pytest.mark.parametrize("name", ["bpe", "llama3"])
def test_preprocess_round_trip(tok_dirs, tmp_path, capsys, name):
    import numpy

    tok = build_tokenizer("HuggingFaceTokenizer", tok_dirs[name])
    texts = EDGE_CASES + [line for line in training_text()[:40]]
    data = write_jsonl(tmp_path / "in.jsonl", texts)
    assert preprocess("--input", data, "--output-prefix", tmp_path / "out", "--tokenizer-type",
                      "HuggingFaceTokenizer", "--tokenizer-model", tok_dirs[name], "--workers", 1) == 0
    assert "(uint16)" in capsys.readouterr().out
    dtype, docs = read_back(tmp_path / "out_text_document")
    assert dtype == numpy.uint16
    assert docs == [tok.tokenize(t) + [tok.eod] for t in texts]


def test_vocabulary_above_65500_is_written_as_int32(tmp_path, capsys):
    """70,001 tokens: megatron-core's rule gives int32 (it has no uint32); ids past 65,535 read back."""
    import numpy

    words = [f"w{i}" for i in range(70_000)]
    path = word_level(tmp_path / "big.json", words)
    tok = build_tokenizer("HuggingFaceTokenizer", path)
    assert tok.vocab_size == 70_001 and tok.eod == 70_000
    texts = ["w0 w1 w65535 w65536 w69999", "w12345", "w65500 w65499 w3"]
    data = write_jsonl(tmp_path / "in.jsonl", texts)
    assert preprocess("--input", data, "--output-prefix", tmp_path / "big", "--tokenizer-type",
                      "HuggingFaceTokenizer", "--tokenizer-model", path, "--workers", 1) == 0
    assert "(int32)" in capsys.readouterr().out
    dtype, docs = read_back(tmp_path / "big_text_document")
    assert dtype == numpy.int32
    assert docs == [[0, 1, 65535, 65536, 69999, 70000], [12345, 70000], [65500, 65499, 3, 70000]]


def test_preprocess_t5_style_ends_documents_with_one_eos(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    d = sentencepiece_dir(tmp_path / "t5", "t5")
    data = write_jsonl(tmp_path / "in.jsonl", ["hello world", "naïve café"])
    assert preprocess("--input", data, "--output-prefix", tmp_path / "out", "--tokenizer-type",
                      "HuggingFaceTokenizer", "--tokenizer-model", d, "--workers", 1) == 0
    _, docs = read_back(tmp_path / "out_text_document")
    assert all(doc[-1] == 1 and doc[-2] != 1 for doc in docs), docs


# ---- HF export and import ----------------------------------------------------------------------

def save_run(root, tokenizer_type, tokenizer_model, vocab):
    """A small Post-LN checkpoint (exports without the fold's calibration) recording the tokenizer."""
    from megatron_prores.checkpointing import model_args_for_checkpoint, save_checkpoint
    from megatron_prores.config import config_to_dict
    from tests.test_hf_export import config, trained_model

    cfg = config("post", gpas=False, vocab=vocab)
    extra = dict(config_to_dict(cfg), tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model)
    save_checkpoint(str(root), 3, [trained_model(cfg)], None, None,
                    {"consumed_samples": 0, "skipped_iters": 0, "losses": []},
                    model_args_for_checkpoint(cfg), model_config=extra)


def assert_same_ids(export_dir, training):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(export_dir), local_files_only=True, trust_remote_code=True)
    for text in EDGE_CASES + training_text()[:200]:
        assert hf(text)["input_ids"] == training.tokenize(text), text[:60]
    assert hf.eos_token_id == training.eod
    config = json.load(open(os.path.join(export_dir, "config.json")))
    assert config["eos_token_id"] == training.eod and config["bos_token_id"] == training.bos


@pytest.mark.parametrize("name", ["bpe", "llama3", "sp_llama"])
def test_export_ships_the_training_tokenizer(single_process, tok_dirs, tmp_path, name):
    pytest.importorskip("transformers")
    from megatron_prores.hf_export import export

    path = sentencepiece_dir(tmp_path / "sp", "llama") if name == "sp_llama" else tok_dirs[name]
    training = build_tokenizer("HuggingFaceTokenizer", path)
    save_run(tmp_path / "ckpt", "HuggingFaceTokenizer", path, training.vocab_size)
    report = export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False, log=lambda *_: None)
    assert "tokenizer exported (Hugging Face" in report["tokenizer"] and "ids checked" in report["tokenizer"]
    out = tmp_path / "hf"
    if name != "sp_llama":  # the same tokenizer.json, byte for byte
        assert (out / "tokenizer.json").read_bytes() == open(training.json_file, "rb").read()
    conf = json.load(open(out / "tokenizer_config.json"))
    assert conf["tokenizer_class"] == "PreTrainedTokenizerFast" and "add_bos_token" not in conf
    assert_same_ids(out, training)


def test_export_tokenizer_errors(single_process, tok_dirs, tmp_path, capsys):
    from megatron_prores.tools.convert_to_hf import main

    save_run(tmp_path / "small", "HuggingFaceTokenizer", tok_dirs["bpe"], 300)  # tokenizer: 500
    code = run(main, ["--load", str(tmp_path / "small"), "--output", str(tmp_path / "o")])
    assert "has 500 tokens but the model only 300" in one_error_line(capsys, code)
    save_run(tmp_path / "gone", "HuggingFaceTokenizer", str(tmp_path / "deleted"), 500)
    code = run(main, ["--load", str(tmp_path / "gone"), "--output", str(tmp_path / "o")])
    err = one_error_line(capsys, code)
    assert "the run's tokenizer: --tokenizer-model" in err and "does not exist" in err and \
        "or give --tokenizer-model PATH" in err, err
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "o.tmp")
    # --tokenizer-model overrides the run's (a NullTokenizer run here): its type from the path
    save_run(tmp_path / "null", "NullTokenizer", None, 500)
    assert run(main, ["--load", str(tmp_path / "null"), "--output", str(tmp_path / "o"),
                      "--tokenizer-model", tok_dirs["bpe"]]) == 0
    assert_same_ids(tmp_path / "o", build_tokenizer("HuggingFaceTokenizer", tok_dirs["bpe"]))


def test_import_records_the_model_directory_tokenizer(single_process, tok_dirs, tmp_path):
    """A Llama directory holding tokenizer.json: the import records it, the export ships it."""
    import shutil

    transformers = pytest.importorskip("transformers")
    import torch

    from megatron_prores.hf_export import export
    from megatron_prores.hf_import import import_llama, import_tokenizer

    cfg = transformers.LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    assert import_tokenizer(str(tmp_path / "llama")) == (None, None)  # no tokenizer there: none recorded
    shutil.copy(os.path.join(tok_dirs["bpe"], "tokenizer.json"), tmp_path / "llama" / "tokenizer.json")
    kind, path = import_tokenizer(str(tmp_path / "llama"))
    assert kind == "HuggingFaceTokenizer" and path == str(tmp_path / "llama")
    with pytest.raises(ConfigError, match="has 500 tokens but the model"):
        cfg.vocab_size = 400
        cfg.save_pretrained(tmp_path / "small")
        import_tokenizer(str(tmp_path / "small"), tok_dirs["bpe"])
    import_llama(str(tmp_path / "llama"), str(tmp_path / "ckpt"), tokenizer_model=path, tokenizer_type=kind,
                 log=lambda *_: None)
    export(str(tmp_path / "ckpt"), str(tmp_path / "back"), progress=False, log=lambda *_: None)
    assert_same_ids(tmp_path / "back", build_tokenizer("HuggingFaceTokenizer", tok_dirs["bpe"]))


@pytest.mark.exhaustive
def test_driver_trains_on_hf_tokenized_data_and_exports_its_tokenizer(tok_dirs, tmp_path, capsys):
    """preprocess -> 2 training steps with --tokenizer-type HuggingFaceTokenizer -> convert-to-hf."""
    from megatron_prores.tools.convert_to_hf import main
    from tests.test_train import run as train

    tok = tok_dirs["llama3"]
    data = write_jsonl(tmp_path / "c.jsonl", training_text())
    assert preprocess("--input", data, "--output-prefix", tmp_path / "c", "--tokenizer-type",
                      "HuggingFaceTokenizer", "--tokenizer-model", tok, "--workers", 1) == 0
    code, out = train(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
                       "--ffn-hidden-size", "64", "--seq-length", "32", "--micro-batch-size", "2",
                       "--global-batch-size", "2", "--lr", "1e-3", "--train-iters", "2", "--log-interval", "1",
                       "--eval-iters", "0", "--data-path", tmp_path / "c_text_document", "--split", "100,0,0",
                       "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok,
                       "--norm-type", "post", "--save", tmp_path / "ckpt"], nproc=1)
    assert code == 0, out[-3000:]
    assert run(main, ["--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]) == 0
    assert_same_ids(tmp_path / "hf", build_tokenizer("HuggingFaceTokenizer", tok))

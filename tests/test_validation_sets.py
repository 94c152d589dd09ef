"""--valid-data-path: held-out validation sets beside the --split part of --data-path, each
evaluated on its own and logged under its name."""

import re

import numpy
import pytest

from tests.test_train import run

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--log-interval", "1",
        "--train-iters", "4", "--eval-interval", "2", "--eval-iters", "2", "--seed", "3", "--split", "80,20,0"]


def valid_losses(out: str) -> dict:
    """{(name or None, iteration): loss} from the driver's validation lines."""
    found = {}
    for m in re.finditer(r" validation loss(?: \((\S+)\))? at iteration (\d+) \| lm loss value: (\S+) ", out):
        found[(m.group(1), int(m.group(2)))] = float(m.group(3))
    return found


def test_named_sets_are_evaluated_and_logged_on_their_own(dataset, tmp_path):
    prefix, tok = str(dataset / "c_text_document"), str(dataset / "tok.model")
    code, out = run(TINY + ["--data-path", prefix, "--tokenizer-model", tok,
                            "--valid-data-path", f"held={prefix}", prefix], nproc=1)
    assert code == 0, out[-3000:]
    losses = valid_losses(out)
    assert set(losses) == {(n, i) for n in (None, "held", "c_text_document") for i in (2, 4)}, losses
    for i in (2, 4):
        assert losses[("held", i)] == losses[("c_text_document", i)]  # the same file: the same samples
        assert losses[(None, i)] != losses[("held", i)]  # the --split part is other samples
    assert losses[("held", 4)] < losses[("held", 2)] + 0.5  # finite and sane while training


def test_a_named_set_covers_the_whole_file(dataset, single_process):
    """Every document of the file takes part (no --split share), as megatron-core's own reader sees it."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_prores.data import build_validation_set
    from megatron_prores.tokenizer import build_tokenizer

    prefix = str(dataset / "c_text_document")
    tok = build_tokenizer("SentencePieceTokenizer", str(dataset / "tok.model"))
    docs = len(IndexedDataset(prefix).document_indices) - 1
    ds = build_validation_set(tok, prefix, 8, seq_length=32, seed=3)
    assert sorted(set(ds.document_index.tolist())) == list(range(docs))
    indexed = IndexedDataset(prefix)
    tokens = numpy.concatenate([indexed[i] for i in range(len(indexed))])
    text = " ".join(map(str, tokens.tolist()))
    sample = ds[0]["tokens"].tolist()
    assert " ".join(map(str, sample[:8])) in text  # drawn from this file's tokens


@pytest.mark.parametrize("items,message", [
    (["a=X", "a=Y"], "--valid-data-path names two sets 'a'; name them apart with NAME=PREFIX"),
    (["d/x_text_document", "e/x_text_document"], "--valid-data-path names two sets 'x_text_document'"),
    (["=X"], "--valid-data-path '=X' is not valid; give PREFIX or NAME=PREFIX"),
])
def test_bad_names(items, message):
    from megatron_prores.config import ConfigError
    from megatron_prores.data import validation_sets

    with pytest.raises(ConfigError, match=re.escape(message)):
        validation_sets(items)
    assert validation_sets(["c4=/d/c4_val", "/d/wiki_text_document"]) == [("c4", "/d/c4_val"),
                                                                           ("wiki_text_document", "/d/wiki_text_document")]


@pytest.mark.parametrize("extra,message", [
    (["--valid-data-path", "/nowhere/v", "--eval-iters", "0"], "--valid-data-path needs evaluation"),
    (["--valid-data-path", "/nowhere/v_text_document"], "--valid-data-path '/nowhere/v_text_document': "),
])
def test_bad_valid_data_path_is_one_line_from_the_driver(dataset, extra, message):
    prefix, tok = str(dataset / "c_text_document"), str(dataset / "tok.model")
    code, out = run(TINY + ["--data-path", prefix, "--tokenizer-model", tok] + extra, nproc=1)
    errors = [l for l in out.splitlines() if l.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], out[-2000:]
    assert "Traceback" not in out

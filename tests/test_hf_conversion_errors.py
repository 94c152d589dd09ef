"""The Hugging Face conversion tools against what an adversarial run found: exports with inf
weights (float16) or NaN weights reported success (or died dividing by zero); a checkpoint whose
recorded configuration disagrees with its tensors was exported as another model (blocks dropped)
or failed in a traceback; the fold's calibration batch missed inputs with a small residual stream;
an import dropped an lm_head that config.json called tied, or tied on the string "false";
valid Llama configs were refused with a wrong reason."""

import json
import os
import shutil

import pytest
import torch

from megatron_prores.config import ConfigError, config_to_dict
from tests.test_hf_export import (FOLD_TOLERANCE, VOCAB, config, convert_to_hf, export, hf_logits,
                                  megatron_logits, prores_layers, save, saved_llama, trained_model)

transformers = pytest.importorskip("transformers")


def left_behind(tmp_path, name):
    return [p for p in (tmp_path / name, tmp_path / f"{name}.tmp") if os.path.exists(p)]


def test_weights_an_export_cannot_hold_are_one_line(single_process, tmp_path, capsys):
    cfg = config("post", gpas=False)  # no fold: no calibration
    chunk = trained_model(cfg)
    with torch.no_grad():
        chunk.decoder.layers[1].mlp.linear_fc2.weight[0, 0] = 1e5  # beyond float16's 65504
    save(chunk, cfg, tmp_path / "big")
    code, err = convert_to_hf(capsys, "--load", tmp_path / "big", "--output", tmp_path / "o16", "--dtype", "float16")
    assert code == 2 and "model.layers.1.mlp.down_proj.weight has values up to 1e+05, beyond float16's range; " \
                          "export with --dtype bfloat16 or float32" in err, err
    assert left_behind(tmp_path, "o16") == []
    code, err = convert_to_hf(capsys, "--load", tmp_path / "big", "--output", tmp_path / "obf", "--dtype", "bfloat16")
    assert code == 0, err

    for norm_type in ("post", "pre"):  # pre: the fold's calibration meets the NaN first
        cfg = config(norm_type, gpas=norm_type == "pre")
        chunk = trained_model(cfg)
        with torch.no_grad():
            chunk.decoder.layers[0].mlp.linear_fc2.weight[0, 0] = float("nan")
        save(chunk, cfg, tmp_path / f"nan-{norm_type}")
        code, err = convert_to_hf(capsys, "--load", tmp_path / f"nan-{norm_type}", "--output", tmp_path / "on")
        assert code == 2 and "values for model.layers.0.mlp.down_proj.weight hold NaN or inf (the run diverged " \
                              "before this iteration); export an earlier --iteration" in err, err
        assert left_behind(tmp_path, "on") == []


@pytest.mark.parametrize("saved", [dict(ffn_hidden_size=64), dict(num_query_groups=4), dict(num_layers=3)])
def test_a_configuration_that_disagrees_with_the_tensors_is_one_line(single_process, tmp_path, capsys, saved):
    """ffn and groups failed with tracebacks; fewer layers exported a model without its last block."""
    from megatron_prores.checkpointing import model_args_for_checkpoint, save_checkpoint

    cfg = config("post", gpas=False)
    recorded = cfg.replace(**saved)
    save_checkpoint(str(tmp_path / "ck"), 25, [trained_model(cfg)], None, None,
                    {"consumed_samples": 0, "skipped_iters": 0, "losses": []}, model_args_for_checkpoint(recorded),
                    model_config=dict(config_to_dict(recorded), tokenizer_type="NullTokenizer", tokenizer_model=None))
    code, err = convert_to_hf(capsys, "--load", tmp_path / "ck", "--output", tmp_path / "o")
    assert code == 2 and "asks for" in err and "it is damaged or was edited: export another --iteration" in err, err
    assert left_behind(tmp_path, "o") == []


@pytest.mark.parametrize("flags, message", [
    (["--max-shard-size", "nan"], "--max-shard-size nan is not valid; it must be a positive number of GB"),
    (["--max-shard-size", "inf"], "--max-shard-size inf is not valid"),
])
def test_bad_export_flags_are_one_line(single_process, tmp_path, capsys, flags, message):
    cfg = config("post", gpas=False)
    save(trained_model(cfg), cfg, tmp_path / "ck")
    code, err = convert_to_hf(capsys, "--load", tmp_path / "ck", "--output", tmp_path / "o", *flags)
    assert code == 2 and message in err, err
    code, err = convert_to_hf(capsys, "--load", tmp_path / "ck", "--output", "")
    assert code == 2 and "--output is empty" in err, err


@torch.no_grad()
def test_the_fold_is_checked_where_the_stream_is_smallest(single_process, tmp_path):
    """A rarely trained token (embedding 1e-3 of the others'): the fold's epsilon eps P^2 changes
    the logits of a sequence that starts with it by 1.7e-2 (relative), which random calibration
    tokens missed. Folded or not, the export must give Megatron's logits there too."""
    cfg = config("pre")
    chunk = trained_model(cfg)
    chunk.embedding.word_embeddings.weight[7] *= 1e-3
    save(chunk, cfg, tmp_path / "ck")
    report = export(str(tmp_path / "ck"), str(tmp_path / "hf"), progress=False, log=lambda *_: None)
    tokens = torch.tensor([[7, 7, 7, 7], [7, 5, 9, 11]])
    ref = megatron_logits(chunk, tokens)
    err = ((hf_logits(tmp_path / "hf", tokens)[1] - ref).abs().max() / ref.abs().max()).item()
    print(report["format"], report["fold_error"], err)
    assert err < FOLD_TOLERANCE, (report, err)


def mutated(src, dst, **changes):
    shutil.copytree(src, dst)
    c = json.loads((dst / "config.json").read_text())
    c.update(changes)
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def imported_head(tmp_path, hf):
    """(tied, the output layer's rows) of ``hf`` imported, as this project's export writes them back."""
    from safetensors.torch import load_file

    from megatron_prores.hf_import import import_llama

    shutil.rmtree(tmp_path / "ck", ignore_errors=True)
    shutil.rmtree(tmp_path / "back", ignore_errors=True)
    lines = []
    import_llama(str(hf), str(tmp_path / "ck"), log=lines.append)
    export(str(tmp_path / "ck"), str(tmp_path / "back"), progress=False, log=lambda *_: None)
    back = {}
    for f in os.listdir(tmp_path / "back"):
        if f.endswith(".safetensors"):
            back.update(load_file(tmp_path / "back" / f))
    return "lm_head.weight" not in back, back.get("lm_head.weight"), lines[0]


def test_import_keeps_an_lm_head_that_differs_from_the_embedding(single_process, tmp_path):
    """config.json says tied, the files hold a different lm_head.weight: transformers loads it untied
    (it warns), so the import keeps it (it dropped it: logits off by 150%)."""
    from safetensors.torch import load_file

    saved_llama(tmp_path / "hf")  # untied: lm_head differs from the embedding
    hf = mutated(tmp_path / "hf", tmp_path / "tied", tie_word_embeddings=True)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    original = load_file(tmp_path / "hf" / "model.safetensors")["lm_head.weight"]
    assert torch.equal(theirs.lm_head.weight, original)  # what transformers makes of it
    tied, head, line = imported_head(tmp_path, hf)
    assert not tied and torch.equal(head, original) and "imported untied, as transformers loads it" in line


@pytest.mark.parametrize("changes, message", [
    (dict(tie_word_embeddings="false"), "config.json has tie_word_embeddings 'false', not true or false"),
    (dict(architectures=["LlamaForSequenceClassification"]), "is a LlamaForSequenceClassification (config.json: "
                                                             "architectures), not a LlamaForCausalLM"),
    (dict(num_key_value_heads=3), "its config.json gives a model this project cannot build: --num-attention-heads 4 "
                                  "is not divisible by --num-query-groups 3"),
    # null takes transformers' default, but 0 is no value to replace silently
    (dict(rms_norm_eps=0.0), "its config.json gives a model this project cannot build: --norm-epsilon 0.0 is not valid"),
    (dict(rope_theta=0, rope_parameters={"rope_theta": 0, "rope_type": "default"}),
     "its config.json gives a model this project cannot build: --rotary-base 0 is not valid"),
    # the import records these for the export (a traceback, and a string id written back, before)
    (dict(max_position_embeddings="4096"), "config.json has max_position_embeddings '4096', not a positive number; "
                                           "fix config.json"),
    (dict(eos_token_id="2"), "config.json has eos_token_id '2', not a token id or a list of them; fix config.json"),
])
def test_import_refusals_name_config_json(single_process, tmp_path, changes, message):
    from megatron_prores.hf_import import import_llama

    saved_llama(tmp_path / "hf")
    with pytest.raises(ConfigError) as e:
        import_llama(str(mutated(tmp_path / "hf", tmp_path / "m", **changes)), str(tmp_path / "ck"))
    assert message in str(e.value), str(e.value)


def test_import_refuses_non_finite_weights(single_process, tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_prores.hf_import import import_llama

    saved_llama(tmp_path / "hf")
    w = load_file(tmp_path / "hf" / "model.safetensors")
    w["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(w, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model.layers.1.mlp.down_proj.weight holds NaN or inf"):
        import_llama(str(tmp_path / "hf"), str(tmp_path / "ck"))


@pytest.mark.parametrize("changes", [dict(head_dim=None), dict(hidden_act="swish"), dict(max_position_embeddings=None),
                                     dict(rope_scaling={"rope_type": "default"}), dict(rms_norm_eps=None)])
def test_import_reads_llama_configs_as_transformers_does(single_process, tmp_path, changes):
    """Each describes the same model as transformers reads it (head_dim null: hidden/heads; swish is
    SiLU; default RoPE scaling is none; null epsilon or length: the defaults): refused or a traceback
    before; now the same weights come back (bitwise)."""
    from safetensors.torch import load_file

    saved_llama(tmp_path / "hf", rms_norm_eps=1e-6)
    hf = mutated(tmp_path / "hf", tmp_path / "m", **changes)
    tied, head, _ = imported_head(tmp_path, hf)
    assert not tied and torch.equal(head, load_file(tmp_path / "hf" / "model.safetensors")["lm_head.weight"])


def convert_from_hf(capsys, *args):
    """(exit code, stderr) of megatron-prores-convert-from-hf, in this process."""
    from megatron_prores.tools import run
    from megatron_prores.tools.convert_from_hf import main

    code = run(main, [str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") <= 1, err
    return code, err.strip()


@pytest.mark.parametrize("flags, message", [
    (["--save", ""], "error: --save is empty (an unset shell variable?); give the checkpoint directory to create"),
    (["--save", "{tmp}/ck", "--make-vocab-size-divisible-by", "0"],
     "error: --make-vocab-size-divisible-by 0 is not valid; it must be a positive integer (default 128)"),
])
def test_bad_import_flags_name_the_flag(tmp_path, capsys, flags, message):
    """An empty --save failed creating '' (convert-to-hf names an empty --output); a vocabulary
    multiple of 0 was blamed on the input's config.json."""
    saved_llama(tmp_path / "hf")
    capsys.readouterr()  # transformers' progress bar
    code, err = convert_from_hf(capsys, "--input", tmp_path / "hf", *[f.format(tmp=tmp_path) for f in flags])
    assert code == 2 and err == message, err
    assert sorted(os.listdir(tmp_path)) == ["hf"]

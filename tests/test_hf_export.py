"""Hugging Face export and import, checked against this project's Megatron model and transformers."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_prores.checkpointing import model_args_for_checkpoint, save_checkpoint
from megatron_prores.config import MethodConfig, ModelConfig, config_to_dict
from megatron_prores.hf_export import FOLD_TOLERANCE, export
from megatron_prores.layer import prores_layers, set_prores_step
from megatron_prores.model import build_model
from megatron_prores.parallel import seed_everything

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 25  # mid-warmup: W = 40 over 4 blocks (T = 10): blocks 1-2 done, 3-4 ramping
VOCAB = 200  # padded to 256 in the checkpoint: the export must drop the padding
TOKENS = torch.tensor([[5, 17, 42, 99, 3, 150, 7, 64, 12, 199, 0, 88, 31, 2, 120, 9],
                       [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])


def config(norm_type, gpas=True, normalization="RMSNorm", vocab=VOCAB, **kw):
    method = MethodConfig(norm_type=norm_type, prores_schedule="linear", prores_warmup_steps=40, gpas=gpas)
    return ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                       vocab_size=vocab, make_vocab_size_divisible_by=128, seq_length=16,
                       normalization=normalization, method=method, **kw)


def trained_model(cfg, seed=0):
    """A model with trained-looking values: non-zero gates, uneven norm gains, and a residual stream
    whose RMS is far above sqrt(eps) as in a trained LM (embeddings of std 1, not 0.02)."""
    seed_everything(seed)
    (chunk,) = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        chunk.embedding.word_embeddings.weight.mul_(50.0)
        for name, p in chunk.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "norm" in name and name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for layer in prores_layers(chunk):
            if layer.gpas_gate is not None:  # g in (0.05, 0.25): scales 1-SiLU(g) in (0.86, 0.97)
                layer.gpas_gate.copy_(0.05 + 0.2 * torch.rand(layer.gpas_gate.shape, generator=g))
    return chunk


def save(chunk, cfg, root, step=STEP, tokenizer=None):
    extra = dict(config_to_dict(cfg), tokenizer_type="SentencePieceTokenizer" if tokenizer else "NullTokenizer",
                 tokenizer_model=tokenizer)
    save_checkpoint(str(root), step, [chunk], None, None, {"consumed_samples": 0, "skipped_iters": 0, "losses": []},
                    model_args_for_checkpoint(cfg), model_config=extra)


@torch.no_grad()
def megatron_logits(chunk, tokens=TOKENS, step=STEP):
    set_prores_step([chunk], step)
    chunk.eval()
    pos = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    return chunk(tokens, pos, None)[..., :VOCAB].double()


@torch.no_grad()
def hf_logits(directory, tokens=TOKENS):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True,
                                                              dtype=torch.float32)
    model.eval()
    return model, model(tokens).logits.double()


@torch.no_grad()
def megatron_greedy(chunk, prompt, n, step=STEP):
    seq = prompt.clone()
    for _ in range(n):
        seq = torch.cat([seq, megatron_logits(chunk, seq, step)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


PROMPTS = [TOKENS[0, :6], TOKENS[1, :3]]  # different lengths: left-padded into one batch


def reference(chunk, step=STEP, new_tokens=20):
    """What tests/hf_compat_check.py checks an export against, from the Megatron model."""
    logits = megatron_logits(chunk, TOKENS, step)
    labels = TOKENS.clone()
    labels[0, 2:5] = labels[1, -2:] = -100
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    return {"tokens": TOKENS, "logits": logits, "labels": labels, "loss": loss.item(), "prompts": PROMPTS,
            "greedy": [megatron_greedy(chunk, p[None], new_tokens, step)[0] for p in PROMPTS],
            "new_tokens": new_tokens}


CASES = [("pre", True), ("lns", True), ("sandwich", True), ("deepnorm", True), ("mix", True), ("post", False),
         ("sandwich-tied", True)]  # -tied: --tie-embeddings-and-output-weights (the custom code ties lm_head)
FOLDED = ("pre", "lns")


@pytest.fixture(scope="module")
def exported(single_process, tmp_path_factory):
    """norm type -> (root, export report): root/ckpt a trained-looking checkpoint, root/hf its export
    with root/hf/expected.pt; built once per module."""
    built = {}

    def get(norm_type):
        if norm_type not in built:
            root = tmp_path_factory.mktemp(norm_type)
            cfg = config(norm_type.split("-")[0], gpas=dict(CASES)[norm_type], tie_embeddings=norm_type.endswith("-tied"))
            chunk = trained_model(cfg)
            save(chunk, cfg, root / "ckpt")
            report = export(str(root / "ckpt"), str(root / "hf"), progress=False, log=lambda *_: None)
            expected = dict(reference(chunk), format="LlamaForCausalLM" if norm_type in FOLDED else "ProResForCausalLM")
            torch.save(expected, root / "hf" / "expected.pt")
            built[norm_type] = root, report
        return built[norm_type]

    return get


@pytest.mark.stack
@pytest.mark.parametrize("norm_type", [c[0] for c in CASES])
def test_exported_model_matches_megatron(exported, norm_type):
    """Logits and loss equal Megatron's; greedy generate, with and without the cache, and a left-padded
    batch with its attention mask give Megatron's greedy tokens (tests/hf_compat_check.py)."""
    from tests.hf_compat_check import check

    root, report = exported(norm_type)
    assert report["format"] == ("LlamaForCausalLM" if norm_type in FOLDED else "ProResForCausalLM"), report
    expected = torch.load(root / "hf" / "expected.pt", weights_only=True)
    print(f"{norm_type}: {report['format']}, max |logit diff| {check(root / 'hf', expected):.1e}")
    if norm_type in FOLDED:  # the same checkpoint with explicit values and gates gives the same logits
        assert report["fold_error"] <= FOLD_TOLERANCE, report
        export(str(root / "ckpt"), str(root / "nofold"), fold=False, progress=False, log=lambda *_: None)
        nofold_model, nofold = hf_logits(root / "nofold")
        assert type(nofold_model).__name__ == "ProResForCausalLM"
        assert (nofold - expected["logits"]).abs().max().item() < 1e-4
        assert (nofold - hf_logits(root / "hf")[1]).abs().max().item() < 1e-4


OLDEST_TRANSFORMERS = "4.45.2"  # pyproject: transformers>=4.45
# installed with --no-deps beside the running environment (torch, numpy, safetensors, regex, pyyaml, tqdm,
# filelock, packaging, fsspec come from it): what transformers 4.45.2 needs that a transformers-5
# environment has in other versions (tokenizers, huggingface_hub 0.x) or not at all (requests)
OLDEST_PINS = ["transformers==4.45.2", "tokenizers==0.20.3", "huggingface_hub==0.25.2", "requests==2.32.3",
               "charset-normalizer==3.4.0", "idna==3.10", "urllib3==2.2.3", "certifi==2024.8.30"]


def oldest_transformers() -> str:
    """A directory holding transformers OLDEST_TRANSFORMERS, installed once per user and Python."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    target = os.path.join(cache, "megatron-prores-tests",
                          f"transformers-{OLDEST_TRANSFORMERS}-py{sys.version_info[0]}{sys.version_info[1]}")
    if os.path.isfile(os.path.join(target, ".complete")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-input",
                        "--disable-pip-version-check", "--timeout", "30", "--retries", "1", "--target", tmp,
                        *OLDEST_PINS], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.fail(f"could not pip-install transformers {OLDEST_TRANSFORMERS} into {tmp} (needs PyPI access "
                    f"once; then cached): {last}", pytrace=False)
    open(os.path.join(tmp, ".complete"), "w").close()
    try:
        os.replace(tmp, target)
    except OSError:  # another run installed it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def test_oldest_claimed_transformers_loads_and_generates(exported, tmp_path):
    """Every norm type's export, loaded by transformers 4.45.2 in a subprocess, passes the same checks."""
    target = oldest_transformers()
    dirs = [str(exported(n)[0] / "hf") for n, _ in CASES]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [target, os.environ.get("PYTHONPATH")])),
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "TRANSFORMERS_VERBOSITY": "error"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "hf_compat_check.py"), *dirs],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and f"transformers {OLDEST_TRANSFORMERS} from {target}" in r.stdout, \
        r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("\nok ") == len(dirs), r.stdout


def test_layernorm_and_unfoldable_gates_export_with_the_custom_code(single_process, tmp_path):
    cfg = config("pre", normalization="LayerNorm")
    chunk = trained_model(cfg)
    save(chunk, cfg, tmp_path / "ln")
    report = export(str(tmp_path / "ln"), str(tmp_path / "ln_hf"), progress=False, log=lambda *_: None)
    assert report["format"] == "ProResForCausalLM" and "LayerNorm" in report["not_folded_because"]
    assert (hf_logits(tmp_path / "ln_hf")[1] - megatron_logits(chunk)).abs().max().item() < 1e-4

    cfg = config("pre")
    chunk = trained_model(cfg)
    with torch.no_grad():  # gate 2 past 1.278: 1 - SiLU(g) < 0, a sign flip
        list(prores_layers(chunk))[1].gpas_gate.fill_(2.0)
    save(chunk, cfg, tmp_path / "flip")
    report = export(str(tmp_path / "flip"), str(tmp_path / "flip_hf"), progress=False, log=lambda *_: None)
    assert report["format"] == "ProResForCausalLM" and "<= 0" in report["not_folded_because"]
    assert (hf_logits(tmp_path / "flip_hf")[1] - megatron_logits(chunk)).abs().max().item() < 1e-4


def old_rule_p2(gates):
    """The largest P^2 (running product of the GPAS scales, one gate per block applied after both
    sublayers): the rule before calibration folded exactly when it was at most 2."""
    p2 = worst = 1.0
    for g in gates:
        for _ in range(2):
            p2 *= float(1 - torch.nn.functional.silu(torch.tensor(float(g), dtype=torch.float64))) ** 2
            worst = max(worst, p2)
    return worst


def test_fold_decision_measures_the_error(single_process, tmp_path):
    """Early in training (embeddings at init std 0.02, ProRes values 0.1 and below, gates down to -0.2)
    the stream's mean square is a few hundred eps: the fold's epsilon eps P^2 changes the logits by
    far more than FOLD_TOLERANCE although P^2 <= 2, which the old rule folded. Growing scales on a
    trained-looking stream (P^2 = 46, which the old rule refused) fold, exactly enough."""
    cfg = config("pre")
    seed_everything(0)
    (chunk,) = build_model(cfg)
    gates = [-0.2, -0.1, -0.05, 0.0]
    with torch.no_grad():
        for layer, g in zip(prores_layers(chunk), gates):
            layer.gpas_gate.fill_(g)
    assert 1.5 < old_rule_p2(gates) <= 2.0
    save(chunk, cfg, tmp_path / "early", step=1)  # ProRes values 0.1 / l
    logs = []
    report = export(str(tmp_path / "early"), str(tmp_path / "early_hf"), progress=False, log=logs.append)
    reason = report["not_folded_because"]
    print(f"early: {report['format']}, fold error {report['fold_error']:.2e}, old rule P^2 {old_rule_p2(gates):.2f}")
    assert report["format"] == "ProResForCausalLM" and report["fold_error"] > 10 * FOLD_TOLERANCE, report
    assert "inexact" in reason and f"{report['fold_error']:.1e}" in reason and f"{FOLD_TOLERANCE:.0e}" in reason
    assert reason in logs[0] and "\n" not in logs[0]
    ref = megatron_logits(chunk, step=1)
    assert (hf_logits(tmp_path / "early_hf")[1] - ref).abs().max().item() < 1e-4 * ref.abs().max().item()

    chunk = trained_model(cfg)
    with torch.no_grad():  # scales 1.27 everywhere: the folded stream shrinks to 1/P, P = 6.8
        for layer in prores_layers(chunk):
            layer.gpas_gate.fill_(-1.0)
    assert old_rule_p2([-1.0] * 4) > 40
    save(chunk, cfg, tmp_path / "grow")
    report = export(str(tmp_path / "grow"), str(tmp_path / "grow_hf"), progress=False, log=lambda *_: None)
    print(f"grow: {report['format']}, fold error {report['fold_error']:.2e}")
    assert report["format"] == "LlamaForCausalLM" and report["fold_error"] <= FOLD_TOLERANCE, report
    model, got = hf_logits(tmp_path / "grow_hf")
    assert type(model).__name__ == "LlamaForCausalLM" and (got - megatron_logits(chunk)).abs().max().item() < 1e-4


def test_tensor_and_pipeline_parallel_checkpoint_converts_like_tp1(single_process, tmp_path):
    """A TP=2 x PP=2 run (4 processes) converts to the same files as its weights saved by TP=1."""
    from safetensors.torch import load_file

    from megatron_prores.checkpointing import load_model
    from tests.test_train import run

    args = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--ffn-hidden-size", "96", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--lr", "3e-3", "--mock-data", "--vocab-size", str(VOCAB), "--norm-type", "lns", "--prores-schedule",
            "linear", "--prores-warmup-steps", "40", "--gpas", "--train-iters", "3", "--log-interval", "1",
            "--eval-iters", "0", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
            "--save", tmp_path / "tp2pp2"]
    code, out = run(args, nproc=4)
    assert code == 0, out[-3000:]
    cfg = config("lns")
    (chunk,) = build_model(cfg)
    load_model([chunk], str(tmp_path / "tp2pp2" / "iter_0000003"))
    save(chunk, cfg, tmp_path / "tp1", step=3)
    reports = [export(str(tmp_path / name), str(tmp_path / f"{name}_hf"), progress=False, log=lambda *_: None)
               for name in ("tp2pp2", "tp1")]
    # 3 steps from init: a small stream, where the fold error is near FOLD_TOLERANCE (seen: 1.2e-4); either
    # way both layouts decide alike, the calibration reading the same tensors
    assert reports[0] == reports[1], reports

    def weights(d):
        files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
        return {k: v for f in files for k, v in load_file(os.path.join(d, f)).items()}

    a, b = weights(tmp_path / "tp2pp2_hf"), weights(tmp_path / "tp1_hf")
    per_block = 9 if reports[0]["format"] == "LlamaForCausalLM" else 10  # the GPAS gate unless folded
    assert a.keys() == b.keys() and len(a) == 2 + 4 * per_block + 1
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca = json.load(open(tmp_path / "tp2pp2_hf" / "config.json"))
    cb = json.load(open(tmp_path / "tp1_hf" / "config.json"))
    assert ca == cb and ca["architectures"] == [reports[0]["format"]]


def saved_llama(directory, layers=2, positions=64, **kw):
    """A random transformers Llama (GQA, SwiGLU; norm gains moved off 1) saved to ``directory``."""
    kw = {"rms_norm_eps": 1e-5, "tie_word_embeddings": False, **kw}
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                                   **kw)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.mark.stack
def test_hf_to_megatron_to_hf_is_bit_identical(tmp_path):
    """A random Llama (GQA, SwiGLU, untied) -> this project's checkpoint -> Llama again."""
    from safetensors.torch import load_file

    cfg = saved_llama(tmp_path / "hf", layers=3, positions=32, rope_theta=10000.0).config
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_from_hf.py"), "--input", tmp_path / "hf",
                        "--save", tmp_path / "ckpt"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_to_hf.py"), "--load", tmp_path / "ckpt",
                        "--output", tmp_path / "back"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    original = load_file(tmp_path / "hf" / "model.safetensors")
    back = {}
    for f in os.listdir(tmp_path / "back"):
        if f.endswith(".safetensors"):
            back.update(load_file(tmp_path / "back" / f))
    assert original.keys() == back.keys()
    for k in original:
        assert original[k].dtype == back[k].dtype and torch.equal(original[k], back[k]), k
    # the imported checkpoint continues pretraining under another layout (TP=2), fresh optimizer
    from tests.test_train import run

    code, out = run(["--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4",
                     "--num-query-groups", "2", "--ffn-hidden-size", "96", "--seq-length", "32",
                     "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-4", "--mock-data",
                     "--vocab-size", str(VOCAB), "--train-iters", "2", "--log-interval", "1", "--eval-iters", "0",
                     "--norm-type", "pre", "--tensor-model-parallel-size", "2", "--load", tmp_path / "ckpt",
                     "--save", tmp_path / "ckpt"], nproc=2)
    assert code == 0 and f"resumed from {tmp_path / 'ckpt'}" in out and "at iteration 0" in out, out[-3000:]
    c = transformers.AutoConfig.from_pretrained(str(tmp_path / "back"))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "rope_parameters"):
        assert getattr(c, key) == getattr(cfg, key), key


def read_json(path):
    with open(path) as f:
        return json.load(f)


def round_trip(source, out, seq_length=None, tokenizer_model=None):
    """``source`` (a Hugging Face Llama directory) imported into ``out``_ck and exported to ``out``."""
    from megatron_prores.hf_import import import_llama

    import_llama(str(source), f"{out}_ck", seq_length=seq_length, tokenizer_model=tokenizer_model,
                 log=lambda *_: None)
    export(f"{out}_ck", str(out), progress=False, log=lambda *_: None)
    return out


TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def test_round_trip_keeps_the_models_token_ids_and_context(exported, tmp_path):
    """HF -> Megatron -> HF wrote BOS/EOS 1/2 whatever the model's ids (also for this project's own
    NullTokenizer export: BOS null, EOS the last id) and max_position_embeddings = the import's
    seq_length (131072 became 4096). Now both files carry the source's ids (a pad id, and several
    EOS ids in generation_config.json as an instruct model has), and the context is the source's,
    or the sequence length when that is longer."""
    saved_llama(tmp_path / "hf", positions=131072, bos_token_id=198, eos_token_id=199, pad_token_id=0)
    gen = read_json(tmp_path / "hf" / "generation_config.json")
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(dict(gen, eos_token_id=[199, 197])))
    back = round_trip(tmp_path / "hf", tmp_path / "back")
    for name in ("config.json", "generation_config.json"):
        source, written = read_json(tmp_path / "hf" / name), read_json(back / name)
        assert {k: written.get(k) for k in TOKEN_KEYS} == {k: source.get(k) for k in TOKEN_KEYS}, name
    assert read_json(back / "generation_config.json")["eos_token_id"] == [199, 197]
    assert read_json(back / "config.json")["max_position_embeddings"] == \
        read_json(tmp_path / "hf" / "config.json")["max_position_embeddings"] == 131072
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(back))
    assert (loaded.config.bos_token_id, loaded.config.eos_token_id, loaded.config.pad_token_id) == (198, 199, 0)
    assert loaded.generation_config.eos_token_id == [199, 197] and loaded.config.max_position_embeddings == 131072

    short = tmp_path / "short"  # trained on longer sequences than the source's context: that length
    shutil.copytree(tmp_path / "hf", short)
    (short / "config.json").write_text(json.dumps(dict(read_json(short / "config.json"), max_position_embeddings=64)))
    assert read_json(round_trip(short, tmp_path / "longer", seq_length=128) / "config.json")[
        "max_position_embeddings"] == 128

    root, report = exported("pre")  # a NullTokenizer run (EOD = the last id), exported as a Llama
    assert report["format"] == "LlamaForCausalLM"
    first = read_json(root / "hf" / "config.json")
    assert (first["bos_token_id"], first["eos_token_id"], first["max_position_embeddings"]) == (None, VOCAB - 1, 16)
    again = round_trip(root / "hf", tmp_path / "again")
    for name in ("config.json", "generation_config.json"):
        written = read_json(again / name)
        assert (written["bos_token_id"], written["eos_token_id"]) == (None, VOCAB - 1), name
    assert read_json(again / "config.json")["max_position_embeddings"] == 16


def test_a_model_trained_from_an_import_exports_its_ids_and_context(single_process, tmp_path):
    """Import -> train (--finetune into another --save, and on in the import's own --save) -> export:
    the checkpoints the driver wrote carried neither the model's BOS/EOS/pad ids nor its context, so
    the export wrote the mock data's EOD and --seq-length (16 for a 131072-position model)."""
    from megatron_prores.hf_import import import_llama
    from megatron_prores.train import main

    saved_llama(tmp_path / "hf", positions=131072, bos_token_id=150, eos_token_id=151, pad_token_id=0)
    messages = []
    import_llama(str(tmp_path / "hf"), str(tmp_path / "ck"), seq_length=16, log=messages.append)
    flags = messages[0].split("train from it with ")[1].split(" (any TP/PP")[0].split()
    run = ["--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1",
           "--lr", "1e-4", "--mock-data", "--vocab-size", str(VOCAB), "--eval-iters", "0"] + flags
    source = read_json(tmp_path / "hf" / "config.json")
    for name, extra in (("ft", ["--finetune", "--save", str(tmp_path / "ft")]),
                        ("ck", ["--save", str(tmp_path / "ck")])):
        assert main(run + extra) == 0
        out = tmp_path / f"{name}_hf"
        export(str(tmp_path / name), str(out), progress=False, log=lambda *_: None)
        written = read_json(out / "config.json")
        assert {k: written.get(k) for k in TOKEN_KEYS} == {k: source.get(k) for k in TOKEN_KEYS}, name
        assert written["max_position_embeddings"] == 131072, name
    i = run.index("--load")  # a run from scratch: its --max-position-embeddings
    assert main(run[:i] + run[i + 2:] + ["--max-position-embeddings", "64", "--save", str(tmp_path / "new")]) == 0
    export(str(tmp_path / "new"), str(tmp_path / "new_hf"), progress=False, log=lambda *_: None)
    assert read_json(tmp_path / "new_hf" / "config.json")["max_position_embeddings"] == 64


def test_a_tokenizer_decides_bos_and_eos_the_models_ids_fill_in(single_process, tmp_path):
    """An imported model with its tokenizer: the tokenizer's BOS and EOS (= EOD, what training ends
    documents with) win; the model's own ids stay where it leaves them open: its pad id, and an EOS
    list that holds the EOD (an instruct model's stop ids). A tokenizer named at export
    (--tokenizer-model, which may be another vocabulary): its ids alone."""
    from tests.test_hf_tokenizer import word_level

    hf = tmp_path / "hf"
    saved_llama(hf, bos_token_id=198, eos_token_id=VOCAB - 1, pad_token_id=0)
    gen = read_json(hf / "generation_config.json")
    (hf / "generation_config.json").write_text(json.dumps(dict(gen, eos_token_id=[VOCAB - 1, 5])))
    (tmp_path / "tok").mkdir()
    tok = word_level(tmp_path / "tok" / "tokenizer.json", [f"w{i}" for i in range(VOCAB - 1)])  # "</s>": VOCAB - 1
    back = round_trip(hf, tmp_path / "back", tokenizer_model=tok)
    source, generation = read_json(hf / "config.json"), read_json(hf / "generation_config.json")
    assert {k: read_json(back / "config.json").get(k) for k in TOKEN_KEYS} == \
        {"bos_token_id": None, "eos_token_id": source["eos_token_id"], "pad_token_id": source["pad_token_id"]}
    assert {k: read_json(back / "generation_config.json").get(k) for k in TOKEN_KEYS} == \
        {"bos_token_id": None, "eos_token_id": generation["eos_token_id"],
         "pad_token_id": generation.get("pad_token_id")}
    named = tmp_path / "named"
    export(str(tmp_path / "back_ck"), str(named), tokenizer_model=tok, progress=False, log=lambda *_: None)
    for name in ("config.json", "generation_config.json"):
        assert {k: read_json(named / name).get(k) for k in TOKEN_KEYS} == \
            {"bos_token_id": None, "eos_token_id": VOCAB - 1, "pad_token_id": None}, name


def test_bf16_checkpoint_exports_its_fp32_gpas_gates(single_process, tmp_path):
    """GPAS gates are fp32 in a bf16 model (layer.py); the export rounded them to bf16, with --dtype
    float32 too, which alone moved these logits by 3e-3 (relative). Now each --dtype writes them as
    the checkpoint holds them, and transformers keeps them fp32 in a bf16 model (loaded or cast)."""
    import dataclasses

    from safetensors.torch import load_file

    cfg = config("sandwich", params_dtype=torch.bfloat16)  # no fold: the gates are exported
    cfg = cfg.replace(method=dataclasses.replace(cfg.method, gpas_gate="sublayer"))
    chunk = trained_model(cfg)
    with torch.no_grad():  # g in [0.5, 1): bf16 rounds it by up to 2e-3
        for k, layer in enumerate(prores_layers(chunk)):
            layer.gpas_gate.copy_(torch.tensor([0.7013 + 0.0011 * k, 0.6021 - 0.0017 * k]))
    gates = [layer.gpas_gate.detach().clone() for layer in prores_layers(chunk)]
    assert chunk.embedding.word_embeddings.weight.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 and not torch.equal(g, g.bfloat16().float()) for g in gates)
    save(chunk, cfg, tmp_path / "ck")
    for dtype in (None, "float32", "bfloat16", "float16"):
        out = tmp_path / f"hf_{dtype}"
        export(str(tmp_path / "ck"), str(out), dtype=dtype, progress=False, log=lambda *_: None)
        written = load_file(out / "model-00001-of-00001.safetensors")
        assert written["model.layers.0.self_attn.q_proj.weight"].dtype == getattr(torch, dtype or "bfloat16")
        for i, g in enumerate(gates):
            t = written[f"model.layers.{i}.gpas_gate"]
            assert t.dtype == torch.float32 and torch.equal(t, g), (dtype, i)
    ref = megatron_logits(chunk.float())  # the bf16 weights in fp32, with the fp32 gates
    model, got = hf_logits(tmp_path / "hf_None")
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, err  # seen: 8.5e-7 (3.1e-3 with the gates rounded)
    half = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_None"), trust_remote_code=True,
                                                             dtype=torch.bfloat16)
    for loaded in (half, model.to(torch.bfloat16)):
        assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
        assert all(block.gpas_gate.dtype == torch.float32 and torch.equal(block.gpas_gate, g)
                   for block, g in zip(loaded.model.layers, gates))


LLAMA3_SCALING = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.stack
@pytest.mark.parametrize("rope", ["theta", "llama3"])
def test_imported_llama_trains_with_its_rope_and_epsilon(single_process, tmp_path, monkeypatch, rope):
    """A Llama 3 (RoPE theta 500000, RMSNorm eps 1e-6) and a Llama 3.2 (theta 500000 with Llama 3
    RoPE scaling, factor 32) imported: the driver refuses them with its defaults (one line naming
    the flags and values), and with the flags the import prints the driver's model gives
    transformers' RoPE frequencies and logits; exported again, transformers loads the same model
    (the custom export's scaling formula against transformers' too)."""
    from megatron_prores.arguments import parse_args
    from megatron_prores.config import ConfigError
    from megatron_prores.hf.modeling_prores import llama3_scaled
    from megatron_prores.hf_import import import_llama
    from megatron_prores.trainer import Trainer

    kw = (dict(rms_norm_eps=1e-6, rope_theta=500000.0) if rope == "theta"
          else dict(rms_norm_eps=1e-5, rope_parameters=dict(LLAMA3_SCALING)))
    model = saved_llama(tmp_path / "hf", **kw).eval()
    messages = []
    import_llama(str(tmp_path / "hf"), str(tmp_path / "ckpt"), seq_length=64, log=messages.append)
    (line,) = messages
    flags = line.split("train from it with ")[1].split(" (any TP/PP")[0].split()
    assert flags[flags.index("--rotary-base") + 1] == "500000.0"
    assert flags[flags.index("--norm-epsilon") + 1] == ("1e-06" if rope == "theta" else "1e-05")
    assert ("--use-rope-scaling" in flags) == (rope == "llama3")
    run = ["--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1",
           "--lr", "1e-4", "--mock-data", "--vocab-size", str(VOCAB), "--eval-iters", "0"]
    ours = ("--rotary-base", "--norm-epsilon", "--rope-scaling-factor")
    without = [f for i, f in enumerate(flags) if f not in ours + ("--use-rope-scaling",) and flags[i - 1] not in ours]
    refusal = (r"norm_epsilon is 1e-06 there but 1e-05 now, rotary_base is 500000.0 there but 10000 now; train it "
               r"with --norm-epsilon 1e-06 --rotary-base 500000.0$" if rope == "theta" else
               r"rotary_base is 500000.0 there but 10000 now, rope_scaling_factor is 32.0 there but None now; train it "
               r"with --rotary-base 500000.0 --use-rope-scaling --rope-scaling-factor 32.0$")
    with pytest.raises(ConfigError, match=refusal):
        Trainer(parse_args(run + without))
    if rope == "theta":  # an import written before the model args recorded them: its model config has them
        import megatron_prores.checkpointing as checkpointing

        record = checkpointing.model_args_for_checkpoint
        monkeypatch.setattr(checkpointing, "model_args_for_checkpoint", lambda cfg: {
            k: v for k, v in record(cfg).items() if k not in ("rotary_base", "norm_epsilon")})
        import_llama(str(tmp_path / "hf"), str(tmp_path / "old"), seq_length=64, log=messages.append)
        monkeypatch.undo()
        with pytest.raises(ConfigError, match=r"rotary_base is 500000.0 there but 10000 now; train it with"):
            Trainer(parse_args(run + [str(tmp_path / "old") if f == str(tmp_path / "ckpt") else f for f in without]))
    trainer = Trainer(parse_args(run + flags))
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    try:
        chunk = trainer.model[0].module
        chunk.eval()
        theirs_freq = model.model.rotary_emb.inv_freq
        assert torch.allclose(chunk.rotary_pos_emb.inv_freq.float(), theirs_freq.float(), rtol=1e-6, atol=0)
        with torch.no_grad():
            ours = chunk(tokens, torch.arange(64)[None].expand_as(tokens), None)[..., :VOCAB].double()
            theirs = model(tokens).logits.double()
        # float32 both sides; theta 10000 instead of 500000 moves these logits by 4.7e-3
        assert (ours - theirs).abs().max().item() < 1e-4, (ours - theirs).abs().max().item()
    finally:
        trainer.close()
    export(str(tmp_path / "ckpt"), str(tmp_path / "back"), progress=False, log=lambda *_: None)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, model(tokens).logits)
    if rope == "llama3":  # the custom export's formula, written independently
        plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
        assert torch.allclose(llama3_scaled(plain, 32.0), theirs_freq.float(), rtol=1e-6, atol=0)
        assert not torch.allclose(plain, theirs_freq.float(), rtol=1e-3)  # the scaling changes them


def test_oldest_claimed_transformers_reads_a_rope_scaled_export(single_process, tmp_path):
    """A Llama 3.2 (Llama 3 RoPE scaling, factor 32) imported and exported again: transformers
    4.45.2, which reads the config's ``rope_scaling`` (5 reads ``rope_parameters``), builds the scaled
    RoPE frequencies transformers 5 built for the original (the plain ones differ by up to 32x; at
    these 64 positions the logits alone would not show it) and gives its logits."""
    import json

    from megatron_prores.hf_import import import_llama

    model = saved_llama(tmp_path / "hf", rope_parameters=dict(LLAMA3_SCALING)).eval()
    import_llama(str(tmp_path / "hf"), str(tmp_path / "ckpt"), seq_length=64, log=lambda *_: None)
    export(str(tmp_path / "ckpt"), str(tmp_path / "back"), progress=False, log=lambda *_: None)
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.save({"tokens": tokens, "logits": model(tokens).logits}, tmp_path / "ref.pt")
    script = ("import json, sys, torch, transformers\n"
              "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()\n"
              "ref = torch.load(sys.argv[2])\n"
              "with torch.no_grad():\n"
              "    d = (m(ref['tokens']).logits - ref['logits']).abs().max().item()\n"
              "print(json.dumps({'version': transformers.__version__, 'class': type(m).__name__, "
              "'inv_freq': m.model.rotary_emb.inv_freq.tolist(), 'logits': d}))\n")
    target = oldest_transformers()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [target, os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "back"), str(tmp_path / "ref.pt")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert (got["version"], got["class"]) == (OLDEST_TRANSFORMERS, "LlamaForCausalLM")
    theirs = model.model.rotary_emb.inv_freq.float()
    assert torch.allclose(torch.tensor(got["inv_freq"]), theirs, rtol=1e-6, atol=0)
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    assert not torch.allclose(plain, theirs, rtol=1e-3)  # the scaling changes them
    assert got["logits"] < 1e-4, got["logits"]


def test_exported_tokenizer_encodes_like_the_training_tokenizer(single_process, tmp_path):
    from megatron_prores.tokenizer import build_tokenizer

    corpus = tmp_path / "corpus.jsonl"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for cmd in (["build_corpus", "--output", corpus, "--max-bytes", 300_000],
                ["train_tokenizer", "--input", corpus, "--model-prefix", tmp_path / "tok", "--vocab-size", 500]):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", f"{cmd[0]}.py"), *map(str, cmd[1:])],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
    cfg = config("pre", vocab=500)
    save(trained_model(cfg), cfg, tmp_path / "ckpt", tokenizer=str(tmp_path / "tok.model"))
    report = export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False, log=lambda *_: None)
    assert "tokenizer exported" in report["tokenizer"]
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = build_tokenizer("SentencePieceTokenizer", str(tmp_path / "tok.model"))
    texts = [json.loads(line)["text"] for line in open(corpus)] + ["  two  spaces\n\ttab 12345 é ✓", " x", "",
                                                                   "\n\nA", "日本語 text"]
    for text in texts:
        assert hf(text)["input_ids"] == ours.tokenize(text), text[:60]
        assert hf.decode(hf(text)["input_ids"]) == text
    assert hf.eos_token_id == ours.eod == 2 and os.path.isfile(tmp_path / "hf" / "tokenizer.json")


def test_bad_inputs_give_one_line(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def tool(*args):
        return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_to_hf.py"), *map(str, args)],
                              capture_output=True, text=True, env=env, timeout=120)

    r = tool("--load", tmp_path / "none", "--output", tmp_path / "o")
    assert r.returncode == 2 and "does not exist" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    (tmp_path / "run" / "iter_0000010.tmp").mkdir(parents=True)
    r = tool("--load", tmp_path / "run", "--output", tmp_path / "o", "--iteration", "10")
    assert r.returncode == 2 and "still being written or was interrupted" in r.stderr, r.stderr
    r = tool("--load", tmp_path / "run", "--output", tmp_path / "o")
    assert r.returncode == 2 and "no complete checkpoint" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "o")


@pytest.fixture(scope="module")
def small_checkpoint(single_process, tmp_path_factory):
    """A Post-LN checkpoint (exports without the fold's calibration: quick)."""
    root = tmp_path_factory.mktemp("small") / "ckpt"
    cfg = config("post", gpas=False)
    save(trained_model(cfg), cfg, root)
    return root


def convert_to_hf(capsys, *args):
    """(exit code, stderr) of megatron-prores-convert-to-hf, in this process."""
    from megatron_prores.tools import run
    from megatron_prores.tools.convert_to_hf import main

    code = run(main, [str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") <= 1, err
    return code, err.strip()


def test_export_to_read_only_directory_gives_one_line(small_checkpoint, tmp_path, capsys, monkeypatch):
    import errno

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root writes there anyway: what the kernel answers anyone else
        makedirs = os.makedirs

        def read_only(name, *args, **kwargs):
            if os.path.abspath(name).startswith(str(ro) + os.sep):
                raise PermissionError(errno.EACCES, "Permission denied", str(name))
            return makedirs(name, *args, **kwargs)

        monkeypatch.setattr(os, "makedirs", read_only)
    code, err = convert_to_hf(capsys, "--load", small_checkpoint, "--output", ro / "hf")
    ro.chmod(0o755)
    assert code == 2 and err == (f"error: --output '{ro / 'hf'}': cannot create {ro / 'hf.tmp'} (Permission denied); "
                                 f"give --output in a writable directory"), err
    assert os.listdir(ro) == []


def test_failed_export_leaves_no_tmp_and_a_stale_tmp_is_replaced(small_checkpoint, tmp_path, capsys, monkeypatch):
    """A disk that fills while the shards are written (OSError or safetensors' own error), an interrupt
    after them: no HF_DIR, no HF_DIR.tmp. A HF_DIR.tmp left by a killed convert does not stop the next."""
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    from megatron_prores import hf_export

    out, tmp = tmp_path / "hf", tmp_path / "hf.tmp"

    def killed_convert():
        tmp.mkdir()
        (tmp / hf_export.MARK).write_bytes(b"")
        (tmp / "model-00001.safetensors.tmp").write_bytes(b"half a shard")

    for error in (OSError(errno.ENOSPC, "No space left on device"),
                  SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")):
        def disk_full(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"partial")
            if isinstance(error, OSError):
                error.filename = filename
            raise error

        killed_convert()
        monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
        code, err = convert_to_hf(capsys, "--load", small_checkpoint, "--output", out)
        monkeypatch.undo()
        where = f"{tmp / 'model-00001.safetensors.tmp'} (No space left on device)" if isinstance(error, OSError) \
            else "the safetensors files (Error while serializing: I/O error: No space left on device (os error 28))"
        assert code == 2 and err == (f"error: --output '{out}': cannot write {where}; give --output in a writable "
                                     f"directory with free space"), err
        assert os.listdir(tmp_path) == [], "partial output left behind"

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_export, "_export_tokenizer", interrupted)  # after every shard is written
    with pytest.raises(KeyboardInterrupt):
        export(str(small_checkpoint), str(out), progress=False, log=lambda *_: None)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []

    killed_convert()
    report = export(str(small_checkpoint), str(out), progress=False, log=lambda *_: None)
    assert report["format"] == "ProResForCausalLM" and os.listdir(tmp_path) == ["hf"]
    files = sorted(os.listdir(out))
    assert "config.json" in files and "model-00001-of-00001.safetensors" in files
    assert not [f for f in files if f.endswith(".tmp")], files


def test_a_tmp_directory_not_left_by_the_tool_is_never_removed(small_checkpoint, tmp_path, capsys):
    """OUTPUT.tmp was removed whatever it was: --load itself (named run.tmp) was deleted, and so was
    a user's directory (found by an adversarial run). Only a .tmp holding the tool's mark (a killed
    export's) is replaced; anything else is refused in one line and left as it is."""
    import shutil

    run = tmp_path / "run.tmp"
    shutil.copytree(small_checkpoint, run)
    before = sorted(os.listdir(run))
    code, err = convert_to_hf(capsys, "--load", run, "--output", tmp_path / "run")
    assert code == 2 and err == (f"error: --output '{tmp_path / 'run'}' would be written through '{run}', which "
                                 f"holds --load '{run}'; give another --output"), err
    assert sorted(os.listdir(run)) == before
    notes = tmp_path / "notes.tmp"
    notes.mkdir()
    (notes / "a.txt").write_text("precious")
    code, err = convert_to_hf(capsys, "--load", small_checkpoint, "--output", tmp_path / "notes")
    assert code == 2 and "'notes.tmp' exists and was not left by this tool" in err.replace(str(tmp_path) + "/", ""), err
    assert (notes / "a.txt").read_text() == "precious"


def test_hints_name_this_tools_flag(small_checkpoint, tmp_path, capsys):
    """convert_to_hf's hints named the driver's --ckpt-step, and an iteration directory as --load got
    a hint that could not work (found by an adversarial run)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(small_checkpoint, run)
    it = int((run / "latest_checkpointed_iteration.txt").read_text())
    code, err = convert_to_hf(capsys, "--load", run / f"iter_{it:07d}", "--output", tmp_path / "o")
    assert code == 2 and err == (f"error: --load '{run / f'iter_{it:07d}'}' is one iteration's directory; give the run "
                                 f"directory and the iteration: --load {run} --iteration {it}"), err
    (run / "latest_checkpointed_iteration.txt").write_text("abc")
    code, err = convert_to_hf(capsys, "--load", run, "--output", tmp_path / "o")
    assert code == 2 and err.endswith("choose one with --iteration N"), err


def test_sentencepiece_tokenizers_are_checked_and_their_ids_exported(single_process, tmp_path, capsys):
    """A unigram SentencePiece model (train_tokenizer --model-type unigram) was exported as a BPE
    tokenizer.json with other ids, a tokenizer larger than the model and a file that is no model were
    accepted or failed late, and generation_config.json said BOS 1 / EOS 2 whatever the tokenizer
    (found by an adversarial run). Now: the unigram one is refused in one line naming
    --tokenizer-model none, which exports the weights alone; the others are refused before anything
    is written; the EOS id is the tokenizer's (a model with EOS at id 1; the mock data's EOD)."""
    import sentencepiece

    text = tmp_path / "corpus.txt"
    with open(os.path.join(ROOT, "README.md")) as f:
        text.write_text(f.read())
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", text,
                        "--model-prefix", tmp_path / "uni", "--vocab-size", "400", "--model-type", "unigram"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    sentencepiece.SentencePieceTrainer.train(  # train_tokenizer's settings, but EOS at id 1
        input=str(text), model_prefix=str(tmp_path / "eos1"), vocab_size=450, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        model_type="bpe", remove_extra_whitespaces=False, normalization_rule_name="identity", byte_fallback=True,
        allow_whitespace_only_pieces=True, split_digits=True, minloglevel=2)
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "big"), vocab_size=600,
                                             minloglevel=2)
    (tmp_path / "junk.model").write_text("not a tokenizer")
    cfg = config("pre", vocab=500)
    save(trained_model(cfg), cfg, tmp_path / "ckpt", tokenizer=str(tmp_path / "uni.model"))
    ckpt = tmp_path / "ckpt"
    code, err = convert_to_hf(capsys, "--load", ckpt, "--output", tmp_path / "a")
    assert code == 2 and "the exported tokenizer encodes" in err and "--tokenizer-model none" in err, err
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "a.tmp")
    for model, message in (("big.model", "tokenizer '{}' has 600 tokens but the model only 500"),
                           ("junk.model", "--tokenizer-model '{}' is not a SentencePiece model")):
        code, err = convert_to_hf(capsys, "--load", ckpt, "--output", tmp_path / "b", "--tokenizer-model",
                                  tmp_path / model)
        assert code == 2 and message.format(tmp_path / model) in err, err
        assert not os.path.exists(tmp_path / "b.tmp")
    assert convert_to_hf(capsys, "--load", ckpt, "--output", tmp_path / "none", "--tokenizer-model", "none")[0] == 0
    assert not os.path.exists(tmp_path / "none" / "tokenizer.model")
    uni = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "uni.model"))  # the run's tokenizer
    assert json.load(open(tmp_path / "none" / "generation_config.json")) == {"bos_token_id": uni.bos_id(),
                                                                             "eos_token_id": uni.eos_id()}
    assert convert_to_hf(capsys, "--load", ckpt, "--output", tmp_path / "e", "--tokenizer-model",
                         tmp_path / "eos1.model")[0] == 0
    assert json.load(open(tmp_path / "e" / "generation_config.json")) == {"bos_token_id": None, "eos_token_id": 1}
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "e"))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "eos1.model"))
    assert hf.eos_token_id == 1 and hf("digits 0123 and 3.14")["input_ids"] == sp.encode("digits 0123 and 3.14")


@pytest.mark.stack
def test_convert_refuses_damaged_legacy_and_unsafe_checkpoints(small_checkpoint, tmp_path, capsys):
    """The export reads a checkpoint through the same checks as a resume: a truncated shard, code
    planted in .metadata or an RNG-style file, a Megatron-LM legacy checkpoint: one line each,
    nothing written, the planted code never runs."""
    import pickle
    import shutil

    it = int(open(os.path.join(small_checkpoint, "latest_checkpointed_iteration.txt")).read())
    mark = tmp_path / "MARK"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {mark}",))

    def damaged(name, mutate):
        root = tmp_path / name
        shutil.copytree(small_checkpoint, root)
        mutate(root / f"iter_{it:07d}")
        return root

    def truncate(d):
        shard = sorted(p for p in os.listdir(d) if p.endswith(".distcp"))[0]
        open(d / shard, "r+b").truncate(100)

    cases = {
        "is truncated (100 of at least": damaged("trunc", truncate),
        "holds objects a checkpoint index never has": damaged("meta", lambda d: pickle.dump(Payload(), open(d / ".metadata", "wb"))),
        "(RNG state) holds objects this project never writes": damaged("rng", lambda d: torch.save(Payload(), d / "rng_rank00000.pt")),
        "is a Megatron-LM legacy checkpoint": damaged("legacy", lambda d: os.makedirs(d / "mp_rank_00")),
    }
    for message, root in cases.items():
        code, err = convert_to_hf(capsys, "--load", root, "--output", tmp_path / "o")
        assert code == 2 and message in err, (message, err)
        assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "o.tmp")
    assert not mark.exists()


@pytest.mark.stack
def test_tied_llama_imports_trains_and_exports_tied(single_process, tmp_path):
    """A Llama with tied embeddings (as Llama 3.2 1B/3B): imported as a tied model (not an output
    layer of its own), refused without --tie-embeddings-and-output-weights (one line naming it),
    with it the driver's model has transformers' logits and, for a training loss, transformers'
    gradient of the shared matrix (the sum of its two uses); exported again, the same tied model."""
    from safetensors.torch import load_file

    from megatron_prores.arguments import parse_args
    from megatron_prores.config import ConfigError
    from megatron_prores.hf_import import import_llama
    from megatron_prores.trainer import Trainer

    model = saved_llama(tmp_path / "hf", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    messages = []
    import_llama(str(tmp_path / "hf"), str(tmp_path / "ckpt"), seq_length=64, log=messages.append)
    flags = messages[0].split("train from it with ")[1].split(" (any TP/PP")[0].split()
    assert "--tie-embeddings-and-output-weights" in flags
    run = ["--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1",
           "--lr", "1e-4", "--mock-data", "--vocab-size", str(VOCAB), "--eval-iters", "0"]
    with pytest.raises(ConfigError, match=r"tie_embeddings is True there but False now; train it with "
                                          r"--tie-embeddings-and-output-weights$"):
        Trainer(parse_args(run + [f for f in flags if f != "--tie-embeddings-and-output-weights"]))
    trainer = Trainer(parse_args(run + flags))
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    try:
        ddp = trainer.model[0]
        chunk = ddp.module
        assert chunk.output_layer.weight is None  # the head reads the embedding matrix
        chunk.train()  # no dropout in this model
        ddp.zero_grad_buffer()
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        logits = chunk(inputs, torch.arange(63)[None].expand_as(inputs), None)[..., :VOCAB]  # (not the padding)
        ours = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        ours.backward()
        theirs = model(tokens, labels=tokens).loss
        theirs.backward()
        assert abs(ours.item() - theirs.item()) < 1e-5 * theirs.item()
        ours_grad = chunk.embedding.word_embeddings.weight.main_grad[:VOCAB]
        theirs_grad = model.model.embed_tokens.weight.grad
        err = ((ours_grad - theirs_grad).norm() / theirs_grad.norm()).item()
        assert err < 1e-5, err
        # either use's share alone is far off (an untied copy of the model gives the two shares)
        import copy

        untied = copy.deepcopy(model)
        untied.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        untied.zero_grad()
        untied(tokens, labels=tokens).loss.backward()
        shares = (untied.lm_head.weight.grad, untied.model.embed_tokens.weight.grad)
        assert torch.allclose(shares[0] + shares[1], theirs_grad, rtol=1e-5, atol=1e-8)
        assert all(((s - theirs_grad).norm() / theirs_grad.norm()).item() > 1e-2 for s in shares)
    finally:
        trainer.close()
    export(str(tmp_path / "ckpt"), str(tmp_path / "back"), progress=False, log=lambda *_: None)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32).eval()
    assert back.config.tie_word_embeddings and back.lm_head.weight is back.model.embed_tokens.weight
    original, exported = load_file(tmp_path / "hf" / "model.safetensors"), {}
    for f in os.listdir(tmp_path / "back"):
        if f.endswith(".safetensors"):
            exported.update(load_file(tmp_path / "back" / f))
    assert original.keys() == exported.keys() and "lm_head.weight" not in exported
    assert all(torch.equal(original[k], exported[k]) for k in original)
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, model.eval()(tokens).logits)

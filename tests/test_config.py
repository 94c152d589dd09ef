"""Bad configurations fail before any model is built, with one line naming value and fix."""

import pytest

from megatron_prores.config import ConfigError, MethodConfig, ModelConfig
from megatron_prores.model import build_model


def model(**kw):
    method = kw.pop("method", MethodConfig())
    base = dict(num_layers=8, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=16)
    base.update(kw)
    return ModelConfig(method=method, **base)


BAD = [
    (model(method=MethodConfig(norm_type="rms")), "--norm-type 'rms' is not valid; choose one of: pre, post, sandwich, deepnorm, lns, mix"),
    (model(method=MethodConfig(prores_schedule="cosine", prores_warmup_steps=10)), "--prores-schedule 'cosine' is not valid; choose one of: none, linear"),
    (model(method=MethodConfig(prores_schedule="linear", prores_warmup_steps=0)), "--prores-warmup-steps 0 is not valid for --prores-schedule linear"),
    (model(method=MethodConfig(prores_schedule="equal", prores_warmup_steps=-5)), "--prores-warmup-steps -5 is not valid for --prores-schedule equal"),
    (model(method=MethodConfig(prores_warmup_steps=12000)), "--prores-warmup-steps 12000 has no effect with --prores-schedule none"),
    (model(method=MethodConfig(prores_schedule="fix-L", prores_warmup_steps=-1)), "has no effect with --prores-schedule fix-L"),
    (model(method=MethodConfig(norm_type="mix", mix_post_layers=8)), "--mix-post-layers 8 is not valid for 8 layers: Mix-LN needs 1 <= k <= 7"),
    (model(method=MethodConfig(norm_type="mix", mix_post_layers=0)), "--mix-post-layers 0 is not valid for 8 layers"),
    (model(num_layers=3, method=MethodConfig(norm_type="mix")), "--mix-post-layers 0 is not valid for 3 layers"),
    (model(method=MethodConfig(norm_type="pre", mix_post_layers=2)), "--mix-post-layers 2 only applies to --norm-type mix"),
    (model(method=MethodConfig(norm_type="post", gpas=True)), "--gpas with --norm-type post is not defined by the GPAS paper"),
    (model(method=MethodConfig(gpas=True, gpas_gate="layer")), "--gpas-gate 'layer' is not valid; choose one of: block, sublayer"),
    (model(method=MethodConfig(init_method="xavier")), "--init-method 'xavier' is not valid; choose one of: normal, scaled, ds-init"),
    (model(pipeline_model_parallel_size=3), "--num-layers 8 is not divisible by --pipeline-model-parallel-size 3"),
    (model(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=3), "--num-layers-per-virtual-pipeline-stage 3 does not divide the 4 layers"),
    (model(num_layers_per_virtual_pipeline_stage=2), "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size >= 2"),
    (model(tensor_model_parallel_size=3), "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"),
    (model(hidden_size=66), "--hidden-size 66 is not divisible by --num-attention-heads 4"),
    (model(num_query_groups=3), "--num-attention-heads 4 is not divisible by --num-query-groups 3"),
    (model(sequence_parallel=True), "--sequence-parallel needs --tensor-model-parallel-size >= 2"),
    (model(num_layers=0), "--num-layers 0 is not valid; it must be a positive integer"),
    (model(normalization="BatchNorm"), "--normalization 'BatchNorm' is not valid; choose one of: RMSNorm, LayerNorm"),
    (model(transformer_impl="apex"), "--transformer-impl 'apex' is not valid; choose one of: local, transformer_engine"),
    (model(context_parallel_size=0), "--context-parallel-size 0 is not valid; it must be a positive integer"),
    (model(context_parallel_size=3, seq_length=32),
     "--seq-length 32 is not divisible by 2 x --context-parallel-size 3 (each sequence is cut into 2 x CP chunks)"),
    (model(context_parallel_size=2, tensor_model_parallel_size=4, sequence_parallel=True, seq_length=12),
     "--seq-length 12 / --context-parallel-size 2 is not divisible by --tensor-model-parallel-size 4"),
    (model(context_parallel_size=2, attention_backend="local"),
     "--attention-backend local (megatron-core's DotProductAttention) has no context parallelism"),
    pytest.param(model(transformer_impl="transformer_engine"),
                 "--transformer-impl transformer_engine needs Transformer Engine, which is not installed",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU-only check")),
    (model(tensor_model_parallel_size=2, sequence_parallel=True, seq_length=15),
     "--seq-length 15 is not divisible by --tensor-model-parallel-size 2, which --sequence-parallel needs"),
    (model(hidden_dropout=1.5), "--hidden-dropout 1.5 is not valid; it must be in [0, 1)"),
    (model(rotary_base=0.0), "--rotary-base 0.0 is not valid; it must be a positive number"),
    (model(norm_epsilon=float("nan")), "--norm-epsilon nan is not valid; it must be a positive number"),
    (model(fp8_format="hybrid"), "--fp8-format needs --transformer-impl transformer_engine"),
    (model(transformer_impl="transformer_engine", fp8_format="e4m3"), "--fp8-format needs --bf16"),
    (model(fp8_recipe="linear"), "--fp8-recipe 'linear' is not valid; choose one of: delayed, tensorwise"),
    (model(attention_backend="cudnn"), "--attention-backend 'cudnn' is not valid; choose one of: auto, flash"),
]


@pytest.mark.parametrize("cfg,message", BAD, ids=[(b.values if hasattr(b, "values") else b)[1][:40] for b in BAD])
def test_bad_config_fails_with_one_clear_line(single_process, cfg, message):
    with pytest.raises(ConfigError) as info:
        build_model(cfg)  # validation runs before any module is constructed
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_valid_configs_pass():
    model(method=MethodConfig(norm_type="mix")).validate()  # k = floor(8/4) = 2
    model(method=MethodConfig(prores_schedule="fix-L")).validate()  # fix-* need no warmup
    model(method=MethodConfig(norm_type="deepnorm", gpas=True, prores_schedule="linear",
                              prores_warmup_steps=800)).validate()
    model(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=2).validate()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU-only check")
def test_te_spec_without_te_is_a_clear_error():
    from megatron_prores.specs import layer_spec

    with pytest.raises(ConfigError, match="needs Transformer Engine, which is not importable here"):
        layer_spec(MethodConfig(), "pre", "transformer_engine")


def test_fp8_shapes_must_be_multiples_of_16():
    cfg = model(transformer_impl="transformer_engine", fp8_format="hybrid", bf16=True, hidden_size=72,
                num_attention_heads=4, ffn_hidden_size=160)
    with pytest.raises(ConfigError, match="--hidden-size 72 is not a multiple of 16, which FP8 GEMMs need"):
        cfg.validate(check_installed=False)
    cfg.replace(hidden_size=64).validate(check_installed=False)
    with pytest.raises(ConfigError, match="--ffn-hidden-size / TP 40 is not a multiple of 16"):
        cfg.replace(hidden_size=64, tensor_model_parallel_size=4).validate(check_installed=False)


def test_vocab_is_padded_for_tensor_parallelism():
    cfg = model(vocab_size=50257, tensor_model_parallel_size=2, make_vocab_size_divisible_by=128)
    assert cfg.padded_vocab_size == 50432 and cfg.padded_vocab_size % 256 == 0
    assert model(vocab_size=64).padded_vocab_size == 64


def test_driver_flags_from_a_recipe_file(tmp_path):
    from megatron_prores.arguments import parse_args

    recipe = tmp_path / "recipe.txt"
    recipe.write_text("# a 4-layer recipe\n--num-layers 4 --hidden-size 64\n--num-attention-heads 4\n"
                      "--seq-length 32 --micro-batch-size 2 --global-batch-size 8\n--train-iters 10 --lr 1e-3\n"
                      "--mock-data --vocab-size 128 --norm-type deepnorm --gpas   # DeepNorm + GPAS\n"
                      "--data-cache-path 'cache # 1'/a#b  # a comment after a quoted #, and a # inside a word\n")
    args = parse_args([f"@{recipe}", "--lr", "2e-3"])  # later flags override the file
    assert (args.num_layers, args.norm_type, args.gpas, args.lr) == (4, "deepnorm", True, 2e-3)
    assert args.data_cache_path == "cache # 1/a#b"
    with pytest.raises(ConfigError, match="--norm-type"):
        parse_args([f"@{recipe}", "--norm-type", "rms"])
    with pytest.raises(ConfigError, match="no training data"):
        parse_args(["--num-layers", "2", "--hidden-size", "8", "--num-attention-heads", "2", "--seq-length", "8",
                    "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1", "--lr", "1e-3"])


def test_a_megatron_lm_llama_recipe_is_accepted():
    """The flags a Megatron-LM Llama recipe carries to describe the model are accepted (they state
    what this model always is); --use-flash-attn is --attention-backend flash; what this model
    cannot be is refused in one line."""
    from megatron_prores.arguments import check_recipe

    llama = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "176", "--num-attention-heads", "4",
             "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32",
             "--max-position-embeddings", "32", "--swiglu", "--normalization", "RMSNorm", "--norm-epsilon", "1e-5",
             "--position-embedding-type", "rope", "--use-rotary-position-embeddings", "--rotary-base", "500000",
             "--no-position-embedding", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
             "--attention-softmax-in-fp32", "--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion",
             "--use-mcore-models", "--distributed-backend", "nccl", "--log-throughput", "--kv-channels", "16",
             "--rotary-percent", "1.0", "--ckpt-format", "torch_dist", "--num-workers", "2",
             "--distributed-timeout-minutes", "60", "--no-create-attention-mask-in-dataloader",
             "--micro-batch-size", "1", "--global-batch-size", "8", "--train-iters", "10", "--lr", "3e-4",
             "--mock-data", "--vocab-size", "128", "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
             "--weight-decay", "0.1", "--adam-beta2", "0.95", "--lr-decay-style", "cosine"]
    args, cfg, _, _ = check_recipe(llama + ["--use-flash-attn", "--lr-warmup-fraction", "0.25"], 8)
    assert (cfg.attention_backend, cfg.rotary_base, cfg.norm_epsilon, cfg.query_groups, args.lr_warmup_fraction) == \
        ("flash", 500000.0, 1e-5, 2, 0.25)
    for extra, message in [
        (["--position-embedding-type", "learned_absolute"], "--position-embedding-type: invalid choice"),
        (["--use-flash-attn", "--attention-backend", "unfused"], "--use-flash-attn asks for --attention-backend flash"),
        (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"], "--lr-warmup-fraction and --lr-warmup-iters exclude"),
        (["--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction 1.5 is not valid; it must be in [0, 1)"),
        (["--kv-channels", "32"], "--kv-channels 32 is not --hidden-size 64 / --num-attention-heads 4"),
        (["--rotary-percent", "0.5"], "--rotary-percent 0.5: this model applies RoPE to the whole head"),
        (["--ckpt-format", "torch"], "--ckpt-format: invalid choice"),
    ]:
        with pytest.raises(ConfigError) as e:
            check_recipe(llama + extra, 8)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("dropped, meaning", [
    (["--swiglu"], "--swiglu means a GeLU MLP"),
    (["--disable-bias-linear"], "--disable-bias-linear means linear layers with biases"),
    (["--untie-embeddings-and-output-weights"], "--untie-embeddings-and-output-weights (or "
                                                "--tie-embeddings-and-output-weights) means an output layer tied"),
    (["--position-embedding-type", "--use-rotary-position-embeddings"],
     "--position-embedding-type rope means learned absolute positions"),
    (["--normalization"], "--normalization RMSNorm (or LayerNorm) means LayerNorm"),
    (["--group-query-attention"], "--group-query-attention means --num-query-groups ignored"),
    (["--num-query-groups"], "--num-query-groups (with --group-query-attention) means one key/value group"),
    (["--ffn-hidden-size"], "--ffn-hidden-size means 4 x --hidden-size, or with --swiglu 8/3 x --hidden-size"),
    # this project's defaults that are not Megatron-LM's (dropout 0.1, wd 0.01, beta2 0.999, linear decay there)
    (["--hidden-dropout"], "--hidden-dropout means 0.1"),
    (["--attention-dropout"], "--attention-dropout means 0.1"),
    (["--weight-decay"], "--weight-decay means 0.01"),
    (["--adam-beta2"], "--adam-beta2 means 0.999"),
    (["--lr-decay-style"], "--lr-decay-style means linear"),
])
def test_a_megatron_lm_recipe_that_leaves_out_a_model_flag_is_refused(dropped, meaning):
    """In Megatron-LM, leaving one of these flags out builds another model (GeLU, biases, tied
    output layer, learned positions, LayerNorm, no GQA, dropout 0.1) or trains it otherwise (weight
    decay 0.01, beta2 0.999, linear decay): a recipe that gives Megatron-LM's model flags must give
    all of them here, or it would train another model than it did there."""
    from megatron_prores.arguments import check_recipe

    recipe = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176", "--num-attention-heads", "4",
              "--num-query-groups", "2", "--group-query-attention", "--seq-length", "32", "--swiglu", "--disable-bias-linear",
              "--untie-embeddings-and-output-weights", "--position-embedding-type", "rope",
              "--use-rotary-position-embeddings", "--normalization", "RMSNorm", "--micro-batch-size", "1",
              "--global-batch-size", "8", "--train-iters", "10", "--lr", "3e-4", "--mock-data", "--vocab-size", "128",
              "--hidden-dropout", "0.0", "--attention-dropout", "0.0", "--weight-decay", "0.1", "--adam-beta2", "0.95",
              "--lr-decay-style", "cosine"]  # the defaults, stated
    check_recipe(recipe, 8)
    valued = ("--position-embedding-type", "--normalization", "--num-query-groups", "--ffn-hidden-size",
              "--hidden-dropout", "--attention-dropout", "--weight-decay", "--adam-beta2", "--lr-decay-style")
    cut = [f for i, f in enumerate(recipe) if f not in dropped and not (recipe[i - 1] in dropped
                                                                          and recipe[i - 1] in valued)]
    with pytest.raises(ConfigError) as e:
        check_recipe(cut, 8)
    assert "reads as a Megatron-LM recipe" in str(e.value) and meaning in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    plain = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
             "--micro-batch-size", "1", "--global-batch-size", "8", "--train-iters", "10", "--lr", "3e-4",
             "--mock-data", "--vocab-size", "128"]
    check_recipe(plain, 8)  # this project's own flags alone state nothing of Megatron-LM's


def test_lr_warmup_fraction_follows_megatron_lm(single_process):
    """--lr-warmup-fraction f: the warmup is f x the decay length in samples, not rounded to whole
    iterations (Megatron-LM's rule), then cosine: the driver's scheduler against it written out."""
    import math

    from megatron_prores.arguments import parse_args
    from megatron_prores.trainer import Trainer

    lr, f, iters, gbs = 1e-3, 0.25, 10, 2
    trainer = Trainer(parse_args(["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
                                  "--seq-length", "8", "--micro-batch-size", "2", "--global-batch-size", str(gbs),
                                  "--train-iters", str(iters), "--lr", str(lr), "--lr-warmup-fraction", str(f),
                                  "--mock-data", "--vocab-size", "64", "--eval-iters", "0"]))
    try:
        warmup = f * iters  # 2.5 iterations
        for it in range(1, iters + 1):
            trainer.scheduler.step(increment=gbs)
            want = (lr * it / warmup if it <= warmup
                    else lr * 0.5 * (1 + math.cos(math.pi * (it - warmup) / (iters - warmup))))
            assert trainer.scheduler.get_lr(trainer.optimizer.param_groups[0]) == pytest.approx(want, rel=1e-12), it
    finally:
        trainer.close()


def test_train_samples_schedule_follows_megatron_lm(single_process):
    """--train-samples (Megatron-LM's sample-based run): train_samples // global batch steps, and the
    LR schedule in samples, not rounded to steps: warmup from --lr-warmup-init over --lr-warmup-samples, cosine decay
    over --lr-decay-samples, then --min-lr; the driver's scheduler against it written out."""
    import math

    from megatron_prores.arguments import parse_args
    from megatron_prores.trainer import Trainer

    lr, min_lr, gbs, warmup, decay, init = 1e-3, 1e-4, 2, 5, 15, 2e-4
    args = parse_args(["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8",
                       "--micro-batch-size", "2", "--global-batch-size", str(gbs), "--train-samples", "21",
                       "--lr", str(lr), "--min-lr", str(min_lr), "--lr-warmup-samples", str(warmup),
                       "--lr-warmup-init", str(init),
                       "--lr-decay-samples", str(decay), "--mock-data", "--vocab-size", "64", "--eval-iters", "0"])
    assert args.train_iters == 10  # 21 // 2
    trainer = Trainer(args)
    try:
        for it in range(1, 11):
            trainer.scheduler.step(increment=gbs)
            s = it * gbs
            want = (init + (lr - init) * s / warmup if s <= warmup else min_lr if s > decay else
                    min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (decay - warmup))))
            assert trainer.scheduler.get_lr(trainer.optimizer.param_groups[0]) == pytest.approx(want, rel=1e-12), it
    finally:
        trainer.close()


def test_a_sample_based_run_resumes_bitwise(single_process, tmp_path):
    """--train-samples with a schedule in samples: stopped after 2 steps and resumed (the checkpoint
    records the schedule in samples; a changed one is refused), the losses are the uninterrupted
    run's bitwise."""
    from megatron_prores.arguments import parse_args
    from megatron_prores.trainer import Trainer
    from tests.test_train import train_in_process, train_state

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-samples", "17", "--lr", "3e-3",
            "--lr-warmup-samples", "12", "--lr-warmup-init", "1e-3", "--lr-decay-samples", "14", "--mock-data",
            "--vocab-size", "64", "--eval-iters", "0", "--log-interval", "1"]

    def train(extra):
        train_in_process(lambda e: Trainer(parse_args(base + [str(x) for x in e])), extra)

    train(["--save", tmp_path / "full"])
    train(["--save", tmp_path / "part", "--exit-interval", "2"])
    with pytest.raises(ConfigError, match=r"--lr-decay-samples 14 -> 16 changes the LR schedule"):
        train(["--save", tmp_path / "part", "--load", tmp_path / "part", "--lr-decay-samples", "16"])
    with pytest.raises(ConfigError, match=r"with --train-samples the training length in steps follows it"):
        train(["--save", tmp_path / "part", "--load", tmp_path / "part", "--global-batch-size", "2",
               "--override-data-flags"])
    # the checkpoint's schedule: its warmup start too (megatron's scheduler state lacks it); step 3 is
    # still in the warmup (12 samples)
    train(["--save", tmp_path / "part", "--load", tmp_path / "part", "--use-checkpoint-opt-param-scheduler",
           "--lr-warmup-init", "0"])
    a, b = train_state(tmp_path / "full")[1]["train_state"], train_state(tmp_path / "part")[1]["train_state"]
    assert len(a["losses"]) == 4 and a["losses"] == b["losses"]


@pytest.mark.parametrize("flags, message", [
    (["--train-iters", "5", "--train-samples", "40"], "--train-iters and --train-samples exclude each other"),
    ([], "give the training length: --train-iters STEPS or --train-samples SAMPLES"),
    (["--train-samples", "40", "--lr-warmup-iters", "2"],
     "--lr-warmup-iters does not go with --train-samples (the LR schedule is in samples then); give --lr-warmup-samples"),
    (["--train-iters", "5", "--lr-decay-samples", "30"],
     "--lr-decay-samples does not go with --train-iters (the LR schedule is in steps then); give --lr-decay-iters"),
    (["--train-samples", "40", "--lr-decay-style", "WSD"], "--lr-decay-style WSD needs --lr-wsd-decay-samples"),
    (["--train-samples", "7"], "--train-samples 7 is less than one global batch (--global-batch-size 8)"),
    (["--train-samples", "40", "--lr-warmup-fraction", "0.1", "--lr-warmup-samples", "4"],
     "--lr-warmup-fraction and --lr-warmup-samples exclude each other"),
    (["--train-samples", "40", "--lr-warmup-samples", "40"],
     "the LR warmup (40 samples) must be shorter than its decay (40 samples); shorten --lr-warmup-samples"),
    (["--train-iters", "5", "--lr-warmup-iters", "6"],
     "the LR warmup (48 samples) must be shorter than its decay (40 samples); shorten --lr-warmup-iters"),
    (["--train-iters", "5", "--lr-warmup-init", "2e-3"], "--lr-warmup-init 0.002 must be at most --lr 0.001"),
    (["--train-iters", "5", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "6"],
     "--lr-wsd-decay-iters is longer than the LR decay"),
    (["--train-iters", "5", "--tie-embeddings-and-output-weights", "--pipeline-model-parallel-size", "2",
      "--use-distributed-optimizer", "--gpas"], "--tie-embeddings-and-output-weights with pipeline parallelism, the "
                                                "distributed optimizer and --gpas fails to save"),
])
def test_training_length_flags_are_checked_in_one_line(flags, message):
    from megatron_prores.arguments import check_recipe

    base = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8",
            "--micro-batch-size", "1", "--global-batch-size", "8", "--lr", "1e-3", "--mock-data", "--vocab-size", "64"]
    with pytest.raises(ConfigError) as e:
        check_recipe(base + flags, 8)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_driver_flags_for_fp8_and_kernels():
    """The kernel flags reach the model config; FP8 token counts are checked per rank."""
    from megatron_prores.arguments import check_recipe

    def base(mbs=1):
        return ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "24",
                "--micro-batch-size", str(mbs), "--global-batch-size", "16", "--train-iters", "10", "--lr", "1e-3",
                "--mock-data", "--vocab-size", "128"]

    fp8 = ["--transformer-impl", "transformer_engine", "--bf16", "--fp8-format", "hybrid",
           "--fp8-recipe", "tensorwise"]
    with pytest.raises(ConfigError, match=r"tokens of a micro batch per rank \(24 = "):
        check_recipe(base() + fp8, 8)
    _, cfg, _, _ = check_recipe(base(2) + fp8, 8)
    assert (cfg.fp8_format, cfg.fp8_recipe, cfg.transformer_impl) == ("hybrid", "tensorwise", "transformer_engine")
    _, cfg, _, _ = check_recipe(base() + ["--attention-backend", "flash", "--no-bias-dropout-fusion"], 8)
    assert cfg.attention_backend == "flash" and cfg.bias_dropout_fusion is False
    with pytest.raises(ConfigError, match="--fp8-format needs --transformer-impl transformer_engine"):
        check_recipe(base() + ["--fp8-format", "hybrid"], 8)

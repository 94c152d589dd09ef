"""SLURM launch: script hygiene, every recipe's flags, and a real single-node SLURM that preempts,
times out, requeues and resumes the tiny CPU recipe to the same result as an uninterrupted run."""

import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import finish
from tests.slurm_cluster import Cluster, install
from tests.test_train import assert_same_weights, train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "slurm", "*.sbatch")))
SCRIPTS = RECIPES + [os.path.join(ROOT, "slurm", "launch.sh"), os.path.join(ROOT, ".ci", "run")] + \
    sorted(glob.glob(os.path.join(ROOT, "examples", "*.sh"))) + sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.sh")))
GIB = 1024 ** 3


def sbatch_option(text, name):
    return int(re.search(rf"^#SBATCH --{name}=(\d+)", text, re.M).group(1))


def test_every_published_recipe_exists():
    names = {os.path.basename(r) for r in RECIPES}
    want = {f"{n}.sbatch" for n in ("71m", "130m", "350m", "1.3b", "3b", "7b", "tiny_cpu")}
    want |= {f"depth_{L}.sbatch" for L in (24, 48, 72, 96, 120)}
    assert want <= names, want - names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_shellcheck_clean():
    if not shutil.which("shellcheck"):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("shellcheck is not installed and cannot be installed here (needs root and apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=900)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "shellcheck"], capture_output=True, text=True,
                           env=env, timeout=900)
        if r.returncode:
            pytest.skip(f"apt-get install shellcheck failed: {r.stderr.strip()[-200:]}")
    r = subprocess.run(["shellcheck", "--severity=style", *SCRIPTS], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def dry_run(recipe, **env):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **env}
    for k in ("SLURM_JOB_ID", "SLURM_JOB_NAME"):
        env.pop(k, None)
    return subprocess.run(["bash", recipe, "--dry-run"], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_dry_run_flags_are_accepted_and_the_comments_are_true(recipe, tmp_path):
    """The printed command's flags pass the driver's own parser and checks for the job's world
    size, and the recipe's comment gives the memory estimate and tokens per step of those flags."""
    from megatron_prores.arguments import check_recipe
    from megatron_prores.tools.estimate_memory import estimate

    r = dry_run(recipe, DATA_PATH="0.7 /data/a_text_document 0.3 /data/b_text_document",
                TOKENIZER_MODEL="/data/tok.model", RUN_DIR=str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    words = shlex.split(r.stdout)
    flags = words[words.index("megatron_prores.train") + 1:]
    text = open(recipe).read()
    world = sbatch_option(text, "nodes") * sbatch_option(text, "ntasks-per-node")
    args, cfg, dp, num_micro = check_recipe(flags, world)
    assert args.save == args.load == str(tmp_path / "run" / "checkpoints") and args.exit_signal_handler
    assert args.tensorboard_dir == str(tmp_path / "run" / "tensorboard")
    tokens = int(re.search(r"tokens per step: ([\d,]+)", text).group(1).replace(",", ""))
    assert tokens == args.global_batch_size * args.seq_length
    if "tiny_cpu" in recipe:
        assert not args.bf16 and args.tensor_model_parallel_size == 2
        assert args.data_path == ["0.7", "/data/a_text_document", "0.3", "/data/b_text_document"]
        return
    assert args.data_path == ["0.7", "/data/a_text_document", "0.3", "/data/b_text_document"]
    assert args.tokenizer_model == "/data/tok.model"
    gib = int(re.search(r"memory per GPU: ~(\d+) GiB", text).group(1))
    total = estimate(args, cfg, dp, num_micro)["bytes"]["total"] / GIB
    assert gib == round(total) and total < 70, (gib, total)  # fits an 80 GB H100 with room
    assert args.bf16 and args.use_distributed_optimizer and args.train_iters * tokens >= 50e9 * 0.999
    L = args.num_layers
    assert args.prores_warmup_steps == (500 if L >= 96 else 1000) * L  # T per block (the ProRes paper)


# ---- fidelity: what a recipe launches against the ProRes paper's published setup, written out ---------------
# (hidden, layers, heads, ffn, LR, ProRes T per block): the ProRes paper's "Published model shapes" table, its
# depth scaling (the 71M width at 24..120 layers, LR 2e-3) and its warmup rule (T = 1000; 500 at 96 and 120 layers)
PUBLISHED = {
    "71m": (512, 12, 8, 1368, 2e-3, 1000),
    "130m": (768, 12, 12, 2048, 2e-3, 1000),
    "350m": (1024, 24, 16, 2736, 1e-3, 1000),
    "1.3b": (2048, 24, 32, 5632, 6e-4, 1000),
    "3b": (2560, 32, 32, 6848, 6e-4, 1000),
    "7b": (4096, 32, 32, 11008, 3e-4, 1000),
    "depth_24": (512, 24, 8, 1368, 2e-3, 1000),
    "depth_48": (512, 48, 8, 1368, 2e-3, 1000),
    "depth_72": (512, 72, 8, 1368, 2e-3, 1000),
    "depth_96": (512, 96, 8, 1368, 2e-3, 500),
    "depth_120": (512, 120, 8, 1368, 2e-3, 500),
}
PUBLISHED_TOKENS = 50e9  # per run
PUBLISHED_SEQ, PUBLISHED_BATCH = 1024, 512  # tokens per sequence, sequences per step
PUBLISHED_LR_WARMUP = 2000  # steps; WSD: linear decay to 0 over the last 10%
PUBLISHED_VOCAB = 32000  # "32k vocab" (the memory comments assume it)


def recipe_command(name, tmp_path, extra=""):
    """The driver's parsed flags and model config of ``slurm/NAME.sbatch`` as submitted (its world size)."""
    from megatron_prores.arguments import check_recipe

    recipe = os.path.join(ROOT, "slurm", f"{name}.sbatch")
    r = dry_run(recipe, DATA_PATH="/data/c4_text_document", TOKENIZER_MODEL="/data/tok.model",
                RUN_DIR=str(tmp_path / "run"), EXTRA_ARGS=extra)
    assert r.returncode == 0, r.stderr
    words = shlex.split(r.stdout)
    text = open(recipe).read()
    world = sbatch_option(text, "nodes") * sbatch_option(text, "ntasks-per-node")
    args, cfg, _, _ = check_recipe(words[words.index("megatron_prores.train") + 1:], world)
    return args, cfg, text


def wsd_lr(step, lr, iters, warmup, decay):
    """The published LR at 0-based step ``step``: linear warmup from 0, constant, linear decay to 0 at ``iters``."""
    if step <= warmup:
        return lr * step / warmup
    return lr if step <= iters - decay else lr * (iters - step) / decay


def scheduler_lr(args, step):
    """The LR megatron-core's OptimizerParamScheduler gives step ``step``, built as the driver builds it."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron_prores.arguments import schedule_samples

    class Groups:  # all the scheduler touches of an optimizer
        param_groups = [{"lr": 0.0, "weight_decay": 0.0}]

    g, lengths = args.global_batch_size, schedule_samples(args)
    s = OptimizerParamScheduler(
        Groups(), init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=lengths["warmup"],
        lr_decay_steps=lengths["decay"], lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.train_iters * g, wd_incr_style="constant",
        wsd_decay_steps=lengths["wsd"], lr_wsd_decay_style=args.lr_wsd_decay_style)
    s.num_steps = step * g
    return s.get_lr(Groups.param_groups[0])


@pytest.mark.parametrize("name", sorted(PUBLISHED), ids=str)
def test_recipe_is_the_published_setup(name, tmp_path):
    """Every number the ProRes paper gives for the run, checked on the flags the recipe launches, and the LR and
    ProRes value of given steps against the published formulas (through megatron-core's scheduler and the
    driver's schedule code, so a flag meaning another thing than the recipe assumes fails here)."""
    hidden, layers, heads, ffn, lr, T = PUBLISHED[name]
    args, cfg, text = recipe_command(name, tmp_path)
    m = cfg.method
    # shape (Llama-style: RMSNorm, SwiGLU, RoPE, no biases, 32k vocabulary)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_attention_heads, cfg.ffn_size) == (hidden, layers, heads, ffn)
    assert cfg.query_groups == heads and cfg.normalization == "RMSNorm" and cfg.swiglu and not cfg.add_bias_linear
    assert cfg.padded_vocab_size == PUBLISHED_VOCAB and not cfg.tie_embeddings
    assert cfg.hidden_dropout == cfg.attention_dropout == 0.0
    # data and length
    assert (args.seq_length, args.global_batch_size) == (PUBLISHED_SEQ, PUBLISHED_BATCH)
    tokens = PUBLISHED_SEQ * PUBLISHED_BATCH
    assert abs(args.train_iters * tokens - PUBLISHED_TOKENS) < tokens  # 50B tokens, to the step
    # optimizer: AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, bf16
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.clip_grad) == (0.9, 0.95, 0.1, 1.0)
    assert args.bf16
    # LR: WSD, 2000 warmup steps, linear decay to 0 over the last 10%
    assert args.lr == lr and args.min_lr == 0 and args.lr_warmup_init == 0
    assert (args.lr_decay_style, args.lr_wsd_decay_style, args.lr_warmup_iters) == ("WSD", "linear", PUBLISHED_LR_WARMUP)
    assert args.lr_decay_iters in (None, args.train_iters)
    n, decay = args.train_iters, round(0.1 * args.train_iters)
    assert args.lr_wsd_decay_iters == decay
    for step in (0, 1, 1000, PUBLISHED_LR_WARMUP, PUBLISHED_LR_WARMUP + 1, n // 2, n - decay, n - decay + 1,
                 n - decay // 2, n - 1, n):
        assert scheduler_lr(args, step) == pytest.approx(wsd_lr(step, lr, n, PUBLISHED_LR_WARMUP, decay), rel=1e-9,
                                                         abs=1e-15), step
    # Pre-LN + ProRes linear: a(l, t) = min(t / (T l), 1); normal init, std 0.02 (no depth-scaled output projections)
    assert (m.norm_type, m.prores_schedule, m.prores_warmup_spacing, m.gpas) == ("pre", "linear", "even", False)
    assert (m.init_method, cfg.init_method_std) == ("normal", 0.02)
    for l in (1, 2, layers // 2, layers):
        for t in (0, 1, T // 2, T, T * l - 1, T * l, T * layers, n - 1):
            assert m.prores_value(t, l, layers) == pytest.approx(min(t / (T * l), 1.0), rel=1e-12, abs=0), (l, t)
        assert m.prores_final_step(l, layers) == T * l
    # the recipe's comment says the same
    assert f"T = {T} (W = {T * layers // 1000}k)" in text and "50B tokens" in text
    assert f"{hidden}, {layers} layers, {heads} heads, ffn {ffn}" in text or \
        f"hidden {hidden}, {heads} heads, ffn {ffn}) at {layers} layers" in text


@pytest.mark.parametrize("name", sorted(PUBLISHED), ids=str)
def test_recipe_post_ln_and_deepnorm_overrides_are_the_published_ones(name, tmp_path):
    """The recipe's EXTRA_ARGS for Post-LN/DeepNorm "as published": half the LR and 10% LR warmup (the paper),
    for both norm types; and the 7B GPAS note's gate clip 0.01 (the published 7B gate clip)."""
    _, _, _, _, lr, _ = PUBLISHED[name]
    text = open(os.path.join(ROOT, "slurm", f"{name}.sbatch")).read()
    extra = re.search(r'EXTRA_ARGS="(--norm-type post [^"]*)"', text).group(1)
    for norm in ("post", "deepnorm"):
        args, cfg, _ = recipe_command(name, tmp_path, extra.replace("--norm-type post", f"--norm-type {norm}"))
        assert cfg.method.norm_type == norm
        assert args.lr == pytest.approx(lr / 2, rel=1e-12)
        assert args.lr_warmup_iters == round(0.1 * args.train_iters)
        assert args.lr_wsd_decay_iters == round(0.1 * args.train_iters)  # the decay is unchanged
    if name == "7b":
        gpas = re.search(r'EXTRA_ARGS="(--gpas [^"]*)"', text).group(1)
        args, cfg, _ = recipe_command(name, tmp_path, gpas)
        assert cfg.method.gpas and args.clip_gate_grad == 0.01


def test_launcher_without_data_gives_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "SLURM_JOB_ID")}
    r = subprocess.run(["bash", os.path.join(ROOT, "slurm", "1.3b.sbatch")], capture_output=True, text=True,
                       env={**env, "RUN_DIR": str(tmp_path)}, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "set DATA_PATH=" in r.stderr, r.stderr
    r = subprocess.run(["bash", os.path.join(ROOT, "slurm", "1.3b.sbatch")], capture_output=True, text=True,
                       env={**env, "RUN_DIR": str(tmp_path), "DATA_PATH": "/d/x"}, timeout=60)
    assert r.returncode == 2 and "TOKENIZER_MODEL" in r.stderr, r.stderr


def test_without_slurm_a_bad_flag_is_the_drivers_one_line_and_exit_2(tmp_path):
    """torchrun's ChildFailedError traceback and exit 1 followed the driver's line before."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("MASTER_PORT", "RANK")}
    r = subprocess.run(["bash", os.path.join(ROOT, "slurm", "tiny_cpu.sbatch")], capture_output=True, text=True,
                       env={**env, "RUN_DIR": str(tmp_path), "EXTRA_ARGS": "--train-iters 0", "PYTHON": sys.executable,
                            "PYTHONWARNINGS": "ignore"}, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error: --train-iters 0 is not valid; it must be positive" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr and "ChildFailedError" not in r.stdout + r.stderr


def test_without_slurm_ctrl_c_saves_and_exits_and_twice_stops_at_once(tmp_path):
    """A terminal's Ctrl-C (SIGINT to the foreground process group): the tee and the launcher died
    of it, cutting the workers' output, and torchrun killed the workers within 30 s, mid-save or
    not. Now the first saves at the next step boundary and exits 0; a second one stops at once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("MASTER_PORT", "RANK")}
    env.update(PYTHON=sys.executable, PYTHONWARNINGS="ignore",
               EXTRA_ARGS="--train-iters 100000 --lr-warmup-iters 1 --eval-iters 0 --log-interval 2 --save-interval 100000")
    for presses, code in ((1, 0), (2, 137)):
        run_dir = tmp_path / f"run{presses}"
        # as a terminal's foreground job: SIGINT at its default (a test run in the background, e.g.
        # under nohup, starts every child with SIGINT ignored, which bash then cannot trap)
        p = subprocess.Popen(["bash", os.path.join(ROOT, "slurm", "tiny_cpu.sbatch")], env={**env, "RUN_DIR": str(run_dir)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        seen = []
        for line in p.stdout:
            seen.append(line)
            if line.startswith(" iteration "):
                break
        for _ in range(presses):
            os.killpg(p.pid, signal.SIGINT)
            time.sleep(0.2)
        try:
            out = "".join(seen) + finish(p, 180)[0]
        finally:  # what a failing launcher leaves (torchrun's workers run in sessions of their own)
            alive = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout.split()
            subprocess.run(["pkill", "-KILL", "-f", str(run_dir)])
        assert p.returncode == code, out[-3000:]
        latest = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
        if presses == 1:
            assert "launch.sh: Ctrl-C: the training saves at the next step boundary and exits" in out
            assert "exiting at iteration" in out and latest.exists(), out[-3000:]
            assert f"(latest checkpoint: iteration {latest.read_text().strip()})" in out
        else:
            assert "Ctrl-C again: stopping at once, without saving" in out and not latest.exists(), out[-3000:]
        assert alive == [], f"processes of the run left behind: {alive}"


def test_launcher_words_with_spaces_are_quoted_as_in_a_shell(tmp_path):
    """EXTRA_ARGS and DATA_PATH were split at every space: an @file or a data path in a folder with
    a space in its name could not be given."""
    launch = os.path.join(ROOT, "slurm", "launch.sh")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(RUN_DIR=str(tmp_path), EXTRA_ARGS="@'/my runs/x.args' --lr 1", TOKENIZER_MODEL="/t",
               DATA_PATH="0.5 '/data/set a/x_text_document' 0.5 \"/data/b\"")
    r = subprocess.run(["bash", launch, "--dry-run", "--", "--num-layers", "2"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    words = shlex.split(r.stdout)
    assert words[words.index("--data-path") + 1:words.index("--data-path") + 5] == [
        "0.5", "/data/set a/x_text_document", "0.5", "/data/b"]
    assert words[-3:] == ["@/my runs/x.args", "--lr", "1"]
    r = subprocess.run(["bash", launch, "--dry-run", "--", "--mock-data"], capture_output=True, text=True,
                       env={**env, "EXTRA_ARGS": "--lr '1"}, timeout=60)
    assert r.returncode == 2 and r.stderr == ("launch.sh: EXTRA_ARGS has a quote that is not closed "
                                              "(EXTRA_ARGS=--lr '1); close it\n"), r.stderr
    (tmp_path / "a-file").write_text("")
    r = subprocess.run(["bash", launch, "--", "--mock-data"], capture_output=True, text=True, timeout=60,
                       env={**env, "EXTRA_ARGS": "", "RUN_DIR": str(tmp_path / "a-file" / "run")})
    assert r.returncode == 2 and r.stderr == (f"launch.sh: cannot create the run directory {tmp_path}/a-file/run "
                                              f"(Not a directory); set RUN_DIR to a writable place\n"), r.stderr


# ---- the launcher's end of a job, with stand-ins for srun/scancel/scontrol ------------------------
FAKE_SRUN = r"""#!/usr/bin/env bash
# stands in for `srun ... python -m megatron_prores.train FLAGS`: records its environment, and on
# USR1 (what scancel --signal=USR1 sends) writes the checkpoint marker FAKE_LATEST and exits 0
save=""
while (($#)); do [[ $1 == --save ]] && save=$2; shift; done
echo "RANK=${RANK:-unset} WORLD_SIZE=${WORLD_SIZE:-unset}" > "$FAKE/srun.env"
trap 'echo "$FAKE_LATEST" > "$save/latest_checkpointed_iteration.txt"; exit 0' USR1
echo $$ > "$FAKE/srun.pid"
sleep 0.5
echo " iteration        1/     400 | lm loss: 5.0E+00 |"
while true; do sleep 0.1; done
"""
FAKE_SCANCEL = '#!/usr/bin/env bash\nkill -USR1 "$(cat "$FAKE/srun.pid")"\n'
FAKE_SCONTROL = """#!/usr/bin/env bash
case $1 in
    show) echo node-a; if [[ -n "${FAKE_EARLY:-}" ]]; then touch "$FAKE/set-up"; sleep 1; fi ;;  # during set-up
    requeue) echo "$2" >> "$FAKE/requeued"; exit "${FAKE_REQUEUE_RC:-0}" ;;
esac
"""
LAUNCH_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
                "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--mock-data",
                "--vocab-size", "128"]


def time_limit_signal(tmp_path, flags, latest, **env):
    """launch.sh in a (stand-in) SLURM job that gets the time-limit signal; its training saves
    ``latest`` and exits 0. Returns (exit code, output, requeued job ids, the tasks' RANK line)."""
    fake = tmp_path / "fake"
    fake.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    for stale in ("srun.pid", "requeued", "srun.env", "set-up"):
        (fake / stale).unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "FAKE": str(fake),
           "FAKE_LATEST": str(latest), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-a",
           "RUN_DIR": str(tmp_path / "run"), "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore", **env}
    p = subprocess.Popen(["bash", os.path.join(ROOT, "slurm", "launch.sh"), "--", *flags], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0, ready = time.time(), fake / ("set-up" if env.get("FAKE_EARLY") else "srun.pid")
    while not ready.exists():
        assert time.time() - t0 < 60 and p.poll() is None, p.communicate()[0]
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)  # --signal=B:USR1: to the batch script
    out = finish(p, 120)[0]
    requeued = (fake / "requeued").read_text().split() if (fake / "requeued").exists() else []
    return p.returncode, out, requeued, (fake / "srun.env").read_text().strip()


def test_time_limit_requeues_an_unfinished_run_whatever_form_its_length_takes(tmp_path):
    """The length as the driver reads it: `--train-iters=N` and an @file were not seen (the run
    ended COMPLETED at its time limit, unfinished); a finished run is not requeued."""
    (tmp_path / "length.args").write_text("--train-iters 400  # the run's length\n")
    for length, latest, requeue in ((["--train-iters=400"], 221, True), ([f"@{tmp_path / 'length.args'}"], 221, True),
                                    (["--train-samples", "1600"], 221, True), (["--train-iters=400"], 400, False)):
        code, out, requeued, _ = time_limit_signal(tmp_path, LAUNCH_FLAGS + length, latest)
        assert code == 0, out
        assert requeued == (["4242"] if requeue else []), (length, out)
        if requeue:
            assert f"saved at iteration {latest} of 400; requeueing job 4242" in out, out


def test_a_time_limit_signal_during_set_up_is_passed_on_after_a_step_and_not_requeued(tmp_path):
    """--time hardly longer than the --signal lead: the signal comes while the launcher sets up.
    It was passed on after a fixed 5 s (a task not yet started died of it: FAILED) and the job was
    requeued, to be stopped at once again, one step per restart."""
    code, out, requeued, _ = time_limit_signal(tmp_path, LAUNCH_FLAGS + ["--train-iters", "400"], 1, FAKE_EARLY="1")
    assert code == 0 and requeued == [], out
    assert "the time-limit signal came before training started" in out and "give a longer --time" in out
    assert out.index(" iteration        1/") < out.index("asking the training to save and exit"), out


def test_a_refused_requeue_says_how_to_resume_and_the_job_ends_cleanly(tmp_path):
    code, out, requeued, _ = time_limit_signal(tmp_path, LAUNCH_FLAGS + ["--train-iters", "400"], 221,
                                               FAKE_REQUEUE_RC="1")
    assert code == 0 and requeued == ["4242"], out
    assert ("SLURM refused to requeue job 4242 (--no-requeue, or the site forbids it); submit the same job "
            "again to resume from iteration 221") in out, out
    assert "training exited with code 0 (latest checkpoint: iteration 221)" in out


def test_torchruns_rank_variables_from_the_submitting_shell_do_not_reach_the_tasks(tmp_path):
    """sbatch passes the submitter's environment on: an exported RANK=0 made every task rank 0."""
    _, out, _, ranks = time_limit_signal(tmp_path, LAUNCH_FLAGS + ["--train-iters", "400"], 400,
                                         RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    assert ranks == "RANK=unset WORLD_SIZE=unset", out


def test_a_recipe_finds_the_launcher_as_salloc_arrays_and_paths_with_spaces_run_it(tmp_path):
    """sbatch runs a copy of the recipe, which finds launch.sh through the job's Command=. Under
    salloc that is "(null)" (bash reads the file itself), a job array prints two Command= lines, and
    the path may hold spaces and is followed by the script's arguments: exit 127 in all three."""
    checkout = tmp_path / "my runs" / "megatron prores"
    shutil.copytree(os.path.join(ROOT, "slurm"), checkout / "slurm")
    recipe = checkout / "slurm" / "tiny_cpu.sbatch"
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(recipe, spool / "slurm_script")  # what slurmd runs
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/usr/bin/env bash\ncase "$1 $2" in\n  "show hostnames") echo node-a ;;\n'
                                   '  "show job") printf "%s\\n" "$FAKE_JOB" ;;\nesac\n')
    (fake / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node-a", "RUN_DIR": str(tmp_path / "run"), "PYTHONWARNINGS": "ignore"}
    env.pop("PRORES_HOME", None)
    cases = {"sbatch, spaces and arguments": (spool / "slurm_script", f"   Command={recipe} --my-arg x"),
             "job array": (spool / "slurm_script", f"   Command={recipe}\n   Command={recipe}"),
             "salloc": (recipe, "   Command=(null)")}
    for name, (script, job) in cases.items():
        r = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True,
                           env={**env, "FAKE_JOB": job}, timeout=60)
        assert r.returncode == 0 and "megatron_prores.train" in r.stdout, (name, r.stderr)
    r = subprocess.run(["bash", str(spool / "slurm_script"), "--dry-run"], capture_output=True, text=True,
                       env={**env, "FAKE_JOB": "   Command=(null)"}, timeout=60)
    assert r.returncode == 2 and r.stderr == (f"error: launch.sh is not in {spool}; set PRORES_HOME to the "
                                              f"megatron-prores checkout\n"), r.stderr
    r = subprocess.run(["bash", str(spool / "slurm_script"), "--dry-run"], capture_output=True, text=True,
                       env={**env, "FAKE_JOB": "   Command=(null)", "PRORES_HOME": str(checkout)}, timeout=60)
    assert r.returncode == 0, r.stderr


# ---- a real SLURM ----------------------------------------------------------------------------
# Timing comes from the uninterrupted reference run on this machine (its start-up time and step
# time), never from wall-clock guesses: a loaded machine makes every run slower, not the test red.

ITERS = 600  # ~70 s on 2 idle CPU processes
LEAD = 300  # --signal=B:USR1@LEAD: seconds between the time-limit signal and the limit
SLURM_TICK = 30  # slurmctld checks time limits (and sends the warning signal) every 30 s


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = install()
    if reason:
        pytest.skip(reason)
    subprocess.run(["pkill", "-f", "prores-slurm.*slurm.conf"], capture_output=True)
    root = str(tmp_path_factory.mktemp("prores-slurm"))
    cluster = Cluster(root)
    reason = cluster.start()
    if reason:
        cluster.stop()
        pytest.skip(f"cannot start a single-node SLURM here: {reason}")
    yield cluster
    subprocess.run(["scancel", "--user", "root"], env=cluster.env, capture_output=True)
    cluster.stop()


def submit(cluster, workdir, run_dir, *sbatch_args):
    # sbatch exports this environment into the job: leave out the rendezvous variables of this
    # test process (other tests' process groups hold their MASTER_PORT)
    env = {k: v for k, v in cluster.env.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(RUN_DIR=str(run_dir), PYTHON=sys.executable, PYTHONWARNINGS="ignore",
               EXTRA_ARGS=f"--train-iters {ITERS} --log-interval 50")
    r = subprocess.run(["sbatch", "--parsable", *sbatch_args, os.path.join(ROOT, "slurm", "tiny_cpu.sbatch")],
                       capture_output=True, text=True, env=env, cwd=workdir, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def seconds(slurm_time: str) -> int:
    """SLURM's [D-]HH:MM:SS (or MM:SS) as seconds."""
    days, _, hms = slurm_time.rpartition("-")
    parts = [int(x) for x in hms.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def wait_done(cluster, job_id, timeout, on_requeue=None):
    """Until the job has ended for good. SLURM holds a requeued job about two minutes (BeginTime);
    the test shortens that to a few seconds (released within the second of the requeue, slurmd
    refuses the new start: "Job credential revoked"). ``on_requeue`` runs once, then."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        job = cluster.job(job_id)
        state = job.get("JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return job
        if state == "PENDING" and job.get("Reason") == "BeginTime":
            if on_requeue is not None:
                on_requeue()
                on_requeue = None
            time.sleep(5)
            cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
        time.sleep(2)
    raise AssertionError(f"job {job_id} did not end within {timeout:.0f}s: {cluster.job(job_id)}")


def wait_latest(run_dir, at_least, timeout, job_output_fn):
    latest = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    t0 = time.time()
    while not (latest.exists() and int(latest.read_text()) >= at_least):
        assert time.time() - t0 < timeout, job_output_fn()[-3000:]
        time.sleep(0.5)
    return int(latest.read_text())


def job_output(workdir, job_id):
    return open(os.path.join(workdir, f"slurm-prores-tiny-cpu-{job_id}.out")).read()


class Reference:
    """The tiny recipe run uninterrupted, and the timing of this machine measured on it."""

    def __init__(self, checkpoints, run_s, step_s):
        self.checkpoints, self.run_s, self.step_s = checkpoints, run_s, step_s

    def timeout(self, runs=1):
        """Bound for a job of ``runs`` runs: 5x what the reference took, plus SLURM's requeue hold."""
        return 5 * runs * self.run_s + 120 * (runs - 1) + 60


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory):
    """The tiny recipe uninterrupted: it ends normally and is not requeued."""
    work = tmp_path_factory.mktemp("ref")
    job_id = submit(slurm, work, work / "run")
    job = wait_done(slurm, job_id, timeout=1800)
    out = job_output(work, job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "0", (job, out[-3000:])
    assert "requeueing" not in out
    steps_ms = [float(x) for x in re.findall(r"elapsed time per iteration \(ms\): ([\d.]+)", out)]
    assert steps_ms, out[-3000:]
    return Reference(work / "run" / "checkpoints", seconds(job["RunTime"]), max(steps_ms) / 1000)


def assert_same_run(a, b):
    it_a, sa = train_state(a)
    it_b, sb = train_state(b)
    assert it_a == it_b == ITERS
    assert sa["train_state"]["consumed_samples"] == sb["train_state"]["consumed_samples"]
    assert sa["train_state"]["losses"] == sb["train_state"]["losses"]  # bitwise, every step
    assert_same_weights(a, b)


@pytest.mark.exhaustive  # 10-25 minutes with the cluster's set-up: CI's 90 minutes
def test_preempted_job_is_requeued_and_resumes_to_the_same_result(slurm, reference, tmp_path):
    job_id = submit(slurm, tmp_path, tmp_path / "run")
    wait_latest(tmp_path / "run", 100, reference.timeout(), lambda: job_output(tmp_path, job_id))
    slurm.run("scontrol", "requeue", job_id)  # as a preemption does: SIGTERM to every process
    job = wait_done(slurm, job_id, reference.timeout(runs=2))
    out = job_output(tmp_path, job_id)
    assert job["JobState"] == "COMPLETED" and int(job["Restarts"]) >= 1, (job, out[-3000:])
    first = open(tmp_path / "run" / "logs" / f"{job_id}-0.log").read()
    second = open(tmp_path / "run" / "logs" / f"{job_id}-1.log").read()
    stopped = int(re.search(r"exiting at iteration (\d+)", first).group(1))
    assert 100 <= stopped < ITERS  # saved at a step boundary after the signal, exit 0
    assert f"resumed from {tmp_path / 'run' / 'checkpoints'} at iteration {stopped}" in second
    assert_same_run(reference.checkpoints, tmp_path / "run" / "checkpoints")


@pytest.mark.exhaustive  # 10-25 minutes with the cluster's set-up: CI's 90 minutes
def test_time_limit_signal_saves_requeues_and_resumes_to_the_same_result(slurm, reference, tmp_path):
    """SLURM's own time limit: the job runs with a 30-minute limit and USR1 LEAD s before it. Once
    it is training with enough steps left (measured step time) to outlast SLURM's next time-limit
    check, its limit is cut so that less than LEAD s remain: SLURM sends USR1 at that check, and
    the run has at least LEAD - 60 s to save and exit. The requeued run gets its 30 minutes back."""
    job_id = submit(slurm, tmp_path, tmp_path / "run", "--time=30", f"--signal=B:USR1@{LEAD}")
    # SLURM signals at its first time-limit check after the cut: leave two checks' worth of steps
    last_cut = ITERS - int(2 * SLURM_TICK / reference.step_s)
    assert last_cut >= 10, f"a step takes {reference.step_s:.2f}s: {ITERS} steps end too soon for SLURM's signal"
    at = wait_latest(tmp_path / "run", 10, reference.timeout(), lambda: job_output(tmp_path, job_id))
    assert at <= last_cut, f"the run passed iteration {last_cut} before its first checkpoint was seen"
    elapsed = seconds(slurm.job(job_id)["RunTime"])
    limit_min = (elapsed + LEAD - 60) // 60 + 1  # remaining = 60 * limit - elapsed, in [LEAD - 60, LEAD)
    slurm.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={limit_min}")
    job = wait_done(slurm, job_id, reference.timeout(runs=2) + LEAD,
                    on_requeue=lambda: slurm.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=30"))
    out = job_output(tmp_path, job_id)
    assert job["JobState"] == "COMPLETED" and int(job["Restarts"]) >= 1, (job, out[-3000:])
    assert "USR1 (time limit near)" in out and f"requeueing job {job_id}" in out
    assert "exiting at iteration" in out and "resumed from" in out
    assert_same_run(reference.checkpoints, tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("recompute, stored, working", [
    (["--recompute-granularity", "full"], "2 * s * b * h * 4", "one_block"),  # uniform, n = 1: 4 blocks a stage
    (["--recompute-granularity", "full", "--recompute-num-layers", "2"], "2 * s * b * h * 2", "2 * one_block"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "3"],
     "2 * s * b * h * 3 + one_block", "one_block"),
    ([], "4 * one_block", "0"),
], ids=["uniform-1", "uniform-2", "block-3", "none"])
def test_memory_estimate_of_recompute(recompute, stored, working):
    """The activation estimate, written out: each micro batch in flight on the first stage (PP=2
    and 8 micro batches: 2) keeps what recompute leaves (a block's 2*s*b*h input per recomputed
    unit), and backward recomputes one unit of one micro batch at a time (its activations once)."""
    from megatron_prores.arguments import check_recipe
    from megatron_prores.tools.estimate_memory import estimate

    L, h, heads, groups, f, s, b = 8, 256, 8, 4, 704, 512, 2
    flags = ["--num-layers", L, "--hidden-size", h, "--num-attention-heads", heads, "--num-query-groups", groups,
             "--ffn-hidden-size", f, "--seq-length", s, "--max-position-embeddings", s, "--micro-batch-size", b,
             "--global-batch-size", 16, "--pipeline-model-parallel-size", 2, "--train-iters", 10, "--lr", "1e-3",
             "--mock-data", "--vocab-size", 1000, "--bf16", "--save", "x", *recompute]
    args, cfg, dp, num_micro = check_recipe(list(map(str, flags)), 2)
    assert (dp, num_micro) == (1, 8)
    kv = groups * h // heads
    one_block = s * b * (10 * h + 2 * (h + 2 * kv) + 6 * f)  # bf16 bytes of a block's activations (module doc)
    expect = eval(stored) * 2 + eval(working)
    assert estimate(args, cfg, dp, num_micro)["bytes"]["activations"] == pytest.approx(expect, rel=1e-12)

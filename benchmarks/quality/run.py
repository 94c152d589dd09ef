"""Small-scale reproductions of the ProRes and GPAS papers' findings (one command per experiment).

    python benchmarks/quality/run.py stability --size cpu     # Post-LN 24 blocks, high LR: schedules
    python benchmarks/quality/run.py depth --size cpu         # 12/24 blocks (GPU: 12-96), Pre-LN vs +ProRes
    python benchmarks/quality/run.py quality --size gpu       # 10 norm x method variants, 2 seeds
    python benchmarks/quality/run.py schedules --size gpu     # Post-LN: linear vs linear-square vs stagewise-L

Corpus: the Linux kernel documentation of Debian's linux-doc-6.1 (English prose, ~29 MB; `apt-get
install linux-doc-6.1`), tokenized with this project's tools (SentencePiece BPE), 2% held out for
validation. Each run trains with megatron-prores-train, logs to TensorBoard, and is skipped when its
result exists (rerunning continues an interrupted experiment). Results: docs/results/<size>/
<experiment>.json and .md (table) and figures made with tools/plot_run.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
KDOC = "/usr/share/doc/linux-doc-6.1/Documentation"

# shapes and lengths per machine size; W is the total ProRes warmup as a share of the run
SIZES = {
    "cpu": dict(hidden=128, heads=4, ffn=352, seq=128, mbs=8, gbs=16, iters=300, lr_warmup=6, eval_interval=50,
                eval_iters=8, vocab=4000, W=0.4, corpus_bytes=12_000_000),
    "toy": dict(hidden=32, heads=2, ffn=64, seq=32, mbs=4, gbs=4, iters=10, lr_warmup=2, eval_interval=5,
                eval_iters=2, vocab=1000, W=0.4, corpus_bytes=300_000),
    "gpu": dict(hidden=512, heads=8, ffn=1368, seq=1024, mbs=16, gbs=64, iters=4000, lr_warmup=80,
                eval_interval=250, eval_iters=20, vocab=16000, W=0.4, corpus_bytes=None),
}


def experiments(size: str) -> dict:
    """{experiment: [(run name, extra flags)]}."""
    z = SIZES[size]
    W = lambda L: ["--prores-warmup-steps", str(int(z["W"] * z["iters"]))]  # noqa: E731
    post = ["--norm-type", "post", "--num-layers", "24", "--lr", "3e-3" if size == "cpu" else "2e-3"]
    exps = {
        "stability": [("post-baseline", post)] + [
            (f"post-{s}", post + ["--prores-schedule", s] + W(24)) for s in ("linear", "equal", "reverse")],
        "schedules": [(f"post-{s}", post + ["--prores-schedule", s] + W(24))
                      for s in ("linear", "linear-square", "stagewise-L")],
        "depth": [],
        "quality": [],
    }
    for L in (12, 24) + ((48, 96) if size == "gpu" else ()):  # 48 blocks take 20+ min per run on 2 CPU cores
        base = ["--norm-type", "pre", "--num-layers", str(L), "--lr", "2e-3" if size == "cpu" else "1e-3"]
        if size == "cpu":  # half the batch: the depth runs fit the CPU machine's time budget
            base += ["--global-batch-size", "8"]
        exps["depth"] += [(f"pre-{L}", base), (f"pre-prores-{L}", base + ["--prores-schedule", "linear"] + W(L))]
    q = ["--num-layers", "12", "--lr", "2e-3" if size == "cpu" else "1e-3"]
    pr = ["--prores-schedule", "linear"] + W(12)
    variants = [("pre", ["--norm-type", "pre"]), ("pre-prores", ["--norm-type", "pre"] + pr),
                ("pre-gpas", ["--norm-type", "pre", "--gpas"]), ("pre-prores-gpas", ["--norm-type", "pre", "--gpas"] + pr),
                ("lns", ["--norm-type", "lns"]), ("lns-prores", ["--norm-type", "lns"] + pr),
                ("sandwich", ["--norm-type", "sandwich"]), ("sandwich-gpas", ["--norm-type", "sandwich", "--gpas"]),
                ("deepnorm", ["--norm-type", "deepnorm"]), ("deepnorm-prores", ["--norm-type", "deepnorm"] + pr)]
    headline = {"pre", "pre-prores", "pre-gpas"}
    for name, flags in variants:
        for seed in ((1234, 1235) if name in headline else (1234,)):
            exps["quality"].append((f"{name}-s{seed}", q + flags + ["--seed", str(seed)]))
    return exps


SEEDED = ("pilot", "all", "report", "cpu-stability", "cpu-prenorm", "cpu-lns", "cpu-sandwich", "cpu-deepnorm",
          "cpu-depth")


def prepare_data(data_dir: str, size: str) -> tuple:
    """Corpus -> tokenizer -> .bin/.idx (cached); returns (data prefix, tokenizer model)."""
    z = SIZES[size]
    prefix, tok = os.path.join(data_dir, "kdoc_text_document"), os.path.join(data_dir, "tok.model")
    if os.path.isfile(prefix + ".idx") and os.path.isfile(tok):
        return prefix, tok
    source = KDOC
    if not os.path.isdir(KDOC) and size == "toy":  # the rehearsal only checks the pipeline: any text will do
        source = None
    elif not os.path.isdir(KDOC):
        sys.exit(f"error: {KDOC} is missing; install it with: apt-get install linux-doc-6.1")
    os.makedirs(data_dir, exist_ok=True)
    corpus = os.path.join(data_dir, "kdoc.jsonl")
    src = ["--source", source, "--extensions", ".rst", ".txt"] if source else []
    steps = [["build_corpus", *src, "--output", corpus]
             + (["--max-bytes", str(z["corpus_bytes"])] if z["corpus_bytes"] else []),
             ["train_tokenizer", "--input", corpus, "--model-prefix", tok[:-6], "--vocab-size", str(z["vocab"]),
              "--max-sentences", "300000"],
             ["preprocess_data", "--input", corpus, "--tokenizer-model", tok, "--output-prefix",
              os.path.join(data_dir, "kdoc")]]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for cmd in steps:
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", cmd[0] + ".py"), *cmd[1:]], check=True, env=env)
    return prefix, tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training_flags(run_dir: str, flags: list, size: str, data: tuple) -> list:
    """The driver's flags for one run: the size's common setup, then the run's own."""
    z = SIZES[size]
    common = ["--hidden-size", str(z["hidden"]), "--num-attention-heads", str(z["heads"]),
              "--ffn-hidden-size", str(z["ffn"]), "--seq-length", str(z["seq"]), "--micro-batch-size", str(z["mbs"]),
              "--global-batch-size", str(z["gbs"]), "--train-iters", str(z["iters"]),
              "--lr-warmup-iters", str(z["lr_warmup"]), "--lr-decay-style", "cosine", "--min-lr", "1e-5",
              "--weight-decay", "0.1", "--adam-beta2", "0.95", "--clip-grad", "1.0",
              "--data-path", data[0], "--tokenizer-model", data[1], "--split", "98,2,0",
              "--eval-interval", str(z["eval_interval"]), "--eval-iters", str(z["eval_iters"]), "--log-interval", "5",
              "--tensorboard-dir", os.path.join(run_dir, "tensorboard"), "--max-nonfinite-iters", "5"]
    if size == "gpu":
        common += ["--bf16"]
    return common + flags


def train(run_dir: str, flags: list, size: str, data: tuple) -> int:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if size != "gpu":  # the driver has no thread flag: one intra-op thread per run (see --jobs)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    nproc = int(os.environ.get("NPROC", "1"))
    if nproc == 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
        cmd = [sys.executable, "-m", "megatron_prores.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", "megatron_prores.train"]
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        return subprocess.run(cmd + training_flags(run_dir, flags, size, data), stdout=log, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT).returncode


def summarize(run_dir: str, code: int, seconds: float, vocab: int) -> dict:
    from megatron_prores.tools.plot_run import read_scalars

    s = read_scalars(os.path.join(run_dir, "tensorboard"))
    train = s.get("lm-loss-training/lm loss", ([], []))[1]
    val = s.get("lm-loss-validation/lm loss", ([], []))[1]
    rms = {int(t.split()[-1]): v[1][-1] for t, v in s.items() if t.startswith("stream-rms/")}
    tail = [x for x in train[-max(1, len(train) // 10):] if math.isfinite(x)]
    final_train = sum(tail) / len(tail) if tail else float("nan")
    diverged = code == 3 or not tail or final_train > math.log(vocab)  # worse than a uniform guess
    return {"exit_code": code, "seconds": round(seconds, 1), "diverged": diverged,
            "final_val_loss": val[-1] if val else None, "final_val_ppl": math.exp(min(val[-1], 50)) if val else None,
            "final_train_loss": final_train,
            "spike_score": s.get("loss-spike-score", ([], [None]))[1][-1],
            "stream_rms_by_block": [rms[k] for k in sorted(rms)]}


def table(results: dict) -> str:
    lines = ["| run | final val loss | val ppl | train loss (last 10%) | diverged | spike score | minutes |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        f = lambda v, p=3: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"  # noqa
        lines.append(f"| {name} | {f(r['final_val_loss'])} | {f(r['final_val_ppl'], 1)} | {f(r['final_train_loss'])} | "
                     f"{'yes' if r['diverged'] else 'no'} | {f(r['spike_score'], 4)} | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main():
    if len(sys.argv) > 1 and sys.argv[1] in SEEDED:
        from seeded import main as seeded_main  # the CPU suite with seeds (issue 17)

        return seeded_main(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=["stability", "schedules", "depth", "quality", *SEEDED])
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "quality"))
    p.add_argument("--results-dir", default=os.path.join(ROOT, "docs", "results"))
    a = p.parse_args()
    data = prepare_data(os.path.join(a.runs_dir, a.size, "data"), a.size)
    out = os.path.join(a.results_dir, a.size)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{a.experiment}.json")
    results = json.load(open(path)) if os.path.isfile(path) else {}
    runs = experiments(a.size)[a.experiment]
    for name, flags in runs:
        if name in results:
            continue
        run_dir = os.path.join(a.runs_dir, a.size, a.experiment, name)
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted attempt starts over
        os.makedirs(run_dir)
        t0 = time.time()
        code = train(run_dir, flags, a.size, data)
        if code < 0:
            sys.exit(f"{a.experiment}/{name} was killed by signal {-code}; rerun to continue")
        results[name] = dict(summarize(run_dir, code, time.time() - t0, SIZES[a.size]["vocab"]), flags=flags)
        print(f"{a.experiment}/{name}: exit {code}, val loss {results[name]['final_val_loss']}, "
              f"{results[name]['seconds']:.0f}s", flush=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
    with open(os.path.join(out, f"{a.experiment}.md"), "w") as f:
        f.write(table(results) + "\n")
    from megatron_prores.tools.plot_run import main as plot

    names = [n for n, _ in runs]
    plot([os.path.join(a.runs_dir, a.size, a.experiment, n, "tensorboard") for n in names]
         + ["--output", os.path.join(out, a.experiment), "--labels", *names])
    plot_rms(results, os.path.join(out, a.experiment, "stream-rms-by-block.png"))
    print(table(results))


def plot_rms(results: dict, path: str) -> None:
    """Final residual-stream RMS after each block, one line per run (the variance-growth picture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        if r["stream_rms_by_block"]:
            ax.plot(range(1, len(r["stream_rms_by_block"]) + 1), r["stream_rms_by_block"], marker=".", label=name)
    ax.set_xlabel("block")
    ax.set_ylabel("RMS of the residual stream (end of training)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

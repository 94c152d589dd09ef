"""Issue 17: the CPU suite with seeds (pilot, 6 experiments, `all`, `report`). Entry: run.py <target>."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics as st
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import run as R

# ---- config: fill POST from the pilot (None = pick automatically from the pilot's results) ----
# Post-LN stability setting (blocks, LR): "an LR just above what the baseline tolerates", at the deepest pilot
# depth that has such an LR. None: taken from the pilot's results (pick_post). The CPU pilot of 2026-11-28 found
# 24 blocks on the unigram plateau at every LR from 2.5e-4 to 4e-3 (no boundary there), hence shallower depths.
POST = {"cpu": None, "toy": None}
PILOT_DEPTHS = {"cpu": (24, 12, 6), "toy": (2,)}  # deepest first
PRE_LR = {"cpu": 2e-3, "toy": 2e-3}    # every other CPU experiment
# DeepNorm runs at half the Pre-LN LR, as the ProRes paper's DeepNorm runs do. Changed after the
# first DeepNorm runs (2026-11-28, LR 2e-3: 3 of 3 seeds of both configs on the unigram plateau, val 6.715/6.716).
LR_BY_EXP = {"cpu": {"cpu-deepnorm": 1e-3}, "toy": {}}
PILOT_LRS = [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3]
# CPU shape of the seeded suite (flags appended after the size's own: the driver's argparse keeps the last)
SHAPE = {"cpu": dict(hidden=64, heads=4, ffn=176, gbs=8, iters=200, eval_interval=50, eval_iters=4, L=24, depths=(12, 24, 48)),
         "toy": dict(hidden=32, heads=2, ffn=64, gbs=4, iters=10, eval_interval=5, eval_iters=2, L=2, depths=(2, 3))}
SEEDS = {"cpu": 3, "toy": 1}
# The stability runs sit at the pilot's train/no-train boundary, where one seed trains and the next collapses
# onto the unigram plateau (3 seeds of 2026-11-28: 1 of 3 trained for the baseline and linear, 0 of 3 for
# equal and reverse), so the claim is judged on counts of runs that train, which need more seeds.
SEEDS_BY_EXP = {"cpu": {"cpu-stability": 8}, "toy": {}}


def seeds_for(size, exp, n=None):
    """Seeds per configuration of ``exp``: --seeds, else the experiment's own count, else the size's."""
    return n or SEEDS_BY_EXP[size].get(exp, SEEDS[size])


TARGETS = ["cpu-prenorm", "cpu-stability", "cpu-lns", "cpu-sandwich", "cpu-deepnorm", "cpu-depth"]  # headline first


def shape_flags(size):
    z = SHAPE[size]
    return ["--hidden-size", str(z["hidden"]), "--num-attention-heads", str(z["heads"]), "--ffn-hidden-size",
            str(z["ffn"]), "--global-batch-size", str(z["gbs"]), "--micro-batch-size", str(z["gbs"]),
            "--train-iters", str(z["iters"]), "--eval-interval", str(z["eval_interval"]),
            "--eval-iters", str(z["eval_iters"])] + (["--split", "60,40,0"] if size == "toy" else [])


def unigram_entropy(prefix):
    import numpy as np
    t = np.fromfile(prefix + ".bin", dtype=np.uint16)
    c = np.bincount(t).astype(float)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log(p)).sum())


def pilot_name(L, lr):
    return f"post-L{L}-lr{lr:g}"


def pick_post(size, pilot, H, depths=None):
    """(blocks, LR, why): at the deepest pilot depth (of ``depths``, default all) where the baseline
    trains at some LR and not at a larger one, the smallest such larger LR."""
    if POST[size]:
        return (*POST[size], "set in POST")
    for L in depths or PILOT_DEPTHS[size]:
        got = {lr: verdict_train(pilot[pilot_name(L, lr)], H) for lr in PILOT_LRS if pilot_name(L, lr) in pilot}
        ok = [lr for lr, v in got.items() if v == "trains"]
        bad = [lr for lr, v in got.items() if v != "trains" and lr > max(ok, default=0)]
        if ok and bad:
            return L, min(bad), f"auto: {L} blocks, the first pilot LR above the largest that trains"
    L = PILOT_DEPTHS[size][0]
    return L, PILOT_LRS[0], "auto FALLBACK: the pilot shows no train/no-train boundary at any depth"


def verdict_train(r, H, margin=0.1):
    if r["diverged"]:
        return "diverged"
    return "trains" if r["final_train_loss"] < H - margin else "plateau"


def experiments(size, post):
    z, sf = SHAPE[size], shape_flags(size)
    W = ["--prores-warmup-steps", str(int(0.4 * z["iters"]))]
    pr = ["--prores-schedule", "linear"] + W
    L = ["--num-layers", str(z["L"])]
    pre_lr = ["--lr", f"{PRE_LR[size]:g}"]
    post = sf + ["--num-layers", str(post[0]), "--norm-type", "post", "--lr", f"{post[1]:g}"]
    base = sf + L + pre_lr
    dn = sf + L + ["--lr", f"{LR_BY_EXP[size].get('cpu-deepnorm', PRE_LR[size]):g}", "--norm-type", "deepnorm"]
    e = {"cpu-stability": [("post-baseline", post)] + [(f"post-{s}", post + ["--prores-schedule", s] + W)
                                                        for s in ("linear", "equal", "reverse")],
         "cpu-prenorm": [("pre", base + ["--norm-type", "pre"]), ("pre-prores", base + ["--norm-type", "pre"] + pr),
                         ("pre-gpas", base + ["--norm-type", "pre", "--gpas"]),
                         ("pre-prores-gpas", base + ["--norm-type", "pre", "--gpas"] + pr)],
         "cpu-lns": [("lns", base + ["--norm-type", "lns"]), ("lns-prores", base + ["--norm-type", "lns"] + pr)],
         "cpu-sandwich": [("sandwich", base + ["--norm-type", "sandwich"]),
                          ("sandwich-gpas", base + ["--norm-type", "sandwich", "--gpas"])],
         "cpu-deepnorm": [("deepnorm", dn), ("deepnorm-prores", dn + pr)],
         "cpu-depth": []}
    for d in z["depths"]:
        b = sf + pre_lr + ["--norm-type", "pre", "--num-layers", str(d)]
        e["cpu-depth"] += [(f"pre-{d}", b), (f"pre-prores-{d}", b + pr)]
    return e


# (section, experiment, paper's claim, [(method, baseline)], metric)
SECTIONS = [
    ("Post-LN: linear vs equal vs reverse", "cpu-stability",
     "Post-LN + linear ProRes trains; equal and reverse are worse (diverge)",
     [("post-linear", "post-baseline"), ("post-linear", "post-equal"), ("post-linear", "post-reverse")], "val"),
    ("Pre-LN ± ProRes ± GPAS", "cpu-prenorm", "ProRes and GPAS each lower Pre-LN's loss",
     [("pre-prores", "pre"), ("pre-gpas", "pre"), ("pre-prores-gpas", "pre")], "val"),
    ("LNS ± ProRes", "cpu-lns", "ProRes lowers LNS's loss", [("lns-prores", "lns")], "val"),
    ("Sandwich ± GPAS", "cpu-sandwich", "GPAS lowers Sandwich-LN's loss", [("sandwich-gpas", "sandwich")], "val"),
    ("DeepNorm ± ProRes", "cpu-deepnorm", "ProRes lowers DeepNorm's loss", [("deepnorm-prores", "deepnorm")], "val"),
    ("Depth trend: Pre-LN vs Pre-LN + ProRes", "cpu-depth", "ProRes beats Pre-LN at every depth", "DEPTH", "val"),
    ("Residual-stream RMS by depth, with and without GPAS", "cpu-prenorm",
     "GPAS lowers the residual stream's growth (last-block RMS)", [("pre-gpas", "pre"), ("pre-prores-gpas", "pre-prores")],
     "rms"),
]
RULE = ("Per configuration: mean ± sample std over seeds. A difference **exceeds the seed spread** when "
        "|Δmean| > 2·sqrt(std_a²/n_a + std_b²/n_b) (≈ a 95% two-sample test), or when the counts of failed runs "
        "differ by ≥ 2 (failed = diverged; in the Post-LN stability experiment, failed = did not train by the "
        "pilot's criterion, a definition made after its first 3 seeds showed that outcome to be bimodal). "
        "Verdict: **agree** if every claimed comparison goes the paper's way beyond the spread; **disagree** if any "
        "goes the other way beyond the spread; otherwise **inconclusive**. The last column of each comparison "
        "pairs the runs of one seed (the seed sets the data order, so both runs of a pair saw the same batches): the "
        "mean per-seed difference ± 2·SE. It was added after the first results, for information; the verdicts use "
        "the rule above, stated before any run.")


def aggregate(results, H=None, failed_if_no_training=False):
    g = {}
    for name, r in results.items():
        g.setdefault(name.rsplit("-s", 1)[0], []).append(r)
    out = {}
    for c, rs in g.items():
        v = [r["final_val_loss"] for r in rs if r["final_val_loss"] is not None and math.isfinite(r["final_val_loss"])
             and not r["diverged"]]
        rms = [r["stream_rms_by_block"][-1] for r in rs if r["stream_rms_by_block"]]
        sp = [r["spike_score"] for r in rs if r["spike_score"] is not None]
        f = lambda x: (st.mean(x) if x else float("nan"), st.stdev(x) if len(x) > 1 else 0.0, len(x))  # noqa
        trains = sum(verdict_train(r, H) == "trains" for r in rs) if H else None
        failed = len(rs) - trains if failed_if_no_training and H else sum(r["diverged"] for r in rs)
        out[c] = dict(val=f(v), rms=f(rms), spike=f(sp), diverged=sum(r["diverged"] for r in rs), trains=trains,
                      failed=failed, n=len(rs))
    return out


def compare(a, b, metric):
    """(delta a-b, threshold, beyond, sign): method a better when lower."""
    (ma, sa, na), (mb, sb, nb) = a[metric], b[metric]
    thr = 2 * math.sqrt(sa ** 2 / max(na, 1) + sb ** 2 / max(nb, 1))
    d = ma - mb
    if metric == "val" and abs(a["failed"] - b["failed"]) >= 2:
        return d, thr, True, (-1 if a["failed"] < b["failed"] else 1)
    beyond = math.isfinite(d) and abs(d) > thr and min(na, nb) > 1
    return d, thr, beyond, (-1 if d < 0 else 1)


def paired(runs, a, b, metric):
    """(mean, 2·SE, n) of the per-seed difference a − b over the seeds both have (finite, not
    diverged): runs of one seed share the data order, so this removes the order's share of the spread."""
    def value(r):
        x = r["final_val_loss"] if metric == "val" else (r["stream_rms_by_block"] or [None])[-1]
        return None if r["diverged"] or x is None or not math.isfinite(x) else x
    by_seed = {}
    for name, r in runs.items():
        config, seed = name.rsplit("-s", 1)
        if config in (a, b) and value(r) is not None:
            by_seed.setdefault(seed, {})[config] = value(r)
    d = [v[a] - v[b] for v in by_seed.values() if len(v) == 2]
    if len(d) < 2:
        return float("nan"), float("nan"), len(d)
    return st.mean(d), 2 * st.stdev(d) / math.sqrt(len(d)), len(d)


def run_experiment(exp, runs, size, data, a):
    out = os.path.join(a.results_dir, size)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{exp}.json")
    results = json.load(open(path)) if os.path.isfile(path) else {}
    lock = threading.Lock()
    stale = [n for n, f in runs if n in results and flag_key(results[n].get("flags", [])) != flag_key(f)]
    for n in stale:  # the experiment's flags changed since this run: its result no longer answers it
        del results[n]
    if stale:
        print(f"{exp}: {', '.join(stale)} rerun (their flags changed)", flush=True)
    reused = reuse_runs(exp, runs, results, size, a)
    if reused or stale:
        json.dump(results, open(path, "w"), indent=2)
        if reused:
            print(f"{exp}: {', '.join(reused)} reused (the same flags ran in another experiment)", flush=True)
    todo = [(n, f) for n, f in runs if n not in results]

    def one(item):
        name, flags = item
        run_dir = os.path.join(a.runs_dir, size, exp, name)
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir)
        t0 = time.time()
        code = R.train(run_dir, flags, size, data)
        if code < 0:
            raise SystemExit(f"{exp}/{name} killed by signal {-code}; rerun to continue")
        r = dict(R.summarize(run_dir, code, time.time() - t0, R.SIZES[size]["vocab"]), flags=flags)
        with lock:
            results[name] = r
            json.dump(results, open(path, "w"), indent=2)
            print(f"{exp}/{name}: exit {code}, val {r['final_val_loss']}, train {r['final_train_loss']:.3f}, "
                  f"{r['seconds']:.0f}s", flush=True)

    with ThreadPoolExecutor(a.jobs) as ex:
        list(ex.map(one, todo))
    return results


def flag_key(flags):
    """The flags as an order-free key: each --flag with its values."""
    groups = []
    for t in map(str, flags):
        if t.startswith("--") or not groups:
            groups.append([t])
        else:
            groups[-1].append(t)
    return tuple(sorted(map(tuple, groups)))


def reuse_runs(exp, runs, results, size, a):
    """Take the result (and link the run directory) of a run with the same flags that another
    experiment already made (e.g. cpu-depth's 24-block runs are cpu-prenorm's): same flags, same run."""
    done = {}
    out = os.path.join(a.results_dir, size)
    for f in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        if f.endswith(".json") and f[:-5] != exp:
            for name, r in json.load(open(os.path.join(out, f))).items():
                if "flags" in r:
                    done.setdefault(flag_key(r["flags"]), (f[:-5], name, r))
    reused = []
    for name, flags in runs:
        hit = done.get(flag_key(flags))
        if name in results or hit is None:
            continue
        other, other_name, r = hit
        run_dir, src = os.path.join(a.runs_dir, size, exp, name), os.path.join(a.runs_dir, size, other, other_name)
        if os.path.isdir(src):
            os.makedirs(os.path.dirname(run_dir), exist_ok=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            os.symlink(src, run_dir)
        results[name] = dict(r, reused_from=f"{other}/{other_name}")
        reused.append(name)
    return reused


def seeded(runs, n):
    return [(f"{name}-s{1234 + i}", flags + ["--seed", str(1234 + i)]) for name, flags in runs for i in range(n)]


def pilot(a, data):
    z = SHAPE[a.size]
    res, H = {}, unigram_entropy(data[0])
    for i, L in enumerate(PILOT_DEPTHS[a.size]):  # deepest first: a depth with a train/no-train boundary ends it
        runs = [(pilot_name(L, lr), shape_flags(a.size) + ["--num-layers", str(L), "--norm-type", "post",
                                                          "--lr", f"{lr:g}", "--seed", "1234"]) for lr in PILOT_LRS]
        res = run_experiment("pilot", runs, a.size, data, a)
        print(f"\npilot: Post-LN {L} blocks, hidden {z['hidden']}; unigram entropy {H:.3f} nats "
              f"('trains' = final train loss < {H - 0.1:.3f})")
        for lr in PILOT_LRS:
            r = res[pilot_name(L, lr)]
            print(f"  lr {lr:<8g} train {r['final_train_loss']:.3f} val {r['final_val_loss']}  "
                  f"spike {r['spike_score']}  -> {verdict_train(r, H)}")
        if not pick_post(a.size, res, H, PILOT_DEPTHS[a.size][:i + 1])[2].startswith("auto FALLBACK"):
            break
    L, lr, why = pick_post(a.size, res, H)
    print(f"stability setting: {L} blocks, LR {lr:g} ({why}); to fix it, set POST in benchmarks/quality/seeded.py")
    return res, H


def fig_loss_band(exp, configs, a, size, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from megatron_prores.tools.plot_run import read_scalars
    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = os.path.join(a.runs_dir, size, exp)
    for c in configs:
        curves = []
        for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            if d.rsplit("-s", 1)[0] == c:
                s = read_scalars(os.path.join(base, d, "tensorboard")).get("lm-loss-training/lm loss")
                if s:
                    curves.append(s)
        if not curves:
            continue
        m = min(len(x[1]) for x in curves)
        y = np.array([x[1][:m] for x in curves], dtype=float)
        ax.plot(curves[0][0][:m], y.mean(0), label=f"{c} (n={len(curves)})")
        ax.fill_between(curves[0][0][:m], y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.2)
    ax.set_xlabel("step"), ax.set_ylabel("training loss (mean ± std over seeds)"), ax.legend(fontsize=7)
    ax.grid(alpha=0.3), fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)


def fig_rms(results_by_exp, pairs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for exp, c in pairs:
        rs = [r["stream_rms_by_block"] for n, r in results_by_exp.get(exp, {}).items()
              if n.rsplit("-s", 1)[0] == c and r["stream_rms_by_block"]]
        if rs:
            y = np.array(rs)
            ax.errorbar(range(1, y.shape[1] + 1), y.mean(0), yerr=y.std(0), marker=".", label=f"{c} (n={len(rs)})")
    ax.set_xlabel("block"), ax.set_ylabel("residual-stream RMS, end of training"), ax.set_yscale("log")
    ax.legend(fontsize=7), ax.grid(alpha=0.3), fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)


def report(a, post=None, H=None):
    out = os.path.join(a.results_dir, a.size)
    page = a.page or (os.path.join(ROOTDOCS, "results_cpu.md") if a.results_dir == DEFAULT_RESULTS
                      else os.path.join(a.results_dir, "results_cpu.md"))
    res = {e: json.load(open(os.path.join(out, f"{e}.json"))) for e in TARGETS + ["pilot"]
           if os.path.isfile(os.path.join(out, f"{e}.json"))}
    z = SHAPE[a.size]
    L = [f"# CPU experiments with seeds (generated by `benchmarks/quality/run.py report --size {a.size}`)", "",
         f"Shape: hidden {z['hidden']}, {z['heads']} heads, ffn {z['ffn']}, {z['gbs']} sequences x "
         f"{R.SIZES[a.size]['seq']} tokens, {z['iters']} steps, {seeds_for(a.size, None, SEEDS_USED[0])} seed(s) "
         f"per configuration (Post-LN stability: {seeds_for(a.size, 'cpu-stability', SEEDS_USED[0])}; seeds "
         f"1234, 1235, ...), one thread per run. Pre-LN-family LR {PRE_LR[a.size]:g}"
         + "".join(f" ({e}: {v:g})" for e, v in LR_BY_EXP[a.size].items()) + "; Post-LN stability runs: "
         + (f"{post[0]} blocks, LR {post[1]:g}" if post else "n/a") + ".", "", "**Rule.** " + RULE, ""]
    if "pilot" in res and H:
        L += ["## Pilot: Post-LN LR sweep by depth (1 seed)", "",
              "| blocks | LR | train loss (last 10%) | val loss | outcome |", "|---|---|---|---|---|"]
        for n, r in res["pilot"].items():
            blocks, lr = n[len("post-L"):].split("-lr")
            L.append(f"| {blocks} | {lr} | {r['final_train_loss']:.3f} | {r['final_val_loss']:.3f} | "
                     f"{verdict_train(r, H)} |")
        L += ["", f"Unigram entropy of the training tokens: {H:.3f} nats; 'trains' = below {H - 0.1:.3f}.", ""]
    fig_dir = os.path.join(out, "seeded")
    os.makedirs(fig_dir, exist_ok=True)
    rel = lambda p: os.path.relpath(p, os.path.dirname(page))  # noqa
    for title, exp, claim, pairs, metric in SECTIONS:
        L += [f"## {title}", "", f"Paper: {claim}.", ""]
        if exp not in res:
            L += ["Not run yet.", ""]
            continue
        agg = aggregate(res[exp], H, failed_if_no_training=exp == "cpu-stability")
        n_seeds = seeds_for(a.size, exp, SEEDS_USED[0])
        expected = len(experiments(a.size, post)[exp]) * n_seeds if post else len(res[exp])
        partial = len(res[exp]) < expected
        if partial:
            L += [f"**Partial: {len(res[exp])} of {expected} runs so far** (`run.py all` continues); the verdict "
                  "below is provisional.", ""]
        if pairs == "DEPTH":
            pairs = [(f"pre-prores-{d}", f"pre-{d}") for d in z["depths"]]
        L += ["| config | n | val loss | trains | spike score | diverged | last-block RMS |",
              "|---|---|---|---|---|---|---|"]
        for c, g in agg.items():
            L.append(f"| {c} | {g['n']} | {g['val'][0]:.3f} ± {g['val'][1]:.3f} | "
                     + (f"{g['trains']}/{g['n']}" if g["trains"] is not None else "n/a") + f" | {g['spike'][0]:.4f} | "
                     f"{g['diverged']}/{g['n']} | {g['rms'][0]:.2f} ± {g['rms'][1]:.2f} |")
        L += ["", f"| comparison ({'last-block RMS' if metric == 'rms' else 'val loss'}) | Δ (method − baseline) | "
              "2·SE threshold | beyond seed spread | paired by seed: Δ ± 2·SE (n) |", "|---|---|---|---|---|"]
        votes, nums = [], []
        for m, b in pairs:
            if m not in agg or b not in agg:
                votes.append(0)
                continue
            d, thr, beyond, sign = compare(agg[m], agg[b], metric)
            pd, pse, pn = paired(res[exp], m, b, metric)
            L.append(f"| {m} vs {b} | {d:+.3f} | {thr:.3f} | {'yes' if beyond else 'no'} | "
                     + (f"{pd:+.3f} ± {pse:.3f} ({pn})" if pn > 1 else "n/a") + " |")
            votes.append(0 if not beyond else (1 if sign < 0 else -1))
            nums.append(f"{m} − {b} = {d:+.3f} (threshold {thr:.3f})")
        v = "disagree" if -1 in votes else ("agree" if votes and all(x == 1 for x in votes) else "inconclusive")
        L += ["", f"**Verdict{' so far' if partial else ''}: {v}** with the paper ({claim})"
              + (": " + "; ".join(nums) if nums else "") + ".", ""]
        f = os.path.join(fig_dir, f"{exp}-loss.png")
        fig_loss_band(exp, list(agg), a, a.size, f)
        L += [f"![{exp} loss]({rel(f)})", ""]
        if metric == "rms":
            f = os.path.join(fig_dir, "stream-rms-gpas.png")
            fig_rms(res, [("cpu-prenorm", c) for c in ("pre", "pre-gpas", "pre-prores", "pre-prores-gpas")]
                    + [("cpu-sandwich", c) for c in ("sandwich", "sandwich-gpas")], f)
            L += [f"![stream RMS by block]({rel(f)})", ""]
    os.makedirs(os.path.dirname(page), exist_ok=True)
    open(page, "w").write("\n".join(L) + "\n")
    print(f"wrote {page}")


ROOTDOCS = os.path.join(R.ROOT, "docs")
DEFAULT_RESULTS = os.path.join(ROOTDOCS, "results")
SEEDS_USED = [None]  # --seeds of this invocation


def main(argv):
    p = argparse.ArgumentParser(description="issue 17 CPU suite: pilot | cpu-* | all | report")
    p.add_argument("target", choices=R.SEEDED)
    p.add_argument("--size", choices=sorted(SHAPE), default="cpu")
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default cpu: 3, the Post-LN stability experiment 8; toy: 1)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each one thread)")
    p.add_argument("--out-dir", default=None, help="put runs/ and results/ here (the rehearsal: /tmp/...)")
    p.add_argument("--runs-dir", default=os.path.join(R.ROOT, "runs", "quality"))
    p.add_argument("--results-dir", default=DEFAULT_RESULTS)
    p.add_argument("--page", default=None, help="default docs/results_cpu.md (or OUT_DIR/results_cpu.md)")
    a = p.parse_args(argv)
    if a.out_dir:
        a.runs_dir, a.results_dir = os.path.join(a.out_dir, "runs"), os.path.join(a.out_dir, "results")
    if a.size == "toy" and a.results_dir == DEFAULT_RESULTS:
        sys.exit("--size toy is a rehearsal: pass --out-dir /tmp/... so docs/results stays clean")
    n = a.seeds
    SEEDS_USED[0] = n
    data = R.prepare_data(os.path.join(a.runs_dir, a.size, "data"), a.size)
    if a.target == "report":
        pil = os.path.join(a.results_dir, a.size, "pilot.json")
        H = unigram_entropy(data[0])
        post = pick_post(a.size, json.load(open(pil)), H)[:2] if os.path.isfile(pil) else POST[a.size]
        return report(a, post, H)
    res, H = pilot(a, data) if a.target in ("pilot", "all", "cpu-stability") else ({}, None)
    if a.target == "pilot":
        return
    post = pick_post(a.size, res, H)[:2] if res else (POST[a.size] or (SHAPE[a.size]["L"], PILOT_LRS[0]))
    exps = experiments(a.size, post)
    for e in (TARGETS if a.target == "all" else [a.target]):
        run_experiment(e, seeded(exps[e], seeds_for(a.size, e, n)), a.size, data, a)
    report(a, post, H)

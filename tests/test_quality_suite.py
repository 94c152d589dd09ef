"""The seeded CPU quality suite (benchmarks/quality/seeded.py): every run passes the driver's
checks and is named by what it runs; the pilot's choice of the Post-LN stability setting, the
seed-spread rule and the reuse of identical runs, each against values written out here."""

import json
import math
import os
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def S():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "quality"))
    try:
        import seeded
    finally:
        sys.path.pop(0)
    return seeded


@pytest.mark.parametrize("size", ["cpu", "toy"])
def test_every_seeded_run_passes_the_driver_checks(S, size):
    from megatron_prores.arguments import check_recipe

    post = (6, 2e-3)
    exps = S.experiments(size, post)
    assert set(exps) == set(S.TARGETS)
    for exp, runs in exps.items():
        assert runs, exp
        for name, flags in S.seeded(runs, 2):
            args, cfg, _, _ = check_recipe(S.R.training_flags("/r", flags, size, ("/d/p", "/d/t.model")), 1)
            base, seed = name.rsplit("-s", 1)
            assert args.seed == int(seed) and seed in ("1234", "1235"), name
            assert args.global_batch_size == S.SHAPE[size]["gbs"] and args.train_iters == S.SHAPE[size]["iters"]
            assert args.hidden_size == S.SHAPE[size]["hidden"]  # the shape flags win over run.py's common ones
            assert ("--gpas" in flags) == ("gpas" in base), name
            if exp == "cpu-stability":
                assert args.norm_type == "post" and (args.num_layers, args.lr) == post
                want = "none" if base == "post-baseline" else base[len("post-"):]
            else:
                # DeepNorm at half the Pre-LN LR on the CPU suite (the paper's DeepNorm LR is half of Pre-LN's)
                half = size == "cpu" and exp == "cpu-deepnorm"
                assert args.lr == pytest.approx(S.PRE_LR[size] / 2 if half else S.PRE_LR[size]), name
                want = "linear" if "prores" in base else "none"
                assert args.norm_type == base.split("-")[0], name
            assert args.prores_schedule == want, name
            if want != "none":
                assert args.prores_warmup_steps == int(0.4 * S.SHAPE[size]["iters"])
        if exp == "cpu-depth":
            assert sorted({int(n.rsplit("-", 1)[-1]) for n, _ in runs}) == sorted(S.SHAPE[size]["depths"])


def result(train, diverged=False):
    return {"final_train_loss": train, "diverged": diverged}


def test_pilot_picks_the_deepest_depth_with_a_train_no_train_boundary(S, monkeypatch):
    monkeypatch.setitem(S.POST, "cpu", None)
    monkeypatch.setattr(S, "PILOT_LRS", [1e-3, 2e-3, 4e-3])
    monkeypatch.setitem(S.PILOT_DEPTHS, "cpu", (24, 12, 6))
    H = 6.4  # 'trains' = train loss below 6.3
    pilot = {S.pilot_name(24, lr): result(6.46) for lr in (1e-3, 2e-3, 4e-3)}  # 24 blocks: never trains
    pilot.update({S.pilot_name(12, 1e-3): result(6.2), S.pilot_name(12, 2e-3): result(6.25),
                  S.pilot_name(12, 4e-3): result(6.5)})
    pilot.update({S.pilot_name(6, 1e-3): result(6.0), S.pilot_name(6, 2e-3): result(6.5)})
    assert S.pick_post("cpu", pilot, H)[:2] == (12, 4e-3)
    pilot[S.pilot_name(12, 4e-3)] = result(float("nan"), diverged=True)  # diverged counts as not training
    assert S.pick_post("cpu", pilot, H)[:2] == (12, 4e-3)
    pilot[S.pilot_name(12, 4e-3)] = result(6.1)  # no boundary at 12 any more: 6 blocks, 2e-3
    assert S.pick_post("cpu", pilot, H)[:2] == (6, 2e-3)
    # a smaller LR that fails below one that trains is no boundary (too slow, not unstable)
    pilot = {S.pilot_name(24, 1e-3): result(6.5), S.pilot_name(24, 2e-3): result(6.2)}
    L, lr, why = S.pick_post("cpu", pilot, H)
    assert (L, lr) == (24, 1e-3) and why.startswith("auto FALLBACK")
    monkeypatch.setitem(S.POST, "cpu", (12, 3e-3))  # a fixed setting wins
    assert S.pick_post("cpu", pilot, H)[:2] == (12, 3e-3)


def test_seed_spread_rule(S):
    a = S.aggregate({f"m-s{i}": {"final_val_loss": v, "diverged": False, "stream_rms_by_block": [1.0, r],
                                 "spike_score": 0.0} for i, (v, r) in enumerate([(5.0, 2.0), (5.2, 4.0), (5.1, 3.0)])})
    b = S.aggregate({f"b-s{i}": {"final_val_loss": v, "diverged": False, "stream_rms_by_block": [1.0, 9.0],
                                 "spike_score": 0.0} for i, v in enumerate([5.5, 5.7, 5.6])})
    ma, sa, na = a["m"]["val"]
    assert (ma, na) == (pytest.approx(5.1), 3) and sa == pytest.approx(0.1)  # sample std
    assert a["m"]["rms"][0] == pytest.approx(3.0)  # the last block's RMS
    d, thr, beyond, sign = S.compare(a["m"], b["b"], "val")
    assert d == pytest.approx(-0.5) and thr == pytest.approx(2 * math.sqrt(0.01 / 3 + 0.01 / 3))
    assert beyond and sign == -1
    b["b"]["val"] = (5.2, 0.3, 3)  # |d| 0.1 < 2 sqrt(0.01/3 + 0.09/3) = 0.365
    assert not S.compare(a["m"], b["b"], "val")[2]
    a["m"]["failed"], b["b"]["failed"] = 0, 2  # two more failed runs decide on their own
    assert S.compare(a["m"], b["b"], "val")[2:] == (True, -1)


def test_failed_runs_are_diverged_ones_or_in_the_stability_experiment_those_that_do_not_train(S):
    H = 6.4  # trains: train loss below 6.3
    runs = {"post-baseline-s1": {"final_train_loss": 5.6, "final_val_loss": 6.0, "diverged": False},
            "post-baseline-s2": {"final_train_loss": 6.45, "final_val_loss": 6.7, "diverged": False},
            "post-baseline-s3": {"final_train_loss": 9.0, "final_val_loss": 9.1, "diverged": True},
            "post-linear-s1": {"final_train_loss": 5.7, "final_val_loss": 6.1, "diverged": False}}
    for r in runs.values():
        r.update(stream_rms_by_block=[], spike_score=0.0)
    plain = S.aggregate(runs, H)
    assert (plain["post-baseline"]["trains"], plain["post-baseline"]["failed"]) == (1, 1)
    stab = S.aggregate(runs, H, failed_if_no_training=True)
    assert (stab["post-baseline"]["trains"], stab["post-baseline"]["failed"]) == (1, 2)
    assert stab["post-linear"]["failed"] == 0
    assert S.compare(stab["post-linear"], stab["post-baseline"], "val")[2:] == (True, -1)
    assert not S.compare(plain["post-linear"], plain["post-baseline"], "val")[2]  # one seed each: no spread
    assert S.seeds_for("cpu", "cpu-stability") == 8 and S.seeds_for("cpu", "cpu-lns") == 3
    assert S.seeds_for("cpu", "cpu-stability", 2) == 2  # --seeds wins


def test_a_run_with_the_same_flags_is_reused_not_rerun(S, tmp_path):
    out = tmp_path / "results" / "cpu"
    out.mkdir(parents=True)
    made = ["--num-layers", "24", "--norm-type", "pre", "--lr", "0.002", "--seed", "1234"]
    json.dump({"pre-s1234": {"flags": made, "final_val_loss": 6.4}}, open(out / "cpu-prenorm.json", "w"))
    (tmp_path / "runs" / "cpu" / "cpu-prenorm" / "pre-s1234").mkdir(parents=True)
    a = types.SimpleNamespace(results_dir=str(tmp_path / "results"), runs_dir=str(tmp_path / "runs"))
    same = ["--lr", "0.002", "--norm-type", "pre", "--num-layers", "24", "--seed", "1234"]  # other order
    other = ["--lr", "0.002", "--norm-type", "pre", "--num-layers", "24", "--seed", "1235"]
    swapped = ["--lr", "1234", "--norm-type", "pre", "--num-layers", "24", "--seed", "0.002"]
    results = {}
    runs = [("pre-24-s1234", same), ("pre-24-s1235", other), ("x", swapped)]
    assert S.reuse_runs("cpu-depth", runs, results, "cpu", a) == ["pre-24-s1234"]
    assert results["pre-24-s1234"]["final_val_loss"] == 6.4
    assert results["pre-24-s1234"]["reused_from"] == "cpu-prenorm/pre-s1234"
    assert os.path.islink(tmp_path / "runs" / "cpu" / "cpu-depth" / "pre-24-s1234")


def test_paired_difference_by_seed(S):
    def r(v, diverged=False):
        return {"final_val_loss": v, "diverged": diverged, "stream_rms_by_block": [2 * v]}
    runs = {"m-s1234": r(5.0), "m-s1235": r(5.3), "m-s1236": r(5.1), "m-s1237": r(9.0, diverged=True),
            "b-s1234": r(5.1), "b-s1235": r(5.5), "b-s1236": r(5.1), "b-s1237": r(5.0), "c-s1234": r(1.0)}
    mean, two_se, n = S.paired(runs, "m", "b", "val")
    d = [-0.1, -0.2, 0.0]  # seed 1237 is left out: m diverged there
    sd = math.sqrt(sum((x + 0.1) ** 2 for x in d) / 2)
    assert n == 3 and mean == pytest.approx(-0.1) and two_se == pytest.approx(2 * sd / math.sqrt(3))
    assert S.paired(runs, "m", "b", "rms")[0] == pytest.approx(-0.2)
    assert S.paired(runs, "m", "c", "val")[2] == 1


def test_a_result_whose_flags_changed_is_rerun_and_the_others_are_kept(S, tmp_path, monkeypatch):
    out = tmp_path / "results" / "cpu"
    out.mkdir(parents=True)
    old = ["--norm-type", "deepnorm", "--lr", "0.002", "--seed", "1234"]
    new = ["--norm-type", "deepnorm", "--lr", "0.001", "--seed", "1234"]
    kept = ["--norm-type", "deepnorm", "--lr", "0.001", "--seed", "1235"]
    json.dump({"deepnorm-s1234": {"flags": old, "final_val_loss": 6.7},
               "deepnorm-s1235": {"flags": kept, "final_val_loss": 6.2}}, open(out / "cpu-deepnorm.json", "w"))
    trained = []
    monkeypatch.setattr(S.R, "train", lambda run_dir, flags, size, data: trained.append(list(flags)) or 0)
    monkeypatch.setattr(S.R, "summarize", lambda run_dir, code, secs, vocab: {"final_val_loss": 6.1, "seconds": secs,
                                                                                "final_train_loss": 6.0})
    a = types.SimpleNamespace(results_dir=str(tmp_path / "results"), runs_dir=str(tmp_path / "runs"), jobs=1)
    res = S.run_experiment("cpu-deepnorm", [("deepnorm-s1234", new), ("deepnorm-s1235", kept)], "cpu", None, a)
    assert trained == [new]  # only the run whose flags changed
    assert res["deepnorm-s1234"]["flags"] == new and res["deepnorm-s1234"]["final_val_loss"] == 6.1
    assert res["deepnorm-s1235"]["final_val_loss"] == 6.2
    assert json.load(open(out / "cpu-deepnorm.json")) == res

"""Same loss and same gradients (gates included, every layer) for TP=1/PP=1 vs TP=2, PP=2,
PP=2 with virtual pipeline 2, TP=2 with sequence parallelism, and context parallelism 2 — real
multi-process gloo groups, float64."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from megatron_prores.config import MethodConfig
from tests import parallel_harness as H
from tests.conftest import free_port

WORLD2_LAYOUTS = ["tp2", "pp2", "pp2-vpp2", "tp2-sp", "cp2"]


def method(norm, prores=True, gpas=True, gate="block"):
    return MethodConfig(norm_type=norm, prores_schedule="linear" if prores else "none",
                        prores_warmup_steps=100 if prores else 0, gpas=gpas, gpas_gate=gate)


# CI: one representative method per norm type (ProRes mid-warmup, GPAS with non-zero gates).
CI_METHODS = {
    "pre": method("pre"),
    "post": method("post", gpas=False),
    "sandwich": method("sandwich", gate="sublayer"),
    "deepnorm": method("deepnorm"),
    "lns": method("lns"),
    "mix": method("mix"),  # 4 layers: block 1 Post-LN, blocks 2-4 Pre-LN (heterogeneous stages)
}
EXHAUSTIVE_METHODS = {
    f"{n}-prores{int(p)}-gpas{int(g)}": method(n, p, g)
    for n in ("pre", "post", "sandwich", "deepnorm", "lns", "mix")
    for p in (False, True) for g in (False, True) if not (n == "post" and g)
}


def run_matrix(tmp_path, methods, layouts, world, loss="probe"):
    baselines = {}
    jobs = []
    for name, m in methods.items():
        weights = str(tmp_path / f"weights-{name}")
        H.make_baseline_weights(m, weights)
        base = H.loss_and_grads(m, "tp1", weights, str(tmp_path / f"grads-{name}-tp1"), loss)
        baselines[name] = (base, H.read_full(m, str(tmp_path / f"grads-{name}-tp1")))
        jobs += [(f"grads-{name}-{layout}", m, layout, weights, loss) for layout in layouts]
    jobs.sort(key=lambda job: layouts.index(job[2]))  # re-create process groups once per layout
    result_dir = str(tmp_path)
    try:
        mp.spawn(H.worker, args=(world, free_port(), jobs, result_dir), nprocs=world, join=True)
    except Exception:
        errors = [open(os.path.join(result_dir, f)).read() for f in os.listdir(result_dir) if f.startswith("error-")]
        pytest.fail("a parallel rank failed:\n" + "\n".join(errors))
    losses = torch.load(os.path.join(result_dir, "losses.pt"))
    # megatron-core's cross entropy (the driver's loss) runs in fp32 even on float64 logits
    loss_rtol, grad_rtol = (1e-12, 1e-10) if loss == "probe" else (1e-6, 1e-5)
    for name, m in methods.items():
        base_loss, base_grads = baselines[name]
        assert any("gpas_gate" in k for k in base_grads) == m.gpas
        for layout in layouts:
            key = f"grads-{name}-{layout}"
            assert losses[key] == pytest.approx(base_loss, rel=loss_rtol, abs=0), key
            grads = H.read_full(m, str(tmp_path / key))
            assert set(grads) == set(base_grads)
            for pname, g in grads.items():
                ref = base_grads[pname]
                assert ref.norm() > 0, f"{name}: zero baseline gradient for {pname}"
                err = ((g - ref).norm() / ref.norm()).item()
                assert err < grad_rtol, f"{key}: {pname} gradient differs, relative error {err:.2e}"


@pytest.mark.stack
def test_layouts_match_single_process(single_process, tmp_path):
    run_matrix(tmp_path, CI_METHODS, WORLD2_LAYOUTS, world=2)


@pytest.mark.stack
def test_driver_loss_with_a_loss_mask_matches_single_process(single_process, tmp_path):
    """The driver's own forward step and loss (Trainer.forward_step: the context-parallel split,
    the mean over the whole sequences' unmasked tokens) with a loss mask that is not all ones:
    loss and every gradient under CP=2 and PP=2+VPP=2 equal TP=1 (float64 model; megatron-core's
    cross entropy runs in fp32, so relative 1e-6 and 1e-5: a loss normalized by a rank's own tokens,
    or off by the CP factor, is off by percents)."""
    run_matrix(tmp_path, {"mix": CI_METHODS["mix"]}, ["cp2", "pp2-vpp2"], world=2, loss="driver")


@pytest.mark.exhaustive
def test_exhaustive_layouts_match_single_process(single_process, tmp_path):
    run_matrix(tmp_path, EXHAUSTIVE_METHODS, WORLD2_LAYOUTS, world=2)


@pytest.mark.exhaustive
def test_tp2_pp2_matches_single_process(single_process, tmp_path):
    run_matrix(tmp_path, CI_METHODS, ["tp2-pp2"], world=4)


def _cp_seed_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from megatron_prores import parallel
    from megatron_prores.model import build_model

    parallel.initialize(context_parallel=world, seed=11)
    (chunk,) = build_model(H.model_config(method("pre"), "cp2"))
    weights = torch.cat([p.detach().flatten() for p in chunk.parameters()])
    parallel.seed_dropout_per_context_rank(11)
    draws = torch.nn.functional.dropout(torch.ones(256), 0.5)  # hidden dropout's generator
    torch.save((weights, draws), os.path.join(out_dir, f"rank{rank}.pt"))


def test_context_parallel_ranks_share_weights_but_not_dropout_masks(tmp_path):
    """The model is initialized alike on both CP ranks; afterwards each CP rank draws its own
    dropout masks (the driver reseeds per CP rank after building the model)."""
    mp.spawn(_cp_seed_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    (w0, d0), (w1, d1) = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(w0, w1)
    assert not torch.equal(d0, d1) and 0.3 < (d0 == 0).float().mean() < 0.7

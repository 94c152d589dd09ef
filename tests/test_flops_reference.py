"""The FLOP count behind the log line's `TFLOP/s per device` and `MFU`, checked against an
independent reference: torch's FlopCounterMode around the driver's own training step
(Trainer.train_step: forward and backward over the microbatches, optimizer step), plus the
attention terms written out by hand where the counter cannot see the kernel.

The convention checked (model FLOPs, as MFU figures are published): forward + backward = 3x the
forward matmul FLOPs, 2 FLOPs per multiply-add; the Q/K/V projections with K and V of the query
groups only (GQA), the output projection, the MLP's matrices (three with SwiGLU, two with GeLU),
QK^T and AV over the full s x s square (causal masking not halved), the logit layer over the padded
vocabulary; activation recompute not counted.

FlopCounterMode counts matmuls (mm, bmm, baddbmm, ...) and the CUDA attention kernels, not the
CPU kernel of scaled_dot_product_attention: the driver's default core attention (SDPA) therefore
has its attention term added here by hand, and ``--attention-backend unfused`` (megatron-core's
DotProductAttention: baddbmm + bmm) lets the counter see every FLOP, the attention included.
"""

import os
import re
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_prores.metrics import flops_per_token

L, H, HEADS, GROUPS, SEQ, MB, GBS, VOCAB = 2, 64, 4, 2, 16, 2, 4, 128
UNFUSED = ["--attention-backend", "unfused"]


def flags(layers=L, hidden=H, heads=HEADS, groups=GROUPS, seq=SEQ, mb=MB, gbs=GBS, vocab=VOCAB, extra=()):
    return list(map(str, [
        "--num-layers", layers, "--hidden-size", hidden, "--num-attention-heads", heads, "--num-query-groups", groups,
        "--seq-length", seq, "--micro-batch-size", mb, "--global-batch-size", gbs, "--lr", "1e-3",
        "--lr-warmup-iters", "0", "--train-iters", "4", "--mock-data", "--vocab-size", vocab,
        "--eval-iters", "0", "--log-interval", "1", *extra]))


def trainer(argv):
    from megatron_prores.arguments import build_parser, check_args
    from megatron_prores.trainer import Trainer

    args = build_parser().parse_args(argv)
    check_args(args)
    return Trainer(args)


def counted_step(t, step=1):
    """FLOPs FlopCounterMode sees in one driver step (after a first step outside the counter),
    in total and per aten op."""
    t.train_step(step - 1)
    counter = FlopCounterMode(display=False)
    with counter:
        t.train_step(step)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op


def attention_flops(layers, heads, head_dim, seq, sequences):
    """QK^T and AV of every block, the full s x s square, forward (2 FLOPs per multiply-add,
    2 matmuls) + backward (twice the forward)."""
    forward = 2 * 2 * heads * seq * seq * head_dim * sequences * layers
    return 3 * forward


def forward_block_flops(layers, hidden, heads, groups, ffn, seq, sequences, swiglu=True):
    """One forward pass of the blocks' matmuls, written out per matrix (no logit layer)."""
    d = hidden // heads
    tokens = seq * sequences
    q = 2 * tokens * hidden * heads * d
    kv = 2 * 2 * tokens * hidden * groups * d
    proj = 2 * tokens * heads * d * hidden
    mlp = (3 if swiglu else 2) * 2 * tokens * hidden * ffn
    return layers * (q + kv + proj + mlp) + attention_flops(layers, heads, d, seq, sequences) // 3


# name: (driver flags, vocabulary given, padded vocabulary the model computes)
CASES = {
    "gqa": (flags(extra=UNFUSED), VOCAB),
    "mha": (flags(groups=HEADS, extra=UNFUSED), VOCAB),
    "mqa": (flags(groups=1, extra=UNFUSED), VOCAB),
    "tied": (flags(extra=UNFUSED + ["--tie-embeddings-and-output-weights"]), VOCAB),
    "seq32-ffn96": (flags(seq=32, extra=UNFUSED + ["--ffn-hidden-size", "96"]), VOCAB),
    "prores-gpas": (flags(extra=UNFUSED + ["--prores-schedule", "linear", "--prores-warmup-steps", "10", "--gpas"]),
                    VOCAB),
    "padded-vocab": (flags(vocab=100, extra=UNFUSED), 100),  # padded to 128 (--make-vocab-size-divisible-by)
}


@pytest.mark.parametrize("case", list(CASES))
def test_flops_per_token_is_what_the_driver_step_computes(single_process, case):
    argv, vocab = CASES[case]
    t = trainer(argv)
    try:
        counted, by_op = counted_step(t)
        cfg = t.cfg
        assert cfg.vocab_size == vocab and cfg.padded_vocab_size == 128
        tokens = GBS * cfg.seq_length
        # the counter saw the attention (DotProductAttention's baddbmm/bmm): exactly the full square
        assert by_op.get("aten.baddbmm", 0) + by_op.get("aten.bmm", 0) == attention_flops(
            cfg.num_layers, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.seq_length, GBS)
        # and every matmul of the step, written out: 3x the forward of blocks and logit layer
        logits = 2 * tokens * cfg.hidden_size * cfg.padded_vocab_size
        assert counted == 3 * (forward_block_flops(cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads,
                                                   cfg.query_groups, cfg.ffn_size, cfg.seq_length, GBS) + logits)
        assert flops_per_token(cfg) * tokens == counted
        assert t.metrics.fpt * t.metrics.tokens_per_iter == counted  # what the log line uses
    finally:
        t.close(0)


def test_default_sdpa_attention_is_counted_in_full(single_process):
    """The driver's default core attention (SDPA): the CPU kernel is invisible to the counter, so
    the counter's matmuls plus the full-square attention term written out give the count."""
    t = trainer(flags())
    try:
        counted, by_op = counted_step(t)
        assert set(by_op) == {"aten.mm"}  # only the linear layers: SDPA's CPU kernel is not counted
        cfg = t.cfg
        attention = attention_flops(L, HEADS, H // HEADS, SEQ, GBS)
        assert flops_per_token(cfg) * GBS * SEQ == counted + attention
    finally:
        t.close(0)


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_does_not_change_model_flops(single_process, granularity):
    """MFU counts model FLOPs: the recomputed forward is work the hardware does (the counter sees
    it) but not in flops_per_token."""
    plain = trainer(flags(extra=UNFUSED))
    try:
        counted_plain, _ = counted_step(plain)
        fpt_plain = flops_per_token(plain.cfg)
    finally:
        plain.close(0)
    t = trainer(flags(extra=UNFUSED + ["--recompute-granularity", granularity]))
    try:
        counted, _ = counted_step(t)
        assert flops_per_token(t.cfg) == fpt_plain and fpt_plain * GBS * SEQ == counted_plain
        d = H // HEADS
        # the extra work: full recomputes one forward of every block; selective (core_attn) the
        # forward of QK^T and AV
        extra = (forward_block_flops(L, H, HEADS, GROUPS, t.cfg.ffn_size, SEQ, GBS) if granularity == "full"
                 else attention_flops(L, HEADS, d, SEQ, GBS) // 3)
        assert counted == counted_plain + extra
    finally:
        t.close(0)


@pytest.mark.parametrize("swiglu", [True, False])
def test_mlp_matrices_follow_the_activation(single_process, swiglu):
    """ModelConfig(swiglu=False) builds a GeLU MLP of two matrices (the driver always uses SwiGLU)."""
    from megatron_prores.config import ModelConfig
    from megatron_prores.model import build_model

    cfg = ModelConfig(num_layers=L, hidden_size=H, num_attention_heads=HEADS, num_query_groups=GROUPS,
                      ffn_hidden_size=96, vocab_size=VOCAB, seq_length=SEQ, swiglu=swiglu,
                      attention_backend="unfused")
    model = build_model(cfg)[0]
    b = 2
    tokens = torch.randint(0, VOCAB, (b, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand(b, SEQ)
    counter = FlopCounterMode(display=False)
    with counter:
        model(tokens, positions, None, labels=tokens).float().mean().backward()
    counted = counter.get_total_flops()
    written = 3 * (forward_block_flops(L, H, HEADS, GROUPS, 96, SEQ, b, swiglu=swiglu) + 2 * b * SEQ * H * VOCAB)
    assert counted == written
    assert flops_per_token(cfg) * b * SEQ == counted


def test_log_line_tflops_and_mfu_are_counted_flops_over_step_time(single_process, capsys):
    """The printed `TFLOP/s per device` and `MFU` of one process: the step's counted FLOPs / the
    mean step time / world size, against the peak."""
    t = trainer(flags(extra=UNFUSED))
    try:
        counted, _ = counted_step(t)
        t.metrics.peak = 989.0  # as on an H100 SXM
        t.metrics._reset()
        seconds = (1e-6, 3e-6)  # the window's two steps: mean 2 us
        for s in seconds:
            t.metrics.add(3.0, True, s)
        capsys.readouterr()
        t.metrics.log(2, t.state, 1e-3, 1.0, None, t.model, {})
        line = capsys.readouterr().out
        tflops = float(re.search(r"TFLOP/s per device: ([0-9.]+)", line).group(1))
        mfu = float(re.search(r"MFU: ([0-9.]+)%", line).group(1))
        expected = counted / (sum(seconds) / len(seconds)) / 1 / 1e12
        assert tflops == pytest.approx(expected, abs=1e-3)
        assert mfu == pytest.approx(100 * expected / 989.0, abs=0.05)
    finally:
        t.close(0)


RANK_SCRIPT = r"""
import sys
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode
from megatron_prores.arguments import build_parser, check_args
from megatron_prores.trainer import Trainer

args = build_parser().parse_args(sys.argv[1:])
check_args(args)
t = Trainer(args)
t.train_step(0)
counter = FlopCounterMode(display=False)
with counter:
    t.train_step(1)
mine = torch.tensor([float(counter.get_total_flops())], dtype=torch.float64)
dist.all_reduce(mine)
if t.metrics.prints:
    print(f"RESULT {mine.item():.0f} {t.metrics.fpt * t.metrics.tokens_per_iter:.0f} {t.metrics.world} "
          f"{dist.get_world_size()} {t.num_micro}", flush=True)
t.close(0)
"""


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                    ["--pipeline-model-parallel-size", "2"], []],
                         ids=["tp2-sp", "pp2", "dp2"])
def test_per_device_tflops_under_parallel_layouts(tmp_path, layout):
    """Two processes: the FLOPs all ranks count in one step sum to flops_per_token x global batch
    tokens (accumulation included), so dividing by the world size gives the per-device rate. TP=2
    pads the vocabulary to 256: the logit layer counts the padded rows."""
    from tests.conftest import free_port, run_tree

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    argv = flags(layers=4, gbs=8, vocab=100, extra=UNFUSED + layout)
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                          os.environ.get("PYTHONPATH", "")])}
    r = run_tree([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                  str(free_port()), str(script), *argv], timeout=300, env=env)
    found = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+)", r.stdout)
    assert r.returncode == 0 and found, r.stdout[-2000:] + r.stderr[-3000:]
    counted, logged, world, dist_world, micro = map(int, found.groups())
    assert world == dist_world == 2
    assert micro == (4 if layout else 2)  # 8 sequences: 4 microbatches of 2 (DP 1) or 2 per replica (DP 2)
    assert logged == counted


# Datasheet dense bf16 peaks (half the "with sparsity" figures) per CUDA device name
DATASHEET = {
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA B200": 2250.0,
    "NVIDIA GB200": 2500.0,
    "NVIDIA GeForce RTX 4090": None,
}


@pytest.mark.parametrize("name", list(DATASHEET))
def test_peak_is_the_datasheet_value_of_the_variant(monkeypatch, name):
    from megatron_prores import metrics

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert metrics.peak_tflops() == DATASHEET[name]

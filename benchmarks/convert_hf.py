"""Time and peak memory of the Hugging Face export (tools/convert_to_hf.py) on a large model.

    python benchmarks/convert_hf.py [--shape 1.3b] [--norm-type pre] [--workdir DIR]

Builds a model of the published shape on CPU (random weights, non-zero GPAS gates, ProRes
mid-warmup), saves it as a checkpoint of this project, converts it with /usr/bin/time -v, and
prints the wall time, the peak resident memory and the model size: streaming means the peak stays
near one layer plus one output shard, far below the model's size. Results go to
benchmarks/results/<machine>-<date>-convert-hf-<shape>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # hidden, layers, heads, ffn (the papers' model sizes)
    "350m": (1024, 24, 16, 2736),
    "1.3b": (2048, 24, 32, 5632),
    "3b": (2560, 32, 32, 6848),
    "7b": (4096, 32, 32, 11008),
}


def make_checkpoint(shape, norm_type, save, dtype):
    """Runs in a child process: build, set gates, save (model only)."""
    import torch

    from megatron_prores import parallel
    from megatron_prores.checkpointing import save_checkpoint
    from megatron_prores.config import MethodConfig, ModelConfig, config_to_dict
    from megatron_prores.layer import prores_layers
    from megatron_prores.model import build_model
    from megatron_prores.checkpointing import model_args_for_checkpoint

    h, L, a, f = SHAPES[shape]
    parallel.initialize()
    cfg = ModelConfig(num_layers=L, hidden_size=h, num_attention_heads=a, ffn_hidden_size=f, vocab_size=32000,
                      make_vocab_size_divisible_by=128, seq_length=1024, params_dtype=getattr(torch, dtype),
                      method=MethodConfig(norm_type=norm_type, prores_schedule="linear",
                                          prores_warmup_steps=1000 * L, gpas=True))
    (chunk,) = build_model(cfg)
    with torch.no_grad():
        for layer in prores_layers(chunk):
            layer.gpas_gate.fill_(0.05)
    save_checkpoint(save, 500 * L, [chunk], None, None, {"consumed_samples": 0, "skipped_iters": 0, "losses": []},
                    model_args_for_checkpoint(cfg), model_config=dict(config_to_dict(cfg), tokenizer_type=None,
                                                                       tokenizer_model=None))
    return sum(p.numel() for p in chunk.parameters())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1.3b")
    p.add_argument("--norm-type", default="pre")
    p.add_argument("--workdir", default="/tmp/prores-convert-bench")
    p.add_argument("--max-shard-size", type=float, default=1.0, help="GB")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights as trained/stored")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    ckpt, out = os.path.join(a.workdir, "ckpt"), os.path.join(a.workdir, "hf")
    if a.child:
        print(json.dumps({"params": make_checkpoint(a.shape, a.norm_type, ckpt, a.dtype)}))
        return
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29677"}
    t0 = time.time()
    r = subprocess.run([sys.executable, __file__, "--child", "--shape", a.shape, "--norm-type", a.norm_type,
                        "--workdir", a.workdir, "--dtype", a.dtype], capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    params = json.loads(r.stdout.strip().splitlines()[-1])["params"]
    print(f"built and saved a {a.shape} model ({params / 1e9:.2f} B parameters) in {time.time() - t0:.0f}s")
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, os.path.join(ROOT, "tools", "convert_to_hf.py"),
                        "--load", ckpt, "--output", out, "--max-shard-size", str(a.max_shard_size)],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", r.stderr).group(1)
    parts = [float(x) for x in wall.split(":")]
    seconds = sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    ckpt_size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(ckpt) for f in fs)
    result = {
        "machine": f"cpu-{platform.machine()}-{os.cpu_count()}cores", "date": datetime.date.today().isoformat(),
        "shape": a.shape, "norm_type": a.norm_type, "dtype": a.dtype, "params": params, "checkpoint_bytes": ckpt_size,
        "hf_bytes": size, "max_shard_gb": a.max_shard_size, "convert_seconds": seconds,
        "peak_rss_bytes": peak_kb * 1024, "peak_rss_over_model": peak_kb * 1024 / size,
        "message": r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "",
    }
    print(f"converted in {seconds:.1f}s; peak RSS {peak_kb / 2 ** 20:.2f} GiB for a {size / 2 ** 30:.2f} GiB model "
          f"({result['peak_rss_over_model']:.2f}x the model)")
    print(result["message"])
    name = f"{result['machine']}-{result['date']}-convert-hf-{a.shape}-{a.dtype}.json"
    with open(os.path.join(ROOT, "benchmarks", "results", name), "w") as f:
        json.dump(result, f, indent=2)
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

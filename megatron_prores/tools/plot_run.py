"""PNG plots from TensorBoard run directories written by megatron-prores-train.

    python tools/plot_run.py RUN_TB_DIR [RUN_TB_DIR ...] --output DIR

- loss.png: training loss (and validation loss, dashed) of every run, overlaid;
- per run, a heatmap (block x iteration) of each per-block series it logged: ProRes values
  (prores-*.png), GPAS scales 1-SiLU(g) (gpas-scale-*.png), residual-stream RMS (stream-rms-*.png).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from megatron_prores.config import ConfigError
from megatron_prores.tools import run

PER_BLOCK = {"prores/": "prores", "gpas-scale/": "gpas-scale", "stream-rms/": "stream-rms"}


def read_scalars(directory: str) -> dict:
    """{tag: ([steps], [values])} of every event file under ``directory``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(directory):
        raise ConfigError(f"{directory!r} is not a directory (give the --tensorboard-dir of a run)")
    out = {}
    for root, _, files in os.walk(directory):
        if not any("tfevents" in f for f in files):
            continue
        acc = EventAccumulator(root, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            events = acc.Scalars(tag)
            steps, values = out.setdefault(tag, ([], []))
            steps.extend(e.step for e in events)
            values.extend(e.value for e in events)
    if not out:
        raise ConfigError(f"no TensorBoard scalars under {directory!r}")
    for tag, (steps, values) in out.items():  # a resumed run logs into the same directory: merge
        merged = dict(zip(steps, values))
        out[tag] = (sorted(merged), [merged[k] for k in sorted(merged)])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="TensorBoard directories (one per run)")
    p.add_argument("--output", required=True, help="directory for the PNG files")
    p.add_argument("--labels", nargs="*", default=None, help="legend names (default: directory names)")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(labels) != len(args.runs):
        raise ConfigError("--labels needs one name per run")
    runs = [read_scalars(r) for r in args.runs]
    os.makedirs(args.output, exist_ok=True)

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, scalars in zip(labels, runs):
        for tag, style in (("lm-loss-training/lm loss", "-"), ("lm-loss-validation/lm loss", "--")):
            if tag in scalars:
                steps, values = scalars[tag]
                ax.plot(steps, values, style, label=f"{label} ({'val' if 'valid' in tag else 'train'})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.output, "loss.png"), dpi=120)
    plt.close(fig)
    written = ["loss.png"]

    for label, scalars in zip(labels, runs):
        for prefix, name in PER_BLOCK.items():
            tags = sorted(t for t in scalars if t.startswith(prefix))
            if not tags:
                continue
            steps = sorted({s for t in tags for s in scalars[t][0]})
            grid = np.full((len(tags), len(steps)), np.nan)
            col = {s: j for j, s in enumerate(steps)}
            for i, t in enumerate(tags):
                for s, v in zip(*scalars[t]):
                    grid[i, col[s]] = v
            fig, ax = plt.subplots(figsize=(8, 0.3 * len(tags) + 2))
            im = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest",
                           extent=(steps[0], steps[-1], 0.5, len(tags) + 0.5))
            ax.set_yticks(range(1, len(tags) + 1))
            ax.set_yticklabels([re.sub(r"^.*block 0*", "", t) for t in tags], fontsize=7)
            ax.set_xlabel("iteration")
            ax.set_ylabel("block")
            ax.set_title(f"{label}: {name}")
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            fname = f"{name}-{label}.png"
            fig.savefig(os.path.join(args.output, fname), dpi=120)
            plt.close(fig)
            written.append(fname)
    print(f"wrote {', '.join(written)} to {args.output}")


def cli():
    sys.exit(run(main))


if __name__ == "__main__":
    cli()

"""PNG plots from TensorBoard run directories written by megatron-prores-train.

    python tools/plot_run.py RUN_TB_DIR [RUN_TB_DIR ...] --output DIR

- loss.png: training loss (and validation loss, dashed) of every run, overlaid;
- per run, a heatmap (block x iteration) of each per-block series it logged: ProRes values
  (prores-LABEL.png), GPAS scales 1-SiLU(g) (gpas-scale-LABEL.png), residual-stream RMS
  (stream-rms-LABEL.png).

A run is the directory its event files are in (the driver writes them all into --tensorboard-dir:
one file per pipeline stage, more after a resume); a directory holding several runs' event files
in different subdirectories is refused. LABEL is the run's --labels name, by default its
directory's name (for the README's RUN/tensorboard, RUN's name), with parent directories added
until the names differ; in file names, characters other than letters, digits, '.', '-', '_', '+'
and '=' become '_'.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

from megatron_prores.config import ConfigError
from megatron_prores.tools import run

PER_BLOCK = {"prores/": "prores", "gpas-scale/": "gpas-scale", "stream-rms/": "stream-rms"}


def read_scalars(directory: str) -> dict:
    """{tag: ([steps], [values])} of the run whose event files are in ``directory`` (or in one
    directory under it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(directory):
        raise ConfigError(f"{directory!r} is not a directory (give the --tensorboard-dir of a run)")
    found = sorted(root for root, _, files in os.walk(directory) if any("tfevents" in f for f in files))
    if len(found) > 1:  # several runs (the driver writes one run's files into one directory): never merged
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ConfigError(f"{directory!r} holds event files in {len(found)} directories, one run each "
                          f"({shown}); give each run's directory instead")
    out = {}
    if found:
        acc = EventAccumulator(found[0], size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            events = acc.Scalars(tag)
            out[tag] = ([e.step for e in events], [e.value for e in events])
    if not out:
        raise ConfigError(f"no TensorBoard scalars under {directory!r}")
    for tag, (steps, values) in out.items():  # a resumed run logs into the same directory: merge
        merged = dict(zip(steps, values))
        out[tag] = (sorted(merged), [merged[k] for k in sorted(merged)])
    return out


def default_labels(runs: list) -> list:
    """Each run's directory name (its parent's for RUN/tensorboard), with as many parent
    directories as make the names differ; the same directory given twice is numbered."""
    paths = []
    for r in runs:
        parts = [c for c in os.path.abspath(r).split(os.sep) if c] or [os.sep]
        if len(parts) > 1 and parts[-1] == "tensorboard":  # the README's layout: name the run
            parts.pop()
        paths.append(parts)
    depth = [1] * len(paths)
    while True:
        labels = ["/".join(p[-k:]) for p, k in zip(paths, depth)]
        longer = [i for i, l in enumerate(labels) if depth[i] < len(paths[i])
                  and any(m == l and q != paths[i] for m, q in zip(labels, paths))]  # another path, same name
        if not longer:
            break
        for i in longer:
            depth[i] += 1
    seen: dict = {}
    for i, l in enumerate(labels):  # what is still equal is the same directory, given twice
        seen[l] = seen.get(l, 0) + 1
        if seen[l] > 1:
            labels[i] = f"{l}-{seen[l]}"
    return labels


def file_label(label: str) -> str:
    """``label`` as part of a file name: letters, digits and . - _ + = (others become _)."""
    return re.sub(r"[^\w.+=-]", "_", label)[:100]


def check_labels(labels: list, given: bool) -> list:
    """The part of each run's file names; names that would share a file are refused (--labels)
    or numbered (default labels)."""
    stems = [file_label(l) for l in labels]
    for i, stem in enumerate(stems):
        first = stems.index(stem)
        if first == i:
            continue
        if given and labels[first] == labels[i]:
            raise ConfigError(f"--labels: {labels[i]!r} is given twice; give every run its own name")
        if given:
            raise ConfigError(f"--labels: {labels[first]!r} and {labels[i]!r} give the same file names "
                              f"(prores-{stem}.png, ...); give names that differ in letters or digits")
        n = 2
        while f"{stem}-{n}" in stems:
            n += 1
        stems[i] = f"{stem}-{n}"
    return stems


def check_output(path: str) -> list:
    """Create the --output directory (and its missing parents) and try a file in it, before any
    run is read; returns the directories created (removed again if plotting fails)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--output {path} is a file; give a directory for the PNG files (created if missing)")
    missing, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        missing.append(p)
        p = os.path.dirname(p)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        remove_dirs(missing)
        raise ConfigError(f"--output {path} cannot be created or written ({e.strerror or e}); "
                          f"give a directory you can write to") from None
    return missing


def remove_dirs(created: list) -> None:
    for d in created:  # deepest first
        try:
            os.rmdir(d)
        except OSError:
            pass


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="TensorBoard directories (one per run)")
    p.add_argument("--output", required=True, help="directory for the PNG files")
    p.add_argument("--labels", nargs="*", default=None,
                   help="legend names (default: directory names, RUN for RUN/tensorboard)")
    args = p.parse_args(argv)
    labels = args.labels or default_labels(args.runs)
    if len(labels) != len(args.runs):
        raise ConfigError("--labels needs one name per run")
    if any(not l.strip() for l in labels):
        raise ConfigError("--labels: an empty name; give every run a name")
    stems = check_labels(labels, given=bool(args.labels))
    created = check_output(args.output)
    try:
        plot(args, labels, stems)
    except BaseException:
        remove_dirs(created)  # an --output made here and still empty (a run could not be read) goes again
        raise


def plot(args, labels: list, stems: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [read_scalars(r) for r in args.runs]

    def save(fig, fname):
        try:
            fig.savefig(os.path.join(args.output, fname), dpi=120)
        except OSError as e:  # a full disk, a quota
            raise ConfigError(f"--output {args.output}: writing {fname} failed ({e.strerror or e}); "
                              f"free space there or give another --output") from None
        finally:
            plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, scalars in zip(labels, runs):
        for tag, style in (("lm-loss-training/lm loss", "-"), ("lm-loss-validation/lm loss", "--")):
            if tag in scalars:
                steps, values = scalars[tag]
                ax.plot(steps, values, style, marker="o" if len(steps) == 1 else None,  # one step: a dot
                        label=f"{label} ({'val' if 'valid' in tag else 'train'})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, "loss.png")
    written = ["loss.png"]

    for label, stem, scalars in zip(labels, stems, runs):
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
            first, last = (steps[0], steps[-1]) if len(steps) > 1 else (steps[0] - 0.5, steps[0] + 0.5)
            fig, ax = plt.subplots(figsize=(8, 0.3 * len(tags) + 2))
            im = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest",
                           extent=(first, last, 0.5, len(tags) + 0.5))
            ax.set_yticks(range(1, len(tags) + 1))
            ax.set_yticklabels([re.sub(r"^.*block 0*", "", t) for t in tags], fontsize=7)
            ax.set_xlabel("iteration")
            ax.set_ylabel("block")
            ax.set_title(f"{label}: {name}")
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            fname = f"{name}-{stem}.png"
            save(fig, fname)
            written.append(fname)
    print(f"wrote {', '.join(written)} to {args.output}")


def cli():
    sys.exit(run(main))


if __name__ == "__main__":
    cli()

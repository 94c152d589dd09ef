"""Throughput of tools/preprocess_data.py: this tree against an older commit, per input format,
tokenizer and --workers.

    python benchmarks/preprocess_throughput.py                              # ~20 MB, both tokenizers
    python benchmarks/preprocess_throughput.py --mb 40 --repeats 2 --out benchmarks/results/NAME

What it builds (in a temporary folder, nothing downloaded):
  corpus      English prose with tools/build_corpus.py: the Linux kernel documentation when installed
              (/usr/share/doc/linux-doc-*/Documentation), else the text files of /usr/share/doc
              (changelogs, NEWS, READMEs, copyright files); identical files dropped and files cut at
              blank lines into documents of at most --doc-chars characters (web-page sized: a few
              files of MBs would otherwise be most of the text), up to --mb MB of JSONL
  formats     the same documents as .jsonl, .jsonl.gz, .jsonl.zst and .parquet (row groups of 1,000)
  tokenizers  a SentencePiece BPE (tools/train_tokenizer.py) and a Hugging Face byte-level BPE
              (tokenizers, GPT-2 style), --vocab pieces each
The old commit (default e33b4d9, before the input formats) is taken with ``git archive`` and run
with PYTHONPATH pointing at it; it reads plain JSONL only.

Each run is the tool's whole process (python start, imports, worker start-up, tokenizing,
writing), timed by wall clock; interleaved old/new per tokenizer and --workers, --repeats times
(the best run counts: the machine may be shared; the load average before each run is recorded).
Columns: M tokens/s and MB/s (of the plain JSONL's bytes) over the wall time; "tool" the tool's
own tokens/s (from its last line: the time after its imports); peak RSS: the most resident memory
of the tool's process tree at once (all processes summed, sampled every 50 ms with psutil) and of
its largest process. The new outputs are checked byte for byte against the old ones (plain JSONL)
and against each other (formats, --workers).

Results: --out PATH writes PATH.json and PATH.md (default:
benchmarks/results/<cpu>-<date>-preprocess-throughput); the table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SOURCES = sorted(glob.glob("/usr/share/doc/linux-doc-*/Documentation"))
DOC_EXTENSIONS = {"kdoc": [".rst", ".txt"],
                  "doc": [".txt", ".md", ".rst", "changelog", ".Debian", "NEWS", "README", "copyright"]}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=20, help="MB of JSONL to tokenize")
    p.add_argument("--doc-chars", type=int, default=8000, help="longest document (0: whole files)")
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--formats", default="jsonl,jsonl.gz,jsonl.zst,parquet",
                   help="formats of the new tool (the old one: jsonl)")
    p.add_argument("--format-workers", type=int, default=2, help="--workers of the runs on the other formats")
    p.add_argument("--tokenizers", default="sentencepiece,hf-bpe")
    p.add_argument("--old", default="e33b4d9", help="the commit to compare with ('' for none)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    p.add_argument("--out", default=None, help="PATH: writes PATH.json and PATH.md")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="only rewrite the report (--out, default: beside it) from a results JSON of this script")
    return p.parse_args(argv)


def sh(cmd, env=None, **kw):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, **kw)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return out


def env_for(tree):
    return {**os.environ, "PYTHONPATH": tree, "PYTHONWARNINGS": "ignore"}


# ---- inputs ------------------------------------------------------------------------------------

def build_corpus(work, mb, doc_chars):
    """The JSONL of documents (deduplicated, cut at blank lines), and what it was made from."""
    raw = os.path.join(work, "files.jsonl")
    source, kind = (SOURCES[-1], "kdoc") if SOURCES else ("/usr/share/doc", "doc")
    sh([sys.executable, os.path.join(ROOT, "tools", "build_corpus.py"), "--source", source, "--extensions",
        *DOC_EXTENSIONS[kind], "--output", raw, "--max-bytes", int(mb * 1e6 * 1.6)], env=env_for(ROOT))
    path, seen, size, docs = os.path.join(work, "corpus.jsonl"), set(), 0, 0
    with open(raw, encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
        for line in f:
            text = json.loads(line)["text"]
            digest = hashlib.sha1(text.encode()).digest()
            if digest in seen:
                continue
            seen.add(digest)
            for doc in split(text, doc_chars):
                record = json.dumps({"text": doc}) + "\n"
                out.write(record)
                size += len(record.encode())
                docs += 1
            if size >= mb * 1e6:
                break
    os.remove(raw)
    return path, {"source": source, "documents": docs, "jsonl_bytes": size}


def split(text, limit):
    """``text`` cut at blank lines into pieces of at most ``limit`` characters (a longer paragraph
    stays whole); ``limit`` 0: the text."""
    if not limit:
        return [text]
    pieces, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + 2 + len(para) > limit:
            pieces.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    return pieces + ([cur] if cur else [])


def formats(work, corpus, names):
    """format -> input path: the same documents in each format."""
    paths = {"jsonl": corpus}
    data = open(corpus, "rb").read()
    if "jsonl.gz" in names:
        paths["jsonl.gz"] = corpus + ".gz"
        with open(paths["jsonl.gz"], "wb") as f:
            f.write(gzip.compress(data, compresslevel=6))
    if "jsonl.zst" in names:
        import zstandard

        paths["jsonl.zst"] = corpus + ".zst"
        with open(paths["jsonl.zst"], "wb") as f:
            f.write(zstandard.ZstdCompressor(level=3).compress(data))
    if "parquet" in names:
        import pyarrow as pa
        import pyarrow.parquet as pq

        texts = [json.loads(line)["text"] for line in data.splitlines()]
        paths["parquet"] = os.path.join(work, "corpus.parquet")
        pq.write_table(pa.table({"text": texts}), paths["parquet"], row_group_size=1000)
    return {k: v for k, v in paths.items() if k in names}


def tokenizers(work, corpus, vocab, names):
    """name -> tokenizer flags of preprocess_data."""
    out = {}
    if "sentencepiece" in names:
        sh([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", corpus, "--model-prefix",
            os.path.join(work, "sp"), "--vocab-size", vocab, "--max-sentences", 200_000], env=env_for(ROOT))
        out["sentencepiece"] = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                                os.path.join(work, "sp.model")]
    if "hf-bpe" in names:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        texts, size = [], 0
        with open(corpus, encoding="utf-8") as f:
            for line in f:  # the first 5 MB
                texts.append(json.loads(line)["text"])
                size += len(line)
                if size > 5e6:
                    break
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        os.makedirs(os.path.join(work, "hf"), exist_ok=True)
        tok.save(os.path.join(work, "hf", "tokenizer.json"))
        out["hf-bpe"] = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", os.path.join(work, "hf")]
    return out


def old_tree(work, commit):
    """The old commit's megatron_prores and tools, from git archive."""
    tree = os.path.join(work, f"old-{commit}")
    data = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", commit, "megatron_prores", "tools"],
                          capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        t.extractall(tree)
    where = sh([sys.executable, "-c", "import megatron_prores.tools.preprocess_data as m; print(m.__file__)"],
               env=env_for(tree), cwd=work).stdout.strip()
    assert where.startswith(tree), f"the old commit's code is not the one imported: {where}"
    return tree


# ---- one run -----------------------------------------------------------------------------------

def measure(cmd, env, cwd):
    """(wall seconds, peak RSS of the tree summed, peak RSS of one process, stdout)."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = psutil.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    peak_sum = peak_one = 0
    while proc.poll() is None:
        try:
            rss = [proc.memory_info().rss] + [c.memory_info().rss for c in proc.children(recursive=True)]
        except psutil.Error:
            rss = []
        peak_sum, peak_one = max(peak_sum, sum(rss)), max([peak_one] + rss)
        time.sleep(0.05)
    wall = time.perf_counter() - start
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{err.decode()[-3000:]}")
    return wall, peak_sum, peak_one, out.decode(), load


def run_tool(tree, inp, tok_flags, workers, prefix, cwd):
    cmd = [sys.executable, os.path.join(tree, "tools", "preprocess_data.py"), "--input", inp, "--output-prefix",
           prefix, *tok_flags, "--workers", workers]
    wall, peak_sum, peak_one, out, load = measure(cmd, env_for(tree), cwd)
    last = [line for line in out.splitlines() if line.startswith("wrote ")][-1]
    tokens = int(re.search(r"wrote \d+ documents, ([\d,]+) tokens", last).group(1).replace(",", ""))
    tool_rate = float(re.search(r": ([\d,]+) tokens/s", last).group(1).replace(",", ""))
    digest = hashlib.sha256()
    for ext in (".bin", ".idx"):
        with open(f"{prefix}_text_document{ext}", "rb") as f:
            digest.update(f.read())
    for ext in (".bin", ".idx"):
        os.remove(f"{prefix}_text_document{ext}")
    return {"wall_s": wall, "tokens": tokens, "tool_tokens_per_s": tool_rate, "peak_rss_tree_mb": peak_sum / 2**20,
            "peak_rss_process_mb": peak_one / 2**20, "load_before": load, "sha256": digest.hexdigest()}


# ---- the table ---------------------------------------------------------------------------------

def table(rows):
    head = ("| version | format | tokenizer | workers | M tokens/s | MB/s | speedup | tool M tokens/s | tool speedup "
            "| peak RSS tree / process (MB) | wall (s) |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        lines.append(f"| {r['version']} | {r['format']} | {r['tokenizer']} | {r['workers']} | "
                     f"{r['tokens_per_s'] / 1e6:.3f} | {r['mb_per_s']:.2f} | {r.get('speedup', '')} | "
                     f"{r['tool_tokens_per_s'] / 1e6:.3f} | {r.get('tool_speedup', '')} | "
                     f"{r['peak_rss_tree_mb']:.0f} / {r['peak_rss_process_mb']:.0f} | {r['wall_s']:.1f} |")
    return head + "\n".join(lines) + "\n"


def report(rows, meta, out):
    """Speedups against the old commit's plain JSONL run (same tokenizer and --workers), the byte
    check, PATH.json and PATH.md; returns the markdown."""
    best = {(r["version"], r["format"], r["tokenizer"], r["workers"]): r for r in rows}
    identical = True
    for r in rows:
        ref = best.get(("old", "jsonl", r["tokenizer"], r["workers"]))
        if r["version"] == "new" and ref:
            r["speedup"] = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x"
            r["tool_speedup"] = f"{r['tool_tokens_per_s'] / ref['tool_tokens_per_s']:.2f}x"
        identical &= len({x["sha256"] for x in rows if x["tokenizer"] == r["tokenizer"]}) == 1
    meta["outputs_identical"] = identical
    info = meta["corpus"]
    text = (f"# preprocess_data throughput ({meta['date']}, {meta['cpus']} CPUs, Python {meta['python']})\n\n"
            f"Corpus: {info['documents']} documents, {info['jsonl_bytes'] / 1e6:.1f} MB of JSONL from "
            f"{info['source']}; vocabularies of {meta['vocab']}; old = {meta['old_commit']}, new = {meta['new']}; "
            f"best of {meta['repeats']} (interleaved). M tokens/s and MB/s (of the plain JSONL): over the wall "
            f"clock of the whole tool process (start-up and imports included); tool M tokens/s: the tool's own "
            f"figure (its time after its imports); speedups: against the old commit on plain JSONL with the "
            f"same tokenizer and --workers; peak RSS: the tool's process tree summed / its largest process. "
            f"Outputs byte-identical across versions, formats and workers: {'yes' if identical else 'NO'}.\n\n"
            + table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(text)
    return text, identical


def default_out():
    cpu = f"cpu-{platform.machine()}-{psutil.cpu_count()}cores"
    return os.path.join(HERE, "results", f"{cpu}-{datetime.date.today()}-preprocess-throughput")


def main(argv=None):
    args = parse(argv)
    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        print(report(saved["rows"], saved["meta"], args.out or args.report[:-len(".json")])[0])
        return 0
    work = args.work or tempfile.mkdtemp(prefix="preprocess-bench-")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    try:
        corpus, info = build_corpus(work, args.mb, args.doc_chars)
        names = args.formats.split(",")
        inputs = formats(work, corpus, names)
        toks = tokenizers(work, corpus, args.vocab, args.tokenizers.split(","))
        old = old_tree(work, args.old) if args.old else None
        print(f"corpus: {info['documents']} documents, {info['jsonl_bytes'] / 1e6:.1f} MB of JSONL from "
              f"{info['source']}; set up in {time.time() - t0:.0f} s", flush=True)
        mb = info["jsonl_bytes"] / 1e6
        runs = []  # (version, format, tokenizer, workers, result)
        plan = []
        for tok in toks:
            for w in map(int, args.workers.split(",")):
                if old:
                    plan.append(("old", "jsonl", tok, w))
                plan.append(("new", "jsonl", tok, w))
            plan += [("new", f, tok, args.format_workers) for f in inputs if f != "jsonl"]
        for rep in range(args.repeats):
            for version, fmt, tok, w in plan:
                tree = old if version == "old" else ROOT
                r = run_tool(tree, inputs[fmt], toks[tok], w, os.path.join(work, "out"), work)
                r.update(version=version, format=fmt, tokenizer=tok, workers=w, repeat=rep,
                         tokens_per_s=r["tokens"] / r["wall_s"], mb_per_s=mb / r["wall_s"])
                runs.append(r)
                print(f"  {version} {fmt} {tok} workers={w}: {r['tokens_per_s'] / 1e6:.3f} M tokens/s "
                      f"({r['wall_s']:.1f} s, tool {r['tool_tokens_per_s'] / 1e6:.3f}, load {r['load_before']:.1f})",
                      flush=True)
        best = {}
        for r in runs:  # the best repeat of each configuration
            key = (r["version"], r["format"], r["tokenizer"], r["workers"])
            if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
                best[key] = r
        meta = {"date": str(datetime.datetime.now().isoformat(timespec="seconds")), "host": platform.node(),
                "cpus": psutil.cpu_count(), "python": platform.python_version(), "old_commit": args.old,
                "new": sh(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]).stdout.strip() + " + working tree",
                "corpus": info, "vocab": args.vocab, "repeats": args.repeats, "total_s": time.time() - t0,
                "runs": runs}
        out = args.out or default_out()
        text, identical = report(list(best.values()), meta, out)
        print("\n" + text + f"\nresults: {out}.json, {out}.md; {time.time() - t0:.0f} s in all")
        if not identical:
            return 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

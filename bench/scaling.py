"""Scaling curve of the index job on this machine: wall time and tokens/s for 1k, 5k and 20k documents.

Each size is the real CLI job in its own process (``python -m pipelines.cli index``: start-up,
model load, read, chunk, embed, write), on DirectRunner with the embedded store and the offline
MiniLM, ``--chunk-tokens 0``, every other flag at its default. Documents: real text, windows of
``--max-chars`` characters (400 by default: ~60-110 MiniLM tokens) of the docstrings of installed
packages (``bench.store.real_texts``; see ``corpus``), short so that 20k documents take minutes on 2
cores; the smaller sizes are prefixes of the larger. Sizes run smallest first, each ``--repeats`` times.

Linear growth means a constant cost per document: the marginal seconds per 1,000 documents
between consecutive sizes, ``(t[n2] - t[n1]) / (n2 - n1)``, should match, the fixed start-up
(imports, model load, store creation) being the intercept of the fit ``t = a + b * n``.

    python bench/scaling.py --write            # 1k, 5k, 20k; ~5 min of jobs on 2 cores (BENCHMARKS.md)
    python bench/scaling.py --sizes 200,1000   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import command, machine, replace_section  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def title(sizes: list[int]) -> str:
    """The section's title, naming the sizes run (the default sizes give "(1k, 5k, 20k documents)")."""
    named = [f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"{n:,}" for n in sorted(sizes)]
    return f"Index job scaling on CPU ({', '.join(named)} documents)"


def fit_line(walls: dict[int, float]) -> str:
    """The least-squares line through (documents, median wall seconds): fixed start-up plus seconds per 1k
    documents. It needs two sizes or more; through one point any line fits, so none is given."""
    sizes = sorted(walls)
    if len(sizes) < 2:
        return "Least-squares fit: none (one size; a line needs two or more)."
    b, a = np.polyfit(sizes, [walls[n] for n in sizes], 1)
    return f"Least-squares fit: wall ≈ {a:.1f} s + {1000 * b:.1f} s per 1k documents."


def corpus(n: int, max_chars: int) -> list[dict[str, str]]:
    """``n`` documents: windows of ``max_chars`` characters of the docstrings of installed packages, the
    first window of every docstring, then the second of those longer than 1.25 windows (real text either way:
    this machine's packages hold ~13k docstrings of >= 200 characters)."""
    from bench.store import real_texts

    texts = real_texts(n)
    windows = [t[:max_chars] for t in texts]
    windows += [t[max_chars : 2 * max_chars] for t in texts if len(t) >= 1.25 * max_chars]
    if len(windows) < n:
        raise SystemExit(f"only {len(windows)} documents of real text are available here, {n} asked for")
    return [{"id": f"doc-{i:05d}", "text": t} for i, t in enumerate(windows[:n])]


def run_job(parquet: str, store: str, extra: list[str]) -> dict[str, float]:
    summary = os.path.join(os.path.dirname(parquet), f"summary-{time.time_ns()}.json")
    argv = [sys.executable, "-m", "pipelines.cli", "index", "--input", parquet, "--collection", "scaling",
            "--model", MODEL, "--qdrant-path", store, "--chunk-tokens", "0", "--progress-interval", "600",
            "--summary-out", summary, *extra]  # fmt: skip
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"index job failed ({done.returncode}):\n{done.stderr[-3000:]}")
    with open(summary) as f:
        s = json.load(f)
    return {
        "wall_s": wall,
        "job_s": float(s["elapsed_s"]),
        "tokens": int(s["counters"].get("tokens", 0)),
        "points": int(s["points_in_collection"]),
        "load1": max(load, os.getloadavg()[0]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000,20000", help="comma-separated document counts")
    parser.add_argument("--repeats", type=int, default=1, help="runs per size (median reported)")
    parser.add_argument("--max-chars", type=int, default=400, help="characters kept of each document")
    parser.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    parser.add_argument("--benchmarks", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument("extra", nargs="*", help="more index flags, after --")
    args = parser.parse_args(argv)
    sizes = sorted({int(x) for x in args.sizes.split(",")})
    work = tempfile.mkdtemp(prefix="bench_scaling_")
    try:
        rows = corpus(sizes[-1], args.max_chars)
        results: dict[int, list[dict[str, float]]] = {}
        for n in sizes:
            parquet = os.path.join(work, f"docs-{n}.parquet")
            pq.write_table(pa.Table.from_pylist(rows[:n]), parquet)
            for i in range(args.repeats):
                store = os.path.join(work, f"store-{n}-{i}")
                out = run_job(parquet, store, args.extra)
                shutil.rmtree(store, ignore_errors=True)
                if out["points"] != n:
                    raise SystemExit(f"{n} documents gave {out['points']} points")
                results.setdefault(n, []).append(out)
                print(f"{n:6d} docs: wall {out['wall_s']:7.1f} s  job {out['job_s']:7.1f} s  "
                      f"{out['tokens'] / out['wall_s']:7.0f} tokens/s  load {out['load1']:.1f}", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {n: statistics.median(r["wall_s"] for r in runs) for n, runs in results.items()}
    tokens = {n: runs[0]["tokens"] for n, runs in results.items()}
    lines = [
        f"Command: `{command('bench/scaling.py', argv)}`",
        "",
        f"- Machine: {machine()} (shared: load column)",
        f"- Date: {subprocess.run(['date', '-u'], capture_output=True, text=True).stdout.strip()}",
        f"- Job: `corpus-etl index --chunk-tokens 0` (MiniLM, DirectRunner, embedded store), each size in its own "
        f"process, {args.repeats} run(s) each, smallest first; documents: windows of {args.max_chars} characters of "
        f"the docstrings of installed packages (`bench.store.real_texts`, `corpus` in the script)",
        "",
        "| documents | tokens | wall s (per run) | docs/s | tokens/s | marginal s per 1k docs | load |",
        "|---|---|---|---|---|---|---|",
    ]
    previous = None
    for n in sizes:
        runs = results[n]
        marginal = "-" if previous is None else f"{1000 * (med[n] - med[previous]) / (n - previous):.1f}"
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
        loads = ", ".join(f"{r['load1']:.1f}" for r in runs)
        lines.append(
            f"| {n:,} | {tokens[n]:,} | {med[n]:.1f} ({walls}) | {n / med[n]:.1f} | {tokens[n] / med[n]:.0f} | "
            f"{marginal} | {loads} |"
        )
        previous = n
    lines += [
        "",
        fit_line(med),
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        replace_section(args.benchmarks, title(sizes), lines)
        print(f"wrote {title(sizes)!r} to {args.benchmarks}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Incremental reindexing: a full index of v1, then v2 (5% changed, 1% deleted, 1% new) with --delete-missing.

The corpus is real text: docstrings of installed packages (``bench.store.real_texts``), one per
document, ``--docs`` of them (5,000 by default). Each run is the real CLI job in its own process on
DirectRunner with the embedded store and the offline MiniLM model. The result is checked against a
fresh index of v2 in another collection: the same point ids, vectors within 1e-6, no orphan point
(a point of a document v2 does not hold).

    .venv/bin/python bench/reindex.py --write
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import machine, replace_section  # noqa: E402
from bench.store import MINILM, real_texts  # noqa: E402

ARGS = ["--chunk-tokens", "128", "--chunk-overlap", "16", "--device", "cpu", "--progress-interval", "60"]


def versions(n: int, seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]], dict[str, int]]:
    texts = real_texts(n + n // 100 + 1)
    v1 = [{"id": f"doc-{i:05d}", "title": t.split(".")[0][:80], "text": t} for i, t in enumerate(texts[:n])]
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    changed = set(order[: n * 5 // 100].tolist())
    deleted = set(order[n * 5 // 100 : n * 6 // 100].tolist())
    v2 = [
        {**r, "text": r["text"] + " (Revised: see the release notes.)"} if i in changed else r
        for i, r in enumerate(v1)
        if i not in deleted
    ]
    new = [{"id": f"doc-new-{i:05d}", "title": t.split(".")[0][:80], "text": t} for i, t in enumerate(texts[n:])]
    v2 += new[: n // 100]
    return v1, v2, {"changed": len(changed), "deleted": len(deleted), "new": n // 100}


def run_index(path: str, qdrant: str, collection: str, *extra: str) -> tuple[dict[str, Any], float]:
    """The CLI job in its own process, as a nightly run is: start-up and model load included."""
    out = os.path.join(os.path.dirname(path), f"{collection}-{time.time_ns()}.json")
    argv = [sys.executable, "-m", "pipelines.cli", "index", "--input", path, "--collection", collection,
            "--model", MINILM, "--qdrant-path", qdrant, "--title-column", "title", *ARGS, "--summary-out", out, *extra]
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode not in (0, 3):
        raise SystemExit(f"index failed ({done.returncode}): {done.stderr[-2000:]}")
    with open(out) as f:
        return json.load(f), elapsed


def points(qdrant: str, collection: str) -> dict[str, tuple[str, np.ndarray]]:
    from transforms.io.edge_store import EdgeStore

    return {p.id: (p.payload["doc_id"], np.asarray(p.vector)) for p in EdgeStore(qdrant).scroll(collection)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--write", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-reindex-")
    try:
        v1, v2, changes = versions(args.docs)
        p1, p2 = os.path.join(work, "v1.parquet"), os.path.join(work, "v2.parquet")
        pq.write_table(pa.Table.from_pylist(v1), p1)
        pq.write_table(pa.Table.from_pylist(v2), p2)
        qdrant = os.path.join(work, "q")
        full, t_full = run_index(p1, qdrant, "docs")
        inc, t_inc = run_index(p2, qdrant, "docs", "--delete-missing")
        fresh, t_fresh = run_index(p2, qdrant, "fresh")
        got, want = points(qdrant, "docs"), points(qdrant, "fresh")
        same_ids = sorted(got) == sorted(want)
        worst = max(float(np.abs(got[k][1] - want[k][1]).max()) for k in want) if same_ids else float("nan")
        valid = {r["id"] for r in v2}
        orphans = sum(1 for doc, _ in got.values() if doc not in valid)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = t_inc / t_full
    lines = [
        f"Command: `.venv/bin/python bench/reindex.py --docs {args.docs}{' --write' if args.write else ''}`  ",
        f"Machine: {machine()}; {datetime.date.today().isoformat()}; DirectRunner in one process, embedded store "
        "(Qdrant Edge), all-MiniLM-L6-v2 on CPU, `--chunk-tokens 128 --chunk-overlap 16`; each run is "
        "`corpus-etl index` in its own process (start-up and model load included).  ",
        f"Corpus: {args.docs} real-text documents (docstrings of installed packages); v2 = {changes['changed']} "
        f"changed, {changes['deleted']} deleted, {changes['new']} new.",
        "",
        "| run | wall s | chunks | embedded | reused | documents unchanged | deleted docs / points |",
        "|---|---|---|---|---|---|---|",
        f"| full index of v1 | {t_full:.1f} | {full['counters'].get('chunks', 0)} | {full['chunks_embedded']} | "
        f"{full['chunks_reused']} | {full['documents_unchanged']} | - |",
        f"| v2 incremental, `--delete-missing` | {t_inc:.1f} | {inc['counters'].get('chunks', 0)} | "
        f"{inc['chunks_embedded']} | {inc['chunks_reused']} | {inc['documents_unchanged']} | "
        f"{inc['deletion']['documents_deleted']} / {inc['deletion']['points_deleted']} |",
        f"| fresh index of v2 (the check) | {t_fresh:.1f} | {fresh['counters'].get('chunks', 0)} | "
        f"{fresh['chunks_embedded']} | {fresh['chunks_reused']} | - | - |",
        "",
        f"**Incremental / full = {ratio:.3f}** (goal <= 0.15). Check against the fresh v2 index: same point ids "
        f"{'yes' if same_ids else 'NO'} ({len(got)} points), largest vector difference {worst:.2e} (<= 1e-6 "
        f"{'yes' if worst <= 1e-6 else 'NO'}), orphan points {orphans}.",
    ]
    print("\n".join(lines))
    if args.write:
        replace_section(os.path.join(ROOT, "BENCHMARKS.md"), "Incremental reindexing (CPU)", lines)


if __name__ == "__main__":
    main()

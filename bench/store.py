"""The embedded store: qdrant-client local mode (the old ``--qdrant-path``) vs Qdrant Edge (the new one).

Realistic vectors: MiniLM embeddings of real text (docstrings of the installed Python
packages, one per document, deduplicated), and, to reach 100k / 1M points, those
embeddings plus small Gaussian noise (sigma per dimension, renormalised). Queries are
other real docstrings, embedded with the model's query prompt. Recall is never measured
on random vectors.

Per store and size: upsert points/s (batches of 256, payload with doc id, chunk index and
200 characters of text), exact grouped top-10 p50/p95 (the jobs' ``search_documents``),
delete by filter (every chunk of 100 documents), reopen (open + count), disk size; for
Edge also an HNSW build (time) and HNSW top-10 p50/p95 and recall@10 against exact, with
``hnsw_ef`` passed explicitly. Local mode runs only up to ``--local-max`` points.

Recall on real embeddings (no noise) is measured on the ``--base`` documents themselves.

    .venv/bin/python bench/store.py --points 100000 --write
    .venv/bin/python bench/store.py --points 100000 --points 1000000 --hnsw-max 100000 --write
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import inspect
import json
import os
import pkgutil
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import command as common_command  # noqa: E402
from bench.common import machine, replace_section  # noqa: E402

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# Walked in this order until enough text is found (apache_beam is left out: some of its example
# modules run pipelines when imported).
PACKAGES = ("email", "http", "json", "logging", "unittest", "xml", "asyncio", "multiprocessing", "concurrent",
            "importlib", "collections", "urllib", "numpy", "pyarrow", "matplotlib", "scipy",
            "networkx", "sympy", "torch")  # fmt: skip


# -- real text ---------------------------------------------------------------------------------
def real_texts(n: int) -> list[str]:
    """``n`` distinct docstrings (>= 200 characters, first 1000 kept) from installed packages, stable order."""
    seen: set[str] = set()
    out: list[str] = []
    warnings.simplefilter("ignore")

    def take(obj: Any) -> None:
        doc = inspect.getdoc(obj)
        if not doc or len(doc) < 200:
            return
        text = " ".join(doc.split())[:1000]
        if text not in seen:
            seen.add(text)
            out.append(text)

    for package in PACKAGES:
        try:
            root = importlib.import_module(package)
        except Exception:  # noqa: BLE001 - a package that does not import gives no text
            continue
        names = [package]
        if hasattr(root, "__path__"):
            names += sorted(m.name for m in pkgutil.walk_packages(root.__path__, package + ".", onerror=lambda _: None))
        for name in names:
            if len(out) >= n:
                return out
            if any(part.startswith("_") or part in ("tests", "testing", "test") for part in name.split(".")[1:]):
                continue
            try:
                module = importlib.import_module(name)
            except BaseException:  # noqa: BLE001 - optional dependencies, GUI toolkits, SystemExit
                continue
            take(module)
            for attr in sorted(vars(module)):
                obj = getattr(module, attr, None)
                if getattr(obj, "__module__", None) != name:
                    continue
                take(obj)
                if inspect.isclass(obj):
                    for member in sorted(vars(obj)):
                        if not member.startswith("_"):
                            take(getattr(obj, member, None))
    return out


def embeddings(workdir: str, n_base: int, n_queries: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Base documents and queries, embedded with MiniLM; cached in ``workdir``."""
    cache = os.path.join(workdir, f"minilm_{n_base}_{n_queries}.npz")
    if os.path.exists(cache):
        data = np.load(cache, allow_pickle=False)
        return data["base"], data["queries"], [str(t) for t in data["texts"]]
    texts = real_texts(n_base + n_queries)
    if len(texts) < n_base + n_queries:
        raise SystemExit(f"only {len(texts)} distinct docstrings found; lower --base")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))
    texts = [texts[i] for i in order]
    from transforms.models.encoder import TextEncoder

    encoder = TextEncoder(MINILM, device="cpu", max_length=256).load()
    started = time.perf_counter()
    base = np.concatenate([encoder.encode(texts[i : i + 512]) for i in range(0, n_base, 512)])[:n_base]
    # A query is the first sentence of a held-out docstring: real text, query prompt.
    queries = encoder.encode([t.split(". ")[0][:300] for t in texts[n_base:]], is_query=True)
    print(f"embedded {n_base} documents and {n_queries} queries in {time.perf_counter() - started:.0f}s", flush=True)
    np.savez(cache, base=base.astype(np.float32), queries=queries.astype(np.float32), texts=np.array(texts[:n_base]))
    return base.astype(np.float32), queries.astype(np.float32), texts[:n_base]


def synthetic(base: np.ndarray, n: int, sigma: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``n`` vectors: base vectors in turn plus N(0, sigma) per dimension, renormalised; and their base index."""
    rng = np.random.default_rng(seed)
    owner = np.arange(n) % len(base)
    out = np.empty((n, base.shape[1]), np.float32)
    for start in range(0, n, 100_000):
        idx = owner[start : start + 100_000]
        block = base[idx] + rng.normal(0, sigma, (len(idx), base.shape[1])).astype(np.float32)
        out[start : start + len(idx)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out, owner


# -- measurements ------------------------------------------------------------------------------
def du(path: str) -> int:
    """Bytes allocated on disk (not apparent size: Edge preallocates sparse files)."""
    return int(subprocess.run(["du", "-s", "-B1", path], capture_output=True, text=True, check=True).stdout.split()[0])


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


def points_of(
    vectors: np.ndarray, owner: np.ndarray, texts: list[str], start: int, stop: int, per_doc: int
) -> list[Any]:
    from transforms.io.store import StorePoint
    from transforms.types import point_id

    out = []
    rows = vectors[start:stop].tolist()  # lists: building points from numpy rows is slower
    for i, row in zip(range(start, stop), rows):
        doc, chunk = f"d{i // per_doc}", i % per_doc
        out.append(StorePoint(point_id(doc, chunk), row, {"doc_id": doc, "chunk_index": chunk, "text": texts[owner[i]][:200]}))
    return out


def timed_queries(search, queries: np.ndarray) -> tuple[list[float], list[list[str]]]:
    times, results = [], []
    search(queries[0].tolist())  # warm-up, not counted
    for q in queries:
        started = time.perf_counter()
        hits = search(q.tolist())
        times.append(time.perf_counter() - started)
        results.append([c.doc_id for c, _ in hits])
    return times, results


def recall(approx: list[list[str]], exact: list[list[str]]) -> float:
    return statistics.mean(len(set(a) & set(e)) / max(1, len(e)) for a, e in zip(approx, exact))


def doomed(n: int, per_doc: int) -> dict[str, int]:
    """100 documents spread over the collection, whose every chunk the delete removes."""
    docs = n // per_doc
    return {f"d{i}": 0 for i in range(0, docs, max(1, docs // 100))[:100]}


def bench_edge(path: str, vectors, owner, texts, queries, args, *, hnsw: bool, per_doc: int = 4) -> dict[str, Any]:
    from transforms.io.edge_store import EdgeStore
    from transforms.io.store import CollectionSpec, HnswSettings

    EdgeStore(path, shards=args.shards).ensure_collection("bench", CollectionSpec(vectors.shape[1]))
    store = EdgeStore(path, keep_open=True)  # one writer holding its shards, as the job's shard writers do
    n = len(vectors)
    started = time.perf_counter()
    for start in range(0, n, 256):
        store.upsert("bench", points_of(vectors, owner, texts, start, min(n, start + 256), per_doc))
    upsert_s = time.perf_counter() - started
    result: dict[str, Any] = {"store": "Qdrant Edge", "points": n, "upsert_per_s": n / upsert_s}
    store.close()
    store = EdgeStore(path, keep_open=True)
    times, exact = timed_queries(lambda q: store.search_documents("bench", q, 10), queries)
    result |= {"exact_p50_ms": pct(times, 50), "exact_p95_ms": pct(times, 95)}
    if hnsw:
        store.close()
        store = EdgeStore(path)
        settings = HnswSettings(args.m, args.ef_construct, full_scan_threshold_kb=1)
        built = store.build_index("bench", settings)
        store = EdgeStore(path, keep_open=True)
        result["hnsw_build_s"] = built["seconds"]
        for i, ef in enumerate(args.hnsw_ef):
            times, approx = timed_queries(lambda q, ef=ef: store.search_documents("bench", q, 10, hnsw_ef=ef), queries)
            measured = {"hnsw_p50_ms": pct(times, 50), "hnsw_p95_ms": pct(times, 95), "recall_at_10": recall(approx, exact)}
            result[f"ef_{ef}"] = measured
            if i == 0:
                result |= measured
    delete = doomed(n, per_doc)
    started = time.perf_counter()
    store.delete_chunks_from("bench", delete)
    result["delete_ms"] = (time.perf_counter() - started) * 1000
    store.close()
    started = time.perf_counter()
    reopened = EdgeStore(path, keep_open=True)
    count = reopened.count("bench")
    result["reopen_s"] = time.perf_counter() - started
    reopened.close()
    result["disk_mb"] = du(path) / 1e6
    assert count == n - per_doc * len(delete), (count, n)
    return result


def bench_local(path: str, vectors, owner, texts, queries) -> dict[str, Any]:
    from qdrant_client import QdrantClient, models

    from transforms.io.qdrant import search_documents

    client = QdrantClient(path=path)
    client.create_collection("bench", vectors_config=models.VectorParams(size=vectors.shape[1], distance=models.Distance.COSINE))
    n = len(vectors)
    started = time.perf_counter()
    for start in range(0, n, 256):
        batch = points_of(vectors, owner, texts, start, min(n, start + 256), 4)
        client.upsert("bench", [models.PointStruct(id=p.id, vector=p.vector, payload=p.payload) for p in batch], wait=True)
    upsert_s = time.perf_counter() - started
    result: dict[str, Any] = {"store": "qdrant-client local mode", "points": n, "upsert_per_s": n / upsert_s}
    times, _ = timed_queries(lambda q: search_documents(client, "bench", q, 10), queries)
    result |= {"exact_p50_ms": pct(times, 50), "exact_p95_ms": pct(times, 95)}
    docs = sorted(doomed(n, 4))
    started = time.perf_counter()
    client.delete("bench", points_selector=models.FilterSelector(filter=models.Filter(
        must=[models.FieldCondition(key="doc_id", match=models.MatchAny(any=docs))])), wait=True)  # fmt: skip
    result["delete_ms"] = (time.perf_counter() - started) * 1000
    client.close()
    started = time.perf_counter()
    reopened = QdrantClient(path=path)
    count = reopened.count("bench", exact=True).count
    result["reopen_s"] = time.perf_counter() - started
    reopened.close()
    result["disk_mb"] = du(path) / 1e6
    assert count == n - 4 * len(docs), (count, n)
    return result


def bench_real_recall(path: str, base: np.ndarray, texts: list[str], queries: np.ndarray, args) -> dict[str, Any]:
    """Item 5: HNSW recall@10 vs exact on the real embeddings themselves (one point per document)."""
    owner = np.arange(len(base))
    shutil.rmtree(path, ignore_errors=True)
    return bench_edge(path, base, owner, texts, queries, args, hnsw=True, per_doc=1)


def ef_sweep(path: str, base: np.ndarray, texts: list[str], queries: np.ndarray, args) -> list[str]:
    """Recall@10 and latency against exact at several ``hnsw_ef`` on the real embeddings (one point per document)."""
    from transforms.io.edge_store import EdgeStore
    from transforms.io.store import CollectionSpec, HnswSettings

    shutil.rmtree(path, ignore_errors=True)
    EdgeStore(path, shards=args.shards).ensure_collection("bench", CollectionSpec(base.shape[1]))
    store = EdgeStore(path, keep_open=True)
    for start in range(0, len(base), 256):
        store.upsert("bench", points_of(base, np.arange(len(base)), texts, start, min(len(base), start + 256), 1))
    store.close()
    built = EdgeStore(path).build_index("bench", HnswSettings(args.m, args.ef_construct, full_scan_threshold_kb=1))
    store = EdgeStore(path, keep_open=True)
    _, exact = timed_queries(lambda q: store.search_documents("bench", q, 10), queries)
    lines = [
        f"Command: `python bench/store.py --ef-sweep --base {args.base} --queries {args.queries}`  ",
        f"Machine: {machine()} (shared); {datetime.date.today().isoformat()}; {len(base):,} documents (MiniLM "
        f"embeddings of real docstrings, one point each), {args.shards} shards, HNSW m={args.m} "
        f"ef_construct={args.ef_construct} built in {built['seconds']}s, graph always walked (full-scan threshold 1 KB).",
        "",
        "| hnsw_ef | recall@10 vs exact | p50 ms | p95 ms |",
        "|---:|---:|---:|---:|",
    ]
    for ef in (8, 16, 32, 64, 128):
        times, approx = timed_queries(lambda q, ef=ef: store.search_documents("bench", q, 10, hnsw_ef=ef), queries)
        lines.append(f"| {ef} | {recall(approx, exact):.3f} | {pct(times, 50):.1f} | {pct(times, 95):.1f} |")
    store.close()
    shutil.rmtree(path, ignore_errors=True)
    return lines


# -- report --------------------------------------------------------------------------------------
def fmt(v: Any, digits: int = 1) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def as_ratio(x: float, digits: int) -> str:
    """A ratio as ``12.3x``, never rounded to ``0x``: below 1 (Edge the slower) it keeps two decimals."""
    return f"{x:.{digits}f}x" if round(x, digits) >= 1 else f"{x:.2f}x"


def comparison(n: int, edge: dict[str, Any], local: dict[str, Any]) -> str:
    """Edge against local mode at ``n`` points: Edge's rate over local mode's, local mode's time over Edge's."""
    return (
        f"At {n:,} points Edge vs local mode (above 1x Edge is faster): upsert "
        f"{as_ratio(edge['upsert_per_s'] / local['upsert_per_s'], 1)}, exact p50 "
        f"{as_ratio(local['exact_p50_ms'] / edge['exact_p50_ms'], 1)}, delete {as_ratio(local['delete_ms'] / edge['delete_ms'], 0)}, "
        f"reopen {as_ratio(local['reopen_s'] / edge['reopen_s'], 0)}."
    )


def edge_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qdrant-edge-py")
    except PackageNotFoundError:
        return "(version unknown)"


def markdown(results: list[dict[str, Any]], real: dict[str, Any], args, command: str) -> list[str]:
    head = ("| store | points | upsert points/s | exact top-10 p50 / p95 ms | HNSW build s | HNSW top-10 p50 / p95 ms "
            "| recall@10 | delete 100 docs ms | reopen s | disk MB |")  # fmt: skip
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {machine()} (shared with other jobs); {datetime.date.today().isoformat()}; "
        f"qdrant-edge-py {edge_version()}, {args.shards} shards; HNSW m={args.m} ef_construct={args.ef_construct}, "
        f"searched with hnsw_ef={args.hnsw_ef[0]} (passed explicitly; other ef below the table).",
        "",
        f"Vectors: MiniLM ({MINILM}) embeddings of {args.base} real docstrings; larger sets are those plus "
        f"N(0, {args.sigma}) noise per dimension, renormalised. {args.queries} queries: first sentences of other "
        "docstrings, with the query prompt. Top-10 = documents (chunk hits grouped by doc id, as the jobs search). "
        "Synthetic sets have 4 chunks per document, the real set 1. "
        "Delete = filtered delete of every chunk of 100 documents. Reopen = open + exact count.",
        "",
        head,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in [real] + results:
        label = r["store"] + (" (real embeddings, no noise)" if r is real else "")
        lines.append(
            f"| {label} | {r['points']:,} | {fmt(r['upsert_per_s'], 0)} | {fmt(r['exact_p50_ms'])} / {fmt(r['exact_p95_ms'])} "
            f"| {fmt(r.get('hnsw_build_s'))} | {fmt(r.get('hnsw_p50_ms'))} / {fmt(r.get('hnsw_p95_ms'))} "
            f"| {fmt(r.get('recall_at_10'), 3)} | {fmt(r['delete_ms'])} | {fmt(r['reopen_s'], 2)} | {fmt(r['disk_mb'])} |"
        )
    for r in [real] + results:
        others = [f"ef={ef}: recall {r[f'ef_{ef}']['recall_at_10']:.3f}, p50 {r[f'ef_{ef}']['hnsw_p50_ms']:.1f} ms, "
                  f"p95 {r[f'ef_{ef}']['hnsw_p95_ms']:.1f} ms" for ef in args.hnsw_ef[1:] if f"ef_{ef}" in r]  # fmt: skip
        if others:
            lines += ["", f"{r['points']:,} points{' (real)' if r is real else ''}, HNSW at other ef: " + "; ".join(others) + "."]
    by = {(r["store"], r["points"]): r for r in results}
    for n in sorted({r["points"] for r in results}):
        edge, local = by.get(("Qdrant Edge", n)), by.get(("qdrant-client local mode", n))
        if edge and local:
            lines.append("")
            lines.append(comparison(n, edge, local))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, action="append", help="collection sizes (repeatable; default 100000)")
    parser.add_argument("--base", type=int, default=6000, help="real documents embedded (>= 5000 for the recall figure)")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--sigma", type=float, default=0.01, help="noise per dimension added to reach the counts")
    parser.add_argument("--local-max", type=int, default=100_000, help="largest size local mode is run at")
    parser.add_argument("--hnsw-max", type=int, default=1_000_000, help="largest size an HNSW index is built at")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--ef-construct", type=int, default=100)
    parser.add_argument("--hnsw-ef", type=int, action="append", help="search ef (repeatable; first in the table; default 128)")
    parser.add_argument("--workdir", default=None, help="keep the embeddings cache and stores here")
    parser.add_argument("--ef-sweep", action="store_true", help="only: recall and latency vs hnsw_ef on the real set")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    args.points = args.points or [100_000]
    args.hnsw_ef = args.hnsw_ef or [128]
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-store-")
    os.makedirs(workdir, exist_ok=True)
    base, queries, texts = embeddings(workdir, args.base, args.queries)
    if args.ef_sweep:
        lines = ef_sweep(os.path.join(workdir, "sweep"), base, texts, queries, args)
        print("\n".join(lines))
        if args.write:
            replace_section(os.path.join(ROOT, "BENCHMARKS.md"), "Embedded vector store: HNSW recall vs hnsw_ef", lines)
        return
    real = bench_real_recall(os.path.join(workdir, "real"), base, texts, queries, args)
    print(json.dumps(real), flush=True)
    shutil.rmtree(os.path.join(workdir, "real"))
    results = []
    for n in args.points:
        vectors, owner = synthetic(base, n, args.sigma)
        for kind in ("edge", "local"):
            if kind == "local" and n > args.local_max:
                continue
            path = os.path.join(workdir, f"{kind}_{n}")
            shutil.rmtree(path, ignore_errors=True)
            if kind == "edge":
                r = bench_edge(path, vectors, owner, texts, queries, args, hnsw=n <= args.hnsw_max)
            else:
                r = bench_local(path, vectors, owner, texts, queries)
            print(json.dumps(r), flush=True)
            results.append(r)
            shutil.rmtree(path, ignore_errors=True)
            gc.collect()
        del vectors
    command = common_command("bench/store.py")
    lines = markdown(results, real, args, command)
    print("\n".join(lines))
    if args.write:
        replace_section(os.path.join(ROOT, "BENCHMARKS.md"), "Embedded vector store: qdrant-client local mode vs Qdrant Edge", lines)


if __name__ == "__main__":
    main()

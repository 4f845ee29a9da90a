"""`corpus-etl evaluate`: retrieval quality of a collection on BEIR-style queries and qrels.

Chunk hits are aggregated to documents (max score per ``doc_id``) before scoring.
Metrics are computed by ir_measures: nDCG@10, MRR@10 (RR@10) and Recall@k, k = ``--top-k``
(the depth retrieved: a recall deeper than the run would only repeat Recall@k).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any, TypeVar

import ir_measures
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from ir_measures import RR, R, nDCG

from pipelines.common import setup_logging, write_json
from pipelines.errors import PreflightError, first_line
from pipelines.flags import evaluate_parser
from pipelines.search import searcher_from_args

T = TypeVar("T")


def measures(top_k: int = 100) -> dict[str, Any]:
    """The metrics reported for a run retrieved ``top_k`` deep: nDCG@10, MRR@10, Recall@top_k."""
    return {"nDCG@10": nDCG @ 10, "MRR@10": RR @ 10, f"Recall@{top_k}": R @ top_k}


MEASURES = measures(100)


def _read_text(path: str) -> str:
    with FileSystems.open(path) as f:
        return f.read().decode("utf-8")


def read_queries(path: str) -> dict[str, str]:
    """BEIR ``queries.jsonl`` (``_id``, ``text``) or Parquet (``query_id``/``_id``, ``query``/``text``)."""
    if path.endswith(".parquet"):
        with FileSystems.open(path) as f:
            rows = pq.read_table(f).to_pylist()
        return {str(r.get("query_id", r.get("_id"))): str(r.get("query", r.get("text"))) for r in rows}
    queries = {}
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            obj = json.loads(line)
            if "_id" not in obj or "text" not in obj:
                raise ValueError(f"{path}:{n}: a BEIR query needs '_id' and 'text'")
            queries[str(obj["_id"])] = obj["text"]
    return queries


def read_qrels(path: str) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV (header ``query-id corpus-id score``), TREC qrels, or Parquet."""
    qrels: dict[str, dict[str, int]] = {}
    if path.endswith(".parquet"):
        with FileSystems.open(path) as f:
            rows = pq.read_table(f).to_pylist()
        for r in rows:
            qrels.setdefault(str(r["query-id"]), {})[str(r["corpus-id"])] = int(r["score"])
        return qrels
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        parts = line.split()
        if not parts or (n == 1 and parts[0] == "query-id"):
            continue
        if len(parts) == 3:
            qid, did, score = parts
        elif len(parts) == 4:  # TREC: qid iter docid rel
            qid, _, did, score = parts
        else:
            raise ValueError(f"{path}:{n}: expected 'query-id corpus-id score', got {line!r}")
        qrels.setdefault(qid, {})[did] = int(score)
    return qrels


def evaluate(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]], top_k: int = 100) -> dict[str, float]:
    wanted = measures(top_k)
    agg = ir_measures.calc_aggregate(list(wanted.values()), qrels, run)
    return {name: round(float(agg[m]), 6) for name, m in wanted.items()}


def evaluate_collection(
    qdrant: Any, collection: str, model: str, queries_path: str, qrels_path: str, *, top_k: int = 100,
    dim: int | None = None, device: str = "auto", precision: str = "auto",
) -> dict[str, float]:
    """The metrics of ``collection`` (or an alias) on BEIR queries and qrels: what ``evaluate`` prints,
    as a function (the index job's quality gate compares two collections with it)."""
    from pipelines.search import Searcher
    from transforms.models.encoder import TextEncoder

    queries = _read(read_queries, "--gate-queries", queries_path)
    qrels = _read(read_qrels, "--gate-qrels", qrels_path)
    judged = {q: t for q, t in sorted(queries.items()) if q in qrels}
    if not judged:
        raise PreflightError(f"no query in {queries_path} has judgements in {qrels_path}")
    searcher = Searcher(qdrant, collection, TextEncoder(model, device=device, dim=dim, precision=precision).load())
    try:
        hits = searcher.search(list(judged.values()), top_k)
    finally:
        searcher.close()
    run_ = {qid: {h["doc_id"]: h["score"] for h in hs} for qid, hs in zip(judged, hits)}
    return evaluate(run_, {q: qrels[q] for q in judged}, top_k)


build_arg_parser = evaluate_parser  # kept here for callers of the old name


def _read(reader: Callable[[str], T], flag: str, path: str) -> T:
    try:
        return reader(path)
    except OSError as exc:  # Beam's BeamIOError is one too
        reason = exc.strerror or first_line(exc)
        raise PreflightError(f"{flag} {path}: cannot read it ({reason}); check the path") from exc


def run(argv: list[str] | None = None) -> dict[str, Any]:
    return run_args(build_arg_parser().parse_args(argv))


def run_args(args: argparse.Namespace, beam_args: list[str] | None = None) -> dict[str, Any]:
    """The evaluation for parsed flags (``corpus-etl evaluate`` parses them in ``pipelines.flags``)."""
    setup_logging(args.verbose)
    if args.top_k < 1:
        raise PreflightError(f"--top-k must be >= 1, got {args.top_k}")
    queries = _read(read_queries, "--queries", args.queries)
    qrels = _read(read_qrels, "--qrels", args.qrels)
    judged = {q: t for q, t in sorted(queries.items()) if q in qrels}
    if not judged:
        raise PreflightError(
            f"no query in {args.queries} has judgements in {args.qrels}; check that their query ids match"
        )
    searcher = searcher_from_args(args)
    try:
        hits = searcher.search(list(judged.values()), args.top_k)
    finally:
        searcher.close()
    run_ = {qid: {h["doc_id"]: h["score"] for h in hs} for qid, hs in zip(judged, hits)}
    metrics = evaluate(run_, {q: qrels[q] for q in judged}, args.top_k)
    result = {"collection": args.collection, "model": args.model, "queries": len(judged), "top_k": args.top_k, **metrics}
    for name, value in metrics.items():
        print(f"{name:<11} {value:.4f}")
    print(f"({len(judged)} queries, top {args.top_k})")
    if args.out:
        write_json(args.out, result)
    return result

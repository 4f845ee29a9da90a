"""`corpus-etl evaluate`: retrieval quality of a collection on BEIR-style queries and qrels.

Chunk hits are aggregated to documents (max score per ``doc_id``) before scoring.
Metrics are computed by ir_measures: nDCG@10, MRR@10 (RR@10) and Recall@100.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import ir_measures
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from ir_measures import RR, R, nDCG

from pipelines.common import (
    HelpFormatter,
    add_model_arguments,
    add_qdrant_arguments,
    qdrant_config,
    setup_logging,
    write_json,
)
from pipelines.search import Searcher, encoder_from_args

MEASURES = {"nDCG@10": nDCG @ 10, "MRR@10": RR @ 10, "Recall@100": R @ 100}


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


def evaluate(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    agg = ir_measures.calc_aggregate(list(MEASURES.values()), qrels, run)
    return {name: round(float(agg[m]), 6) for name, m in MEASURES.items()}


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corpus-etl evaluate", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--collection", required=True)
    parser.add_argument("--queries", required=True, help="BEIR queries.jsonl or Parquet")
    parser.add_argument("--qrels", required=True, help="BEIR qrels TSV (query-id corpus-id score) or Parquet")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--out", default=None, help="write metrics as JSON here")
    add_model_arguments(parser, with_batching=False)
    add_qdrant_arguments(parser)
    return parser


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_arg_parser().parse_args(argv)
    setup_logging()
    queries = read_queries(args.queries)
    qrels = read_qrels(args.qrels)
    judged = {q: t for q, t in sorted(queries.items()) if q in qrels}
    if not judged:
        raise SystemExit(f"no query in {args.queries} has judgements in {args.qrels}")
    searcher = Searcher(qdrant_config(args), args.collection, encoder_from_args(args))
    try:
        hits = searcher.search(list(judged.values()), args.top_k)
    finally:
        searcher.close()
    run_ = {qid: {h["doc_id"]: h["score"] for h in hs} for qid, hs in zip(judged, hits)}
    metrics = evaluate(run_, {q: qrels[q] for q in judged})
    result = {"collection": args.collection, "model": args.model, "queries": len(judged), "top_k": args.top_k, **metrics}
    for name in MEASURES:
        print(f"{name:<11} {metrics[name]:.4f}")
    print(f"({len(judged)} queries, top {args.top_k})")
    if args.out:
        write_json(args.out, result)
    return result

"""`corpus-etl search`: top documents for a query from a collection the index job built."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipelines.common import HelpFormatter, add_model_arguments, add_qdrant_arguments, qdrant_config, setup_logging
from transforms.embed import TextEncoder
from transforms.qdrant import QdrantConfig
from transforms.store import CollectionSpec, open_store


class Searcher:
    """Embeds queries with the model's query prompt and returns documents (chunk hits grouped, max score)."""

    def __init__(
        self, qdrant: QdrantConfig, collection: str, encoder: TextEncoder, *, hnsw_ef: int | None = None
    ) -> None:
        self.store = open_store(qdrant, keep_open=True)
        self.collection = collection
        self.encoder = encoder
        self.hnsw_ef = hnsw_ef
        # exists, and holds vectors of the encoder's size
        self.store.ensure_collection(collection, CollectionSpec(encoder.dimension), create=False)

    def close(self) -> None:
        self.store.close()

    def search(self, queries: list[str], top_k: int) -> list[list[dict[str, Any]]]:
        vectors = self.encoder.encode(queries, is_query=True)
        out = []
        for vector in vectors:
            hits = self.store.search_documents(self.collection, vector, top_k, hnsw_ef=self.hnsw_ef)
            out.append(
                [
                    {"rank": c.rank, "doc_id": c.doc_id, "score": round(c.score, 6), "chunk_index": p.get("chunk_index"),
                     "title": p.get("title"), "text": p.get("text", "")}
                    for c, p in hits
                ]
            )
        return out


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corpus-etl search", description="Search a collection built by `corpus-etl index`.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("query", nargs="+", help="the query text")
    parser.add_argument("--collection", required=True)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--hnsw-ef", type=int, default=None,
        help="search the HNSW index with this ef (approximate); default: exact search in the embedded store",
    )
    add_model_arguments(parser, with_batching=False)
    add_qdrant_arguments(parser)
    return parser


def encoder_from_args(args: argparse.Namespace) -> TextEncoder:
    return TextEncoder(
        args.model, device=args.device, dim=args.dim, max_length=args.max_length,
        query_instruction=args.query_instruction,
    ).load()


def run(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_arg_parser().parse_args(argv)
    setup_logging()
    query = " ".join(args.query)
    searcher = Searcher(qdrant_config(args), args.collection, encoder_from_args(args), hnsw_ef=args.hnsw_ef)
    try:
        hits = searcher.search([query], args.top_k)[0]
    finally:
        searcher.close()
    if args.json:
        print(json.dumps({"query": query, "hits": hits}, ensure_ascii=False, indent=2))
    else:
        print(f"query: {query}")
        for h in hits:
            snippet = " ".join(h["text"].split())[:90]
            print(f"{h['rank']:>3}  {h['score']:.4f}  {h['doc_id']:<24} {snippet}")
    return hits

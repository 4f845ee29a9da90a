"""`corpus-etl search`: top documents for a query from a collection the index job built."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipelines.common import setup_logging
from pipelines.configs import qdrant_config
from pipelines.errors import PreflightError, UsageError
from pipelines.flags import search_parser
from pipelines.security import redact_url
from transforms.io.qdrant import QdrantConfig
from transforms.io.store import CollectionSpec, open_store
from transforms.models.encoder import TextEncoder
from transforms.models.settings import EmbeddingSpec


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


build_arg_parser = search_parser  # kept here for callers of the old name


def encoder_from_args(args: argparse.Namespace) -> TextEncoder:
    # The model's config files first (EmbeddingSpec): a model that cannot be found fails after one
    # round of hub retries, not after one round per optional sentence-transformers file.
    spec = EmbeddingSpec.read(args.model, dim=args.dim, max_length=args.max_length)
    return TextEncoder(spec, device=args.device, precision=args.precision, query_instruction=args.query_instruction).load()


def check_top_k(top_k: int) -> None:
    """``--top-k`` of search and evaluate: at least one result. A slice would take 0 or negative values
    (``-3``: all but the last 3 of the candidates), so they are refused before anything is opened."""
    if top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {top_k}")


def check_collection(qdrant: QdrantConfig, collection: str) -> None:
    """Fail fast, before the model loads (seconds), when the store is unreachable or lacks the collection."""
    store = open_store(qdrant)
    try:
        exists = store.collection_exists(collection)
    finally:
        store.close()
    if not exists:
        raise PreflightError(
            f"collection {collection!r} does not exist at {redact_url(qdrant.where)}; "
            "check --collection, or build it with `corpus-etl index`"
        )


def searcher_from_args(args: argparse.Namespace) -> Searcher:
    qdrant = qdrant_config(args)
    check_collection(qdrant, args.collection)
    return Searcher(qdrant, args.collection, encoder_from_args(args), hnsw_ef=args.hnsw_ef)


def run(argv: list[str] | None = None) -> list[dict[str, Any]]:
    return run_args(build_arg_parser().parse_args(argv))


def run_args(args: argparse.Namespace, beam_args: list[str] | None = None) -> list[dict[str, Any]]:
    """The search for parsed flags (``corpus-etl search`` parses them in ``pipelines.flags``)."""
    setup_logging(args.verbose)
    check_top_k(args.top_k)
    query = " ".join(args.query)
    searcher = searcher_from_args(args)
    try:
        from pipelines.evaluate import warn_other_model  # evaluate imports this module

        warn_other_model(searcher.store, args.collection, args.model)
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

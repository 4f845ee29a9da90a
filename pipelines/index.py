"""The index job: Parquet documents → token chunks → embeddings → Qdrant points.

    config = IndexConfig(...)            # validates itself
    build_pipeline(p, config)            # pure wiring, no I/O at construction
    run(argv)                            # flags → config → checks → job → summary

``run`` checks what can be checked before any worker starts (input columns, the
collection's size and distance) and prints a summary built from Beam's counters.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from typing import Any

import apache_beam as beam

from pipelines.common import (
    BEAM_OPTIONS_EPILOG,
    HelpFormatter,
    add_model_arguments,
    add_qdrant_arguments,
    counters,
    qdrant_config,
    setup_logging,
    start_pipeline,
    write_json,
)
from transforms.chunk import ChunkDocuments, ChunkSettings
from transforms.dead_letter import WriteDeadLetters
from transforms.embed import Embed, EmbeddingModelHandler
from transforms.models import embedding_size
from transforms.qdrant import RESERVED_PAYLOAD_KEYS, QdrantConfig, WriteToQdrant
from transforms.read import DEAD, DocumentColumns, ReadDocuments, validate_columns
from transforms.store import CollectionSpec, HnswSettings, open_store

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    input: str
    collection: str
    model: str
    qdrant: QdrantConfig = dataclasses.field(default_factory=QdrantConfig)
    columns: DocumentColumns = dataclasses.field(default_factory=DocumentColumns)
    chunking: ChunkSettings = dataclasses.field(default_factory=ChunkSettings)
    dim: int | None = None
    device: str = "auto"
    max_length: int | None = None
    max_batch_tokens: int | None = None
    dead_letter: str | None = None
    summary_out: str | None = None
    alias: str | None = None
    progress_interval_s: float = 30.0
    upsert_batch_points: int = 256
    hnsw: HnswSettings | None = None  # build an HNSW index after the job (embedded store)

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("--input is required")
        if not self.collection:
            raise ValueError("--collection is required")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"--dim must be positive, got {self.dim}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError(f"--max-batch-tokens must be positive, got {self.max_batch_tokens}")
        clash = RESERVED_PAYLOAD_KEYS & set(self.columns.metadata)
        if clash:
            raise ValueError(f"--metadata-columns {sorted(clash)} clash with payload fields the index writes")
        if self.alias and self.alias == self.collection:
            raise ValueError("--alias must differ from --collection")
        if self.hnsw and not self.qdrant.embedded:
            raise ValueError("--hnsw applies to the embedded store (--qdrant-path); a server indexes by itself")
        if self.dead_letter and not self.dead_letter.endswith((".jsonl", ".json", ".parquet")):
            raise ValueError(f"--dead-letter must end in .jsonl or .parquet, got {self.dead_letter}")

    def embedding_handler(self) -> EmbeddingModelHandler:
        return EmbeddingModelHandler(
            self.model,
            device=self.device,
            dim=self.dim,
            max_length=self.max_length,
            max_batch_tokens=self.max_batch_tokens,
            progress_interval_s=self.progress_interval_s,
        )


def build_pipeline(p: beam.Pipeline, config: IndexConfig) -> dict[str, beam.PCollection]:
    """Wire the index job onto ``p``. Returns the named outputs (for tests and composition)."""
    read = p | "ReadDocuments" >> ReadDocuments(config.input, config.columns)
    chunked = read["documents"] | "ChunkDocuments" >> ChunkDocuments(
        config.model, config.chunking, config.max_length
    )
    embedded = chunked["chunks"] | "EmbedChunks" >> Embed(config.embedding_handler())
    written = embedded["embedded"] | "WriteToQdrant" >> WriteToQdrant(
        config.qdrant, config.collection, config.model, batch_points=config.upsert_batch_points
    )
    dead = (read[DEAD], chunked[DEAD], embedded[DEAD]) | "AllDeadLetters" >> beam.Flatten()
    dead | "WriteDeadLetters" >> WriteDeadLetters(config.dead_letter)
    return {"documents": read["documents"], "chunks": chunked["chunks"], "embedded": embedded["embedded"], "dead_letters": dead,
            "written": written}


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corpus-etl index",
        description="Embed Parquet documents into a Qdrant collection (idempotent: reruns overwrite).",
        formatter_class=HelpFormatter,
        epilog=BEAM_OPTIONS_EPILOG,
    )
    parser.add_argument("--input", required=True, help="Parquet file or glob, local or gs://")
    parser.add_argument("--collection", required=True, help="Qdrant collection (created when missing)")
    cols = parser.add_argument_group("input columns")
    cols.add_argument("--id-column", default="id")
    cols.add_argument("--text-column", default="text")
    cols.add_argument("--title-column", default=None, help="prefixed to every chunk when given")
    cols.add_argument("--metadata-columns", default="", help="comma-separated columns copied into the payload")
    chunk = parser.add_argument_group("chunking")
    chunk.add_argument("--chunk-tokens", type=int, default=512, help="tokens per chunk; 0: one chunk per document")
    chunk.add_argument("--chunk-overlap", type=int, default=64, help="tokens shared by consecutive chunks")
    add_model_arguments(parser)
    add_qdrant_arguments(parser)
    out = parser.add_argument_group("outputs")
    out.add_argument("--dead-letter", default=None, help="rejected rows with reasons (.jsonl or .parquet)")
    out.add_argument("--summary-out", default=None, help="run summary as JSON")
    out.add_argument(
        "--alias", default=None,
        help="after a successful run, atomically point this Qdrant alias at --collection (blue/green reindexing)",
    )
    out.add_argument("--progress-interval", type=float, default=30.0, help="seconds between progress lines")
    hnsw = parser.add_argument_group("HNSW index (embedded store)")
    hnsw.add_argument("--hnsw", action="store_true", help="build an HNSW index when the job has written every point")
    hnsw.add_argument("--hnsw-m", type=int, default=16, help="edges per node")
    hnsw.add_argument("--hnsw-ef-construct", type=int, default=100, help="candidates while building")
    out.add_argument("-v", "--verbose", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace) -> IndexConfig:
    return IndexConfig(
        input=args.input,
        collection=args.collection,
        model=args.model,
        qdrant=qdrant_config(args),
        columns=DocumentColumns(
            id=args.id_column,
            text=args.text_column,
            title=args.title_column,
            metadata=tuple(c.strip() for c in args.metadata_columns.split(",") if c.strip()),
        ),
        chunking=ChunkSettings(args.chunk_tokens, args.chunk_overlap),
        dim=args.dim,
        device=args.device,
        max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens,
        dead_letter=args.dead_letter,
        summary_out=args.summary_out,
        alias=args.alias,
        progress_interval_s=args.progress_interval,
        hnsw=HnswSettings(args.hnsw_m, args.hnsw_ef_construct) if args.hnsw else None,
    )


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """Run the index job; returns the summary (also printed, and written to ``--summary-out``)."""
    args, beam_args = build_arg_parser().parse_known_args(argv)
    setup_logging(args.verbose)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"corpus-etl index: {exc}") from exc
    return run_config(config, beam_args, test_pipeline)


def run_config(config: IndexConfig, beam_args: list[str] | None = None, test_pipeline=None) -> dict[str, Any]:
    started = time.time()
    p = start_pipeline(test_pipeline, beam_args, config.device)
    files = validate_columns(config.input, config.columns.all)
    size = embedding_size(config.model, config.dim)
    store = open_store(config.qdrant)  # the embedded store holds no shard open while workers write
    spec = CollectionSpec(
        size, model=config.model,
        settings={"dim": config.dim, "chunk_tokens": config.chunking.chunk_tokens,
                  "chunk_overlap": config.chunking.chunk_overlap, "max_length": config.max_length},
    )  # fmt: skip
    created = store.ensure_collection(config.collection, spec)
    _LOG.info(
        "indexing %d file(s) into %s/%s (%s, size %d, %s)",
        len(files), config.qdrant.where, config.collection, config.model, size, "created" if created else "exists",
    )
    build_pipeline(p, config)
    result = p.run()
    result.wait_until_finish()
    elapsed = time.time() - started
    counts = counters(result)
    hnsw = store.build_index(config.collection, config.hnsw) if config.hnsw else None
    points = store.count(config.collection)
    previous = store.point_alias(config.alias, config.collection) if config.alias else None
    store.close()
    summary = {
        "pipeline": "index",
        "input": config.input,
        "files": len(files),
        "collection": config.collection,
        "qdrant": config.qdrant.where,
        "model": config.model,
        "vector_size": size,
        "chunk_tokens": config.chunking.chunk_tokens,
        "chunk_overlap": config.chunking.chunk_overlap,
        "counters": counts,
        "points_in_collection": points,
        "dead_letter": config.dead_letter,
        "alias": {"name": config.alias, "previous": previous} if config.alias else None,
        "hnsw": hnsw,
        "elapsed_s": round(elapsed, 2),
        "documents_per_s": round(counts.get("documents_read", 0) / elapsed, 2),
        "tokens_per_s": round(counts.get("tokens", 0) / elapsed, 1),
    }
    print(format_summary(summary), flush=True)
    if config.summary_out:
        write_json(config.summary_out, summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    c = summary["counters"]
    return "\n".join(
        [
            f"index: {summary['collection']} at {summary['qdrant']} ({summary['model']}, {summary['vector_size']} dims)",
            f"  rows read        {c.get('rows_read', 0)}",
            f"  documents        {c.get('documents_read', 0)}  (truncated {c.get('documents_truncated', 0)})",
            f"  chunks           {c.get('chunks', 0)}  tokens {c.get('tokens', 0)}",
            f"  points written   {c.get('points_written', 0)} in {c.get('upsert_batches', 0)} batches"
            f"  (collection now holds {summary['points_in_collection']})",
            f"  dead letters     {c.get('dead_letters', 0)}" + (f" -> {summary['dead_letter']}" if summary["dead_letter"] else ""),
            *([f"  alias            {summary['alias']['name']} -> {summary['collection']}"
               f" (was {summary['alias']['previous']})"] if summary.get("alias") else []),
            *([f"  hnsw             m={summary['hnsw']['m']} ef_construct={summary['hnsw']['ef_construct']}: "
               f"{summary['hnsw']['indexed_vectors']} vectors indexed in {summary['hnsw']['seconds']}s"]
              if summary.get("hnsw") else []),
            f"  time             {summary['elapsed_s']}s  ({summary['documents_per_s']} docs/s, "
            f"{summary['tokens_per_s']} tokens/s)",
        ]
    )

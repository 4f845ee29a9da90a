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
from collections.abc import Sequence
from typing import Any

import apache_beam as beam

from pipelines.common import (
    counters,
    qdrant_config,
    setup_logging,
    start_pipeline,
    write_json,
)
from pipelines.errors import JobFailed, PreflightError, UsageError, first_line, translate
from pipelines.flags import index_parser, split_beam_args
from pipelines.security import redact_url
from transforms.chunk import ChunkDocuments, ChunkSettings, load_chunker
from transforms.dead_letter import WriteDeadLetters
from transforms.embed import Embed, EmbeddingModelHandler
from transforms.models import embedding_size
from transforms.progress import report_progress, reset_reporters
from transforms.qdrant import (
    RESERVED_PAYLOAD_KEYS,
    QdrantConfig,
    WriteToQdrant,
    ensure_collection,
    point_alias,
    shared_client,
)
from transforms.read import DEAD, BadFilesError, DocumentColumns, ReadDocuments, check_files
from transforms.types import DeadLetter

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
    skip_bad_files: bool = False

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


def _document_counts(doc: Any) -> dict[str, int]:
    return {"documents": 1}


def _chunk_counts(chunk: Any) -> dict[str, int]:
    return {"documents": int(chunk.chunk_index == 0), "chunks": 1, "tokens": chunk.n_tokens}


def build_pipeline(
    p: beam.Pipeline, config: IndexConfig, files: Sequence[str] | None = None, skipped: Sequence[DeadLetter] = ()
) -> dict[str, beam.PCollection]:
    """Wire the index job onto ``p``. Returns the named outputs (for tests and composition).

    ``files``: the input files the driver checked (default: ``config.input``, matched when the
    job runs); ``skipped``: file-level dead letters of the files ``--skip-bad-files`` left out.
    """
    interval = config.progress_interval_s  # embed and write report from their own steps
    read = p | "ReadDocuments" >> ReadDocuments(files or config.input, config.columns)
    documents = read["documents"] | "ReadProgress" >> report_progress("read", interval, _document_counts)
    chunked = documents | "ChunkDocuments" >> ChunkDocuments(config.model, config.chunking, config.max_length)
    chunks = chunked["chunks"] | "ChunkProgress" >> report_progress("chunk", interval, _chunk_counts)
    embedded = chunks | "EmbedChunks" >> Embed(config.embedding_handler())
    written = embedded["embedded"] | "WriteToQdrant" >> WriteToQdrant(
        config.qdrant, config.collection, config.model, batch_points=config.upsert_batch_points,
        progress_interval_s=interval,
    )
    skipped_files = p | "SkippedFiles" >> beam.Create(list(skipped), reshuffle=False)
    dead = (skipped_files, read[DEAD], chunked[DEAD], embedded[DEAD]) | "AllDeadLetters" >> beam.Flatten()
    dead | "WriteDeadLetters" >> WriteDeadLetters(config.dead_letter)
    return {"documents": read["documents"], "chunks": chunked["chunks"], "embedded": embedded["embedded"], "dead_letters": dead,
            "written": written}


build_arg_parser = index_parser  # kept here for callers of the old name


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
        skip_bad_files=args.skip_bad_files,
    )


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """Run the index job; returns the summary (also printed, and written to ``--summary-out``)."""
    args, beam_args = split_beam_args(build_arg_parser(), argv)
    return run_args(args, beam_args, test_pipeline)


def run_args(args: argparse.Namespace, beam_args: list[str], test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """The job for parsed flags (``corpus-etl index`` parses them in ``pipelines.flags``)."""
    setup_logging(args.verbose)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return run_config(config, beam_args, test_pipeline)


def run_config(config: IndexConfig, beam_args: list[str] | None = None, test_pipeline=None) -> dict[str, Any]:
    started = time.time()
    where = redact_url(config.qdrant.where)
    reset_reporters()  # this job's progress lines start afresh, even after another job in this process
    p = start_pipeline(test_pipeline, beam_args, config.device)
    try:
        files, skipped = check_files(config.input, config.columns.all, skip_bad=config.skip_bad_files)
    except FileNotFoundError as exc:
        raise PreflightError(f"--input: {exc}; check the path or glob (local or gs://)") from exc
    except BadFilesError as exc:
        raise PreflightError(f"--input: {exc}") from exc
    try:  # chunk size against the model's limit; the tokenizer loads
        load_chunker(config.model, config.chunking, config.max_length)
    except ValueError as exc:
        raise PreflightError(str(exc)) from exc
    size = embedding_size(config.model, config.dim)
    client, lock = shared_client(config.qdrant)
    with lock:
        if config.alias and _is_collection_not_alias(client, config.alias):
            raise PreflightError(
                f"--alias {config.alias!r} is the name of a collection at {where}, not an alias; choose another --alias"
            )
        created = ensure_collection(client, config.collection, size)
    _LOG.info(
        "indexing %d file(s) into %s/%s (%s, size %d, %s)",
        len(files), where, config.collection, config.model, size, "created" if created else "exists",
    )
    build_pipeline(p, config, files, skipped)
    result = p.run()
    result.wait_until_finish()
    elapsed = time.time() - started
    counts = counters(result)
    refused = None
    try:
        with lock:
            points = client.count(config.collection, exact=True).count
            try:
                previous = point_alias(client, config.alias, config.collection) if config.alias else None
            except ValueError as exc:  # e.g. a collection of that name appeared while the job ran
                previous, refused = None, str(exc)
    except Exception as exc:  # the points are written: not a pre-flight failure, whatever the cause
        reason = translate(exc, qdrant_url=config.qdrant.url) or f"{type(exc).__name__}: {first_line(exc)}"
        raise JobFailed(f"the job ran, then reading the collection back failed: {reason}") from exc
    partial = _partial(counts, config, refused, skipped)
    summary = {
        "pipeline": "index",
        "status": "partial" if partial else "ok",
        "input": config.input,
        "files": len(files),
        "files_skipped": [letter.source for letter in skipped],
        "collection": config.collection,
        "qdrant": where,
        "model": config.model,
        "vector_size": size,
        "chunk_tokens": config.chunking.chunk_tokens,
        "chunk_overlap": config.chunking.chunk_overlap,
        "counters": counts,
        "points_in_collection": points,
        "dead_letter": config.dead_letter,
        "alias": _alias_summary(config.alias, previous, refused),
        "elapsed_s": round(elapsed, 2),
        "documents_per_s": round(counts.get("documents_read", 0) / elapsed, 2),
        "tokens_per_s": round(counts.get("tokens", 0) / elapsed, 1),
        "partial": partial,
    }
    print(format_summary(summary), flush=True)
    if config.summary_out:
        write_json(config.summary_out, summary)
    return summary


def _is_collection_not_alias(client: Any, name: str) -> bool:
    return client.collection_exists(name) and not any(a.alias_name == name for a in client.get_aliases().aliases)


def _alias_summary(alias: str | None, previous: str | None, refused: str | None) -> dict[str, Any] | None:
    if not alias:
        return None
    return {"name": alias, "previous": previous, **({"refused": refused} if refused else {})}


def _partial(
    counts: dict[str, int], config: IndexConfig, alias_refused: str | None, skipped: Sequence[DeadLetter] = ()
) -> str | None:
    """Why the job is only partly done (exit status 3), or None."""
    reasons = []
    if skipped:
        reasons.append(f"{len(skipped)} input file(s) skipped")
    if counts.get("row_groups_unreadable"):
        reasons.append(f"{counts['row_groups_unreadable']} row group(s) could not be read")
    dead = counts.get("dead_letters", 0)
    if dead:
        reasons.append(f"{dead} dead letter(s)" + (f" in {config.dead_letter}" if config.dead_letter else
                                                  " (pass --dead-letter PATH to keep them)"))
    if alias_refused:
        reasons.append(f"--alias {config.alias} not switched to {config.collection}: {alias_refused}")
    return "; ".join(reasons) or None


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
               f" (was {summary['alias']['previous']})"] if summary.get("alias") and "refused" not in summary["alias"]
              else []),
            *([f"  alias            REFUSED: {summary['alias']['refused']}"] if (summary.get("alias") or {}).get("refused")
              else []),
            f"  time             {summary['elapsed_s']}s  ({summary['documents_per_s']} docs/s, "
            f"{summary['tokens_per_s']} tokens/s)",
        ]
    )

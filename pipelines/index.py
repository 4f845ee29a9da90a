"""The index job: Parquet documents → token chunks → embeddings → Qdrant points.

    config = IndexConfig(...)            # validates itself
    build_pipeline(p, config)            # pure wiring, no I/O at construction
    run(argv)                            # flags → config → checks → job → summary

``run`` checks everything it can before anything is created (input files, the gate's queries
and qrels, chunk size against the model, the store, the names in it, and that an existing
collection holds vectors of ``--model``), runs the job, then records the run's model and
settings on the collection, deletes what the input no longer holds (``--delete-missing``),
builds HNSW (``--hnsw``), switches the alias when every guard passes (``--alias``; the gate
scores each collection with the model it was built with), and prints the summary (also
``--summary-out``, with a ``status``).

Reindexing is incremental (``transforms.io.incremental``): only chunks whose text or embedding
settings changed are embedded; ``--force`` embeds everything.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines import names
from pipelines.common import (
    check_output_locations,
    describe_copies,
    describe_precision,
    describe_steps,
    ended_early,
    publish_summary,
    run_and_wait,
    run_job,
    start_pipeline,
    step_seconds,
    worker_cpu_threads,
    write_json,
)
from pipelines.configs import PACKING, IndexConfig, check_outputs_outside_input, index_config
from pipelines.errors import JobFailed, PreflightError, first_line, translate
from pipelines.flags import index_parser, split_beam_args
from pipelines.launch import build_only, build_outputs, format_built, refuse_after_job_flags, write_job_file
from pipelines.security import redact_text, redact_url
from transforms.hooks import pause_point
from transforms.inference.embed import Embed, EmbeddingModelHandler
from transforms.inference.handlers import tokens_by_kernels, tokens_by_layout, tokens_by_precision
from transforms.io.dead_letters import WriteDeadLetters
from transforms.io.incremental import REUSED, SkipUnchanged, missing_documents, settings_digest
from transforms.io.parquet import REJECTED_IDS, BadFilesError, ReadDocuments, check_files
from transforms.io.preflight import LaunchChecks
from transforms.io.qdrant import WriteToQdrant, chunk_payload
from transforms.io.store import CollectionSpec, VectorStore, model_held, open_store, same_model
from transforms.models.devices import TokenBudgets
from transforms.models.settings import LEGACY_REVISION_PREFIX, EmbeddingSpec, legacy_model_revision, model_revision
from transforms.progress import report_progress, reset_reporters
from transforms.text.chunk import ChunkDocuments
from transforms.types import DEAD, DeadLetter

_LOG = logging.getLogger(__name__)


def _document_counts(doc: Any) -> dict[str, int]:
    return {"documents": 1}


def _chunk_counts(chunk: Any) -> dict[str, int]:
    return {"documents": int(chunk.chunk_index == 0), "chunks": 1, "tokens": chunk.n_tokens}


def build_pipeline(
    p: beam.Pipeline,
    config: IndexConfig,
    spec: EmbeddingSpec | None = None,
    files: Sequence[str] | beam.pvalue.PCollection | None = None,
    skipped: Sequence[DeadLetter] | beam.pvalue.PCollection = (),
    digest: str = "",
    doc_ids_prefix: str | None = None,
    legacy_digest: str | None = None,
) -> dict[str, beam.PCollection]:
    """Wire the index job onto ``p``. Returns the named outputs (for tests and composition).

    ``spec``: the embedding model as the driver read it (default: read here from the config);

    ``files``: the input files the driver checked (default: ``config.input``, matched when the
    job runs; a PCollection: the files a worker checked as the job started, ``_build_job``);
    ``skipped``: file-level dead letters of the files ``--skip-bad-files`` left out;
    ``digest``: the embedding settings' digest that every point's fingerprint includes;
    ``doc_ids_prefix``: where to write the ids of this run's documents and of its refused rows
    (``_write_doc_ids``, for ``--delete-missing``);
    ``legacy_digest``: the digest an earlier version's points were written with (``legacy_digest``),
    whose points are taken over with their vectors instead of being embedded again.
    """
    spec = spec or read_spec(config)
    interval = config.progress_interval_s  # embed and write report from their own steps
    # ``files`` is a PCollection when a worker checks the inputs as the job starts (transforms.io.preflight)
    checked = isinstance(files, beam.pvalue.PCollection)
    source = files if checked else p
    read = source | "ReadDocuments" >> ReadDocuments(config.input if checked else files or config.input, config.columns)
    documents = read["documents"] | "ReadProgress" >> report_progress("read", interval, _document_counts)
    chunked = documents | "ChunkDocuments" >> ChunkDocuments(spec, config.chunking)
    chunks = chunked["chunks"] | "ChunkProgress" >> report_progress("chunk", interval, _chunk_counts)
    fresh = chunks | "SkipUnchanged" >> SkipUnchanged(
        functools.partial(open_store, config.qdrant), config.collection,
        functools.partial(chunk_payload, model_id=config.model, digest=digest), force=config.force,
        legacy_digest=legacy_digest,
    )  # fmt: skip
    shared = config.model_copies(p.options) == "machine"
    handler = embedding_handler(config, spec, worker_cpu_threads(p.options, config.cpu_threads), shared=shared)
    embedded = fresh["to_embed"] | "EmbedChunks" >> _with_hints(Embed(handler), config.resource_hints)
    to_write = (embedded["embedded"], fresh[REUSED]) | "ToWrite" >> beam.Flatten()
    written = to_write | "WriteToQdrant" >> WriteToQdrant(
        config.qdrant, config.collection, config.model, batch_points=config.upsert_batch_points,
        settings_digest=digest, progress_interval_s=interval,
    )  # fmt: skip
    if doc_ids_prefix:
        ids = read["documents"] | "DocIds" >> beam.Map(lambda d: d.doc_id)
        _write_doc_ids(ids, doc_ids_prefix, DOCUMENTS, "DocIds")
        _write_doc_ids(read[REJECTED_IDS], doc_ids_prefix, REJECTED_IDS, "RejectedIds")
    if isinstance(skipped, beam.pvalue.PCollection):
        skipped_files = skipped
    else:
        skipped_files = p | "SkippedFiles" >> beam.Create(list(skipped), reshuffle=False)
    dead = (skipped_files, read[DEAD], chunked[DEAD], embedded[DEAD]) | "AllDeadLetters" >> beam.Flatten()
    dead | "WriteDeadLetters" >> WriteDeadLetters(config.dead_letter)
    return {"documents": read["documents"], "chunks": chunked["chunks"], "embedded": embedded["embedded"],
            "dead_letters": dead, "written": written}


def _with_hints(transform: beam.PTransform, hints: tuple[tuple[str, str], ...]) -> beam.PTransform:
    return transform.with_resource_hints(**dict(hints)) if hints else transform


def read_spec(config: IndexConfig) -> EmbeddingSpec:
    """The embedding model's settings, read from its files: once per job, in the driver."""
    return EmbeddingSpec.read(config.model, dim=config.dim, max_length=config.max_length)


def embedding_handler(
    config: IndexConfig, spec: EmbeddingSpec, cpu_threads: int | None = None, *, shared: bool = False
) -> EmbeddingModelHandler:
    return EmbeddingModelHandler(
        spec,
        device=config.device,
        precision=config.precision,
        kernels=config.kernels,
        budgets=TokenBudgets.from_flag(config.max_batch_tokens, spec.max_length, gpu=config.expects_gpu),
        progress_interval_s=config.progress_interval_s,
        backend=config.backend,
        packing=PACKING[config.packing],
        cpu_workers=0 if config.cpu_workers is None else config.cpu_workers,  # 0: the worker's torch threads
        cpu_threads=cpu_threads,
        large_model=shared,  # one copy per GPU of a machine (--share-model)
    )


build_arg_parser = index_parser  # kept here for callers of the old name


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """Run the index job; returns the summary (also printed, and written to ``--summary-out``)."""
    return run_args(*split_beam_args(index_parser(), argv), test_pipeline)


def run_args(args: argparse.Namespace, beam_args: list[str], test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """The job for parsed flags (``corpus-etl index`` parses them in ``pipelines.flags``)."""
    return run_job(args, beam_args, test_pipeline, to_config=index_config, run_config=run_config)


def embedding_settings(config: IndexConfig, spec: EmbeddingSpec) -> dict[str, Any]:
    """Everything a vector depends on besides its text: what the points' fingerprints include."""
    return {"model": config.model, "revision": spec.revision, "dim": config.dim,
            "max_length": config.max_length, "chunk_tokens": config.chunking.chunk_tokens,
            "chunk_overlap": config.chunking.chunk_overlap}  # fmt: skip


MIGRATING = "migrating_from_revision"  # recorded while a run takes over an earlier version's collection


def legacy_digest(store: VectorStore, config: IndexConfig, settings: dict[str, Any]) -> tuple[str, str] | None:
    """``(revision, digest)`` when the collection was last written by a version that recorded a local
    model's revision in its older, header-only form (``legacy_model_revision``) and the model's files
    still give that revision; else None.

    Those versions' fingerprints cannot say whether the weights were retrained in place since, and
    re-embedding a whole collection because the revision's form changed would cost hours. So their
    points are taken on trust once: a point whose fingerprint is the one the earlier version would
    give it now (same text and settings) keeps its vector and is re-written with this version's
    fingerprint. From then on a retrained model re-embeds. Points of documents not in this run's
    input keep the old fingerprint, and are embedded again when a later run reads them.
    """
    if not store.collection_exists(config.collection):
        return None
    recorded = store.collection_spec(config.collection)
    was = recorded.settings.get(MIGRATING) or recorded.settings.get("revision")
    if not (isinstance(was, str) and was.startswith(LEGACY_REVISION_PREFIX)) or not recorded.model:
        return None
    if not same_model(recorded.model, config.model) or legacy_model_revision(config.model) != was:
        return None  # another model, or files changed since (a config, a tokenizer): nothing to take over
    _LOG.info("%s was written by an earlier version, which recorded %s's revision as %s: its points whose text "
              "and settings are unchanged keep their vectors and get this version's fingerprint (revision %s)",
              config.collection, config.model, was, settings["revision"])  # fmt: skip
    return was, settings_digest({**settings, "revision": was})


def check_names(store: VectorStore, config: IndexConfig, where: str) -> None:
    """``--collection`` must not be an alias, ``--alias`` must not be a collection: refused before any write."""
    names.check_names(store, config.collection, config.alias, where, flag="--collection", verb="index",
                      done="the run succeeds")  # fmt: skip


def check_model(store: VectorStore, config: IndexConfig, where: str) -> None:
    """A collection holds vectors of one model: an existing, non-empty collection whose vectors are of
    another model than ``--model`` is refused before any write. Vectors of two models live in two spaces,
    so a search would rank one model's documents against the other's; incremental reindexing re-embeds
    only the documents in the input, so the rest would keep the old model's vectors."""
    if not store.collection_exists(config.collection):
        return
    held = model_held(store, config.collection)
    if held is not None and not same_model(held, config.model):
        raise PreflightError(
            f"collection {config.collection!r} at {where} holds vectors of model {held}; this job embeds with "
            f"{config.model}. Vectors of two models cannot be compared, so nothing was written: index into a new "
            f"collection (--collection NEW) and switch readers to it with --alias"
        )


def run_config(config: IndexConfig, beam_args: list[str] | None = None, test_pipeline=None) -> dict[str, Any]:
    started = time.time()
    where = redact_url(config.qdrant.where)
    reset_reporters()  # this job's progress lines start afresh, even after another job in this process
    p = start_pipeline(test_pipeline, beam_args, config.device)
    building = build_only(p.options)
    if building:  # a dry run or a template: no store, no input here; the workers check them
        return _build_job(config, p, building, started)
    # -- checks: nothing is created before all of them pass
    try:
        files, skipped = check_files(config.input, config.columns.all, skip_bad=config.skip_bad_files)
    except FileNotFoundError as exc:
        raise PreflightError(f"--input: {exc}; check the path or glob (local or gs://)") from exc
    except BadFilesError as exc:
        raise PreflightError(f"--input: {exc}") from exc
    try:  # the config compared the paths as written; the files listed name them all (links resolved)
        listed = [*files, *(letter.source for letter in skipped)]
        check_outputs_outside_input(config.input, {"--dead-letter": config.dead_letter,
                                                   "--summary-out": config.summary_out}, listed)  # fmt: skip
    except ValueError as exc:
        raise PreflightError(str(exc)) from exc
    check_output_locations({"--dead-letter": config.dead_letter, "--summary-out": config.summary_out}, p.options)
    gate_judged = None
    if config.gate:  # read now, not after an hour of embedding: a bad file is exit 2, nothing written
        from pipelines.evaluate import read_judged

        gate_judged = read_judged(config.gate.queries, config.gate.qrels, ("--gate-queries", "--gate-qrels"))
    try:  # the model's files, read once; chunk size against the model's limit
        spec = read_spec(config)
        config.chunking.check_model(spec)
    except ValueError as exc:
        raise PreflightError(str(exc)) from exc
    size = spec.size
    settings = embedding_settings(config, spec)
    digest = settings_digest(settings)
    store = open_store(config.qdrant)  # the embedded store holds no shard open while workers write
    doc_ids_prefix = None
    try:
        check_names(store, config, where)
        check_model(store, config, where)
        legacy = legacy_digest(store, config, settings)
        collection = CollectionSpec(size, model=config.model, settings=settings)
        created = store.ensure_collection(config.collection, collection)
        if not created:  # record this run's model now: a run interrupted after writing must be rerun with it
            # ... and, while taking over a collection of an earlier version, the revision it was taken over
            # from, so a rerun after a failure still takes over what this one had no time to (_finish drops it)
            migrating = {MIGRATING: legacy[0]} if legacy else {}
            store.record_collection(config.collection, dataclasses.replace(collection,
                                                                           settings={**settings, **migrating}))
        _LOG.info(
            "indexing %d file(s) into %s/%s (%s, size %d, %s)",
            len(files), where, config.collection, config.model, size, "created" if created else "exists",
        )
        doc_ids_prefix = _doc_ids_prefix(p) if config.delete_missing else None
        build_pipeline(p, config, spec, files, skipped, digest, doc_ids_prefix, legacy[1] if legacy else None)
        summary: dict[str, Any] = {"pipeline": "index", "status": "running", "input": config.input,
                                   "collection": config.collection, "qdrant": where}  # fmt: skip
        try:
            result, counts = run_and_wait(p, config.job_timeout_s)  # counts None: the runner keeps no metrics
        except BaseException as exc:  # a failure, or Ctrl-C (KeyboardInterrupt)
            _write_summary(config, {**summary, **ended_early(exc)})
            raise
        pause_point("finish")  # tests: a kill here leaves the points written, nothing deleted, no alias
        elapsed = time.time() - started
        try:
            summary = _finish(config, store, counts or {}, files, skipped, doc_ids_prefix, collection, where,
                              gate_judged)  # fmt: skip
        except Exception as exc:  # the points are written: not a pre-flight failure, whatever the cause
            reason = translate(exc, qdrant_url=config.qdrant.url) or f"{type(exc).__name__}: {first_line(exc)}"
            failed = JobFailed(f"the job ran, then finishing it failed: {reason}")
            # the job started: --summary-out says how it ended, as when the job itself fails
            _write_summary(config, {**summary, "status": "failed", "error": redact_text(first_line(failed))})
            raise failed from exc
    finally:
        store.close()
        _discard_doc_ids(doc_ids_prefix)  # read by _finish, or never (a failed run)
    if counts is None:
        summary.update(counters=None, counters_unavailable="the runner reports no metrics")
    summary.update(
        elapsed_s=round(elapsed, 2),
        documents_per_s=round((counts or {}).get("documents_read", 0) / elapsed, 2),
        tokens_per_s=round((counts or {}).get("tokens", 0) / elapsed, 1),
        step_seconds=step_seconds(result, counts, STEPS),
        # --share-model: the setting, and the copies of the model per worker machine it resolved to
        share_model=config.share_model,
        model_copies=config.model_copies(p.options),
    )
    publish_summary(summary, format_summary(summary), config.summary_out)
    return summary


def prepare_store(config: IndexConfig, collection: CollectionSpec) -> bool:
    """The store half of the pre-flight, as a worker runs it when the job was built elsewhere
    (``_build_job``): the names (``check_names``), the model (``check_model``), then the collection,
    created when missing."""
    store = open_store(config.qdrant)
    try:
        where = redact_url(config.qdrant.where)
        check_names(store, config, where)
        check_model(store, config, where)
        created = store.ensure_collection(config.collection, collection)
        if not created:  # no driver records it after a built job: the metadata says what this run writes
            store.record_collection(config.collection, collection)
        return created
    finally:
        store.close()


def build_checked_pipeline(config: IndexConfig, p: beam.Pipeline) -> int:
    """The job as a template or dry run builds it (``pipelines.launch``): from the flags and the model alone.

    The model is read here (chunk size against its limit, vector size, the settings digest
    every fingerprint holds); the store and the input are not. A worker checks them when the
    job starts (``LaunchChecks``: names, collection, then every input file's columns), before
    any document is read, and fails the job naming what is wrong. Returns the vector size.
    """
    try:
        spec = read_spec(config)
        config.chunking.check_model(spec)
    except ValueError as exc:
        raise PreflightError(str(exc)) from exc
    settings = embedding_settings(config, spec)
    collection = CollectionSpec(spec.size, model=config.model, settings=settings)
    checks = p | "LaunchChecks" >> LaunchChecks(
        functools.partial(prepare_store, config, collection),
        {"input": functools.partial(check_files, config.input, config.columns.all, skip_bad=config.skip_bad_files)},
    )
    build_pipeline(p, config, spec, checks["input"], checks[DEAD], settings_digest(settings))
    return spec.size


def _build_job(config: IndexConfig, p: beam.Pipeline, how: str, started: float) -> dict[str, Any]:
    """Build (and, for a template, stage) the job without running it; the summary says so."""
    refuse_after_job_flags(how, {"--alias": config.alias, "--delete-missing": config.delete_missing,
                                 "--hnsw": config.hnsw, "--gate-queries/--gate-qrels": config.gate})  # fmt: skip
    check_output_locations({**build_outputs(p.options, how), "--summary-out": config.summary_out}, p.options)
    size = build_checked_pipeline(config, p)
    result = p.run()  # builds; with --template_location also stages and writes the template
    summary = {"pipeline": "index", "status": "built", "built": how, "input": config.input,
               "collection": config.collection, "qdrant": redact_url(config.qdrant.where), "model": config.model,
               "vector_size": size, "job_file": write_job_file(p.options, result), "counters": None,
               "counters_unavailable": "the job was built, not run",
               "elapsed_s": round(time.time() - started, 2)}  # fmt: skip
    publish_summary(summary, format_summary(summary), config.summary_out)
    return summary


DOCUMENTS = "documents"  # the ids of the documents read; REJECTED_IDS: of the rows refused (dead letters)


def _doc_ids_prefix(p: beam.Pipeline) -> str:
    """Where the job writes its document ids: under ``--temp_location`` when set (remote
    runners), else a new local folder. ``_read_doc_ids`` deletes the files once read.

    A new folder per run, read by the run that wrote it: no run reads another's ids (a crashed
    run's folder is left, never read), so their encoding is free to change between versions.
    """
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    temp = p.options.view_as(GoogleCloudOptions).temp_location
    if temp:
        return FileSystems.join(temp, f"corpus-etl-docs-{uuid.uuid4().hex}", "doc_ids")
    return os.path.join(tempfile.mkdtemp(prefix="corpus-etl-docs-"), "doc_ids")


def _write_doc_ids(ids: beam.PCollection, prefix: str, kind: str, label: str) -> None:
    """Write ``ids`` one a line as JSON strings: ASCII (``ensure_ascii``), so a line break, a
    carriage return or a U+2028 in an id is an escape, and every id reads back exactly."""
    _ = (
        ids
        | f"Encode{label}" >> beam.Map(json.dumps)
        | f"Write{label}" >> beam.io.WriteToText(f"{prefix}-{kind}", shard_name_template="-SSSSS-of-NNNNN")
    )


def _read_doc_ids(prefix: str, kind: str) -> tuple[set[str] | None, int]:
    """The ids ``_write_doc_ids`` wrote under ``prefix`` for ``kind``, and how many were None (a
    refused row whose id cannot be read); the files are deleted. None when there is no file: the job
    writes at least one, even for no ids, so the workers wrote where this process cannot read."""
    matches = FileSystems.match([f"{prefix}-{kind}-*"])[0].metadata_list
    if not matches:
        return None, 0
    ids: set[str] = set()
    unknown = 0
    for m in matches:
        with FileSystems.open(m.path) as f:
            # split on "\n" alone: the encoder escapes every other line break
            for doc_id in (json.loads(line) for line in f.read().decode("ascii").split("\n") if line):
                if doc_id is None:
                    unknown += 1
                else:
                    ids.add(doc_id)
    FileSystems.delete([m.path for m in matches])
    return ids, unknown


def _discard_doc_ids(prefix: str | None) -> None:
    """Remove this run's local ids folder and what is left in it (all of it when the run failed before
    ``_read_doc_ids``), however the run ended; on ``gs://`` ``_read_doc_ids`` deleted the files it read,
    and a failed run's are left to the bucket's lifecycle rules."""
    if prefix and "://" not in prefix:
        shutil.rmtree(os.path.dirname(prefix), ignore_errors=True)


def _write_summary(config: IndexConfig, summary: dict[str, Any]) -> None:
    if config.summary_out:
        write_json(config.summary_out, summary)


def _finish(
    config: IndexConfig,
    store: VectorStore,
    counts: dict[str, int],
    files: Sequence[str],
    skipped: Sequence[DeadLetter],
    doc_ids_prefix: str | None,
    collection: CollectionSpec,
    where: str,
    gate_judged: tuple[dict[str, str], dict[str, dict[str, int]]] | None = None,
) -> dict[str, Any]:
    """After the job: the collection's recorded settings, deletions, HNSW, the guarded alias switch, the summary."""
    # What the collection now holds is what this run wrote: its model and settings replace the recorded ones
    # (chunking, --max-length, ... of the last run, not of the run that created it).
    store.record_collection(config.collection, collection)
    size = collection.size
    unread = []
    if skipped:
        unread.append(f"{len(skipped)} input file(s) skipped")
    if counts.get("row_groups_unreadable"):
        unread.append(f"{counts['row_groups_unreadable']} row group(s) could not be read")
    deletion = _delete_missing(config, store, counts, doc_ids_prefix, unread)
    hnsw = store.build_index(config.collection, config.hnsw) if config.hnsw else None
    points = store.count(config.collection)
    alias = _switch_alias(config, store, counts, points, unread, gate_judged) if config.alias else None
    refused = (alias or {}).get("refused")
    # --delete-missing asked for, not done: a scheduler must see it (status 3), not only the summary's line
    not_deleted = ["--delete-missing deleted nothing (see deletion.skipped)"] if (deletion or {}).get("skipped") else []
    partial = _partial(counts, config, refused, [*unread, *not_deleted])
    status = "alias_refused" if refused else "partial" if partial else "ok"
    return {
        "pipeline": "index",
        "status": status,
        "partial": partial,
        "input": config.input,
        "files": len(files),
        "files_skipped": [letter.source for letter in skipped],
        "collection": config.collection,
        "qdrant": where,
        "model": config.model,
        "precision": config.precision,  # the setting
        # what the workers resolved it to (auto differs with their hardware): tokens embedded in each
        "precision_computed": tokens_by_precision(counts, "embed"),
        "packing": config.packing,  # the setting; what ran: tokens in packed rows and in padded passes
        "packing_computed": tokens_by_layout(counts, "embed"),
        "kernels": config.kernels,  # the setting; what ran: tokens with Liger's kernels and without
        "kernels_computed": tokens_by_kernels(counts, "embed"),
        "vector_size": size,
        "chunk_tokens": config.chunking.chunk_tokens,
        "chunk_overlap": config.chunking.chunk_overlap,
        "counters": counts,
        "documents_unchanged": counts.get("documents_unchanged", 0),
        "chunks_reused": counts.get("chunks_reused", 0),
        "chunks_embedded": counts.get("chunks_embedded", 0),
        "payloads_updated": counts.get("payloads_updated", 0),
        "deletion": deletion,
        "points_in_collection": points,
        "dead_letter": config.dead_letter,
        "alias": alias,
        "hnsw": hnsw,
    }


def _delete_missing(
    config: IndexConfig, store: VectorStore, counts: dict[str, int], doc_ids_prefix: str | None, unread: list[str]
) -> dict[str, Any] | None:
    """``--delete-missing``: the points of documents this run's input does not hold, deleted and listed.

    A document is held when a row of the input has its id, whether the row became a document
    or was refused at read (a dead letter: null or empty text, a value that cannot be
    converted, ...): bad input never loses what an earlier run indexed, the same as for a
    document the chunker refuses. Refused documents that kept their points are counted
    (``documents_kept_refused``). Nothing is deleted when the documents held cannot all be
    told: an input file or row group was not read (``unread``), a refused row's id is null
    or unreadable (it may be any document), or the ids the workers wrote did not all reach this
    driver (their count is not the job's ``documents_read``).
    """
    if not config.delete_missing or not doc_ids_prefix:
        return None
    held, _ = _read_doc_ids(doc_ids_prefix, DOCUMENTS)
    refused, unknown = _read_doc_ids(doc_ids_prefix, REJECTED_IDS)
    untold = [*unread, *([f"{unknown} refused row(s) have a null or unreadable id"] if unknown else [])]
    if held is None or refused is None or len(held) != counts.get("documents_read", 0):
        # The workers wrote the ids where this driver cannot read them all (workers on other machines, and a
        # local folder: no --temp_location), or the runner reports no count to check them against. With no ids
        # read, every stored document would look missing and be deleted.
        read_back = "none" if held is None or refused is None else f"{len(held)} of {counts.get('documents_read', 0)}"
        untold.append(
            f"the ids of the documents read did not all reach this driver ({read_back} read back from "
            f"{os.path.dirname(doc_ids_prefix)}); with workers on other machines, set --temp_location to a path "
            "they share with it (gs://...)"
        )
    elif not held and not refused:  # an empty export (zero-row files) would empty the collection
        untold.append("the input holds no document: to empty the collection, delete it")
    if untold:
        return {"skipped": f"cannot tell every document the input holds ({'; '.join(untold)}): nothing deleted",
                "documents_deleted": 0, "points_deleted": 0}  # fmt: skip
    points_per_doc: dict[str, int] = {}
    for point in store.scroll(config.collection, with_vectors=False):
        doc = str(point.payload.get("doc_id"))
        points_per_doc[doc] = points_per_doc.get(doc, 0) + 1
    missing = missing_documents(list(points_per_doc), held | refused)
    for start in range(0, len(missing), 256):
        store.delete_chunks_from(config.collection, {d: 0 for d in missing[start : start + 256]})
    listed = None
    if config.summary_out and missing:
        listed = FileSystems.join(os.path.dirname(config.summary_out) or ".", "deleted_documents.txt")
        with FileSystems.create(listed) as f:
            f.write("".join(d + "\n" for d in missing).encode("utf-8"))
    return {"documents_deleted": len(missing), "points_deleted": sum(points_per_doc[d] for d in missing),
            "documents_kept_refused": len((refused - held) & points_per_doc.keys()), "list": listed}  # fmt: skip


def _switch_alias(
    config: IndexConfig, store: VectorStore, counts: dict[str, int], points: int, unread: list[str],
    gate_judged: tuple[dict[str, str], dict[str, dict[str, int]]] | None = None,
) -> dict[str, Any]:
    """Point ``--alias`` at the new collection only when every guard passes; else say why, untouched.
    ``gate_judged``: the gate's queries and qrels (``evaluate.read_judged``), read before the job."""
    alias = config.alias or ""
    current = store.aliases().get(alias)
    reasons = []
    if points == 0:
        reasons.append("the collection holds no points")
    rows, dead = counts.get("rows_read", 0), counts.get("dead_letters", 0)
    fraction = dead / rows if rows else 1.0
    if "rows_read" not in counts:
        reasons.append("no rows_read counter (the runner reports no metrics, or read nothing): the dead-letter "
                       "guard cannot be checked")  # fmt: skip
    elif fraction > config.max_rejected_fraction:
        reasons.append(f"{dead} of {rows} rows rejected ({fraction:.1%} > --max-rejected-fraction "
                       f"{config.max_rejected_fraction:.1%})")  # fmt: skip
    if unread:
        reasons.append(f"not every input was read ({'; '.join(unread)})")
    gate = None
    if config.gate and not reasons:
        assert gate_judged is not None, "the gate's files are read before the job"
        gate = _gate(config, store, current, gate_judged)
        if gate["refused"]:
            reasons.append(gate["refused"])
    if reasons:
        return {"name": alias, "previous": current, "refused": "; ".join(reasons), "gate": gate}
    try:
        previous = store.point_alias(alias, config.collection)
    except ValueError as exc:  # e.g. a collection of that name appeared while the job ran
        return {"name": alias, "previous": current, "refused": str(exc), "gate": gate}
    return {"name": alias, "previous": previous, "gate": gate}


def _gate(
    config: IndexConfig, store: VectorStore, current: str | None,
    judged_qrels: tuple[dict[str, str], dict[str, dict[str, int]]],
) -> dict[str, Any]:  # fmt: skip
    """The gate metric of the new collection and of the alias's current target, each with its own model.

    The new collection is scored with ``--model`` and this run's ``--dim``/``--max-length``; the current
    target with the model and settings it records (``collection_spec``: those of the last run that wrote
    it), so a worse model cannot pass by scoring the old vectors with the new model's queries. A target
    that records no model, or whose model cannot be loaded as it was, cannot be scored: the switch is
    refused, with the reason. ``judged_qrels``: the gate's queries and qrels, read before the job.
    """
    from pipelines.evaluate import evaluate_collection, query_encoder

    gate = config.gate
    assert gate is not None
    judged, qrels = judged_qrels

    def metric(collection: str, encoder: Any) -> float:
        return evaluate_collection(config.qdrant, collection, encoder, judged, qrels, top_k=gate.top_k)[gate.metric]

    # --query-instruction: the same query prompt for both collections (queries only; no document depends on it)
    encoder = query_encoder(config.model, dim=config.dim, max_length=config.max_length, device=config.device,
                            precision=config.precision, query_instruction=config.query_instruction)  # fmt: skip
    new = metric(config.collection, encoder)
    out: dict[str, Any] = {"metric": gate.metric, "new": round(new, 6), "current": None, "current_model": None,
                           "refused": None}  # fmt: skip
    if current is None:
        return out  # nothing to compare with: the first switch only needs the other guards
    recorded = store.collection_spec(current)
    cannot = f"the current target {current}'s {gate.metric} cannot be measured as it was built"
    if not recorded.model and (held := model_held(store, current)):
        # Built before collections recorded their model (or on a server that keeps no metadata): its points name
        # the model; their vectors are the collection's size (a --dim it had is that size, as truncation).
        _LOG.warning("%s records no model; scoring it with %s, the model its points name, at size %d",
                     current, held, recorded.size)  # fmt: skip
        recorded = CollectionSpec(recorded.size, model=held, settings={"dim": recorded.size})
    if not recorded.model:
        out["refused"] = (f"{current} (the alias's current target) records no model (made by another tool, or by "
                          f"a version that recorded none), so {cannot}; evaluate it (corpus-etl evaluate), then "
                          f"switch without the gate")  # fmt: skip
        return out
    out["current_model"] = recorded.model
    settings = recorded.settings
    if _revision_changed(recorded):
        out["refused"] = (f"model {recorded.model} changed since {current} was built with it (revision "
                          f"{settings['revision']}, now {_revision(recorded.model, settings['revision'])}), so {cannot}")  # fmt: skip
        return out
    same = same_model(recorded.model, config.model)
    try:
        if same and (settings.get("dim"), settings.get("max_length")) == (config.dim, config.max_length):
            old_encoder = encoder  # the same query vectors: load it once
        else:
            old_encoder = query_encoder(recorded.model, dim=settings.get("dim"), max_length=settings.get("max_length"),
                                        device=config.device, precision=config.precision,
                                        query_instruction=config.query_instruction)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - any load failure: the old index cannot be scored, so no switch
        out["refused"] = f"cannot load model {recorded.model}, which {current} was built with ({first_line(exc)}), so {cannot}"
        return out
    old = metric(current, old_encoder)
    out["current"] = round(old, 6)
    if new < old - gate.tolerance:
        out["refused"] = (f"{gate.metric} {new:.4f} of {config.collection} is below {old:.4f} of {current} minus "
                          f"--gate-tolerance {gate.tolerance}"
                          + ("" if same else f" (each scored with its own model: {config.model}, {recorded.model})"))
    return out


def _revision(model: str, like: str = "") -> str:
    """The model's revision now, in the form ``like`` was recorded in (an earlier version's, or this one's)."""
    return (legacy_model_revision if like.startswith(LEGACY_REVISION_PREFIX) else model_revision)(model)


def _revision_changed(recorded: CollectionSpec) -> bool:
    """Whether the recorded model's files are no longer those the collection was built with (both revisions known)."""
    was = recorded.settings.get("revision")
    if not isinstance(was, str) or not was or was == "unknown" or not recorded.model:
        return False
    now = _revision(recorded.model, was)
    return now != "unknown" and now != was


def _partial(
    counts: dict[str, int], config: IndexConfig, alias_refused: str | None, unread: Sequence[str] = ()
) -> str | None:
    """Why the job is only partly done (exit status 3), or None."""
    reasons = list(unread)
    dead = counts.get("dead_letters", 0)
    if dead:
        reasons.append(f"{dead} dead letter(s)" + (f" in {config.dead_letter}" if config.dead_letter else
                                                  " (pass --dead-letter PATH to keep them)"))
    if alias_refused:
        reasons.append(f"--alias {config.alias} not switched to {config.collection}: {alias_refused}")
    return "; ".join(reasons) or None


def format_summary(summary: dict[str, Any]) -> str:
    if summary["status"] == "built":
        return format_built(summary)
    c = summary["counters"] or {}
    deletion = summary.get("deletion")
    alias = summary.get("alias") or {}
    return "\n".join(
        [
            f"index: {summary['collection']} at {summary['qdrant']} ({summary['model']}, {summary['vector_size']} dims)"
            f"  [{summary['status']}]",
            f"  rows read        {c.get('rows_read', 0)}",
            f"  documents        {c.get('documents_read', 0)}  (unchanged {summary['documents_unchanged']}, "
            f"truncated {c.get('documents_truncated', 0)})",
            f"  chunks           {c.get('chunks', 0)}  (embedded {summary['chunks_embedded']}, reused "
            f"{summary['chunks_reused']}, payloads updated {summary.get('payloads_updated', 0)})"
            f"  tokens {c.get('tokens', 0)}",
            f"  points written   {c.get('points_written', 0)} in {c.get('upsert_batches', 0)} batches"
            f"  (collection now holds {summary['points_in_collection']})",
            *([f"  deleted          {deletion['documents_deleted']} documents, {deletion['points_deleted']} points"
               + (f"  ({deletion['skipped']})" if deletion.get("skipped") else "")
               + (f"  (kept {deletion['documents_kept_refused']} whose rows were refused)"
                  if deletion.get("documents_kept_refused") else "")] if deletion else []),
            f"  dead letters     {c.get('dead_letters', 0)}" + (f" -> {summary['dead_letter']}" if summary["dead_letter"] else ""),
            f"  precision        {describe_precision(summary['precision'], summary.get('precision_computed'))}",
            *([f"  packing          {describe_precision(summary['packing'], summary.get('packing_computed'))}"]
              if "packing" in summary else []),
            *([f"  kernels          {describe_precision(summary['kernels'], summary.get('kernels_computed'))}"]
              if "kernels" in summary else []),
            *([f"  model copies     {describe_copies(summary)}"] if summary.get("model_copies") == "machine" else []),
            *([f"  alias            {alias['name']} -> {summary['collection']} (was {alias['previous']})"]
              if alias and not alias.get("refused") else []),
            *([f"  alias            REFUSED, {alias['name']} stays on {alias['previous']}: {alias['refused']}"]
              if alias.get("refused") else []),
            *([f"  hnsw             m={summary['hnsw']['m']} ef_construct={summary['hnsw']['ef_construct']}: "
               f"{summary['hnsw']['indexed_vectors']} vectors indexed in {summary['hnsw']['seconds']}s"]
              if summary.get("hnsw") else []),
            *([f"  counters         unavailable: {summary['counters_unavailable']}"]
              if summary.get("counters_unavailable") else []),
            f"  time             {summary['elapsed_s']}s  ({summary['documents_per_s']} docs/s, "
            f"{summary['tokens_per_s']} tokens/s)",
            *([f"  time in steps    {describe_steps(summary['step_seconds'])}"] if summary.get("step_seconds") else []),
        ]
    )


# The steps whose own work the summary times, in pipeline order: (name, RunInference step label or None for
# the "<name>_ms" counter); pipelines.common.step_seconds.
STEPS = (("chunk", None), ("embed", "EmbedChunks"), ("upsert", None))

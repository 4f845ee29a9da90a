"""The label job: offline query logs → first-stage candidates → Qwen3-Reranker → datasets.

    queries (Parquet) ─parse, dedup, sample─▶ Query
    Query ─index (embed + Qdrant, grouped by doc) or run file + corpus─▶ RerankPair (top k)
    RerankPair ─doc id TREC files can hold, else a candidate dead letter─▶ RerankPair
    RerankPair ─Qwen3-Reranker P(yes), token batches (--share-prefix: grouped by query, prompt head once)─▶ Judgement
    Judgements by query + split (hash of the near-duplicate key) ─▶ QueryJudgements
    ─▶ BEIR eval set, TREC runs, distillation Parquet, manifest.json, report.md

Every output is a function of the inputs and the settings: the same run twice gives
byte-identical files (run_stats.json alone holds wall-clock times).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

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
from pipelines.configs import LabelConfig, label_config
from pipelines.errors import JobFailed, PreflightError
from pipelines.flags import label_parser, split_beam_args
from pipelines.launch import build_only, build_outputs, format_built, write_job_file
from pipelines.security import redact_url
from transforms.datasets.formats import MANIFEST_FILE
from transforms.datasets.judgements import BuildQueryJudgements, RefuseUnwritableCandidates
from transforms.datasets.report import dead_letter_count
from transforms.datasets.write import WriteLabelDatasets
from transforms.inference.embed import EmbeddingModelHandler
from transforms.inference.handlers import tokens_by_kernels, tokens_by_layout, tokens_by_precision
from transforms.inference.rerank import Rerank, RerankModelHandler
from transforms.io.dead_letters import WriteDeadLetters
from transforms.io.parquet import BadFilesError, ReadDocuments, ReadParquetRows, match_files, validate_columns
from transforms.io.qdrant import QdrantConfig
from transforms.io.retrieve import RetrieveFromIndex, RetrieveFromRun
from transforms.models.devices import TokenBudgets
from transforms.models.reranker import DEFAULT_INSTRUCTION, check_reranker
from transforms.models.settings import EmbeddingSpec, model_revision
from transforms.progress import report_progress, reset_reporters
from transforms.text.queries import DedupQueries, ParseQueryRows, SampleQueries, refused_row_ids
from transforms.types import DEAD, DeadLetter

_LOG = logging.getLogger(__name__)


# -- steps -------------------------------------------------------------------------------------
def reranker_handler(config: LabelConfig, cpu_threads: int | None = None, *, shared: bool = False) -> RerankModelHandler:
    return RerankModelHandler(
        config.reranker,
        device=config.device,
        precision=config.precision,
        kernels=config.kernels,
        max_length=config.max_length,
        instruction=config.instruction,
        budgets=TokenBudgets.from_flag(config.max_batch_tokens, config.max_length, gpu=config.expects_gpu),
        share_prefix=config.share_prefix,
        progress_interval_s=config.progress_interval_s,
        cpu_threads=cpu_threads,
        large_model=shared,  # one copy per GPU of a machine (--share-model)
    )


def query_handler(
    config: LabelConfig, spec: EmbeddingSpec, cpu_threads: int | None = None, *, shared: bool = False
) -> EmbeddingModelHandler:
    return EmbeddingModelHandler(
        spec, device=config.device, precision=config.precision, kernels=config.kernels,
        query_instruction=config.query_instruction,
        kind="query",
        progress_interval_s=config.progress_interval_s, cpu_threads=cpu_threads, large_model=shared,
    )


def _row_counts(_: Any) -> dict[str, int]:
    return {"query_rows": 1}


def _query_id_of(letter: DeadLetter) -> str:
    return json.loads(letter.record)["query_id"]


def _count(pcoll: beam.PCollection, name: str) -> beam.PCollection:
    """``(name, 1)`` per element, for the accounting (summed in the writer)."""
    return pcoll | f"Count[{name}]" >> beam.Map(lambda _, n=name: (n, 1))


def build_pipeline(p: beam.Pipeline, config: LabelConfig, provenance: dict[str, Any] | None = None,
                   started_at: float | None = None, spec: EmbeddingSpec | None = None,
                   checked: dict[str, beam.PCollection] | None = None) -> dict[str, beam.PCollection]:
    """Wire the label job onto ``p``; returns its named outputs.

    ``spec``: the embedding model as the driver read it, for retrieval from the index (default:
    read here). ``checked``: the query log and corpus files a worker checked as the job started
    (``LaunchChecks``, for a job built as a template or dry run); by default the patterns are
    matched when the job runs (the driver checked them before).
    """
    checked = checked or {}
    hints = dict(config.resource_hints)
    threads = worker_cpu_threads(p.options, config.cpu_threads)
    shared = config.model_copies(p.options) == "machine"  # one copy of each model per GPU of a machine
    log = checked.get("queries", p) | "ReadQueryLog" >> ReadParquetRows(config.queries, config.query_columns.all)
    rows = log["rows"] | "ReadProgress" >> report_progress("read", config.progress_interval_s, _row_counts)
    parsed = rows | "ParseQueries" >> ParseQueryRows(config.query_columns)
    deduped = parsed["queries"] | "DedupQueries" >> DedupQueries()
    queries = deduped["queries"] | "SampleQueries" >> SampleQueries(config.sample)
    dead = [log[DEAD], parsed[DEAD], deduped[DEAD]]
    failed = p | "NoFailedQueries" >> beam.Create([])
    unknown = p | "NoUnknownCandidates" >> beam.Create([])
    if config.collection:
        spec = spec or EmbeddingSpec.read(config.model, dim=config.dim)
        first = queries | "RetrieveFromIndex" >> RetrieveFromIndex(
            query_handler(config, spec, threads, shared=shared), config.qdrant, config.collection, config.top_k, embed_hints=hints
        )
        failed = first[DEAD]  # a query whose embedding failed: written once, as its outcome
    else:
        docs = checked.get("corpus", p) | "ReadCorpus" >> ReadDocuments(config.corpus, config.corpus_columns)
        dead.append(docs[DEAD])
        # Every id on a log row, refused rows' too: a run line under one of them is "in the log".
        log_ids = (
            parsed["queries"] | "RowIds" >> beam.Map(lambda q: q.query_id),
            parsed[DEAD] | "RefusedRowIds" >> beam.FlatMap(refused_row_ids, config.query_columns),
        ) | "LogIds" >> beam.Flatten()
        first = queries | "RetrieveFromRun" >> RetrieveFromRun(
            config.candidates, docs["documents"], config.corpus, config.top_k, deduped["queries"], log_ids
        )
        unknown = first["unknown_candidates"]
        dead += [first[DEAD], unknown]
    # A doc id TREC files cannot hold (the index takes any): that candidate is refused, not its query.
    writable = first["pairs"] | "RefuseUnwritableCandidates" >> RefuseUnwritableCandidates()
    pairs = writable["pairs"]
    rerank = Rerank(reranker_handler(config, threads, shared=shared))
    scored = pairs | "Rerank" >> (rerank.with_resource_hints(**hints) if hints else rerank)
    dead += [writable[DEAD], scored[DEAD]]
    built = (
        {
            "query": queries | "KeyQueries" >> beam.WithKeys(lambda q: q.query_id),
            "pairs": pairs | "KeyPairs" >> beam.WithKeys(lambda x: x.query_id),
            "judgements": scored["results"] | "KeyJudgements" >> beam.WithKeys(lambda j: j.query_id),
            "failed": failed | "KeyFailed" >> beam.WithKeys(_query_id_of),
            "unknown": unknown | "KeyUnknown" >> beam.WithKeys(_query_id_of),
            "unwritable": writable[DEAD] | "KeyUnwritable" >> beam.WithKeys(_query_id_of),
        }
        | "GroupByQuery" >> beam.CoGroupByKey()
        | "BuildQueryJudgements" >> BuildQueryJudgements(config.eval_fraction, "index" if config.collection else "run")
    )
    dead.append(built[DEAD])
    all_dead = tuple(dead) | "AllDeadLetters" >> beam.Flatten()
    all_dead | "WriteDeadLetters" >> WriteDeadLetters(FileSystems.join(config.out, "dead_letters.jsonl"))
    # What the accounting (manifest, report, summary) is computed from: see datasets.accounting.
    counts = (
        all_dead | "DeadLetterCounts" >> beam.Map(dead_letter_count),
        _count(log["rows"], "query_rows_read"),
        _count(deduped["queries"], "queries_distinct"),
        _count(queries, "queries_sampled"),
    ) | "AllCounts" >> beam.Flatten()
    written = built.items | "WriteDatasets" >> WriteLabelDatasets(
        config.out, config.datasets_config(provenance or {}, started_at), pipeline_counts=counts
    )
    return {"queries": queries, "pairs": pairs, "judgements": scored["results"], "items": built.items,
            "dead_letters": all_dead, "written": written}


# -- provenance ------------------------------------------------------------------------------
def provenance_of(
    config: LabelConfig, query_files: list[str], corpus_files: list[str], spec: EmbeddingSpec | None = None
) -> dict[str, Any]:
    prov: dict[str, Any] = {
        "reranker": {"model": config.reranker, "revision": model_revision(config.reranker),
                     "max_length": config.max_length,
                     # as the reranker reads it: None is the card's default, "" an empty instruction
                     "instruction": DEFAULT_INSTRUCTION if config.instruction is None else config.instruction,
                     # the settings; each worker logs what it resolved them to (the summary counts its tokens)
                     "precision": config.precision, "kernels": config.kernels, "device": config.device,
                     "share_prefix": config.share_prefix},
        "query_log": {"files": query_files, "columns": dataclasses.asdict(config.query_columns)},
        "sampling": {"max_queries": config.sample.max_queries, "proportions": config.sample.proportions,
                     "seed": config.sample.seed},
        "top_k": config.top_k,
        "thresholds": list(config.thresholds),
        "eval_fraction": config.eval_fraction,
    }
    if config.collection:
        prov["first_stage"] = {
            "kind": "index", "collection": config.collection, "qdrant": redact_url(config.qdrant.url) or "local",
            "model": config.model, "revision": spec.revision if spec else model_revision(config.model), "dim": config.dim,
            "query_instruction": config.query_instruction, "precision": config.precision, "kernels": config.kernels,
        }
    else:
        prov["first_stage"] = {"kind": "run", "candidates": config.candidates, "corpus": corpus_files}
    return prov


# -- command line ----------------------------------------------------------------------------
build_arg_parser = label_parser  # kept here for callers of the old name


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    return run_args(*split_beam_args(label_parser(), argv), test_pipeline)


def run_args(args: argparse.Namespace, beam_args: list[str], test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """The job for parsed flags (``corpus-etl label`` parses them in ``pipelines.flags``)."""
    return run_job(args, beam_args, test_pipeline, to_config=label_config, run_config=run_config)


def check_run_file(pattern: str) -> list[str]:
    """The run files, refused when they hold no line at all (an empty run labels nothing)."""
    files = match_files(pattern)
    for path in files:
        with FileSystems.open(path) as f:
            while chunk := f.read(1 << 16):
                if chunk.strip():
                    return files
    raise ValueError(f"--candidates {pattern}: the run file is empty ({len(files)} file(s), no line); nothing to label")


def run_config(config: LabelConfig, beam_args: list[str] | None = None, test_pipeline=None) -> dict[str, Any]:
    """Checks, the job, then the summary (printed, written to ``--summary-out``), built from
    the manifest the job wrote, so it is exact on every runner. Raises ``ValueError`` before
    the job when a check fails, and ``LabelFailed`` after it when no query was labelled."""
    started = time.time()
    reset_reporters()  # this job's progress lines start afresh, even after another job in this process
    p = start_pipeline(test_pipeline, beam_args, config.device)
    building = build_only(p.options)
    if building:  # a dry run or a template: no store, no input here; the workers check them
        return _build_job(config, p, building, started)
    check_output_locations({"--out": config.out, "--summary-out": config.summary_out}, p.options, folders=["--out"])
    query_files = _input_files("--queries", config.queries, config.checked_query_columns)
    corpus_files: list[str] = []
    spec = None
    other_model = None
    if config.candidates:
        check_run_file(config.candidates)
        corpus_files = _input_files("--corpus", config.corpus, config.corpus_columns.all)
    else:
        from pipelines.evaluate import warn_other_model
        from transforms.io.store import CollectionSpec, open_store

        spec = EmbeddingSpec.read(config.model, dim=config.dim)  # the model's files, read once
        store = open_store(config.qdrant)  # exists, and holds vectors of this model's size
        try:
            store.ensure_collection(config.collection, CollectionSpec(spec.size), create=False)
            # A warning, as search and evaluate give: the candidates are what --model's queries retrieve
            other_model = warn_other_model(store, config.collection, config.model)
        finally:
            store.close()
    check_reranker(config.reranker, config.max_length)
    provenance = provenance_of(config, query_files, corpus_files, spec)
    if config.collection and other_model:
        provenance["first_stage"]["warning"] = other_model
    _LOG.info("labelling %d query log file(s) into %s (reranker %s)", len(query_files), config.out, config.reranker)
    build_pipeline(p, config, provenance, started, spec)
    try:
        result, counts = run_and_wait(p, config.job_timeout_s)
    except BaseException as exc:  # the job started (a failure, or Ctrl-C): --summary-out says how it ended
        if config.summary_out:
            write_json(config.summary_out, {"pipeline": "label", "out": config.out, **ended_early(exc)})
        raise
    elapsed = time.time() - started
    with FileSystems.open(FileSystems.join(config.out, MANIFEST_FILE)) as f:
        manifest = json.loads(f.read())
    acct = manifest["accounting"]
    labelled = manifest["status"] == "ok"
    # The summary's status is the exit status's (README): rejected queries are accounted for and expected in a
    # log (0, "ok"); input rows refused at read are not (3, "partial"); nothing labelled fails the job (1).
    partial = (
        f"{acct['input_rows_rejected']} input row(s) refused at read (unreadable row groups, or rows with a missing, "
        f"duplicate or empty id or text); reasons in {FileSystems.join(config.out, 'dead_letters.jsonl')}"
        if labelled and acct["input_rows_rejected"] else None
    )
    summary = {
        "pipeline": "label",
        "status": ("partial" if partial else "ok") if labelled else "failed",
        **({} if labelled else {"error": manifest["status"]}),
        "out": config.out,
        **{k: v for k, v in acct.items()},
        "dead_letters": FileSystems.join(config.out, "dead_letters.jsonl"),
        "counters": counts,
        "precision": config.precision,
        # what the workers resolved it to (auto differs with their hardware): tokens run in each
        "precision_computed": {stage: tokens_by_precision(counts, stage) for stage in ("rerank", "query")},
        # the query encoder's --packing auto (packed rows on a GPU, padded passes on CPU): what it ran
        "packing_computed": {"query": tokens_by_layout(counts, "query")},
        # --kernels: the setting, and the tokens each model ran with Liger's kernels and without
        "kernels": config.kernels,
        "kernels_computed": {stage: tokens_by_kernels(counts, stage) for stage in ("rerank", "query")},
        # --share-model: the setting, and the copies of each model per worker machine it resolved to
        "share_model": config.share_model,
        "model_copies": config.model_copies(p.options),
        "elapsed_s": round(elapsed, 2),
        "pairs_per_s": round(acct["pairs_scored"] / elapsed, 2),
        # each step's own work: RunInference's latency for the models, the retriever's and the writer's counters
        "step_seconds": step_seconds(result, counts, STEPS),
        "partial": partial,
    }
    publish_summary(summary, format_summary(summary), config.summary_out)
    if not labelled:
        raise LabelFailed(
            f"{manifest['status']}: {acct['queries_read']} queries read, {acct['queries_rejected']} rejected, "
            f"{acct['queries_not_sampled']} not sampled; reasons in {summary['dead_letters']}"
        )
    return summary


def _input_files(flag: str, pattern: str, columns: Sequence[str]) -> list[str]:
    """The files of an input flag, each with ``columns``; an error names the flag."""
    try:
        return validate_columns(pattern, columns)
    except FileNotFoundError as exc:
        raise PreflightError(f"{flag}: {exc}; check the path or glob (local or gs://)") from exc
    except BadFilesError as exc:
        raise PreflightError(f"{flag}: {exc}") from exc


def check_collection(qdrant: QdrantConfig, collection: str, size: int) -> None:
    """The index to retrieve from exists and holds vectors of the query model's size."""
    from transforms.io.store import CollectionSpec, open_store

    store = open_store(qdrant)
    try:
        store.ensure_collection(collection, CollectionSpec(size), create=False)
    finally:
        store.close()


def _checked_run_file(pattern: str) -> tuple[list[str], list[DeadLetter]]:
    return check_run_file(pattern), []


def build_checked_pipeline(config: LabelConfig, p: beam.Pipeline, started: float | None = None) -> None:
    """The job as a template or dry run builds it (``pipelines.launch``): from the flags and the models alone.

    The reranker (and the query model) are read here; the index, the query log, the run file
    and the corpus are checked by a worker when the job starts (``LaunchChecks``), before any
    query is read. The accounting is in the manifest the job writes.
    """
    from transforms.io.parquet import check_files
    from transforms.io.preflight import LaunchChecks

    check_reranker(config.reranker, config.max_length)
    store_check = None
    spec = None
    inputs = {"queries": functools.partial(check_files, config.queries, config.checked_query_columns)}
    if config.collection:
        spec = EmbeddingSpec.read(config.model, dim=config.dim)
        store_check = functools.partial(check_collection, config.qdrant, config.collection, spec.size)
    else:
        inputs["candidates"] = functools.partial(_checked_run_file, config.candidates)
        inputs["corpus"] = functools.partial(check_files, config.corpus, config.corpus_columns.all)
    checks = p | "LaunchChecks" >> LaunchChecks(store_check, inputs)
    provenance = provenance_of(config, [config.queries], [config.corpus] if config.corpus else [], spec)
    build_pipeline(p, config, provenance, started, spec,
                   checked={k: checks[k] for k in ("queries", "corpus") if k in checks})  # fmt: skip


def _build_job(config: LabelConfig, p: beam.Pipeline, how: str, started: float) -> dict[str, Any]:
    """Build (and, for a template, stage) the job without running it; the summary says so."""
    check_output_locations({**build_outputs(p.options, how), "--summary-out": config.summary_out}, p.options)
    build_checked_pipeline(config, p, started)
    result = p.run()  # builds; with --template_location also stages and writes the template
    summary = {"pipeline": "label", "status": "built", "built": how, "out": config.out,
               "job_file": write_job_file(p.options, result), "counters": None,
               "counters_unavailable": "the job was built, not run", "elapsed_s": round(time.time() - started, 2)}
    publish_summary(summary, format_built(summary), config.summary_out)
    return summary


class LabelFailed(JobFailed):
    """The job ran and labelled nothing: no dataset was written (the manifest says why)."""


def format_summary(summary: dict[str, Any]) -> str:
    reasons = "".join(f"\n      {n:>6}  {r}" for r, n in summary["queries_rejected_by_reason"].items())
    return (
        f"label: {summary['out']} ({summary['status']})\n"
        f"  queries read       {summary['queries_read']}  (log rows {summary['query_rows_read']})\n"
        f"  labelled           {summary['queries_labelled']}  (eval {summary['queries_eval']}, "
        f"train {summary['queries_train']})\n"
        f"  rejected           {summary['queries_rejected']}{reasons}\n"
        f"  not sampled        {summary['queries_not_sampled']}\n"
        f"  pairs scored       {summary['pairs_scored']}  (candidates rejected {summary['candidates_rejected']}, "
        f"run lines rejected {summary['run_lines_rejected']})\n"
        f"  dead letters       {(summary.get('counters') or {}).get('dead_letters', 0)} -> {summary['dead_letters']}\n"
        f"{_precision_lines(summary)}"
        f"  time               {summary['elapsed_s']}s  ({summary['pairs_per_s']} pairs/s)"
        + (f"\n  time in steps      {describe_steps(summary['step_seconds'])}" if summary.get("step_seconds") else "")
    )


# The steps whose own work the summary times, in pipeline order: (name, RunInference step label or None for
# the "<name>_ms" counter); pipelines.common.step_seconds.
STEPS = (("query", "EmbedQueries"), ("search", None), ("rerank", "Rerank"), ("write", None))


def _precision_lines(summary: dict[str, Any]) -> str:
    computed = summary.get("precision_computed") or {}
    lines = [f"  {stage + ' precision':<19}{describe_precision(summary['precision'], computed[stage])}\n"
             for stage in ("rerank", "query") if stage in computed and computed[stage] != {}]  # fmt: skip
    packing = (summary.get("packing_computed") or {}).get("query", {})
    if packing != {}:
        lines.append(f"  {'query packing':<19}{describe_precision('auto', packing)}\n")
    kernels = summary.get("kernels_computed") or {}
    lines += [f"  {stage + ' kernels':<19}{describe_precision(summary['kernels'], kernels[stage])}\n"
              for stage in ("rerank", "query") if stage in kernels and kernels[stage] != {}]  # fmt: skip
    if summary.get("model_copies") == "machine":
        lines.append(f"  {'model copies':<19}{describe_copies(summary)}\n")
    return "".join(lines)

"""The label job: offline query logs → first-stage candidates → Qwen3-Reranker → datasets.

    queries (Parquet) ─parse, dedup, sample─▶ Query
    Query ─index (embed + Qdrant, grouped by doc) or run file + corpus─▶ RerankPair (top k)
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
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines.common import (
    DEFAULT_EMBEDDING_MODEL,
    counters,
    qdrant_config,
    setup_logging,
    start_pipeline,
    write_json,
)
from pipelines.errors import JobFailed, UsageError
from pipelines.flags import DEFAULT_RERANKER, label_parser, split_beam_args
from pipelines.launch import build_only, format_built, model_resource_hints, write_job_file
from pipelines.security import redact_url
from transforms.datasets.formats import MANIFEST_FILE, LabelDatasetsConfig, QueryJudgements, parse_thresholds
from transforms.datasets.report import dead_letter_count
from transforms.datasets.write import WriteLabelDatasets
from transforms.inference.batching import RunInferenceByTokens
from transforms.inference.embed import EmbeddingModelHandler
from transforms.inference.rerank import PairTokenEstimate, RerankByQuery, RerankModelHandler, pair_key, pair_source
from transforms.io.dead_letters import WriteDeadLetters
from transforms.io.parquet import DocumentColumns, ReadDocuments, ReadParquetRows, match_files, validate_columns
from transforms.io.qdrant import QdrantConfig
from transforms.io.retrieve import RetrieveFromIndex, RetrieveFromRun
from transforms.models.reranker import DEFAULT_INSTRUCTION, check_reranker
from transforms.models.settings import embedding_size, model_revision
from transforms.progress import report_progress, reset_reporters
from transforms.text.queries import (
    DedupQueries,
    ParseQueryRows,
    QueryColumns,
    SampleConfig,
    SampleQueries,
    assign_split,
    derive_query_id,
    parse_sample_spec,
    query_key,
)
from transforms.types import DEAD, DeadLetter, Judgement, Query, RerankPair

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    queries: str
    out: str
    reranker: str = DEFAULT_RERANKER
    # first stage: an index ...
    collection: str | None = None
    model: str = DEFAULT_EMBEDDING_MODEL
    qdrant: QdrantConfig = dataclasses.field(default_factory=QdrantConfig)
    dim: int | None = None
    query_instruction: str | None = None
    # ... or a run file and the corpus it ranks
    candidates: str | None = None
    corpus: str | None = None
    corpus_columns: DocumentColumns = dataclasses.field(default_factory=DocumentColumns)
    top_k: int = 100
    query_columns: QueryColumns = dataclasses.field(default_factory=QueryColumns)
    checked_query_columns: tuple[str, ...] = ("query",)
    instruction: str | None = None
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    thresholds: tuple[float, ...] = (0.5, 0.9)
    eval_fraction: float = 0.2
    device: str = "auto"
    max_length: int = 8192
    max_batch_tokens: int | None = None
    share_prefix: bool = False
    progress_interval_s: float = 30.0
    summary_out: str | None = None
    resource_hints: tuple[tuple[str, str], ...] = ()  # on query embedding and reranking only

    def __post_init__(self) -> None:
        if bool(self.collection) == bool(self.candidates):
            raise ValueError("give either --collection (retrieve from the index) or --candidates RUN_FILE --corpus GLOB")
        if self.candidates and not self.corpus:
            raise ValueError("--candidates needs --corpus (the Parquet documents the run ranks)")
        if self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.eval_fraction <= 1.0:
            raise ValueError(f"--eval-fraction must be in [0, 1], got {self.eval_fraction}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError("--max-batch-tokens must be positive")
        LabelDatasetsConfig(thresholds=self.thresholds)  # validates the thresholds

    def reranker_handler(self) -> RerankModelHandler:
        return RerankModelHandler(
            self.reranker,
            device=self.device,
            max_length=self.max_length,
            instruction=self.instruction,
            token_budget=self.max_batch_tokens,
            share_prefix=self.share_prefix,
            progress_interval_s=self.progress_interval_s,
        )

    def query_handler(self) -> EmbeddingModelHandler:
        return EmbeddingModelHandler(
            self.model, device=self.device, dim=self.dim, query_instruction=self.query_instruction, kind="query",
            progress_interval_s=self.progress_interval_s,
        )

    def datasets_config(self, provenance: dict[str, Any], started_at: float | None = None) -> LabelDatasetsConfig:
        return LabelDatasetsConfig(
            thresholds=self.thresholds, recall_k=min(20, self.top_k), provenance=provenance, started_at=started_at
        )


# -- steps -------------------------------------------------------------------------------------
# Query-level outcomes other than "labelled": each is one dead letter (stage "label").
NO_CANDIDATES = "no candidates"
ALL_UNKNOWN = "all candidates unknown"
ALL_FAILED = "all candidates failed scoring"


class _BuildQueryJudgements(beam.DoFn):
    """Joins a query with its pairs and judgements; every query comes out exactly once:
    labelled (with its split) or a dead letter saying why not."""

    def __init__(self, eval_fraction: float, first_stage: str) -> None:
        self.eval_fraction = eval_fraction
        self.first_stage = first_stage  # "index" or "run": worded into the reasons
        self.labelled = Metrics.counter("corpus_etl", "queries_labelled")
        self.rejected = Metrics.counter("corpus_etl", "queries_rejected")
        self.judgements = Metrics.counter("corpus_etl", "judgements")

    def _reject(self, query: Query, reason: str, detail: str = "") -> beam.pvalue.TaggedOutput:
        self.rejected.inc()
        record = {"query_id": query.query_id, "query": query.text, "count": query.count}
        return beam.pvalue.TaggedOutput(
            DEAD, DeadLetter.of("label", reason + (f": {detail}" if detail else ""), query.query_id, record)
        )

    def process(self, element: tuple[str, dict[str, list]]):
        _, grouped = element
        if grouped["query"]:  # pairs always come with their query; never pairs alone
            yield self._outcome(grouped["query"][0], grouped)

    def _outcome(self, query: Query, grouped: dict[str, list]) -> QueryJudgements | beam.pvalue.TaggedOutput:
        if grouped["failed"]:  # the query's own earlier dead letter (e.g. embedding) is its outcome
            self.rejected.inc()
            return beam.pvalue.TaggedOutput(DEAD, grouped["failed"][0])
        pairs: list[RerankPair] = grouped["pairs"]
        judgements: list[Judgement] = grouped["judgements"]
        qid = query.query_id
        if not pairs:
            unknown = len(grouped["unknown"])
            if unknown:
                return self._reject(query, ALL_UNKNOWN, f"the run's {unknown} candidate(s) are not in the corpus")
            if self.first_stage == "run":
                derived = qid == derive_query_id(query_key(query.text))
                hint = " (the log gives this query no id, so its id was derived from the text)" if derived else ""
                return self._reject(query, NO_CANDIDATES, f"the run file lists no line for query id {qid!r}{hint}")
            return self._reject(query, NO_CANDIDATES, "the index returned no hits")
        if not judgements:
            return self._reject(query, ALL_FAILED, f"{len(pairs)} pair(s), see the rerank dead letters")
        try:
            item = QueryJudgements(
                query=query,
                split=assign_split(query.text, self.eval_fraction),
                judgements=tuple(sorted(judgements, key=lambda j: j.first_stage_rank)),
                doc_texts={p.doc_id: p.doc_text for p in pairs},
            )
        except ValueError as exc:
            return self._reject(query, "unwritable", str(exc))
        self.labelled.inc()
        self.judgements.inc(len(judgements))
        return item


def _row_counts(_: Any) -> dict[str, int]:
    return {"query_rows": 1}


def _query_id_of(letter: DeadLetter) -> str:
    return json.loads(letter.record)["query_id"]


def _count(pcoll: beam.PCollection, name: str) -> beam.PCollection:
    """``(name, 1)`` per element, for the accounting (summed in the writer)."""
    return pcoll | f"Count[{name}]" >> beam.Map(lambda _, n=name: (n, 1))


def build_pipeline(p: beam.Pipeline, config: LabelConfig, provenance: dict[str, Any] | None = None,
                   started_at: float | None = None,
                   checked: dict[str, beam.PCollection] | None = None) -> dict[str, beam.PCollection]:
    """Wire the label job onto ``p``; returns its named outputs.

    ``checked``: the query log and corpus files a worker checked as the job started
    (``LaunchChecks``, for a job built as a template or dry run); by default the patterns are
    matched when the job runs (the driver checked them before).
    """
    checked = checked or {}
    hints = dict(config.resource_hints)
    log = checked.get("queries", p) | "ReadQueryLog" >> ReadParquetRows(config.queries, config.query_columns.all)
    rows = log["rows"] | "ReadProgress" >> report_progress("read", config.progress_interval_s, _row_counts)
    parsed = rows | "ParseQueries" >> ParseQueryRows(config.query_columns)
    deduped = parsed["queries"] | "DedupQueries" >> DedupQueries()
    queries = deduped["queries"] | "SampleQueries" >> SampleQueries(config.sample)
    dead = [log[DEAD], parsed[DEAD], deduped[DEAD]]
    failed = p | "NoFailedQueries" >> beam.Create([])
    unknown = p | "NoUnknownCandidates" >> beam.Create([])
    if config.collection:
        first = queries | "RetrieveFromIndex" >> RetrieveFromIndex(
            config.query_handler(), config.qdrant, config.collection, config.top_k, embed_hints=hints
        )
        failed = first[DEAD]  # a query whose embedding failed: written once, as its outcome
    else:
        docs = checked.get("corpus", p) | "ReadCorpus" >> ReadDocuments(config.corpus, config.corpus_columns)
        dead.append(docs[DEAD])
        known = deduped["queries"] | "KnownIds" >> beam.Map(lambda q: q.query_id)
        first = queries | "RetrieveFromRun" >> RetrieveFromRun(
            config.candidates, docs["documents"], config.corpus, config.top_k, known
        )
        unknown = first["unknown_candidates"]
        dead += [first[DEAD], unknown]
    handler = config.reranker_handler()
    max_batch_weight = max(4 * (config.max_batch_tokens or 8192), config.max_length)
    if config.share_prefix:  # a query's pairs must reach the scorer together to share its head
        rerank: beam.PTransform = RerankByQuery(handler, max_batch_weight=max_batch_weight, max_length=config.max_length)
    else:
        rerank = RunInferenceByTokens(
            handler,
            stage="rerank",
            max_batch_weight=max_batch_weight,
            element_size_fn=PairTokenEstimate(max_length=config.max_length),
            key_fn=pair_key,
            describe=pair_source,
        )
    scored = first["pairs"] | "Rerank" >> (rerank.with_resource_hints(**hints) if hints else rerank)
    dead.append(scored[DEAD])
    built = (
        {
            "query": queries | "KeyQueries" >> beam.WithKeys(lambda q: q.query_id),
            "pairs": first["pairs"] | "KeyPairs" >> beam.WithKeys(lambda x: x.query_id),
            "judgements": scored["results"] | "KeyJudgements" >> beam.WithKeys(lambda j: j.query_id),
            "failed": failed | "KeyFailed" >> beam.WithKeys(_query_id_of),
            "unknown": unknown | "KeyUnknown" >> beam.WithKeys(_query_id_of),
        }
        | "GroupByQuery" >> beam.CoGroupByKey()
        | "BuildQueryJudgements" >> beam.ParDo(
            _BuildQueryJudgements(config.eval_fraction, "index" if config.collection else "run")
        ).with_outputs(DEAD, main="items")
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
    return {"queries": queries, "pairs": first["pairs"], "judgements": scored["results"], "items": built.items,
            "dead_letters": all_dead, "written": written}


# -- provenance ------------------------------------------------------------------------------
def provenance_of(config: LabelConfig, query_files: list[str], corpus_files: list[str]) -> dict[str, Any]:
    prov: dict[str, Any] = {
        "reranker": {"model": config.reranker, "revision": model_revision(config.reranker),
                     "instruction": config.instruction or DEFAULT_INSTRUCTION, "max_length": config.max_length},
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
            "model": config.model, "revision": model_revision(config.model), "dim": config.dim,
            "query_instruction": config.query_instruction,
        }
    else:
        prov["first_stage"] = {"kind": "run", "candidates": config.candidates, "corpus": corpus_files}
    return prov


# -- command line ----------------------------------------------------------------------------
build_arg_parser = label_parser  # the parser lives in pipelines.flags (no heavy imports for --help)


def config_from_args(args: argparse.Namespace) -> LabelConfig:
    query_columns = QueryColumns(
        query=args.query_column, query_id=args.query_id_column or "query_id", count=args.count_column or "count"
    )
    checked = tuple(c for c in (args.query_column, args.query_id_column, args.count_column) if c)
    return LabelConfig(
        queries=args.queries,
        out=args.out,
        reranker=args.reranker,
        collection=args.collection,
        model=args.model,
        qdrant=qdrant_config(args),
        dim=args.dim,
        query_instruction=args.query_instruction,
        candidates=args.candidates,
        corpus=args.corpus,
        corpus_columns=DocumentColumns(id=args.id_column, text=args.text_column, title=args.title_column),
        top_k=args.top_k,
        query_columns=query_columns,
        checked_query_columns=checked,
        instruction=args.instruction,
        sample=SampleConfig(
            max_queries=args.max_queries,
            proportions=parse_sample_spec(args.sample) if args.sample else None,
            seed=args.seed,
        ),
        thresholds=parse_thresholds(args.label_thresholds),
        eval_fraction=args.eval_fraction,
        device=args.device,
        max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens,
        share_prefix=args.share_prefix,
        progress_interval_s=args.progress_interval,
        summary_out=args.summary_out,
        resource_hints=tuple(model_resource_hints(args.accelerator, args.model_min_ram).items()),
    )


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    args, beam_args = split_beam_args(build_arg_parser(), argv)
    return run_args(args, beam_args, test_pipeline)


def run_args(args: argparse.Namespace, beam_args: list[str], test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """The job for parsed flags (``corpus-etl label`` parses them in ``pipelines.flags``)."""
    setup_logging(args.verbose)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return run_config(config, beam_args, test_pipeline)


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
    query_files = validate_columns(config.queries, config.checked_query_columns)
    corpus_files: list[str] = []
    if config.candidates:
        check_run_file(config.candidates)
        corpus_files = validate_columns(config.corpus, config.corpus_columns.all)
    else:
        from transforms.io.store import CollectionSpec, open_store

        store = open_store(config.qdrant)  # exists, and holds vectors of this model's size
        try:
            store.ensure_collection(
                config.collection, CollectionSpec(embedding_size(config.model, config.dim)), create=False
            )
        finally:
            store.close()
    check_reranker(config.reranker)
    provenance = provenance_of(config, query_files, corpus_files)
    _LOG.info("labelling %d query log file(s) into %s (reranker %s)", len(query_files), config.out, config.reranker)
    build_pipeline(p, config, provenance, started)
    result = p.run()
    result.wait_until_finish()
    elapsed = time.time() - started
    with FileSystems.open(FileSystems.join(config.out, MANIFEST_FILE)) as f:
        manifest = json.loads(f.read())
    acct = manifest["accounting"]
    summary = {
        "pipeline": "label",
        "status": manifest["status"],
        "out": config.out,
        **{k: v for k, v in acct.items()},
        "dead_letters": FileSystems.join(config.out, "dead_letters.jsonl"),
        "counters": counters(result),
        "elapsed_s": round(elapsed, 2),
        "pairs_per_s": round(acct["pairs_scored"] / elapsed, 2),
        # Rejected queries are accounted for and expected in a log; unreadable input is not.
        "partial": f"{acct['input_rows_rejected']} input dead letter(s) (unreadable row groups or rows)"
        if acct["input_rows_rejected"] else None,
    }
    print(format_summary(summary), flush=True)
    if config.summary_out:
        write_json(config.summary_out, summary)
    if manifest["status"] != "ok":
        raise LabelFailed(
            f"{manifest['status']}: {acct['queries_read']} queries read, {acct['queries_rejected']} rejected, "
            f"{acct['queries_not_sampled']} not sampled; reasons in {summary['dead_letters']}"
        )
    return summary


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

    check_reranker(config.reranker)
    store_check = None
    inputs = {"queries": functools.partial(check_files, config.queries, config.checked_query_columns)}
    if config.collection:
        store_check = functools.partial(
            check_collection, config.qdrant, config.collection, embedding_size(config.model, config.dim)
        )
    else:
        inputs["candidates"] = functools.partial(_checked_run_file, config.candidates)
        inputs["corpus"] = functools.partial(check_files, config.corpus, config.corpus_columns.all)
    checks = p | "LaunchChecks" >> LaunchChecks(store_check, inputs)
    provenance = provenance_of(config, [config.queries], [config.corpus] if config.corpus else [])
    build_pipeline(p, config, provenance, started, checked={k: checks[k] for k in ("queries", "corpus") if k in checks})


def _build_job(config: LabelConfig, p: beam.Pipeline, how: str, started: float) -> dict[str, Any]:
    """Build (and, for a template, stage) the job without running it; the summary says so."""
    build_checked_pipeline(config, p, started)
    result = p.run()  # builds; with --template_location also stages and writes the template
    summary = {"pipeline": "label", "status": "built", "built": how, "out": config.out,
               "job_file": write_job_file(p.options, result), "counters": None,
               "counters_unavailable": "the job was built, not run", "elapsed_s": round(time.time() - started, 2)}
    print(format_built(summary), flush=True)
    if config.summary_out:
        write_json(config.summary_out, summary)
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
        f"  dead letters    -> {summary['dead_letters']}\n"
        f"  time               {summary['elapsed_s']}s  ({summary['pairs_per_s']} pairs/s)"
    )

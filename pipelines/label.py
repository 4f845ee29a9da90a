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
import hashlib
import logging
import os
import time
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines.common import (
    BEAM_OPTIONS_EPILOG,
    DEFAULT_EMBEDDING_MODEL,
    HelpFormatter,
    add_qdrant_arguments,
    counters,
    qdrant_config,
    setup_logging,
    start_pipeline,
)
from transforms.datasets import LabelDatasetsConfig, QueryJudgements, WriteLabelDatasets, parse_thresholds
from transforms.dead_letter import WriteDeadLetters
from transforms.embed import EmbeddingModelHandler
from transforms.inference import RunInferenceByTokens
from transforms.models import embedding_size
from transforms.qdrant import QdrantConfig
from transforms.queries import (
    DedupQueries,
    ParseQueryRows,
    QueryColumns,
    SampleConfig,
    SampleQueries,
    assign_split,
    parse_sample_spec,
)
from transforms.read import DEAD, DocumentColumns, ReadDocuments, ReadParquetRows, match_files, validate_columns
from transforms.rerank import DEFAULT_INSTRUCTION, PairTokenEstimate, RerankByQuery, RerankModelHandler, pair_source
from transforms.retrieve import RetrieveFromIndex, RetrieveFromRun
from transforms.types import DeadLetter, Judgement, Query

_LOG = logging.getLogger(__name__)
DEFAULT_RERANKER = "Qwen/Qwen3-Reranker-0.6B"


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
class _BuildQueryJudgements(beam.DoFn):
    """Joins a query with its pairs and judgements; the split is decided here, per query."""

    def __init__(self, eval_fraction: float) -> None:
        self.eval_fraction = eval_fraction
        self.labelled = Metrics.counter("corpus_etl", "queries_labelled")
        self.without = Metrics.counter("corpus_etl", "queries_without_judgements")
        self.judgements = Metrics.counter("corpus_etl", "judgements")

    def process(self, element: tuple[str, dict[str, list]]):
        qid, grouped = element
        if not grouped["query"]:
            return
        query: Query = grouped["query"][0]
        judgements: list[Judgement] = grouped["judgements"]
        if not judgements:
            self.without.inc()
            return
        texts = {p.doc_id: p.doc_text for p in grouped["pairs"]}
        try:
            item = QueryJudgements(
                query=query,
                split=assign_split(query.text, self.eval_fraction),
                judgements=tuple(sorted(judgements, key=lambda j: j.first_stage_rank)),
                doc_texts=texts,
            )
        except ValueError as exc:
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter.of("label", str(exc), qid, {"query_id": qid}))
            return
        self.labelled.inc()
        self.judgements.inc(len(judgements))
        yield item


def _dead_letter_count(letter: DeadLetter) -> tuple[str, int]:
    return f"dead_letters/{letter.stage}", 1


def build_pipeline(p: beam.Pipeline, config: LabelConfig, provenance: dict[str, Any] | None = None,
                   started_at: float | None = None) -> dict[str, beam.PCollection]:
    """Wire the label job onto ``p``; returns its named outputs."""
    parsed = (
        p
        | "ReadQueryLog" >> ReadParquetRows(config.queries, config.query_columns.all)
        | "ParseQueries" >> ParseQueryRows(config.query_columns)
    )
    queries = (
        parsed["queries"]
        | "DedupQueries" >> DedupQueries()
        | "SampleQueries" >> SampleQueries(config.sample)
    )
    dead = [parsed[DEAD]]
    if config.collection:
        first = queries | "RetrieveFromIndex" >> RetrieveFromIndex(
            config.query_handler(), config.qdrant, config.collection, config.top_k
        )
    else:
        docs = p | "ReadCorpus" >> ReadDocuments(config.corpus, config.corpus_columns)
        dead.append(docs[DEAD])
        first = queries | "RetrieveFromRun" >> RetrieveFromRun(
            config.candidates, docs["documents"], config.corpus, config.top_k
        )
    dead.append(first[DEAD])
    handler = config.reranker_handler()
    max_batch_weight = max(4 * (config.max_batch_tokens or 8192), config.max_length)
    if config.share_prefix:  # a query's pairs must reach the scorer together to share its head
        scored = first["pairs"] | "Rerank" >> RerankByQuery(
            handler, max_batch_weight=max_batch_weight, max_length=config.max_length
        )
    else:
        scored = first["pairs"] | "Rerank" >> RunInferenceByTokens(
            handler,
            stage="rerank",
            max_batch_weight=max_batch_weight,
            element_size_fn=PairTokenEstimate(max_length=config.max_length),
            describe=pair_source,
        )
    dead.append(scored[DEAD])
    built = (
        {
            "query": queries | "KeyQueries" >> beam.WithKeys(lambda q: q.query_id),
            "pairs": first["pairs"] | "KeyPairs" >> beam.WithKeys(lambda x: x.query_id),
            "judgements": scored["results"] | "KeyJudgements" >> beam.WithKeys(lambda j: j.query_id),
        }
        | "GroupByQuery" >> beam.CoGroupByKey()
        | "BuildQueryJudgements" >> beam.ParDo(_BuildQueryJudgements(config.eval_fraction)).with_outputs(
            DEAD, main="items"
        )
    )
    dead.append(built[DEAD])
    all_dead = tuple(dead) | "AllDeadLetters" >> beam.Flatten()
    all_dead | "WriteDeadLetters" >> WriteDeadLetters(FileSystems.join(config.out, "dead_letters.jsonl"))
    counts = all_dead | "DeadLetterCounts" >> beam.Map(_dead_letter_count) | "SumCounts" >> beam.CombinePerKey(sum)
    written = built.items | "WriteDatasets" >> WriteLabelDatasets(
        config.out, config.datasets_config(provenance or {}, started_at), pipeline_counts=counts
    )
    return {"queries": queries, "pairs": first["pairs"], "judgements": scored["results"], "items": built.items,
            "dead_letters": all_dead, "written": written}


# -- provenance ------------------------------------------------------------------------------
def model_revision(model: str) -> str:
    """A revision for the manifest: the hub commit of a cached model, or a digest of a local one.

    For a local directory: sha256 over its config and tokenizer files and the safetensors
    headers (tensor names, shapes, offsets), which change whenever the weights do.
    """
    from transforms.models import resolve_model

    path = resolve_model(model)
    if not os.path.isdir(path):
        ref = os.path.join(os.environ.get("HF_HUB_CACHE", os.path.expanduser("~/.cache/huggingface/hub")),
                           "models--" + model.replace("/", "--"), "refs", "main")
        return open(ref).read().strip() if os.path.exists(ref) else "unknown"
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        if name.endswith(".json") or name.endswith(".txt"):
            digest.update(name.encode() + open(full, "rb").read())
        elif name.endswith(".safetensors"):
            with open(full, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                digest.update(name.encode() + f.read(n))
    return "sha256:" + digest.hexdigest()[:16]


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
            "kind": "index", "collection": config.collection, "qdrant": config.qdrant.url or "local",
            "model": config.model, "revision": model_revision(config.model), "dim": config.dim,
            "query_instruction": config.query_instruction,
        }
    else:
        prov["first_stage"] = {"kind": "run", "candidates": config.candidates, "corpus": corpus_files}
    return prov


# -- command line ----------------------------------------------------------------------------
def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corpus-etl label",
        description="Label offline query logs with Qwen3-Reranker into evaluation (BEIR, TREC) and distillation sets.",
        formatter_class=HelpFormatter,
        epilog=BEAM_OPTIONS_EPILOG,
    )
    parser.add_argument("--queries", required=True, help="query log Parquet file or glob, local or gs://")
    parser.add_argument("--out", required=True, help="output folder, local or gs://")
    parser.add_argument("--reranker", default=DEFAULT_RERANKER, help="Hugging Face id or local directory")
    first = parser.add_argument_group("first stage: an index (--collection) or a run file (--candidates + --corpus)")
    first.add_argument("--collection", default=None, help="Qdrant collection built by `corpus-etl index`")
    first.add_argument("--model", default=DEFAULT_EMBEDDING_MODEL, help="the embedding model the index was built with")
    first.add_argument("--dim", type=int, default=None, help="the --dim the index was built with")
    first.add_argument("--query-instruction", default=None, help="embedding instruction for queries")
    first.add_argument("--candidates", default=None, metavar="RUN_FILE", help="TREC run file: qid Q0 docid rank score tag")
    first.add_argument("--corpus", default=None, metavar="GLOB", help="Parquet documents the run file ranks")
    first.add_argument("--id-column", default="id", help="--corpus id column")
    first.add_argument("--text-column", default="text", help="--corpus text column")
    first.add_argument("--title-column", default=None, help="--corpus title column (prefixed to the text)")
    first.add_argument("--top-k", type=int, default=100, help="candidates per query")
    add_qdrant_arguments(parser)
    log = parser.add_argument_group("query log")
    log.add_argument("--query-column", default="query")
    log.add_argument("--query-id-column", default=None, help="ids to keep (default: 'query_id' when present, else derived)")
    log.add_argument("--count-column", default=None, help="frequencies (default: 'count' when present, else 1)")
    log.add_argument("--max-queries", type=int, default=None)
    log.add_argument("--sample", default=None, metavar="HEAD:TORSO:TAIL",
                     help="stratified sample by frequency, e.g. 50:30:20 (needs --max-queries)")
    log.add_argument("--seed", type=int, default=0)
    lab = parser.add_argument_group("labels")
    lab.add_argument("--instruction", default=None, help=f"reranker instruction (default: {DEFAULT_INSTRUCTION!r})")
    lab.add_argument("--label-thresholds", default="0.5,0.9", help="P(yes) cut points: below the first -> 0, then 1, 2 ...")
    lab.add_argument("--eval-fraction", type=float, default=0.2, help="share of queries (by hash) in the evaluation set")
    run = parser.add_argument_group("execution")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    run.add_argument("--max-length", type=int, default=8192, help="reranker pair length limit (tokens)")
    run.add_argument("--max-batch-tokens", type=int, default=None, help="padded tokens per forward pass")
    run.add_argument(
        "--share-prefix", action="store_true",
        help="group pairs by query and run each query's prompt head once per forward pass (same scores, ~15-20%% "
        "fewer tokens at 300-token documents; 5%% faster on CPU in BENCHMARKS.md, not yet measured on GPU)",
    )
    run.add_argument("--progress-interval", type=float, default=30.0)
    run.add_argument("-v", "--verbose", action="store_true")
    return parser


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
    )


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    args, beam_args = build_arg_parser().parse_known_args(argv)
    setup_logging(args.verbose)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"corpus-etl label: {exc}") from exc
    return run_config(config, beam_args, test_pipeline)


def run_config(config: LabelConfig, beam_args: list[str] | None = None, test_pipeline=None) -> dict[str, Any]:
    started = time.time()
    p = start_pipeline(test_pipeline, beam_args, config.device)
    query_files = validate_columns(config.queries, config.checked_query_columns)
    corpus_files: list[str] = []
    if config.candidates:
        match_files(config.candidates)
        corpus_files = validate_columns(config.corpus, config.corpus_columns.all)
    else:
        from transforms.store import CollectionSpec, open_store

        store = open_store(config.qdrant)  # exists, and holds vectors of this model's size
        store.ensure_collection(config.collection, CollectionSpec(embedding_size(config.model, config.dim)), create=False)
        store.close()
    provenance = provenance_of(config, query_files, corpus_files)
    build_pipeline(p, config, provenance, started)
    result = p.run()
    result.wait_until_finish()
    elapsed = time.time() - started
    counts = counters(result)
    summary = {
        "pipeline": "label",
        "out": config.out,
        "counters": counts,
        "elapsed_s": round(elapsed, 2),
        "pairs_per_s": round(counts.get("num_inferences", 0) / elapsed, 2),
    }
    print(
        f"label: {counts.get('queries_labelled', 0)} queries, {counts.get('judgements', 0)} judgements "
        f"-> {config.out} in {summary['elapsed_s']}s ({summary['pairs_per_s']} pairs/s); "
        f"dead letters {counts.get('dead_letters', 0)} -> {FileSystems.join(config.out, 'dead_letters.jsonl')}",
        flush=True,
    )
    return summary

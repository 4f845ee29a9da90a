"""Flags → config objects: the one place where the command line meets the jobs.

Each job's config is a frozen dataclass that validates itself (``ValueError`` naming the flag);
``index_config``, ``label_config`` and ``qdrant_config`` build them from parsed flags
(``pipelines.flags``). What is read from the model's files (sizes, limits, prompts) is not
here: the driver reads it once (``EmbeddingSpec``) after the config is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from pipelines.flags import DEFAULT_EMBEDDING_MODEL, DEFAULT_RERANKER, SHARE_MODEL
from pipelines.launch import model_resource_hints
from pipelines.security import check_qdrant_flags
from transforms.datasets.formats import LabelDatasetsConfig, parse_thresholds
from transforms.io.parquet import DocumentColumns, input_matches
from transforms.io.qdrant import RESERVED_PAYLOAD_KEYS, QdrantConfig
from transforms.io.store import HnswSettings
from transforms.models import liger
from transforms.models.devices import TokenBudgets, check_precision, expects_gpu
from transforms.text.chunk import ChunkSettings
from transforms.text.queries import QueryColumns, SampleConfig, parse_sample_spec

# --packing → TextEncoder(packing=...): None lets the encoder decide (transforms.models.encoder.resolve_packing)
PACKING: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


def check_share_model(setting: str) -> None:
    if setting not in SHARE_MODEL:
        raise ValueError(f"--share-model must be one of {', '.join(SHARE_MODEL)}, got {setting!r}")


class _ModelSteps:
    """Where a job's model steps run, from its ``device``, ``resource_hints`` and ``share_model`` fields (the
    index and label configs both have them)."""

    device: str
    resource_hints: tuple[tuple[str, str], ...]
    share_model: str

    @property
    def expects_gpu(self) -> bool:
        """Whether the model steps will run on a GPU as far as this machine can tell (Beam batch sizes follow)."""
        return expects_gpu(self.device, dict(self.resource_hints).get("accelerator"))

    def shares_model(self, several_processes: bool) -> bool:
        """Whether each model is loaded once per GPU of a worker machine and shared by its processes (RunInference's
        ``large_model``): ``--share-model machine``, or ``auto`` where the model steps run on a GPU and a machine
        may run several worker processes (``pipelines.common.several_worker_processes``). One copy per GPU:
        weights once in each GPU's memory (``devices.place_on_gpu``), forward passes sized from free memory and run one at a time
        (``transforms.models.devices.device_lock``), where a copy per process (Dataflow starts one per vCPU)
        would load the weights N times and size each process's passes from what the others left free."""
        setting = self.share_model
        return setting == "machine" or (setting == "auto" and self.expects_gpu and several_processes)

    def model_copies(self, options: Any) -> str:
        """``machine`` where the job's pipeline ``options`` make ``shares_model`` hold, else ``process``: what the
        job builds (``large_model``) and what its summary reports."""
        from pipelines.common import several_worker_processes

        return "machine" if self.shares_model(several_worker_processes(options)) else "process"


def model_location(model: str) -> str:
    """A local model folder as an absolute path (workers may run in another folder); a hub id as given."""
    return os.path.abspath(model) if os.path.isdir(model) else model


def qdrant_config(args: argparse.Namespace) -> QdrantConfig:
    """The Qdrant settings of the flags, refused (``UsageError``) when they would leak the API key.

    An API key goes only over https or to a loopback host unless ``--allow-insecure-api-key``;
    a named key variable must be set, checked here, before any job starts.
    """
    check_qdrant_flags(args)
    return QdrantConfig(
        path=None if args.qdrant_url else args.qdrant_path,
        url=args.qdrant_url,
        api_key_env=args.qdrant_api_key_env,
        prefer_grpc=args.qdrant_grpc,
        timeout_s=args.qdrant_timeout,
        lock_wait_s=args.store_lock_wait,
    )


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """``--gate-queries/--gate-qrels``: the new collection must score at least the alias's
    current target minus ``tolerance`` on ``metric``, both evaluated with the same model."""

    queries: str
    qrels: str
    metric: str = "nDCG@10"
    tolerance: float = 0.01
    top_k: int = 100

    def __post_init__(self) -> None:
        if self.metric not in ("nDCG@10", "MRR@10", f"Recall@{self.top_k}"):
            raise ValueError(f"--gate-metric must be nDCG@10, MRR@10 or Recall@{self.top_k}, got {self.metric!r}")
        if self.tolerance < 0:
            raise ValueError(f"--gate-tolerance must be >= 0, got {self.tolerance}")


def check_cpu_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise ValueError(f"--cpu-threads must be >= 1, got {threads}")


def check_job_timeout(seconds: float | None) -> None:
    if seconds is not None and seconds <= 0:
        raise ValueError(f"--job-timeout must be positive, got {seconds}")


def check_outputs_outside_input(pattern: str, outputs: dict[str, str | None], files: Sequence[str] = ()) -> None:
    """Refuse (``ValueError``) an output that ``--input`` matches, or will once written: the job would
    overwrite an input file, or the next run would read the output as documents.

    ``outputs``: flag → path; ``files``: the input files matched, when listed (``input_matches``).
    """
    for flag, path in outputs.items():
        if path and input_matches(pattern, path, files):
            raise ValueError(
                f"{flag} {path} is an input file: --input {pattern!r} matches it; write {flag} outside the input"
            )


@dataclasses.dataclass(frozen=True)
class IndexConfig(_ModelSteps):
    input: str
    collection: str
    model: str
    qdrant: QdrantConfig = dataclasses.field(default_factory=QdrantConfig)
    columns: DocumentColumns = dataclasses.field(default_factory=DocumentColumns)
    chunking: ChunkSettings = dataclasses.field(default_factory=ChunkSettings)
    dim: int | None = None
    device: str = "auto"
    precision: str = "auto"  # --precision (transforms.models.devices.resolve_precision)
    kernels: str = "auto"  # --kernels: auto | none | liger (transforms.models.liger.resolve)
    max_length: int | None = None
    max_batch_tokens: int | None = None
    backend: str = "eager"  # --backend: eager | compile | onnx (transforms.models.fast)
    packing: str = "auto"  # --packing: auto | on | off (transforms.models.encoder.resolve_packing)
    cpu_workers: int | None = None  # --cpu-workers: forward passes at once on CPU (TextEncoder)
    cpu_threads: int | None = None  # --cpu-threads: torch threads per worker process (pipelines.common)
    dead_letter: str | None = None
    summary_out: str | None = None
    alias: str | None = None
    progress_interval_s: float = 30.0
    upsert_batch_points: int = 256
    skip_bad_files: bool = False
    hnsw: HnswSettings | None = None  # build an HNSW index after the job (embedded store)
    force: bool = False  # embed every chunk, even those whose stored fingerprint matches
    delete_missing: bool = False  # delete the points of documents this run's input does not hold
    max_rejected_fraction: float = 0.01  # alias guard: dead letters per row read
    gate: GateConfig | None = None  # alias guard: quality against the current target
    query_instruction: str | None = None  # --query-instruction: the gate's queries (documents get none)
    resource_hints: tuple[tuple[str, str], ...] = ()  # on the embedding step only (--accelerator, --model-min-ram)
    job_timeout_s: float | None = None  # --job-timeout: the job fails past it (pipelines.runner)
    share_model: str = "auto"  # --share-model: auto | machine | process (_ModelSteps.shares_model)

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("--input is required")
        if not self.collection:
            raise ValueError("--collection is required")
        if self.cpu_workers is not None and self.cpu_workers < 1:
            raise ValueError(f"--cpu-workers must be >= 1, got {self.cpu_workers}")
        check_cpu_threads(self.cpu_threads)
        check_precision(self.precision, backend=self.backend)
        liger.check(self.kernels, self.backend)
        check_share_model(self.share_model)
        if self.packing not in PACKING:
            raise ValueError(f"--packing must be one of {', '.join(PACKING)}, got {self.packing!r}")
        if self.packing == "on" and self.backend == "onnx":
            raise ValueError("--packing on runs with --backend eager or compile, not onnx")
        TokenBudgets(forward=self.max_batch_tokens)  # validates it; --dim is checked against the model (EmbeddingSpec)
        clash = RESERVED_PAYLOAD_KEYS & set(self.columns.metadata)
        if clash:
            raise ValueError(f"--metadata-columns {sorted(clash)} clash with payload fields the index writes")
        if self.alias and self.alias == self.collection:
            raise ValueError("--alias must differ from --collection")
        if self.hnsw and not self.qdrant.embedded:
            raise ValueError("--hnsw applies to the embedded store (--qdrant-path); a server indexes by itself")
        if not 0.0 <= self.max_rejected_fraction <= 1.0:
            raise ValueError(f"--max-rejected-fraction must be in [0, 1], got {self.max_rejected_fraction}")
        if self.gate and not self.alias:
            raise ValueError("--gate-queries/--gate-qrels guard the alias switch: give --alias too")
        if self.query_instruction is not None and not self.gate:
            # Documents never get an instruction: the gate's queries are the only queries an index job embeds.
            raise ValueError("--query-instruction applies to the gate's queries (documents get no instruction): "
                             "give --gate-queries/--gate-qrels too")
        check_job_timeout(self.job_timeout_s)
        if self.dead_letter and not self.dead_letter.endswith((".jsonl", ".json", ".parquet")):
            raise ValueError(f"--dead-letter must end in .jsonl or .parquet, got {self.dead_letter}")
        check_outputs_outside_input(self.input, {"--dead-letter": self.dead_letter, "--summary-out": self.summary_out})


def index_config(args: argparse.Namespace) -> IndexConfig:
    gate = None
    if args.gate_queries or args.gate_qrels:
        if not (args.gate_queries and args.gate_qrels):
            raise ValueError("--gate-queries and --gate-qrels go together")
        gate = GateConfig(args.gate_queries, args.gate_qrels, args.gate_metric, args.gate_tolerance)
    return IndexConfig(
        input=args.input,
        collection=args.collection,
        model=model_location(args.model),
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
        precision=args.precision,
        kernels=args.kernels,
        max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens,
        backend=args.backend,
        packing=args.packing,
        cpu_workers=args.cpu_workers,
        cpu_threads=args.cpu_threads,
        dead_letter=args.dead_letter,
        summary_out=args.summary_out,
        alias=args.alias,
        progress_interval_s=args.progress_interval,
        job_timeout_s=args.job_timeout,
        skip_bad_files=args.skip_bad_files,
        hnsw=HnswSettings(args.hnsw_m, args.hnsw_ef_construct) if args.hnsw else None,
        force=args.force,
        delete_missing=args.delete_missing,
        max_rejected_fraction=args.max_rejected_fraction,
        gate=gate,
        query_instruction=args.query_instruction,
        resource_hints=tuple(model_resource_hints(args.accelerator, args.model_min_ram).items()),
        share_model=args.share_model,
    )


@dataclasses.dataclass(frozen=True)
class LabelConfig(_ModelSteps):
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
    precision: str = "auto"  # --precision, for the query encoder and the reranker
    kernels: str = "auto"  # --kernels, for both (transforms.models.liger.resolve)
    max_length: int = 8192
    max_batch_tokens: int | None = None
    share_prefix: bool = False
    cpu_threads: int | None = None  # --cpu-threads: torch threads per worker process (pipelines.common)
    progress_interval_s: float = 30.0
    summary_out: str | None = None
    resource_hints: tuple[tuple[str, str], ...] = ()  # on query embedding and reranking only
    job_timeout_s: float | None = None  # --job-timeout: the job fails past it (pipelines.runner)
    share_model: str = "auto"  # --share-model: auto | machine | process (_ModelSteps.shares_model)

    def __post_init__(self) -> None:
        if bool(self.collection) == bool(self.candidates):
            raise ValueError("give either --collection (retrieve from the index) or --candidates RUN_FILE --corpus GLOB")
        if self.candidates and not self.corpus:
            raise ValueError("--candidates needs --corpus (the Parquet documents the run ranks)")
        if self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.eval_fraction <= 1.0:
            raise ValueError(f"--eval-fraction must be in [0, 1], got {self.eval_fraction}")
        TokenBudgets(forward=self.max_batch_tokens)  # validates it
        check_cpu_threads(self.cpu_threads)
        check_precision(self.precision)
        liger.check(self.kernels)
        check_share_model(self.share_model)
        LabelDatasetsConfig(thresholds=self.thresholds)  # validates the thresholds
        check_job_timeout(self.job_timeout_s)

    def datasets_config(self, provenance: dict[str, Any], started_at: float | None = None) -> LabelDatasetsConfig:
        return LabelDatasetsConfig(
            thresholds=self.thresholds, recall_k=self.recall_k, provenance=provenance, started_at=started_at
        )

    @property
    def recall_k(self) -> int:
        """The report's Recall cutoff: 20, and at most half of --top-k. The teacher judges only the first
        stage's top-k, so Recall@top-k is 1 by construction; half of it says how much the first stage ranks
        below where a consumer of the top half would look."""
        return max(1, min(20, self.top_k // 2))


def label_config(args: argparse.Namespace) -> LabelConfig:
    query_columns = QueryColumns(
        query=args.query_column, query_id=args.query_id_column or "query_id", count=args.count_column or "count"
    )
    checked = tuple(c for c in (args.query_column, args.query_id_column, args.count_column) if c)
    return LabelConfig(
        queries=args.queries,
        out=args.out,
        reranker=model_location(args.reranker),
        collection=args.collection,
        model=model_location(args.model),
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
        precision=args.precision,
        kernels=args.kernels,
        max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens,
        share_prefix=args.share_prefix,
        cpu_threads=args.cpu_threads,
        progress_interval_s=args.progress_interval,
        job_timeout_s=args.job_timeout,
        summary_out=args.summary_out,
        resource_hints=tuple(model_resource_hints(args.accelerator, args.model_min_ram).items()),
        share_model=args.share_model,
    )



"""Every command's argument parser. Standard library only.

``corpus-etl COMMAND --help`` and argument errors are answered from here without importing
torch, Beam or qdrant-client (seconds of CPU); the jobs import them only once the flags parse.
The flags left for Beam are checked against Beam's pipeline options (``check_beam_args``), which
imports Beam's options module, once ours have parsed.
tests/test_cli.py checks it on ``sys.modules``.
"""

from __future__ import annotations

import argparse
import re
import textwrap

DEFAULT_EMBEDDING_MODEL = "Qwen/Qwen3-Embedding-0.6B"
DEFAULT_RERANKER = "Qwen/Qwen3-Reranker-0.6B"
# transforms/rerank.py's DEFAULT_INSTRUCTION, repeated so that --help need not import torch (a test compares them).
DEFAULT_RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
# transforms/models/devices.py's PRECISIONS, repeated for the same reason (the same test compares them).
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "bf16-mixed")
SHARE_MODEL = ("auto", "machine", "process")
# transforms/models/liger.py's KERNELS, repeated for the same reason (the same test compares them).
KERNELS = ("auto", "none", "liger")
BEAM_OPTIONS_EPILOG = textwrap.fill(
    "Any other --flag is passed to Beam as a pipeline option, e.g. --runner DataflowRunner "
    "--project P --region R --temp_location gs://B/tmp --setup_file ./setup.py "
    "--direct_num_workers 1 (see `python -m apache_beam.examples.wordcount --help` for the full list). "
    "A flag that is neither ours nor Beam's is refused (on Dataflow and portable runners, one not close "
    "to a known flag is passed on to the runner, with a warning).",
    width=100,
)
EXIT_STATUS_EPILOG = """exit status:
    0  success
    1  the job failed
    2  usage or pre-flight error (store, model, inputs): nothing written
    3  finished, but partial (dead letters) or the alias switch refused
  130  interrupted (Ctrl-C); writes are idempotent: rerun it"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows a default once: not when the help already says it, nor for None / False (nothing to show)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_ = action.help or ""
        if "default" in help_ or action.default in (None, False, argparse.SUPPRESS, "", []):
            return help_
        return super()._get_help_string(action)


def new_parser(prog: str, description: str | None, *, beam: bool = False) -> argparse.ArgumentParser:
    epilog = f"{BEAM_OPTIONS_EPILOG}\n\n{EXIT_STATUS_EPILOG}" if beam else EXIT_STATUS_EPILOG
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter, epilog=epilog)


def add_verbose(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and the traceback of an error"
    )


def add_qdrant_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Qdrant")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--qdrant-path", default="./qdrant_data", help="embedded store (Qdrant Edge): folder that holds the collections")
    where.add_argument(
        "--qdrant-url", default=None,
        help="Qdrant server, e.g. https://qdrant:6333 (instead of the embedded store); credentials in it are redacted "
        "in output",
    )
    group.add_argument(
        "--qdrant-api-key-env", default=None, metavar="VAR", help="name of the environment variable holding the API key"
    )
    group.add_argument(
        "--allow-insecure-api-key", action="store_true",
        help="send the API key over plain http to a non-loopback host (refused otherwise)",
    )
    group.add_argument("--qdrant-grpc", action="store_true", help="talk gRPC to the server (port 6334)")
    group.add_argument("--qdrant-timeout", type=int, default=60, help="request timeout, seconds")
    group.add_argument(
        "--store-lock-wait", type=float, default=300.0, metavar="SECONDS",
        help="embedded store: how long to wait for a shard another process holds before failing",
    )


# Dataflow's accelerator types (``gcloud compute accelerator-types list``): lower case, digits, dashes.
_ACCELERATOR = re.compile(r"^(?P<type>[a-z][a-z0-9-]*):(?P<count>[1-9][0-9]*)$")
_DATAFLOW_ACCELERATOR = re.compile(r"^type:[a-z][a-z0-9-]*;count:[1-9][0-9]*(;[a-z0-9_:=-]+)*$")
_RAM = re.compile(r"^[0-9]+(\.[0-9]+)?(PiB|TiB|GiB|MiB|KiB|PB|TB|GB|MB|KB|B)$")


def accelerator_hint(value: str) -> str:
    """``TYPE:COUNT`` (``nvidia-l4:1``) → Beam's accelerator hint for Dataflow,
    ``type:nvidia-l4;count:1;install-nvidia-driver``; a value already in that form is kept as given."""
    value = value.strip()
    if _DATAFLOW_ACCELERATOR.match(value):
        return value
    match = _ACCELERATOR.match(value)
    if not match:
        raise argparse.ArgumentTypeError(
            f"expected TYPE:COUNT such as nvidia-l4:1, or Dataflow's type:T;count:N[;install-nvidia-driver], got {value!r}"
        )
    return f"type:{match['type']};count:{match['count']};install-nvidia-driver"


def ram_size(value: str) -> str:
    """A memory size Beam's ``min_ram`` hint reads: a number and a unit (16GB, 15.5GiB)."""
    value = value.strip()
    if not _RAM.match(value):
        raise argparse.ArgumentTypeError(f"expected a size with a unit such as 16GB or 30GiB, got {value!r}")
    return value


def add_resource_arguments(parser: argparse.ArgumentParser, steps: str) -> None:
    """``--accelerator`` and ``--model-min-ram``: Beam resource hints on the model steps only."""
    group = parser.add_argument_group(
        "worker resources (Beam resource hints on the model steps only; runners without hints ignore them)"
    )
    group.add_argument(
        "--accelerator", type=accelerator_hint, default=None, metavar="TYPE:COUNT",
        help=f"GPU for {steps}, e.g. nvidia-l4:1 (Dataflow: type:nvidia-l4;count:1;install-nvidia-driver); "
        "reading and writing carry no hint, so Dataflow can run them on CPU workers; default: none",
    )
    group.add_argument(
        "--model-min-ram", type=ram_size, default=None, metavar="SIZE",
        help=f"least worker memory for {steps}, e.g. 16GB; default: none",
    )
    group.add_argument(
        "--share-model", default="auto", choices=SHARE_MODEL,
        help="copies of each model on a worker machine: process (one per SDK worker process, Beam's default; "
        "Dataflow starts a process per vCPU), machine (one per GPU of the machine, one on CPU, shared by the machine's "
        "processes: RunInference's large_model, the other processes send it their batches) or auto (machine where the model steps run on a "
        "GPU, --device cuda or auto with --accelerator or a GPU here, and a machine may run several worker processes: "
        "every runner but DirectRunner in one process; else process)",
    )


def add_model_arguments(parser: argparse.ArgumentParser, *, with_batching: bool = True) -> None:
    group = parser.add_argument_group("embedding model")
    group.add_argument(
        "--model", default=DEFAULT_EMBEDDING_MODEL, help="Hugging Face id or local directory of the embedding model"
    )
    group.add_argument("--dim", type=int, default=None, help="truncate vectors to N dimensions (Matryoshka), then L2-normalise")
    group.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (cuda without a GPU is an error)")
    add_precision(group)
    add_kernels(group)
    group.add_argument(
        "--max-length", type=int, default=None,
        help="override the model's maximum input length in tokens (default: the model's own)",
    )
    group.add_argument(
        "--query-instruction",
        default=None,
        help="task for queries, sent as 'Instruct: {task}\\nQuery:' (default: the model's own query prompt; "
        "'': no prompt, the query as it is)",
    )
    if with_batching:
        group.add_argument(
            "--max-batch-tokens",
            type=int,
            default=None,
            help="padded tokens per forward pass (default: from free GPU memory; 2048 on CPU, where 512, 1024 and 4096 "
            "were no faster in bench/index_cpu.py); Beam batches hold 4 passes' worth, without it 4 x 262,144 tokens for a GPU "
            "(--device cuda, or auto with --accelerator or a GPU here) and 4 x 8,192 on CPU (TokenBudgets)",
        )
        group.add_argument(
            "--backend", default="eager", choices=("eager", "compile", "onnx"),
            help="how forward passes run: eager (transformers), compile (torch.compile; on a GPU with packed rows one "
            "graph, 94-113 s at worker start, ~20 s with a warm inductor cache, then ~1.9x plain eager on an H100, but "
            "behind eager with --kernels auto's fused kernels on an H200; padded, one graph per length bucket) or onnx (ONNX Runtime, model exported once into "
            "~/.cache/corpus-etl; needs the onnx extra); measured in BENCHMARKS.md",
        )
        group.add_argument(
            "--packing", default="auto", choices=("auto", "on", "off"),
            help="run each forward pass as one row of texts back to back, no padding, kept apart by FlashAttention's "
            "variable-length kernel (auto: on for a GPU with bf16/fp16 weights, 1.2-1.6x padded passes on an H100; off on "
            "CPU, where the encoder's workers run padded passes and packing falls back to a dense mask)",
        )
        group.add_argument(
            "--cpu-workers", type=int, default=None, metavar="N",
            help="on CPU, forward passes run at once, one thread each, and torch's intra-op threads are set to 1 "
            "in the worker (default: torch's thread count; 1: one pass at a time over all threads, as before)",
        )
        add_cpu_threads(group)


def add_precision(group: argparse.ArgumentParser | argparse._ArgumentGroup, *, reranker: bool = False) -> None:
    extra = ("; the reranker stays fp32 on CPU under auto: bf16-mixed scores 1.87x faster, but was measured only "
             "with random weights") if reranker else ""  # fmt: skip
    group.add_argument(
        "--precision", default="auto", choices=PRECISIONS,
        help="what the model computes in: auto (bf16 weights on a GPU; on a CPU with AVX512-BF16 or AMX the "
        "embedding model runs bf16-mixed, 1.75x fp32 on long documents with vectors within 1e-4 cosine, "
        f"BENCHMARKS.md; fp32 on other CPUs{extra}), fp32, bf16, fp16, or bf16-mixed (fp32 weights, matrix "
        "products in bf16 under torch.autocast)",
    )  # fmt: skip


def add_kernels(group: argparse.ArgumentParser | argparse._ArgumentGroup, *, models: str = "the model") -> None:
    group.add_argument(
        "--kernels", default="auto", choices=KERNELS,
        help=f"fused Triton kernels (Liger-Kernel) for Qwen3's RMSNorm, rotary embedding and SwiGLU in {models}: "
        "auto puts them in where they run (a Qwen3 model on a GPU of compute capability >= 8.0, liger-kernel installed: pip install "
        "'corpus-etl[liger]'; on an H200 1.93x the encoder's packed eager passes and ahead of --backend compile, "
        "BENCHMARKS.md), else loads the model as it is; liger: required, the worker fails at load where they "
        "cannot run; none: never",
    )


def add_cpu_threads(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--cpu-threads", type=int, default=None, metavar="N",
        help="torch's CPU threads in each worker process (default: with DirectRunner's multi_processing or "
        "multi_threading, the machine's cores divided among --direct_num_workers; else torch's own, or "
        "OMP_NUM_THREADS when set)",
    )  # fmt: skip


def add_job_timeout(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--job-timeout", type=float, default=None, metavar="SECONDS",
        help="fail the job (exit 1) when it has not finished after this many seconds: it is cancelled, and local "
        "SDK worker processes are killed; a bound for a hung or lost worker (default: none)",
    )  # fmt: skip


def index_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "corpus-etl index", "Embed Parquet documents into a Qdrant collection (idempotent: reruns overwrite).", beam=True
    )
    parser.add_argument("--input", required=True, help="Parquet file or glob, local or gs://")
    parser.add_argument("--collection", required=True, help="Qdrant collection (created when missing)")
    cols = parser.add_argument_group("input columns")
    cols.add_argument("--id-column", default="id", help="document id column")
    cols.add_argument("--text-column", default="text", help="document text column")
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
    add_job_timeout(out)
    inc = parser.add_argument_group("reindexing")
    inc.add_argument(
        "--force", action="store_true",
        help="embed every chunk; by default a chunk whose stored fingerprint (text, model and settings) matches "
        "is left as it is",
    )
    inc.add_argument(
        "--delete-missing", action="store_true",
        help="after every input was read, delete the points of documents the input no longer holds (as rsync "
        "--delete); listed in deleted_documents.txt beside --summary-out",
    )
    gate = parser.add_argument_group("alias guards (with --alias)")
    gate.add_argument(
        "--max-rejected-fraction", type=float, default=0.01,
        help="refuse the alias switch when more than this share of rows became dead letters",
    )
    gate.add_argument("--gate-queries", default=None, help="BEIR queries for the quality gate of the alias switch")
    gate.add_argument("--gate-qrels", default=None, help="BEIR qrels for the quality gate")
    gate.add_argument("--gate-metric", default="nDCG@10", help="nDCG@10, MRR@10 or Recall@100")
    gate.add_argument(
        "--gate-tolerance", type=float, default=0.01,
        help="switch when the new collection scores at least the current target minus this",
    )
    hnsw = parser.add_argument_group("HNSW index (embedded store)")
    hnsw.add_argument("--hnsw", action="store_true", help="build an HNSW index when the job has written every point")
    hnsw.add_argument("--hnsw-m", type=int, default=16, help="edges per node")
    hnsw.add_argument("--hnsw-ef-construct", type=int, default=100, help="candidates while building")
    out.add_argument(
        "--skip-bad-files", action="store_true",
        help="index the readable files when some cannot be read (each skipped file is a dead letter and the run "
        "ends as partial); without it any bad file stops the job before anything is written",
    )
    add_resource_arguments(parser, "the embedding step")
    add_verbose(out)
    return parser


def label_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "corpus-etl label",
        "Label offline query logs with Qwen3-Reranker into evaluation (BEIR, TREC) and distillation sets.",
        beam=True,
    )
    parser.add_argument("--queries", required=True, help="query log Parquet file or glob, local or gs://")
    parser.add_argument("--out", required=True, help="output folder, local or gs://")
    parser.add_argument("--reranker", default=DEFAULT_RERANKER, help="Hugging Face id or local directory")
    first = parser.add_argument_group("first stage: an index (--collection) or a run file (--candidates + --corpus)")
    first.add_argument("--collection", default=None, help="Qdrant collection built by `corpus-etl index`")
    first.add_argument("--model", default=DEFAULT_EMBEDDING_MODEL, help="the embedding model the index was built with")
    first.add_argument("--dim", type=int, default=None, help="the --dim the index was built with")
    first.add_argument("--query-instruction", default=None,
                       help="task for queries, sent as 'Instruct: {task}\\nQuery:' (default: the model's own query "
                       "prompt; '': no prompt)")
    first.add_argument("--candidates", default=None, metavar="RUN_FILE", help="TREC run file: qid Q0 docid rank score tag")
    first.add_argument("--corpus", default=None, metavar="GLOB", help="Parquet documents the run file ranks")
    first.add_argument("--id-column", default="id", help="--corpus id column")
    first.add_argument("--text-column", default="text", help="--corpus text column")
    first.add_argument("--title-column", default=None, help="--corpus title column (prefixed to the text)")
    first.add_argument("--top-k", type=int, default=100, help="candidates per query")
    add_qdrant_arguments(parser)
    log = parser.add_argument_group("query log")
    log.add_argument("--query-column", default="query", help="query text column")
    log.add_argument("--query-id-column", default=None, help="ids to keep (default: 'query_id' when present, else derived)")
    log.add_argument("--count-column", default=None, help="frequencies (default: 'count' when present, else 1)")
    log.add_argument("--max-queries", type=int, default=None, help="label at most N queries (default: all)")
    log.add_argument("--sample", default=None, metavar="HEAD:TORSO:TAIL",
                     help="stratified sample by frequency, e.g. 50:30:20 (needs --max-queries)")
    log.add_argument("--seed", type=int, default=0, help="seed of the sample")
    lab = parser.add_argument_group("labels")
    lab.add_argument("--instruction", default=None, help=f"reranker instruction (default: {DEFAULT_RERANK_INSTRUCTION!r})")
    lab.add_argument("--label-thresholds", default="0.5,0.9", help="P(yes) cut points in (0, 1]: below the first -> 0, then 1, 2 ...")
    lab.add_argument("--eval-fraction", type=float, default=0.2, help="share of queries (by hash) in the evaluation set")
    run = parser.add_argument_group("execution")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_precision(run, reranker=True)
    add_kernels(run, models="the query encoder and the reranker")
    run.add_argument("--max-length", type=int, default=8192, help="reranker pair length limit (tokens)")
    run.add_argument(
        "--max-batch-tokens", type=int, default=None,
        help="padded tokens per forward pass (default: from free GPU memory; 2048 on CPU); Beam batches hold 4 "
        "passes' worth, without it 4 x 262,144 tokens for a GPU (--device cuda, or auto with --accelerator or a GPU "
        "here) and 4 x 8,192 on CPU (TokenBudgets)",
    )
    run.add_argument(
        "--share-prefix", action="store_true",
        help="group pairs by query and run each query's prompt head once per forward pass (same scores, ~14%% "
        "fewer tokens at 300-token documents; in BENCHMARKS.md 5%% faster on CPU, 0.96-1.05x the time on an H100 "
        "and an H200)",
    )
    add_cpu_threads(run)
    run.add_argument("--progress-interval", type=float, default=30.0, help="seconds between progress lines")
    add_job_timeout(run)
    run.add_argument("--summary-out", default=None, help="run summary as JSON (local or gs://)")
    add_resource_arguments(parser, "query embedding and reranking")
    add_verbose(run)
    return parser


def _add_search_arguments(parser: argparse.ArgumentParser, top_k: int) -> None:
    parser.add_argument("--collection", required=True, help="collection or alias built by `corpus-etl index`")
    parser.add_argument("--top-k", type=int, default=top_k, help="documents per query")
    parser.add_argument(
        "--hnsw-ef", type=int, default=None,
        help="search the HNSW index with this ef (approximate); default: exact search in the embedded store",
    )
    add_model_arguments(parser, with_batching=False)
    add_qdrant_arguments(parser)
    add_verbose(parser)


def search_parser() -> argparse.ArgumentParser:
    parser = new_parser("corpus-etl search", "Search a collection built by `corpus-etl index`.")
    parser.add_argument("query", nargs="+", help="the query text")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_search_arguments(parser, top_k=10)
    return parser


def evaluate_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "corpus-etl evaluate",
        "Retrieval quality of a collection on BEIR-style queries and qrels: nDCG@10, MRR@10 and Recall@k "
        "(k = --top-k). Chunk hits are aggregated to documents (max score per doc_id) before scoring.",
    )
    parser.add_argument("--queries", required=True, help="BEIR queries.jsonl or Parquet")
    parser.add_argument("--qrels", required=True, help="BEIR qrels TSV (query-id corpus-id score) or Parquet")
    parser.add_argument("--out", default=None, help="write metrics as JSON here")
    _add_search_arguments(parser, top_k=100)
    return parser


def prune_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "corpus-etl prune-collections",
        "Delete the oldest collections named <alias>-YYYYMMDD[-suffix] (or <alias>-YYYY-MM-DD...), keeping the "
        "--keep most recent and always the alias's target (and any collection an alias points at). Other names "
        "are never touched.",
    )
    parser.add_argument("--alias", required=True, help="the alias the nightly runs switch, e.g. docs")
    parser.add_argument("--keep", type=int, required=True, help="how many of the most recent dated collections stay (>= 1)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    add_qdrant_arguments(parser)
    add_verbose(parser)
    return parser


def sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corpus-etl sample-data", formatter_class=HelpFormatter, epilog=EXIT_STATUS_EPILOG,
        description="Write a small real-text corpus (Python standard library docs), queries, qrels (BEIR) and a "
        "query log: corpus.parquet, queries.jsonl, qrels/test.tsv, query_log.parquet.",
    )
    parser.add_argument("--out", default="demo_data", help="output folder")
    add_verbose(parser)
    return parser


def dump_parser() -> argparse.ArgumentParser:
    from pipelines import dump  # standard library only at import: its docstring is the help

    parser = new_parser("corpus-etl dump", dump.__doc__)
    parser.add_argument("--collection", required=True, help="collection or alias")
    parser.add_argument("--out", required=True, help="FILE.parquet, local or gs://")
    add_qdrant_arguments(parser)
    add_verbose(parser)
    return parser


def copy_parser() -> argparse.ArgumentParser:
    from pipelines import copy  # standard library only at import: its docstring is the help

    parser = new_parser("corpus-etl copy", copy.__doc__)
    parser.add_argument("--collection", required=True, help="source collection or alias in --qdrant-path")
    parser.add_argument("--qdrant-path", default="./qdrant_data", help="the embedded store to copy from")
    target = parser.add_argument_group("target")
    where = target.add_mutually_exclusive_group(required=True)
    where.add_argument("--to-url", default=None, help="Qdrant server, e.g. http://qdrant:6333")
    where.add_argument("--to-path", default=None, help="another embedded store instead of a server")
    target.add_argument("--to-collection", default=None, help="target collection (default: the source's name)")
    target.add_argument("--alias", default=None, help="after the copy, point this alias of the target at it")
    target.add_argument("--qdrant-api-key-env", default=None, metavar="VAR", help="variable holding the server's API key")
    target.add_argument(
        "--allow-insecure-api-key", action="store_true",
        help="send the API key over plain http to a non-loopback --to-url (refused otherwise)",
    )  # fmt: skip
    target.add_argument("--qdrant-grpc", action="store_true", help="talk gRPC to the server")
    target.add_argument("--qdrant-timeout", type=int, default=60, help="request timeout, seconds")
    target.add_argument("--batch-points", type=int, default=256, help="points per upsert request (bytes bound: 8 MiB)")
    parser.add_argument(
        "--store-lock-wait", type=float, default=300.0, metavar="SECONDS",
        help="embedded stores: how long to wait for a shard another process holds before failing",
    )  # fmt: skip
    add_verbose(parser)
    return parser


def split_beam_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, and the rest for Beam. What Beam would not read is a usage error (``check_beam_args``)."""
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") and not a.startswith("--")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    check_beam_args(parser, rest)
    return args, rest


# Runners that hand the pipeline options they do not know to a service or a job server that may (Beam keeps
# them: ``retain_unknown_options`` in its Dataflow and portable runners). Any other runner drops them.
_PASS_THROUGH_RUNNERS = ("dataflow", "portable", "flink", "spark", "prism")


def check_beam_args(parser: argparse.ArgumentParser, rest: list[str]) -> None:
    """Refuse what is left for Beam when Beam would drop it: a misspelt flag would otherwise be discarded
    with a warning and the job run without it (``--eval-fractoin 0.9`` ran at the default 0.2).

    Refused, with a "did you mean" where one is close: a stray value; a flag that is close to one of ours
    or Beam's; one in our hyphenated style (Beam's are snake_case); and on runners that run in this
    process (DirectRunner), any flag Beam's pipeline options do not define. On Dataflow and portable
    runners (Flink, Spark) a flag Beam does not know is passed on, as Beam does, with a warning: the
    service or job server may read it. Imports Beam's options module (not torch), only when ``rest`` is
    not empty.
    """
    if not rest:
        return
    import difflib
    import logging

    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    beam = _BeamArgumentParser(allow_abbrev=False, exit_on_error=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():  # as PipelineOptions does
        cls._add_argparse_args(beam)
    try:
        known, unknown = beam.parse_known_args(rest)
    except argparse.ArgumentError as exc:  # a Beam option's value: say it in our usage, not Beam's 170 flags
        parser.error(f"Beam pipeline option {exc}")
    if not unknown:
        return
    ours = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    beams = [o for a in beam._actions for o in a.option_strings if o.startswith("--")]
    runner = (getattr(known, "runner", None) or "DirectRunner").lower()
    passes_on = any(name in runner for name in _PASS_THROUGH_RUNNERS)
    refused: list[str] = []
    passed: list[str] = []
    i = 0
    while i < len(unknown):
        token = unknown[i]
        if token == "--":
            break
        if not token.startswith("--"):
            refused.append(f"{token} (a value without a flag)")
            i += 1
            continue
        name = token.split("=", 1)[0]
        takes_value = "=" not in token and i + 1 < len(unknown) and not unknown[i + 1].startswith("-")
        shown = f"{token} {unknown[i + 1]}" if takes_value else token
        i += 2 if takes_value else 1
        close = difflib.get_close_matches(name, ours + beams, n=1, cutoff=0.85)
        if close:
            refused.append(f"{shown} (did you mean {close[0]}?)")
        elif "-" in name[2:] or not passes_on:
            refused.append(f"{shown} (not a flag of {parser.prog}, nor a Beam pipeline option)")
        else:
            passed.append(name)
    if refused:
        parser.error("unrecognized arguments: " + "; ".join(refused))
    if passed:
        logging.getLogger(__name__).warning(
            "%s: not Beam pipeline options this SDK defines; passed on to the %s as they are",
            ", ".join(passed), known.runner,
        )

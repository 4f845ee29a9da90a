"""Pieces every command shares: Qdrant and model flags, logging, metrics, JSON output."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from transforms.qdrant import QdrantConfig

DEFAULT_EMBEDDING_MODEL = "Qwen/Qwen3-Embedding-0.6B"
BEAM_OPTIONS_EPILOG = (
    "Any other --flag is passed to Beam as a pipeline option, e.g. --runner DataflowRunner "
    "--project P --region R --temp_location gs://B/tmp --setup_file ./setup.py "
    "--direct_num_workers 1 (see `python -m apache_beam.examples.wordcount --help` for the full list)."
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_qdrant_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Qdrant")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--qdrant-path", default="./qdrant_data", help="embedded store (Qdrant Edge): folder that holds the collections")
    where.add_argument("--qdrant-url", default=None, help="Qdrant server, e.g. http://qdrant:6333 (instead of the embedded store)")
    group.add_argument(
        "--qdrant-api-key-env", default=None, metavar="VAR", help="name of the environment variable holding the API key"
    )
    group.add_argument("--qdrant-grpc", action="store_true", help="talk gRPC to the server (port 6334)")
    group.add_argument("--qdrant-timeout", type=int, default=60, help="request timeout, seconds")


def qdrant_config(args: argparse.Namespace) -> QdrantConfig:
    return QdrantConfig(
        path=None if args.qdrant_url else args.qdrant_path,
        url=args.qdrant_url,
        api_key_env=args.qdrant_api_key_env,
        prefer_grpc=args.qdrant_grpc,
        timeout_s=args.qdrant_timeout,
    )


def add_model_arguments(parser: argparse.ArgumentParser, *, with_batching: bool = True) -> None:
    group = parser.add_argument_group("embedding model")
    group.add_argument(
        "--model", default=DEFAULT_EMBEDDING_MODEL, help="Hugging Face id or local directory of the embedding model"
    )
    group.add_argument("--dim", type=int, default=None, help="truncate vectors to N dimensions (Matryoshka), then L2-normalise")
    group.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (cuda without a GPU is an error)")
    group.add_argument("--max-length", type=int, default=None, help="override the model's maximum input length (tokens)")
    group.add_argument(
        "--query-instruction",
        default=None,
        help="task for queries, sent as 'Instruct: {task}\\nQuery:' (default: the model's own query prompt)",
    )
    if with_batching:
        group.add_argument(
            "--max-batch-tokens",
            type=int,
            default=None,
            help="padded tokens per forward pass (default: from free GPU memory; 2048 on CPU, measured fastest in bench/index_cpu.py)",
        )


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for name in ("corpus_etl", "transforms", "pipelines"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def beam_options(beam_args: list[str]) -> PipelineOptions:
    unknown = [a for a in beam_args if a.startswith("-") and not a.startswith("--")]
    if unknown:
        raise SystemExit(f"unrecognised arguments: {' '.join(unknown)}")
    return PipelineOptions(beam_args)


def counters(result: Any) -> dict[str, int]:
    """Beam counters of a finished job, by name (committed values where the runner has them)."""
    out: dict[str, int] = {}
    for c in result.metrics().query()["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        name = c.key.metric.name
        out[name] = out.get(name, 0) + int(value or 0)
    return dict(sorted(out.items()))


def write_json(path: str, obj: Any) -> None:
    with FileSystems.create(path) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


def check_local_device(options: PipelineOptions, device: str) -> None:
    """Fail before the job starts when a local run asks for a device this machine lacks.

    Only for runners that execute here (DirectRunner, the default): a Dataflow or Flink
    driver rarely has the workers' GPU, so there the workers check it when they load the model.
    """
    from apache_beam.options.pipeline_options import StandardOptions

    from transforms.gpu import resolve_device

    runner = options.view_as(StandardOptions).runner
    if runner is None or str(runner).lower() in ("directrunner", "direct", "prismrunner", "prism"):
        resolve_device(device)


def start_pipeline(test_pipeline: Any, beam_args: list[str] | None, device: str):
    """The job's pipeline (the injected one in tests), with the driver set up to use its options.

    The driver's own file access (column checks, ``gs://`` listing) uses the job's options,
    e.g. GCS credentials; a local run asking for a missing device fails here, before any work.
    """
    import apache_beam as beam

    p = test_pipeline or beam.Pipeline(options=beam_options(beam_args or []))
    FileSystems.set_options(p.options)
    check_local_device(p.options, device)
    return p

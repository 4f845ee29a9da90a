"""Resource-hint flags, build-only detection, and summaries of runners without metrics (fast, no job runs)."""

from __future__ import annotations

import argparse

import pytest

from pipelines import flags


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("nvidia-l4:1", "type:nvidia-l4;count:1;install-nvidia-driver"),
        ("nvidia-tesla-t4:2", "type:nvidia-tesla-t4;count:2;install-nvidia-driver"),
        ("type:nvidia-h100-80gb;count:1", "type:nvidia-h100-80gb;count:1"),  # Dataflow's own form: kept
        ("type:nvidia-l4;count:1;install-nvidia-driver", "type:nvidia-l4;count:1;install-nvidia-driver"),
        ("type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver",
         "type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver"),
    ],
)
def test_accelerator_flag(value, hint):
    assert flags.accelerator_hint(value) == hint


@pytest.mark.parametrize("value", ["nvidia-l4", "nvidia-l4:0", "L4:1", "type:nvidia-l4", "nvidia-l4:1;x"])
def test_accelerator_flag_refuses(value):
    with pytest.raises(argparse.ArgumentTypeError, match="TYPE:COUNT"):
        flags.accelerator_hint(value)


def test_min_ram_flag_and_parsers(capsys):
    assert flags.ram_size("16GB") == "16GB" and flags.ram_size("15.5GiB") == "15.5GiB"
    for parser in (flags.index_parser(), flags.label_parser()):
        args, _ = flags.split_beam_args(parser, _required(parser) + ["--accelerator", "nvidia-l4:1", "--model-min-ram", "30GiB"])
        assert (args.accelerator, args.model_min_ram) == ("type:nvidia-l4;count:1;install-nvidia-driver", "30GiB")
        args, _ = flags.split_beam_args(parser, _required(parser))
        assert (args.accelerator, args.model_min_ram) == (None, None)  # CPU: no hints
        with pytest.raises(SystemExit) as exc:
            flags.split_beam_args(parser, _required(parser) + ["--model-min-ram", "16"])
        assert exc.value.code == 2 and "16GB" in capsys.readouterr().err


def _required(parser: argparse.ArgumentParser) -> list[str]:
    if parser.prog.endswith("index"):
        return ["--input", "x.parquet", "--collection", "c"]
    return ["--queries", "q.parquet", "--out", "o"]


def test_model_resource_hints():
    from pipelines.launch import model_resource_hints

    assert model_resource_hints(None, None) == {}
    assert model_resource_hints("type:nvidia-l4;count:1", "16GB") == {"accelerator": "type:nvidia-l4;count:1",
                                                                      "min_ram": "16GB"}


def test_build_only():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.launch import build_only

    dataflow = ["--runner=DataflowRunner"]
    assert build_only(PipelineOptions(dataflow)) is None
    assert build_only(PipelineOptions([*dataflow, "--dry_run=True"])) == "dry run"
    assert build_only(PipelineOptions([*dataflow, "--template_location=gs://b/t.json"])) == "template gs://b/t.json"
    # Only DataflowRunner honours them: elsewhere the job runs, and is treated as running.
    assert build_only(PipelineOptions(["--dry_run=True", "--template_location=gs://b/t.json"])) is None


def test_counters_of_a_runner_without_metrics():
    from apache_beam.runners.runner import PipelineResult, PipelineState

    from pipelines.common import counters

    assert counters(PipelineResult(PipelineState.DONE)) is None  # metrics() raises NotImplementedError


def test_index_summary_without_counters():
    from pipelines.index import format_summary

    summary = {"status": "ok", "collection": "c", "qdrant": "edge:/q", "model": "m", "vector_size": 4,
               "counters": None, "counters_unavailable": "the runner reports no metrics", "documents_unchanged": 0,
               "chunks_embedded": 0, "chunks_reused": 0, "points_in_collection": 3, "dead_letter": None,
               "elapsed_s": 1.0, "documents_per_s": 0.0, "tokens_per_s": 0.0, "precision": "auto",
               "precision_computed": None}  # fmt: skip
    text = format_summary(summary)
    assert "counters         unavailable: the runner reports no metrics" in text and "rows read        0" in text
    assert "precision        auto (counters unavailable)" in text


def test_alias_switch_refused_without_counters(tmp_path):
    from pipelines.index import IndexConfig, _switch_alias
    from transforms.io.edge_store import EdgeStore
    from transforms.io.qdrant import QdrantConfig
    from transforms.io.store import CollectionSpec

    store = EdgeStore(str(tmp_path))
    store.ensure_collection("c-1", CollectionSpec(2))
    config = IndexConfig(input="x", collection="c-1", model="m", qdrant=QdrantConfig(path=str(tmp_path)), alias="c")
    out = _switch_alias(config, store, {}, points=5, unread=[])
    assert "no rows_read counter" in out["refused"] and store.aliases() == {}


def test_build_only_refuses_what_runs_after_the_job(tmp_path):
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.test_pipeline import TestPipeline

    from pipelines import index
    from pipelines.errors import UsageError

    argv = ["--input", "x.parquet", "--collection", "docs-1", "--alias", "docs", "--delete-missing",
            "--qdrant-path", str(tmp_path)]  # fmt: skip
    options = PipelineOptions(["--runner=DataflowRunner", "--template_location=gs://b/t.json"])
    pipeline = TestPipeline(runner="DirectRunner", options=options)  # refused before anything is built or run
    with pytest.raises(UsageError, match=r"--alias, --delete-missing run\(s\) in the driver after the job, and a template"):
        index.run(argv, test_pipeline=pipeline)
    assert list(tmp_path.iterdir()) == []  # nothing created
    from pipelines.launch import refuse_after_job_flags

    with pytest.raises(UsageError, match=r"^--hnsw run\(s\) in the driver after the job, and a dry run has no driver"):
        refuse_after_job_flags("dry run", {"--alias": None, "--hnsw": True})
    refuse_after_job_flags("dry run", {"--alias": None, "--hnsw": False})  # nothing set: nothing refused


def test_beam_validation_errors_in_one_line():
    from pipelines.errors import EXIT_USAGE, translate

    exc = ValueError("Pipeline has validations errors: \nInvalid Project ID (p). Please make sure ...\nMissing region.")
    error = translate(exc)
    assert error.exit_status == EXIT_USAGE
    assert str(error) == "Beam options: Invalid Project ID (p). Please make sure ...; Missing region."

"""Jobs that are built but not run here: a Dataflow dry run or template, and the resource hints.

Two ways to build a Dataflow job without running it:

- ``--dry_run=True`` (Beam's ``TestOptions``): DataflowRunner translates the pipeline and
  returns the job on ``result.job`` without staging or submitting anything;
  ``--dataflow_job_file PATH`` then gets the job written here (``write_job_file``), with the
  pipeline proto (its steps, their environments and resource hints) Dataflow would receive.
- ``--template_location gs://...`` (``GoogleCloudOptions``): DataflowRunner stages the
  pipeline and its dependencies and writes the job there without submitting it. A classic
  template, and also what a Flex Template launcher does when the template is launched.

Neither needs the store nor the input: building a job must work where neither is reachable
(a laptop, CI, the Flex Template launcher). The jobs' own checks then run in the workers when
the job starts, before any document is read (``transforms.io.preflight.LaunchChecks``), and
fail the job there in its first minutes. What only the driver can do after a job finished
(``--alias``, ``--delete-missing``, ``--hnsw``, the quality gate, the label summary read
from the manifest) does not happen: ``refuse_after_job_flags`` says so before anything is built.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from apache_beam.options.pipeline_options import (
    DebugOptions,
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
    TestOptions,
)

from pipelines.errors import UsageError


def build_only(options: PipelineOptions) -> str | None:
    """How the job is only built, not run ("dry run", "template gs://..."), or None when it runs.

    Only DataflowRunner honours these options; any other runner (DirectRunner...) runs the job.
    """
    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) else type(runner).__name__ if runner is not None else ""
    if "dataflow" not in name.lower():
        return None
    if options.view_as(TestOptions).dry_run:
        return "dry run"
    template = options.view_as(GoogleCloudOptions).template_location
    if template:
        return f"template {template}"
    return None


def build_outputs(options: PipelineOptions, how: str) -> dict[str, str | None]:
    """flag -> path of what building the job writes here (``common.check_output_locations`` checks them first):
    the job file of a dry run; a template, and the staged files under ``--staging_location`` (by default
    ``--temp_location``), for a template. A missing bucket there would fail the build only after DataflowRunner
    retried its uploads for about ten minutes."""
    cloud = options.view_as(GoogleCloudOptions)
    outputs: dict[str, str | None] = {"--dataflow_job_file": options.view_as(DebugOptions).dataflow_job_file}
    if how.startswith("template"):
        outputs.update({"--template_location": cloud.template_location, "--temp_location": cloud.temp_location,
                        "--staging_location": cloud.staging_location})  # fmt: skip
    return outputs


def model_resource_hints(accelerator: str | None, min_ram: str | None) -> dict[str, str]:
    """Beam resource hints for a model step (``PTransform.with_resource_hints``); empty on CPU.

    ``accelerator`` is already in Dataflow's form (``pipelines.flags.accelerator_hint``).
    """
    hints = {}
    if accelerator:
        hints["accelerator"] = accelerator
    if min_ram:
        hints["min_ram"] = min_ram
    return hints


def refuse_after_job_flags(how: str, flags: Mapping[str, Any]) -> None:
    """``flags``: {flag: value} of what runs in the driver after the job; any set one is a usage error."""
    given = [flag for flag, value in flags.items() if value]
    kind = "template" if how.startswith("template") else "dry run"
    if given:
        raise UsageError(
            f"{', '.join(given)} run(s) in the driver after the job, and a {kind} has no driver "
            "after the job; run the command itself with --runner DataflowRunner (it waits for the job, then "
            "does them), or leave them out of the template"
        )


def job_description(result: Any) -> dict[str, Any] | None:
    """The Dataflow job a dry run built (``result.job``): the job message and its pipeline proto, as JSON.

    Runner v2 jobs carry no v1 ``steps``: the steps, their environments and resource hints
    are in the pipeline proto (staged as ``pipeline.pb`` on a real submission). None when the
    runner built no Dataflow job.
    """
    job = getattr(result, "job", None)
    if job is None or not hasattr(job, "proto_pipeline"):
        return None
    from google.protobuf import json_format

    return {
        "job": json.loads(job.json()),
        "pipeline": json_format.MessageToDict(job.proto_pipeline),
        "options": {k: v for k, v in job.options.get_all_options(drop_default=True).items() if v is not None},
    }


def write_job_file(options: PipelineOptions, result: Any) -> str | None:
    """``--dataflow_job_file PATH`` for a dry run (DataflowRunner writes it only when it submits)."""
    path = options.view_as(DebugOptions).dataflow_job_file
    described = job_description(result)
    if not path or described is None:
        return None
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path) as f:
        f.write((json.dumps(described, indent=1, sort_keys=True, default=str) + "\n").encode("utf-8"))
    return path


def format_built(summary: Mapping[str, Any]) -> str:
    """The summary of a job that was built, not run (``status: built``)."""
    target = summary.get("collection") or summary.get("out")
    lines = [f"{summary['pipeline']}: {target}  [built: {summary['built']}]"]
    if summary.get("job_file"):
        lines.append(f"  job file         {summary['job_file']}")
    lines += [
        f"  counters         unavailable: {summary['counters_unavailable']}",
        "  checks           store and inputs: by a worker when the job starts",
        f"  time             {summary['elapsed_s']}s",
    ]
    return "\n".join(lines)

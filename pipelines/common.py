"""Pieces every command shares: logging, Beam options, the run skeleton, metrics, JSON output."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.errors import PreflightError, UsageError, first_line, interrupted
from pipelines.security import redact_text

_LOG = logging.getLogger(__name__)


def setup_logging(verbose: bool = False) -> None:
    quiet_libraries()
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for name in ("corpus_etl", "transforms", "pipelines"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    # A failing step is logged by Beam with its traceback, then raised to the command, which prints
    # it as one line (with the traceback under -v): once is enough.
    logging.getLogger("apache_beam.runners.common").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    workers = logging.getLogger(WORKER_LOGS)
    workers.setLevel(logging.DEBUG if verbose else logging.INFO)  # the filter decides what reaches the root's handler
    for f in [f for f in workers.filters if isinstance(f, WorkerLogs)]:
        workers.removeFilter(f)
    workers.addFilter(WorkerLogs(verbose))


# DirectRunner's multi_processing SDK workers send their log records to the driver, which logs each one as a
# record of this logger: "Worker: <the LogEntry proto as text>", at the entry's level.
WORKER_LOGS = "apache_beam.runners.portability.local_job_service"
# What every Beam SDK worker process says as it starts, at WARNING: nothing a user can act on.
WORKER_NOISE = ("No semi_persistent_directory found", "Discarding unparseable args")
_PACKAGES = tuple(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + name + os.sep
                  for name in ("pipelines", "transforms"))  # fmt: skip


class WorkerLogs(logging.Filter):
    """The log lines of DirectRunner's ``multi_processing`` workers, as the job's own in one process.

    Beam logs them as one-line protos at the worker's level under ``WORKER_LOGS``, whose INFO the root
    logger's WARNING dropped: the workers' progress lines and model loads never showed, while Beam's
    start-up warnings (``WORKER_NOISE``, two per worker) did, as protos. This filter rewrites each
    entry to its message, with its time, level and module (``transforms.progress``), and keeps what the
    in-process job shows: this project's lines at INFO (DEBUG with ``-v``, where a worker sends them),
    the libraries' from WARNING, Beam's step errors (the command prints them as its one line) and
    start-up noise only with ``-v``. The runner's own records are left to the usual levels."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        entry = _log_entry(record)
        if entry is None:  # the job service's own records: as before this filter, WARNING and above
            return record.levelno >= logging.WARNING
        path = entry.log_location.rsplit(":", 1)[0]
        ours = path.startswith(_PACKAGES)
        if not self.verbose and not ours and (
            record.levelno < logging.WARNING
            or any(noise in entry.message for noise in WORKER_NOISE)
            # a step's error, which the command prints as its one line (a lull's WARNING still shows)
            or (record.levelno >= logging.ERROR and f"{os.sep}apache_beam{os.sep}runners{os.sep}" in path)
        ):
            return False
        record.msg, record.args = entry.message, ()
        if entry.trace and self.verbose:
            record.msg += "\n" + entry.trace.rstrip()
        record.name = _module_name(path)
        if entry.timestamp.seconds:
            record.created = entry.timestamp.seconds + entry.timestamp.nanos / 1e9
            record.msecs = (entry.timestamp.nanos // 1_000_000) % 1000
        return True


def _log_entry(record: logging.LogRecord) -> Any:
    """The worker's ``LogEntry`` a ``WORKER_LOGS`` record carries, or None for the runner's own records."""
    if record.msg != "Worker: %s" or not isinstance(record.args, tuple) or len(record.args) != 1:
        return None
    from apache_beam.portability.api import beam_fn_api_pb2
    from google.protobuf import text_format

    try:
        return text_format.Parse(str(record.args[0]), beam_fn_api_pb2.LogEntry())
    except Exception:  # noqa: BLE001 - a format this version does not know: leave the record as Beam wrote it
        return None


def _module_name(path: str) -> str:
    """``transforms.progress`` for ``/repo/transforms/progress.py``, ``apache_beam.x`` under site-packages."""
    path = os.path.splitext(path)[0]
    for root in (os.path.dirname(_PACKAGES[0].rstrip(os.sep)) + os.sep, f"site-packages{os.sep}"):
        if root in path:
            return "worker " + path.rsplit(root, 1)[1].replace(os.sep, ".")
    return "worker " + os.path.basename(path)


def quiet_libraries() -> None:
    """No progress bars in batch logs, and each Hugging Face hub warning printed once.

    The environment variable reaches DirectRunner's worker processes too (workers elsewhere
    turn the bars off when they load a model: ``transforms.progress.disable_library_progress_bars``).
    huggingface_hub logs through its own handler *and* propagates to the root one: once is enough.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("huggingface_hub").propagate = False
    # qdrant_config() already refused a key over plain http to another host; the ones left are allowed
    # (loopback, or --allow-insecure-api-key), so qdrant-client's warning would only repeat that choice.
    warnings.filterwarnings("ignore", message="Api key is used with an insecure connection")
    # qdrant-client checks the server's version on a thread of its own; when the server cannot be reached, that
    # thread's warning races the one-line error the command prints for it (and once broke a test's one line).
    # A version mismatch with a reachable server still warns: only the unreachable case is dropped.
    warnings.filterwarnings("ignore", message="Failed to obtain server version")


def beam_options(beam_args: list[str]) -> PipelineOptions:
    unknown = [a for a in beam_args if a.startswith("-") and not a.startswith("--")]
    if unknown:
        raise SystemExit(f"unrecognised arguments: {' '.join(unknown)}")
    return PipelineOptions(beam_args)


def counters(result: Any) -> dict[str, int] | None:
    """Beam counters of a finished job, by name (committed values where the runner has them).

    None when the runner keeps no metrics (``result.metrics()`` raises ``NotImplementedError``,
    e.g. a Dataflow dry run or template): the summary says the counters are unavailable.
    """
    try:
        metrics = result.metrics()
    except NotImplementedError:
        return None
    out: dict[str, int] = {}
    for c in metrics.query()["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        name = c.key.metric.name
        out[name] = out.get(name, 0) + int(value or 0)
    return dict(sorted(out.items()))


# RunInference's own metric: per batch, microseconds in the handler's run_inference, its results listed.
INFERENCE_LATENCY = "inference_batch_latency_micro_secs"


def step_seconds(
    result: Any, counts: dict[str, int] | None, steps: Sequence[tuple[str, str | None]]
) -> dict[str, float] | None:
    """Seconds of each step's own work, in ``steps`` order, for the steps that ran: ``(name, None)`` reads
    the ``<name>_ms`` counter (``transforms.progress.count_time``; ``search_ms``, ``write_ms``), and
    ``(name, label)`` sums RunInference's own batch latency in the step labelled ``label``. Summed over
    threads and workers; None where the runner keeps no metrics."""
    if counts is None:
        return None
    latency: dict[str, int] = {}
    for d in result.metrics().query()["distributions"]:
        value = d.committed or d.attempted
        if d.key.metric.name.endswith(INFERENCE_LATENCY) and value:
            for part in d.key.step.split("/"):
                latency[part] = latency.get(part, 0) + value.sum
    out: dict[str, float] = {}
    for name, label in steps:
        if label is None and f"{name}_ms" in counts:
            out[name] = round(counts[f"{name}_ms"] / 1000, 2)
        elif label is not None and label in latency:
            out[name] = round(latency[label] / 1e6, 2)
    return out


def describe_steps(seconds: dict[str, float]) -> str:
    """``chunk 5.3s, embed 22.1s, upsert 3.0s`` (``step_seconds``): summed over threads and workers, so with
    parallel workers they can add up to more than the job's wall time; what they leave of it is reading, Beam
    and loading."""
    return ", ".join(f"{step} {value:.1f}s" for step, value in seconds.items()) + "  (summed over workers)"


def describe_precision(setting: str, computed: dict[str, int] | None) -> str:
    """A setting (``--precision``, ``--packing``) and what the workers ran under it, for a summary line:
    ``auto -> bf16-mixed (350927 tokens)``; with several, each with its tokens."""
    if computed is None:
        return f"{setting} (counters unavailable)"
    if not computed:
        return f"{setting} (nothing run)"
    return f"{setting} -> " + ", ".join(f"{name} ({tokens} tokens)" for name, tokens in computed.items())


def describe_copies(summary: dict[str, Any]) -> str:
    """The summary line of ``--share-model`` where it resolved to copies per machine, not per process."""
    why = " (auto: a GPU, several worker processes)" if summary.get("share_model") == "auto" else ""
    return f"one per GPU of each worker machine (one on CPU), shared by its processes{why}"


def write_json(path: str, obj: Any) -> None:
    with FileSystems.create(path) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


def check_output_locations(outputs: dict[str, str | None], options: PipelineOptions | None = None,
                           folders: Sequence[str] = ()) -> None:
    """Refuse (``PreflightError``) an output the job could not write, before the job: a ``gs://`` path whose
    bucket does not exist, or a local one under a file. Otherwise the job would run to its end (hours of
    embedding or scoring) and fail only when it writes there, with the storage client's bare 404 (or
    Dataflow's staging retry for ten minutes). ``outputs``: flag -> path; ``folders``: the flags whose path is a
    folder (label's ``--out``). Other schemes are left to the job."""
    for flag, path in outputs.items():
        if not path:
            continue
        if path.startswith("gs://"):
            _check_bucket(flag, path, options)
        elif "://" not in path:
            _check_local_parent(flag, path, folder=flag in folders)


def _check_bucket(flag: str, path: str, options: PipelineOptions | None) -> None:
    from apache_beam.io.gcp.gcsio import GcsIO

    bucket = path[len("gs://"):].split("/", 1)[0]
    if not bucket:
        raise PreflightError(f"{flag} {path}: no bucket named; give gs://BUCKET/PATH")
    try:
        found = GcsIO(pipeline_options=options).get_bucket(bucket) is not None
    except Exception as exc:  # noqa: BLE001
        # Not a refusal: writing objects does not need storage.buckets.get (roles/storage.objectAdmin
        # lacks it), so a job that cannot look at the bucket may still write into it.
        _LOG.warning("%s %s: could not check bucket gs://%s (%s); going on", flag, path, bucket, first_line(exc))
        return
    if not found:
        raise PreflightError(f"{flag} {path}: bucket gs://{bucket} does not exist; create it or write elsewhere")


def _check_local_parent(flag: str, path: str, *, folder: bool) -> None:
    if os.path.isdir(path) and not folder:
        raise PreflightError(f"{flag} {path} is a folder; give a file path")
    part = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(part) and os.path.dirname(part) != part:  # the nearest existing folder up
        part = os.path.dirname(part)
    if not os.path.isdir(part):
        todo = "give a folder (local or gs://)" if folder else f"write {flag} elsewhere"
        raise PreflightError(f"{flag} {path}: {part} is a file, not a folder; {todo}")


def check_local_device(options: PipelineOptions, device: str) -> None:
    """Fail before the job starts when a local run asks for a device this machine lacks.

    Only for runners that execute here (DirectRunner, the default): a Dataflow or Flink
    driver rarely has the workers' GPU, so there the workers check it when they load the model.
    """
    from apache_beam.options.pipeline_options import StandardOptions

    from transforms.models.devices import resolve_device

    runner = options.view_as(StandardOptions).runner
    if runner is None or str(runner).lower() in ("directrunner", "direct", "prismrunner", "prism"):
        resolve_device(device)


def direct_runner_mode(options: PipelineOptions) -> str | None:
    """DirectRunner's ``--direct_running_mode`` (``in_memory`` by default) when the job runs on DirectRunner (the
    default runner), else None."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    runner = options.view_as(StandardOptions).runner
    if runner is not None and str(runner).lower() not in ("directrunner", "direct"):
        return None
    return options.view_as(DirectOptions).direct_running_mode or "in_memory"


def worker_cpu_threads(options: PipelineOptions, flag: int | None = None) -> int | None:
    """Torch's CPU threads in each worker process, or None to leave torch's default.

    ``--cpu-threads`` when given. Otherwise, when DirectRunner runs W workers on this machine
    (``--direct_running_mode multi_processing`` or ``multi_threading``, W = ``--direct_num_workers``,
    0 meaning one per core as Beam reads it), the machine's cores divided among them: each
    worker would otherwise start one thread per core, W times the cores in all, and OpenMP
    threads that wait at every op's barrier spin against each other (two workers scoring at once
    on 2 cores: 13-20% fewer pairs/s, BENCHMARKS.md "Torch threads per worker process"). None on other runners (their workers are on other
    machines) and when ``OMP_NUM_THREADS`` is set (the user has chosen).
    """
    from apache_beam.options.pipeline_options import DirectOptions

    if flag:
        return flag
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    if direct_runner_mode(options) not in ("multi_processing", "multi_threading"):
        return None
    direct = options.view_as(DirectOptions)
    workers = direct.direct_num_workers if direct.direct_num_workers != 0 else (os.cpu_count() or 1)
    if not workers or workers <= 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // workers)
    _LOG.info("%d DirectRunner workers share %d cores: torch runs %d thread(s) in each (--cpu-threads to change)",
              workers, cores, threads)  # fmt: skip
    return threads


def several_worker_processes(options: PipelineOptions) -> bool:
    """Whether the job's workers may run several SDK processes on one machine: on every runner (Dataflow starts
    one per vCPU, a worker pool one per task slot) but DirectRunner in one process (``in_memory``,
    ``multi_threading``, or ``multi_processing`` with one worker). ``--share-model auto`` shares a GPU model
    only where this holds: in one process there is nothing to share, and the proxy costs a little."""
    from apache_beam.options.pipeline_options import DirectOptions

    mode = direct_runner_mode(options)
    return mode is None or (mode == "multi_processing" and options.view_as(DirectOptions).direct_num_workers != 1)


def check_runner(options: PipelineOptions) -> None:
    """A ``--runner`` that Beam does not know is a usage error (status 2), with the nearest name when one is
    close; Beam would raise it from its runners' package, which reads as a job that started and failed (1).
    Names are Beam's (case-insensitive, ``Runner`` optional, as it reads them); a dotted name is a runner class
    Beam imports itself."""
    import difflib

    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner
    if not isinstance(runner, str) or "." in runner:
        return
    known = {name.lower(): name for name in StandardOptions.KNOWN_RUNNER_NAMES}
    if runner.lower() in known or runner.lower() + "runner" in known:
        return
    close = difflib.get_close_matches(runner.lower(), known, n=1, cutoff=0.75)
    hint = f" (did you mean {known[close[0]]}?)" if close else ""
    raise UsageError(
        f"--runner {runner}: unknown runner{hint}; Beam's runners: {', '.join(StandardOptions.KNOWN_RUNNER_NAMES)}, "
        "or the module path of a runner class"
    )


def start_pipeline(test_pipeline: Any, beam_args: list[str] | None, device: str):
    """The job's pipeline (the injected one in tests), with the driver set up to use its options.

    The driver's own file access (column checks, ``gs://`` listing) uses the job's options,
    e.g. GCS credentials; a local run asking for a missing device fails here, before any work.
    """
    import apache_beam as beam

    p = test_pipeline
    if p is None:
        options = beam_options(beam_args or [])
        check_runner(options)
        p = beam.Pipeline(options=options)
    FileSystems.set_options(p.options)
    check_local_device(p.options, device)
    return p


def run_job(
    args: argparse.Namespace,
    beam_args: list[str],
    test_pipeline: Any,
    *,
    to_config: Callable[[argparse.Namespace], Any],
    run_config: Callable[[Any, list[str], Any], Any],
) -> Any:
    """The skeleton of both jobs: logging, flags → config (a bad value is a ``UsageError``),
    then ``run_config(config, beam_args, test_pipeline)``: checks, the job, the summary."""
    setup_logging(args.verbose)
    try:
        config = to_config(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return run_config(config, beam_args, test_pipeline)


def run_and_wait(p: Any, timeout_s: float | None = None) -> tuple[Any, dict[str, int]]:
    """Run the pipeline to the end; the result and its counters (``counters``). Never forever:
    ``--job-timeout`` and a lost local worker end the wait (``pipelines.runner``)."""
    from pipelines.runner import run_pipeline

    result = run_pipeline(p, timeout_s)
    return result, counters(result)


def ended_early(exc: BaseException) -> dict[str, Any]:
    """The ``--summary-out`` fields of a started job that did not finish: ``interrupted`` (Ctrl-C, status 130),
    else ``failed`` with its error (credentials in a URL redacted)."""
    if interrupted(exc):
        return {"status": "interrupted"}
    return {"status": "failed", "error": redact_text(first_line(exc))}


def publish_summary(summary: dict[str, Any], text: str, summary_out: str | None) -> None:
    """The run summary: printed for people, and written as JSON to ``--summary-out`` when given."""
    print(text, flush=True)
    if summary_out:
        write_json(summary_out, summary)

"""The jobs on two multi-process modes, and killed mid-job.

Modes, both on the embedded store (``--qdrant-path``), both with 2 SDK worker processes:

- ``multi_processing``: DirectRunner ``--direct_running_mode=multi_processing``; the workers are
  children of the driver.
- ``portable``: ``--runner PortableRunner`` against Beam's Python job service
  (``tests/portable_job_service.py``) with ``--environment_type EXTERNAL`` and a worker pool
  (``worker_pool_main``) that starts the workers: the path of Flink and Dataflow Runner v2, where
  the pipeline travels as a Runner API proto and the workers import the project.

On each: the index job (with an HNSW build; on ``multi_processing``, an in-process job writes
another collection of the same folder meanwhile), a rerun that embeds nothing, and the label job
with candidates from that index. The results equal the in-process run's (point ids and payloads, vectors within 1e-6, label
files byte for byte), and each worker process loads each model once (``transforms.hooks``), with
every bundle run twice (``--direct_runner_bundle_repeat=1``: more bundles than workers, and
every write replayed).

Crashes, run together on copies of the v1 index, each a v2 reindex with ``--delete-missing
--alias`` (a shorter document leaves stale chunks, one is gone, one is new): the whole job killed
(kill -9 of its process group) while embedding, while writing and before finishing; one SDK worker
killed while writing, on each mode; a hung worker, bounded by ``--job-timeout`` (started first,
the others during its wait). After each, a rerun gives exactly a clean v2 run's collection and alias.

Every process runs in its own process group, killed when the test leaves (``tests/processes.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from pipelines import dump, index, label
from tests.processes import free_port, kill_group, started, wait_for_file
from tests.stores import copy_store
from transforms.hooks import ENV as HOOKS_ENV
from transforms.hooks import PAUSE_AT_FILE, PAUSED_FILE
from transforms.inference.handlers import LOAD_LOG_ENV
from transforms.io.edge_store import EdgeStore

pytestmark = pytest.mark.slow

V1_DOCS = ("bisect", "calendar", "collections", "contextlib", "copy", "csv", "dataclasses", "datetime")
TEXT_CHARS = 1100
JOB_TIMEOUT_S = 420  # every job's own bound (--job-timeout): none can hang past it
WAIT_S = 480  # the tests' bound on any wait; the process groups are killed after it
LOST_WORKER = re.compile(
    r"corpus-etl index: error: the job failed: an SDK worker process was lost mid-job \((Beam: Channel closed "
    r"prematurely|Beam: Worker subprocess exited with return code -?[0-9]+|process [0-9, ]+ ended)\): killed, or out of memory\? Rerun the job: its writes are idempotent"
)
# No OMP_NUM_THREADS: with multi_processing the job divides the cores among its workers itself
# (pipelines.common.worker_cpu_threads, checked below); the portable pool's workers get it from their env.
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
ENV.pop("OMP_NUM_THREADS", None)
ENV.pop(HOOKS_ENV, None)
ENV.pop(LOAD_LOG_ENV, None)
LOADS = "model_loads.txt"  # in the hooks folder: CORPUS_ETL_LOAD_LOG, '<pid> <torch threads> <model>' per load_model
MULTI = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


# -- arguments and results ------------------------------------------------------------------------
def index_args(store: str, corpus: str, model: str, *extra: str, collection: str = "docs") -> list[str]:
    return ["--input", corpus, "--collection", collection, "--model", model, "--qdrant-path", store,
            "--title-column", "title", "--chunk-tokens", "128", "--chunk-overlap", "16", "--device", "cpu",
            *extra]  # fmt: skip


V2_FLAGS = ("--delete-missing", "--alias", "live")


def label_args(store: str, out: Path, queries: str, model: str, reranker: Path) -> list[str]:
    return ["--queries", queries, "--out", str(out), "--reranker", str(reranker), "--collection", "docs",
            "--model", model, "--qdrant-path", store, "--top-k", "5", "--label-thresholds", "0.2,0.35",
            "--eval-fraction", "0.3", "--device", "cpu"]  # fmt: skip


def dumped(store: str, out: Path, collection: str = "docs") -> pa.Table:
    dump.run(["--collection", collection, "--qdrant-path", store, "--out", str(out)])
    return pq.read_table(out)


def assert_same_points(got: pa.Table, want: pa.Table) -> None:
    """Same ids and payloads, vectors within 1e-6 (a batch's neighbours may move the last bits)."""
    assert got.column("id").to_pylist() == want.column("id").to_pylist()
    assert got.drop(["vector"]).equals(want.drop(["vector"]))
    np.testing.assert_allclose(
        np.asarray(got.column("vector").to_pylist()), np.asarray(want.column("vector").to_pylist()), atol=1e-6
    )


def label_files(root: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    files.pop("run_stats.json")  # wall-clock times
    return files


def aliases(store: str) -> dict[str, str]:
    return EdgeStore(store).aliases()


def model_loads(hooks: Path) -> list[tuple[int, str]]:
    return [(pid, model) for pid, _, model in model_loads_with_threads(hooks)]


def model_loads_with_threads(hooks: Path) -> list[tuple[int, int, str]]:
    with contextlib.suppress(FileNotFoundError):
        lines = (line.split(" ", 2) for line in (hooks / LOADS).read_text().splitlines())
        return [(int(pid), int(threads), model) for pid, threads, model in lines]
    return []


def assert_each_model_loaded_once_per_process(
    loads: list[tuple[int, str]], driver: int, models: set[str], optional: set[str] = frozenset()
) -> None:
    """Each (process, model) once; ``models`` loaded, ``optional`` maybe, no other; never by the driver."""
    repeated = {k: n for k, n in Counter(loads).items() if n > 1}
    assert not repeated, f"a worker process loaded a model more than once: {repeated}"
    assert models <= {model for _, model in loads} <= models | optional
    assert driver not in {pid for pid, _ in loads}, "the driver ran a model: the job did not run on the workers"


def hooks_env(hooks: Path) -> dict[str, str]:
    """The environment of a process whose SDK workers (itself included) report to ``hooks``."""
    return {**ENV, HOOKS_ENV: str(hooks), LOAD_LOG_ENV: str(hooks / LOADS)}


class Job:
    """One ``corpus-etl`` command in its own process group (killed on the way out); ``wait()`` is bounded.
    Its output goes to files: a pipe nobody reads while the test does something else could fill and block it."""

    def __init__(self, stack: contextlib.ExitStack, args: list[str], env: dict[str, str]) -> None:
        cmd = [sys.executable, "-m", "pipelines.cli", *args, "--job-timeout", str(JOB_TIMEOUT_S)]
        if "--job-timeout" in args:
            cmd = cmd[:-2]
        self.out, self.err = (stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2))
        self.proc = stack.enter_context(started(cmd, env=env, stdout=self.out, stderr=self.err, text=True))
        self.pid = self.proc.pid

    def wait(self, timeout_s: float = WAIT_S) -> tuple[int, str, str]:
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            pytest.fail(f"{self.proc.args[3:5]} did not end within {timeout_s:.0f}s")
        self.out.seek(0)
        self.err.seek(0)
        return self.proc.returncode, self.out.read(), self.err.read()


def run_job(args: list[str], env: dict[str, str], alongside=None) -> tuple[int, str]:
    """Run a command to the end (and ``alongside()`` here meanwhile); returns (driver pid, stdout)."""
    with contextlib.ExitStack() as stack:
        job = Job(stack, args, env)
        if alongside:
            alongside()
        rc, out, err = job.wait()
    assert rc == 0, f"exit {rc}\n{out[-2000:]}\n{err[-4000:]}"
    return job.pid, out


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample_dir) -> dict[str, str]:
    """v1: 8 documents of real text, cut to ~300 tokens (embedding is most of a job's CPU). v2: one shortened (its stale chunks must go), one edited,
    one gone (``--delete-missing``), one new, four unchanged."""
    tmp = tmp_path_factory.mktemp("corpus")
    rows = {r["id"]: r for r in pq.read_table(sample_dir["corpus"]).to_pylist()}
    v1 = [{**rows[i], "text": rows[i]["text"][:TEXT_CHARS]} for i in V1_DOCS]  # ~3 chunks each
    v2 = [dict(r) for r in v1 if r["id"] != "copy"] + [{**rows["decimal"], "text": rows["decimal"]["text"][:TEXT_CHARS]}]
    v2[0]["text"] = v2[0]["text"][:300]  # bisect: one chunk
    v2[1]["text"] = v2[1]["text"] + " Edited in v2: the calendar module also prints month and year calendars."
    for name, table in (("v1", v1), ("v2", v2)):
        pq.write_table(pa.Table.from_pylist(table), tmp / f"{name}.parquet")
    return {"v1": str(tmp / "v1.parquet"), "v2": str(tmp / "v2.parquet"), "queries": sample_dir["query_log"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, minilm_path, qwen3_reranker_dir) -> dict:
    """The in-process runs (DirectRunner, one process): the v1 index, its dump, the label files."""
    tmp = tmp_path_factory.mktemp("reference")
    store = str(tmp / "store")
    summary = index.run(index_args(store, corpus["v1"], minilm_path), test_pipeline=TestPipeline())
    label.run(label_args(store, tmp / "labels", corpus["queries"], minilm_path, qwen3_reranker_dir),
              test_pipeline=TestPipeline())  # fmt: skip
    return {"store": store, "summary": summary, "dump": dumped(store, tmp / "dump.parquet"),
            "labels": label_files(tmp / "labels")}  # fmt: skip


def _wait_for_port(port: int, procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("localhost", port), timeout=1):
            return
        assert all(p.poll() is None for p in procs), "the worker pool or the job service died at start-up"
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {timeout_s:.0f}s")


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """Beam's Python job service and an EXTERNAL worker pool, one for the module.

    The pool starts each SDK worker as ``python`` from PATH: the venv's bin goes first (or the
    workers die with ``No module named 'apache_beam'``). The workers inherit the pool's
    environment, hooks folder included.
    """
    tmp = tmp_path_factory.mktemp("portable")
    hooks = tmp / "hooks"
    hooks.mkdir()
    pool_port, port_file = free_port(), tmp / "job_service.port"
    # A pool's workers are not the job's to size: one torch thread each, as the README says to start a pool.
    pool_env = {**hooks_env(hooks), "PATH": os.path.dirname(sys.executable) + os.pathsep + ENV.get("PATH", ""),
                "OMP_NUM_THREADS": "1"}  # fmt: skip
    with contextlib.ExitStack() as stack:
        pool_log = stack.enter_context(open(tmp / "pool.log", "w"))
        pool = stack.enter_context(started(
            [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={pool_port}"],
            env=pool_env, stdout=pool_log, stderr=subprocess.STDOUT,
        ))  # fmt: skip
        service_log = stack.enter_context(open(tmp / "job_service.log", "w"))
        service = stack.enter_context(started(
            [sys.executable, "-m", "tests.portable_job_service", "--port_file", str(port_file)],
            env=ENV, stdout=service_log, stderr=subprocess.STDOUT,
        ))  # fmt: skip
        port = int(wait_for_file(str(port_file), [pool, service], 120, "job service start-up"))
        _wait_for_port(pool_port, [pool, service], 120)
        yield {
            "args": ["--runner=PortableRunner", f"--job_endpoint=localhost:{port}", "--environment_type=EXTERNAL",
                     f"--environment_config=localhost:{pool_port}", "--direct_num_workers=2"],
            "hooks": hooks,
            "pool_log": tmp / "pool.log",
        }  # fmt: skip


def _mode(name: str, request, tmp_path: Path) -> tuple[list[str], dict[str, str], Path]:
    """(runner flags, the driver's environment, the workers' hooks folder) of a mode."""
    if name == "portable":
        service = request.getfixturevalue("portable")
        return service["args"], ENV, service["hooks"]
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    return MULTI, hooks_env(hooks), hooks


def _workers_started(request, name: str) -> int:
    if name != "portable":
        return 0
    return request.getfixturevalue("portable")["pool_log"].read_text().count("Starting worker with command")


# -- the jobs on both modes ---------------------------------------------------------------------
# On portable (the path of Dataflow and Flink) the index and label jobs run with ``--share-model machine``, the
# default where the model steps run on a GPU: each model is loaded by one process and the other worker sends it
# its batches (RunInference's ``large_model``). On multi_processing they run with one copy per process (the CPU
# default); tests/test_embed.py shares one model across two processes at the handler too.
@pytest.mark.parametrize("mode", ["multi_processing", "portable"])
def test_index_rerun_and_label_equal_the_in_process_run(
    mode, request, tmp_path, corpus, reference, minilm_path, qwen3_reranker_dir
):
    runner, env, hooks = _mode(mode, request, tmp_path)
    store = str(tmp_path / "store")
    machine = ["--share-model", "machine"] if mode == "portable" else []

    def job(args: list[str], models: set[str], optional: set[str] = frozenset(), alongside=None) -> tuple[dict, str]:
        loaded, workers = len(model_loads(hooks)), _workers_started(request, mode)
        summary_out = tmp_path / f"summary-{loaded}-{time.monotonic_ns()}.json"
        driver, out = run_job([*args, *runner, "--summary-out", str(summary_out)], env, alongside)
        loads = model_loads(hooks)[loaded:]
        assert_each_model_loaded_once_per_process(loads, driver, models, optional)
        if "machine" in args:  # one process of the two loaded each model
            assert sorted(model for _, model in loads) == sorted(models)
        # 2 workers on this machine: each gets its share of the cores (multi_processing: the job's choice;
        # portable: the pool's OMP_NUM_THREADS=1), never one thread per core each.
        share = max(1, len(os.sched_getaffinity(0)) // 2) if mode == "multi_processing" else 1
        assert {threads for _, threads, _ in model_loads_with_threads(hooks)[loaded:]} <= {share}
        if mode == "portable":
            assert _workers_started(request, mode) - workers == 2  # the pool started 2 SDK workers for the job
        summary = json.loads(summary_out.read_text())
        assert summary["model_copies"] == ("machine" if "machine" in args else "process")
        return summary, out

    # Every bundle twice: each worker runs several bundles per model, and replays every write. With
    # multi_processing, an in-process job writes another collection of the same folder meanwhile.
    def in_process() -> None:
        args = index_args(store, corpus["v1"], minilm_path, collection="single")
        index.run(args, test_pipeline=TestPipeline())

    hnsw = ["--hnsw", "--hnsw-m", "8", "--hnsw-ef-construct", "32"]
    first, out = job(["index", *index_args(store, corpus["v1"], minilm_path), "--direct_runner_bundle_repeat=1",
                      *hnsw, *machine], {minilm_path}, alongside=in_process if mode == "multi_processing" else None)  # fmt: skip
    want = reference["summary"]
    assert first["status"] == "ok"
    assert first["chunks_embedded"] == want["chunks_embedded"] == first["points_in_collection"] > len(V1_DOCS)
    assert _counts(first) == _counts(want)
    assert first["hnsw"]["m"] == 8 and first["hnsw"]["indexed_vectors"] == first["points_in_collection"]
    assert EdgeStore(store).meta("docs").hnsw == {"m": 8, "ef_construct": 32}
    assert_same_points(dumped(store, tmp_path / "first.parquet"), reference["dump"])
    if mode == "multi_processing":
        assert_same_points(dumped(store, tmp_path / "single.parquet", "single"), reference["dump"])
    else:
        assert (first["share_model"], first["model_copies"]) == ("machine", "machine")
        assert "model copies     one per GPU of each worker machine (one on CPU), shared by its processes\n" in out

    again, _ = job(["index", *index_args(store, corpus["v1"], minilm_path)], set(), {minilm_path})  # nothing to embed
    assert again["chunks_embedded"] == 0 and again["documents_unchanged"] == len(V1_DOCS)
    assert again["chunks_reused"] == again["points_in_collection"] == first["points_in_collection"]
    assert_same_points(dumped(store, tmp_path / "again.parquet"), reference["dump"])

    out = tmp_path / "labels"
    labelled, _ = job(["label", *label_args(store, out, corpus["queries"], minilm_path, qwen3_reranker_dir), *machine],
                      {minilm_path, str(qwen3_reranker_dir)})  # fmt: skip
    assert labelled["status"] == "ok" and labelled["pairs_scored"] > 0
    got = label_files(out)
    assert sorted(got) == sorted(reference["labels"])
    assert [name for name in got if got[name] != reference["labels"][name]] == []


# -- crashes --------------------------------------------------------------------------------------
# --job-timeout of the job whose worker hangs. It starts first and alone: the others start once one of
# its workers has reached the pause (30 s was not enough, once in CI, with all of them starting at once),
# and they run within its wait
HUNG_TIMEOUT_S = 90
CRASHES = {  # name: (runner, where the job pauses, what is then killed); the hung job first
    # a worker that never answers: --job-timeout ends the job, its workers with it
    "worker-hung-until-job-timeout": ("multi_processing", "embed", "nothing"),
    "job-killed-while-embedding": ("in_process", "embed", "job"),
    "job-killed-while-writing": ("multi_processing", "write", "job"),
    "job-killed-before-finishing": ("in_process", "finish", "job"),
    # Beam's FnApiRunner waits forever for a bundle whose input it has sent: the driver notices
    # that its worker process died (pipelines.runner)
    "worker-killed-while-writing": ("multi_processing", "write", "worker"),
    # the job service notices (the worker's output stream breaks), and the driver says why
    "portable-worker-killed-while-embedding": ("portable", "embed", "worker"),
}


def _live_in_group(pgid: int) -> list[str]:
    """The processes of group ``pgid`` that still run (zombies left to a container's init do not count)."""
    live = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            state, _, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                live.append(f"{entry} {stat[stat.index('(') : stat.rindex(')') + 1]}")
    return live


def _crash(name: str, job: Job, hooks: Path, started_at: float) -> dict:
    """Wait for the job to pause, kill what ``CRASHES`` says; what happened, for the test to check."""
    _, _, kill = CRASHES[name]
    if kill == "nothing":  # the job's own --job-timeout must end it (the fixture saw a worker reach the pause)
        rc, out, err = job.wait()
        return {"rc": rc, "err": err, "elapsed_s": time.monotonic() - started_at, "left": _live_in_group(job.pid)}
    pid = int(wait_for_file(str(hooks / PAUSED_FILE), [job.proc], WAIT_S, name).split("\t")[1].split()[0])
    if kill == "job":
        kill_group(job.proc)  # kill -9 of the driver and its SDK workers
        return {"rc": None}
    os.kill(pid, signal.SIGKILL)  # one SDK worker, mid-write
    killed_at = time.monotonic()
    rc, out, err = job.wait(120)
    elapsed = time.monotonic() - killed_at
    kill_group(job.proc)
    return {"rc": rc, "err": err, "elapsed_s": elapsed}


@pytest.fixture(scope="module")
def crashes(tmp_path_factory, request, corpus, reference, minilm_path) -> dict:
    """Every case of ``CRASHES`` started at once, each on its own copy of the v1 index, and
    crashed; plus a clean v2 run (in process) to compare the reruns with."""
    tmp = tmp_path_factory.mktemp("crashes")
    clean = str(tmp / "clean")
    copy_store(reference["store"], clean)
    index.run(index_args(clean, corpus["v2"], minilm_path, *V2_FLAGS), test_pipeline=TestPipeline())
    runs: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        jobs = {}
        for name, (runner, moment, _) in CRASHES.items():
            store, summary = str(tmp / name / "store"), tmp / name / "summary.json"
            (tmp / name).mkdir()
            copy_store(reference["store"], store)
            hooks = tmp / name / "hooks"
            flags, env = [], hooks_env(hooks)
            if runner == "portable":
                service = request.getfixturevalue("portable")
                hooks, flags, env = service["hooks"], service["args"], ENV
            elif runner == "multi_processing":
                flags = MULTI
            hooks.mkdir(exist_ok=True)
            (hooks / PAUSED_FILE).unlink(missing_ok=True)
            (hooks / PAUSE_AT_FILE).write_text(moment)
            timeout = HUNG_TIMEOUT_S if CRASHES[name][2] == "nothing" else JOB_TIMEOUT_S
            args = ["index", *index_args(store, corpus["v2"], minilm_path, *V2_FLAGS), *flags,
                    "--summary-out", str(summary), "--job-timeout", str(timeout)]  # fmt: skip
            jobs[name] = (Job(stack, args, env), hooks, time.monotonic(), store, summary)
            if CRASHES[name][2] == "nothing":  # the hung job: a worker at the pause before the others load the cores
                wait_for_file(str(hooks / PAUSED_FILE), [jobs[name][0].proc], HUNG_TIMEOUT_S,
                              "no worker reached the model before --job-timeout: nothing hung, the job was slow")  # fmt: skip
        try:
            for name, (job, hooks, started_at, store, summary) in jobs.items():
                runs[name] = {**_crash(name, job, hooks, started_at), "store": store, "summary": summary}
        finally:
            for _, hooks, *_ in jobs.values():
                (hooks / PAUSE_AT_FILE).unlink(missing_ok=True)
    return {"runs": runs, "clean": dumped(clean, tmp / "clean.parquet"), "aliases": aliases(clean)}


@pytest.mark.parametrize("case", list(CRASHES))
def test_a_crashed_reindex_then_a_rerun_equals_a_clean_run(case, crashes, corpus, reference, minilm_path, tmp_path):
    run, (runner, moment, kill) = crashes["runs"][case], CRASHES[case]
    store = run["store"]
    partial = dumped(store, tmp_path / "partial.parquet")  # every shard opens after the crash
    assert aliases(store) == {}  # a crashed job switches no alias
    docs = set(partial.column("doc_id").to_pylist())
    if moment == "embed":  # nothing written yet: v1's points, less maybe the shortened document's stale chunks
        kept = len([d for d in crashes["clean"].column("doc_id").to_pylist() if d == "bisect"])
        stale = (pc.field("doc_id") == "bisect") & (pc.field("chunk_index") >= kept)
        if runner == "in_process":  # one bundle: SkipUnchanged deletes them before its chunks reach the model
            assert_same_points(partial, reference["dump"].filter(~stale))
            assert partial.num_rows < reference["dump"].num_rows
        else:  # the bundle with that document may be another worker's, not yet at its lookup when the job ended
            kept_ids = partial.column("id")
            assert set(reference["dump"].filter(~pc.field("id").isin(kept_ids)).column("id").to_pylist()) <= set(
                reference["dump"].filter(stale).column("id").to_pylist()
            ), "a point other than a stale chunk is gone"
            assert_same_points(partial, reference["dump"].filter(pc.field("id").isin(kept_ids)))
    elif moment == "write":  # some written; deletions come after the writes
        assert "copy" in docs
    else:  # every write done; --delete-missing not yet
        assert docs - set(crashes["clean"].column("doc_id").to_pylist()) == {"copy"}
        assert_same_points(partial.filter(pc.field("doc_id") != "copy"), crashes["clean"])
    if kill == "worker":  # the job fails (within _crash's bounded wait, not at a hang), and says why
        assert run["rc"] == 1, run
        assert LOST_WORKER.fullmatch(run["err"].strip().splitlines()[-1]), run["err"][-3000:]
        assert json.loads(Path(run["summary"]).read_text())["status"] == "failed"
    elif kill == "nothing":  # the job's --job-timeout ended it, and its workers with it
        assert run["rc"] == 1, run
        last = run["err"].strip().splitlines()[-1]
        assert last.startswith(f"corpus-etl index: error: the job did not finish within --job-timeout {HUNG_TIMEOUT_S}s")
        assert last.endswith("; rerun it: its writes are idempotent")
        assert run["left"] == [], "a worker outlived the job's --job-timeout"

    summary = index.run(index_args(store, corpus["v2"], minilm_path, *V2_FLAGS), test_pipeline=TestPipeline())
    assert summary["status"] == "ok" and summary["deletion"]["documents_deleted"] == (0 if "copy" not in docs else 1)
    assert_same_points(dumped(store, tmp_path / "rerun.parquet"), crashes["clean"])
    assert aliases(store) == crashes["aliases"] == {"live": "docs"}


def _counts(summary: dict) -> dict[str, int]:
    """A summary's counters without the ``<step>_ms`` times, which differ from run to run."""
    return {k: v for k, v in summary["counters"].items() if not k.endswith("_ms")}

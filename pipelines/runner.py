"""Run a job and wait for it, never forever: ``--job-timeout``, a lost local worker, a runner's failure in one line.

    result = run_pipeline(p, timeout_s)   # p.run() + wait_until_finish(), or JobAbandoned

Why: an SDK worker process that dies under a bundle whose input the runner has already sent
(kill -9, the out-of-memory killer) leaves Beam 2.77's ``FnApiRunner`` (DirectRunner
``multi_processing``, and Beam's Python job service) waiting for the bundle's answer forever;
a worker that dies while the runner still streams to it fails the job at once
(``Channel closed prematurely``, translated in ``pipelines.errors``). So:

- with ``multi_processing``, this driver starts the SDK workers itself: a worker process that
  exits with an error status (Beam's thread for it raises, and nobody hears it) fails the job
  within a second; as a fallback, their processes are watched (``/proc``), and one that
  disappears while the job goes on past ``END_GRACE_S`` fails it too;
- with ``timeout_s`` (``--job-timeout``), on any runner, the job fails when the time is up.

Either way the job is cancelled where the runner can, the local workers are killed (and waited
for, up to ``STOP_WAIT_S``, so that none outlives the command), and ``JobAbandoned`` is raised;
``corpus-etl`` then exits at once (``os._exit``), as Beam's own threads may never end. Ctrl-C
while such a job runs does the same and raises ``JobInterrupted`` (status 130). The
``multi_processing`` workers ignore SIGINT (``_workers_ignore_interrupts``): a terminal's Ctrl-C
goes to the whole process group, and each worker would print its own KeyboardInterrupt
traceback and run on, busy, until its bundle ended; the driver stops them instead. The job
runs in a daemon thread only in those cases (DirectRunner's ``p.run()`` blocks until the end; a
portable runner's returns and ``wait_until_finish`` blocks); otherwise, as before, in the caller's
thread.

A portable job service (Flink, Beam's Python job service) reports a failure as
``Pipeline job-... failed in state FAILED: <last error message>``, where the last message is
often a bare ``Error running pipeline.``; the cause is the last line of the traceback the
service sent, which is what the error then says.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any

from pipelines.errors import JobAbandoned, JobInterrupted, first_line, worker_lost

_LOG = logging.getLogger(__name__)
POLL_S = 0.5
END_GRACE_S = 15.0  # a job that ends stops its workers first: how long a vanished worker may precede the end
STOP_WAIT_S = 30.0  # how long a stopped job waits for the workers it killed to end
_WORKER_MARK = b"sdk_worker"  # in the command line of DirectRunner's SDK worker processes (and their shell)


def run_pipeline(p: Any, timeout_s: float | None = None) -> Any:
    """``p.run()`` and wait for the end; ``JobAbandoned`` after ``timeout_s`` seconds (None: no
    bound) or when a local SDK worker process is lost."""
    watch_workers = _local_worker_processes(p.options)
    if not timeout_s and not watch_workers:
        result = p.run()
        _wait(result)
        return result
    if watch_workers:
        _workers_ignore_interrupts()
    box: dict[str, Any] = {}

    def job() -> None:
        try:
            box["result"] = p.run()
            _wait(box["result"])
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=job, name="corpus-etl-job", daemon=True)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    killing = threading.Event()  # set once this run cancels its job and kills its workers
    with _worker_exits(killing) as exits:
        thread.start()
        try:
            _watch(thread, box, timeout_s, deadline, watch_workers, exits, killing)
        except KeyboardInterrupt:  # Ctrl-C: the job runs on in its thread and workers unless stopped
            stopped = _stop(box.get("result"), killing)
            raise JobInterrupted(f"interrupted; {stopped} local worker process(es) killed") from None
    if "error" in box:
        raise box["error"]
    return box["result"]


def _watch(
    thread: threading.Thread, box: dict[str, Any], timeout_s: float | None, deadline: float | None,
    watch_workers: bool, exits: list[str], killing: threading.Event,
) -> None:  # fmt: skip
    seen: set[int] = set()
    while thread.is_alive():
        thread.join(POLL_S)
        if not thread.is_alive():
            break
        if exits:  # Beam's thread for a worker process saw it exit with an error status
            thread.join(POLL_S)
            if thread.is_alive():
                _stop(box.get("result"), killing)
                raise JobAbandoned(worker_lost(f"Beam: {exits[0]}"))
        if deadline is not None and time.monotonic() >= deadline:
            stopped = _stop(box.get("result"), killing)
            raise JobAbandoned(
                f"the job did not finish within --job-timeout {timeout_s:g}s (a hung or lost worker?); it was "
                f"cancelled{f' and its {stopped} local worker process(es) killed' if stopped else ''}; "
                "rerun it: its writes are idempotent"
            )
        if watch_workers:
            alive = set(worker_processes(os.getpid()))
            lost = sorted(seen - alive)
            seen |= alive
            if lost:
                thread.join(END_GRACE_S)
                if thread.is_alive():
                    _stop(box.get("result"), killing)
                    raise JobAbandoned(worker_lost(f"process {', '.join(map(str, lost))} ended"))


@contextlib.contextmanager
def _worker_exits(killing: threading.Event):
    """The ``Worker subprocess exited with return code N`` errors that DirectRunner's worker threads
    raise (and nobody else sees) while the block runs; other thread errors go on to the usual hook."""
    exits: list[str] = []
    previous = threading.excepthook

    def hook(args: Any) -> None:
        if killing.is_set():
            # A consequence of our own cancel and kills (a worker's exit, Beam's control stream
            # closing under it): the job's one error line says so already.
            _LOG.debug("after the job was stopped, thread %s: %s", getattr(args.thread, "name", "?"),
                       first_line(args.exc_value))
            return
        if isinstance(args.exc_value, RuntimeError) and "Worker subprocess exited" in str(args.exc_value):
            exits.append(first_line(args.exc_value))
        previous(args)

    threading.excepthook = hook
    try:
        yield exits
    finally:
        # After _stop, Beam's worker threads notice the kills late, some after this block: keep
        # the hook so their tracebacks do not follow the job's one-line error on stderr.
        if not killing.is_set():
            threading.excepthook = previous


# A shell prefix for DirectRunner's worker command line (run with ``sh -c``): SIGINT ignored, which the
# Python that ``exec`` starts keeps (it installs its KeyboardInterrupt handler only where SIGINT is not ignored).
IGNORE_SIGINT = "trap '' INT; exec "


def _workers_ignore_interrupts() -> None:
    """Start DirectRunner's ``multi_processing`` SDK workers with SIGINT ignored (once per process).

    Ctrl-C in a terminal reaches the whole foreground process group, the workers too: each printed
    a KeyboardInterrupt traceback after the command's one line, and ran on (busy, holding its model)
    until its bundle ended. The driver alone answers Ctrl-C: it kills them (``run_pipeline``).
    SIGTERM and SIGKILL still reach them with the group."""
    from apache_beam.runners.portability import local_job_service

    worker = local_job_service.SubprocessSdkWorker
    if getattr(worker, "corpus_etl_ignores_sigint", False):
        return

    class SubprocessSdkWorker(worker):  # type: ignore[misc, valid-type]
        corpus_etl_ignores_sigint = True

        def __init__(self, worker_command_line: bytes, *args: Any, **kwargs: Any) -> None:
            super().__init__(worker_command_line, *args, **kwargs)
            if not self._worker_command_line.startswith(IGNORE_SIGINT):
                self._worker_command_line = IGNORE_SIGINT + self._worker_command_line

    local_job_service.SubprocessSdkWorker = SubprocessSdkWorker


def _local_worker_processes(options: Any) -> bool:
    """Whether the job's SDK workers are this driver's children (DirectRunner ``multi_processing``)."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    runner = str(options.view_as(StandardOptions).runner or "DirectRunner").lower()
    mode = options.view_as(DirectOptions).direct_running_mode
    return runner in ("directrunner", "direct") and mode == "multi_processing"


def _wait(result: Any) -> None:
    try:
        result.wait_until_finish()
    except Exception as exc:
        cause = _job_service_cause(result)
        if cause and cause not in first_line(exc):
            raise RuntimeError(f"{cause} (the job service: {first_line(exc)})") from exc
        raise


def _job_service_cause(result: Any) -> str | None:
    """The last line of the last traceback among a portable job's error messages, if any."""
    texts = []
    for message in getattr(result, "_messages", None) or ():
        with contextlib.suppress(Exception):
            if message.HasField("message_response"):
                texts.append(message.message_response.message_text)
    for text in reversed(texts):
        if "Traceback (most recent call last)" in text:
            lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
            return lines[-1] if lines else None
    return None


def _stop(result: Any, killing: threading.Event) -> int:
    """Cancel the job (where the runner can) and kill this process's descendants; how many were killed."""
    killing.set()
    # Beam's threads log the kills they meet (ERROR "Failed to read inputs in the data plane", with a traceback)
    # before the command's one line; the command silences logging once it has written that line.
    beam = logging.getLogger("apache_beam")
    level = beam.level
    beam.setLevel(logging.CRITICAL + 1)
    try:
        if result is not None:
            with contextlib.suppress(Exception):
                result.cancel()
        killed = []
        for pid in _descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        _wait_ended(killed, STOP_WAIT_S)
    finally:
        beam.setLevel(level)
    return len(killed)


def _wait_ended(pids: list[int], timeout_s: float) -> None:
    """Return once every process of ``pids`` has ended (a zombie has), or after ``timeout_s``.

    A killed worker takes a while to give back its memory (seconds for a large model on a busy
    machine); the command returns after that, so a rerun started at once does not meet it."""
    deadline = time.monotonic() + timeout_s
    while (pids := [pid for pid in pids if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)


def _running(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _stat(pid: int | str) -> tuple[str, int] | None:
    """(state, parent pid) of a process from ``/proc/<pid>/stat``; None once it is gone (or without ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
    return state, int(ppid)


def worker_processes(pid: int) -> list[int]:
    """The live SDK worker processes below ``pid`` (zombies excluded)."""
    out = []
    for child in _descendants(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if _WORKER_MARK in cmdline:  # a zombie's command line is empty
            out.append(child)
    return out


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from ``/proc`` (empty where there is no ``/proc``)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            stat = _stat(entry) if entry.isdigit() else None
            if stat is not None:
                children.setdefault(stat[1], []).append(int(entry))
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop(0)
        out.append(child)
        todo.extend(children.get(child, []))
    return out

"""``pipelines.runner.run_pipeline`` without Beam jobs: the timeout, a lost local worker, a job service's cause.

The same paths on real jobs (DirectRunner ``multi_processing``, the portable job service) are in
``tests/test_runners.py``; these take a second.
"""

from __future__ import annotations

import os
import threading

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_job_api_pb2

from pipelines import runner
from pipelines.errors import JobAbandoned, JobFailed, JobInterrupted, translate, worker_lost

MULTI = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


class FakeResult:
    """A job that never ends by itself (``release`` ends it), as a hung runner's result."""

    def __init__(self, on_wait=None, error: Exception | None = None, messages=()) -> None:
        self.release = threading.Event()
        self.cancelled = False
        self.on_wait, self.error, self._messages = on_wait, error, list(messages)

    def wait_until_finish(self, duration=None):
        if self.on_wait:
            self.on_wait()
        if self.error:
            raise self.error
        self.release.wait(30)
        return "DONE"

    def cancel(self):
        self.cancelled = True


class FakePipeline:
    def __init__(self, result: FakeResult, argv: list[str] = ()) -> None:
        self.result, self.options = result, PipelineOptions(list(argv))

    def run(self) -> FakeResult:
        return self.result


def test_a_job_past_its_timeout_is_cancelled_and_abandoned():
    result = FakeResult()
    try:
        with pytest.raises(JobAbandoned) as caught:
            runner.run_pipeline(FakePipeline(result), timeout_s=0.3)
    finally:
        result.release.set()
    assert str(caught.value) == (
        "the job did not finish within --job-timeout 0.3s (a hung or lost worker?); it was cancelled; "
        "rerun it: its writes are idempotent"
    )
    assert result.cancelled and isinstance(caught.value, JobFailed)


def test_thread_errors_after_the_job_is_stopped_do_not_follow_its_error_line(monkeypatch):
    # Killing the workers closes Beam's control stream under its reader thread, which then raises
    # ("Exception in thread beam_control_read"); that trace landed after the job's one error line.
    heard: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: heard.append(str(args.exc_value)))

    def raise_in_thread(message: str) -> None:
        def fail():
            raise ValueError(message)

        thread = threading.Thread(target=fail, name="beam_control_read")
        thread.start()
        thread.join()

    result = FakeResult(on_wait=lambda: raise_in_thread("before the stop"))
    try:
        with pytest.raises(JobAbandoned):
            runner.run_pipeline(FakePipeline(result), timeout_s=0.3)
        raise_in_thread("after the stop")
    finally:
        result.release.set()
    assert heard == ["before the stop"]  # a thread's error while the job runs still reaches the usual hook


def test_a_job_that_ends_in_time_returns_its_result():
    result = FakeResult()
    result.release.set()
    assert runner.run_pipeline(FakePipeline(result), timeout_s=5) is result
    assert runner.run_pipeline(FakePipeline(result, MULTI)) is result  # watched, no timeout


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_local_worker_that_exits_with_an_error_fails_the_job_at_once():
    def worker_dies():  # what DirectRunner's thread for a worker process raises, and nobody hears
        def exited():
            raise RuntimeError("Worker subprocess exited with return code 137")

        threading.Thread(target=exited).start()

    result = FakeResult(on_wait=worker_dies)
    try:
        with pytest.raises(JobAbandoned) as caught:
            runner.run_pipeline(FakePipeline(result, MULTI))
    finally:
        result.release.set()
    assert str(caught.value) == worker_lost("Beam: Worker subprocess exited with return code 137")
    assert str(caught.value).startswith("the job failed: an SDK worker process was lost mid-job (Beam: Worker")
    assert result.cancelled


def test_a_local_worker_process_that_vanishes_fails_the_job(monkeypatch):
    seen = iter([[101, 102], [101, 102], [101]])
    monkeypatch.setattr(runner, "worker_processes", lambda pid: next(seen, [101]))
    monkeypatch.setattr(runner, "POLL_S", 0.05)
    monkeypatch.setattr(runner, "END_GRACE_S", 0.2)
    result = FakeResult()
    try:
        with pytest.raises(JobAbandoned, match=r"lost mid-job \(process 102 ended\): killed, or out of memory\?"):
            runner.run_pipeline(FakePipeline(result, MULTI))
    finally:
        result.release.set()


def test_a_portable_failure_says_the_cause_the_job_service_sent():
    traceback = (
        "Error running pipeline.\nTraceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
        "ValueError: boom 1 [while running 'Map(boom)']\n"
    )
    messages = [
        beam_job_api_pb2.JobMessagesResponse(message_response=beam_job_api_pb2.JobMessage(
            message_text=text, importance=beam_job_api_pb2.JobMessage.JOB_MESSAGE_ERROR))
        for text in (traceback, "Error running pipeline.")
    ]  # fmt: skip
    error = RuntimeError("Pipeline job-1 failed in state FAILED: Error running pipeline.\n" + traceback)
    with pytest.raises(RuntimeError) as caught:
        runner.run_pipeline(FakePipeline(FakeResult(error=error, messages=messages)))
    assert str(caught.value) == (
        "ValueError: boom 1 [while running 'Map(boom)'] "
        "(the job service: Pipeline job-1 failed in state FAILED: Error running pipeline.)"
    )
    assert caught.value.__cause__ is error


def test_a_worker_lost_under_a_running_bundle_is_one_clear_line():
    # raised from a file under apache_beam/runners, as the runner raises it
    code = compile("raise RuntimeError('Channel closed prematurely.')", "/venv/apache_beam/runners/fake.py", "exec")
    try:
        exec(code)
    except RuntimeError as exc:
        error = translate(exc)
    assert isinstance(error, JobFailed)
    assert str(error) == worker_lost("Beam: Channel closed prematurely")
    assert str(error) == (
        "the job failed: an SDK worker process was lost mid-job (Beam: Channel closed prematurely): killed, or "
        "out of memory? Rerun the job: its writes are idempotent"
    )


def test_the_worker_processes_of_this_process_are_found():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)  # sdk_worker_main"])
    try:
        assert child.pid in runner.worker_processes(os.getpid())
    finally:
        child.kill()
        child.wait()


def test_a_stopped_job_returns_once_the_workers_it_killed_have_ended():
    """After ``--job-timeout`` the driver kills its workers and waits for them to end (a zombie has
    ended): a rerun started at once meets none of them, holding memory or the store."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # sdk_worker_main"])
    result = FakeResult()
    try:
        with pytest.raises(JobAbandoned, match=r"cancelled and its 1 local worker process\(es\) killed"):
            runner.run_pipeline(FakePipeline(result), timeout_s=0.3)
        assert not runner._running(child.pid)
        assert child.poll() == -9
    finally:
        result.release.set()
        child.kill()
        child.wait()


def test_waiting_for_killed_processes_polls_until_they_end_and_is_bounded(monkeypatch):
    checks = []

    def running(pid):  # a killed process that needs three looks to be seen ended; pid 2 never ends
        checks.append(pid)
        return pid == 2 or checks.count(pid) < 3

    monkeypatch.setattr(runner, "_running", running)
    runner._wait_ended([1], 10)
    assert checks == [1, 1, 1]
    checks.clear()
    runner._wait_ended([1, 2], 0.2)  # returns, 2 still running
    assert checks.count(1) == 3 and checks.count(2) > 3


def test_ctrl_c_stops_the_job_and_kills_its_local_workers():
    """Ctrl-C while the driver watches a multi_processing job: the job is cancelled and its workers are
    killed and waited for (they ran on, busy, after the command had exited with 130)."""
    import _thread
    import signal
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # sdk_worker_main"])
    result = FakeResult()
    timer = threading.Timer(0.3, _thread.interrupt_main)  # SIGINT's KeyboardInterrupt, in the main thread
    # interrupt_main does nothing where SIGINT is not Python's handler, and a process started with SIGINT ignored
    # keeps it ignored: `.ci/run` started as a background job of a non-interactive shell (`bash .ci/run &`, whose
    # children ignore SIGINT) failed here, the job running its 30 s out.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        timer.start()
        with pytest.raises(JobInterrupted, match=r"1 local worker process\(es\) killed"):
            runner.run_pipeline(FakePipeline(result, MULTI))
        assert result.cancelled
        assert child.poll() == -9
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, handler)
        result.release.set()
        child.kill()
        child.wait()


def test_multi_processing_workers_start_with_ctrl_c_ignored():
    """A terminal's Ctrl-C reaches the whole process group: each DirectRunner worker printed its own
    KeyboardInterrupt traceback after the command's one line. They start with SIGINT ignored."""
    import subprocess
    import sys

    from apache_beam.runners.portability import local_job_service

    result = FakeResult()
    result.release.set()
    runner.run_pipeline(FakePipeline(result, MULTI))
    command = f"{sys.executable} -c 'import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)'"
    worker = local_job_service.SubprocessSdkWorker(command.encode(), "localhost:1", None)
    assert worker._worker_command_line == runner.IGNORE_SIGINT + command
    out = subprocess.run(worker._worker_command_line, shell=True, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"

"""Subprocesses for the multi-process tests: each in its own process group, killed with it, bounded in time.

A killed SDK worker can leave a runner waiting, so every process a test starts runs in its own
session (``start_new_session``: the SDK workers it starts inherit the group) and the whole group
is killed (``os.killpg``) when the test leaves the block, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def started(args: list[str], **kwargs):
    """A subprocess in its own process group; the group is killed on the way out, whatever happened."""
    proc = subprocess.Popen(args, cwd=kwargs.pop("cwd", ROOT), start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group (its SDK workers included), then reap ``proc``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for_line(proc: subprocess.Popen, marker: str, timeout_s: float = 120) -> None:
    """Read the child's stdout until a line contains ``marker`` (or fail after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"child exited before printing {marker!r} (rc {proc.poll()})")
        if marker in line:
            return
    raise AssertionError(f"no {marker!r} within {timeout_s}s")


def wait_for_file(path: str, procs: list[subprocess.Popen], timeout_s: float, what: str) -> str:
    """The content of ``path`` once it is non-empty; fails when a process of ``procs`` ends first, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if text.endswith("\n"):
                return text
        ended = [p for p in procs if p.poll() is not None]
        if ended:
            raise AssertionError(f"{what}: {ended[0].args[:4]} ended (rc {ended[0].returncode}) first")
        time.sleep(0.1)
    raise AssertionError(f"{what}: nothing in {path} within {timeout_s:.0f}s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]

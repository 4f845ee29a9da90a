"""``corpus-etl`` commands in fresh processes forked from one that has imported the jobs' modules once.

A command run as ``python -m pipelines.cli`` spends ~5-10 s of CPU on this project's 2-core machines importing
torch, Beam, transformers and qdrant-client before it does anything: most of what a test of a one-line
error costs. ``ForkedCli`` starts one *zygote* process (``python -m tests.forked_cli``) that imports every
command's module, then forks a child per command. The child is a process of its own, as a shell's command
is: its own pid, standard streams (files, read back whole), working directory, environment (``os.environ``
replaced before the command runs) and exit status; it runs ``sys.exit(main(argv))`` as ``python -m
pipelines.cli`` does and exits the normal way (atexit handlers, buffered output flushed).

What a child cannot show: output written while the modules are imported (it went to the zygote's log) and
environment variables a library reads once at import (it read the zygote's). Like the test processes, the
zygote memoizes Beam's ``get_dofn_specs`` (``tests/beam_speed.py``); the jobs' SDK workers do not. Tests about those run a real
``python -m pipelines.cli`` (``tests/test_cli.py``'s ``cli(..., fresh=True)``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class ForkedCli:
    """One zygote; ``run(argv, env=..., cwd=..., timeout=...)`` -> ``subprocess.CompletedProcess``."""

    def __init__(self, env: dict[str, str]) -> None:
        self._log = tempfile.TemporaryFile("w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.forked_cli"], cwd=REPO, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, text=True, start_new_session=True,
        )  # fmt: skip
        self._reply(300, "start-up")

    def run(self, argv: list[str], *, env: dict[str, str], cwd: Path = REPO, timeout: float = 300):
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
            request = {"argv": argv, "env": env, "cwd": str(cwd), "stdout": out, "stderr": err}
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            pid = self._reply(30, "fork")["pid"]
            try:
                status = self._reply(timeout, " ".join(argv[:1]))["status"]
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                self._reply(30, "the killed command's status")
                raise
            return subprocess.CompletedProcess(["corpus-etl", *argv], status, Path(out).read_text(),
                                               Path(err).read_text())  # fmt: skip

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._log.close()

    def _reply(self, timeout: float, what: str) -> dict:
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError(f"the forked corpus-etl ({what}) did not answer within {timeout:.0f}s")
        line = self._proc.stdout.readline()
        if not line:
            self._log.seek(0)
            raise RuntimeError(f"the corpus-etl zygote died ({what}):\n{self._log.read()[-3000:]}")
        return json.loads(line)


def _serve() -> None:
    """The zygote: import, say so, then fork one child per request line on stdin."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as pipelines.cli sets it before these imports
    import pipelines.cli
    from tests.beam_speed import memoize_dofn_specs

    memoize_dofn_specs()  # as in the test processes: the children's in-process pipelines build faster

    for module, _ in pipelines.cli.COMMANDS.values():  # every command's module: no child imports one
        importlib.import_module(module)
    replies = sys.stdout
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request, pipelines.cli)  # exits: never returns to this loop
        print(json.dumps({"pid": pid}), file=replies, flush=True)
        _, wait_status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(wait_status)}), file=replies, flush=True)


def _child(request: dict, cli) -> None:
    os.setpgid(0, 0)  # the test's kill on a timeout reaches what the command started
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):  # fmt: skip
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own stdin, /dev/null now
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [cli.__file__, *request["argv"]]  # as `python -m pipelines.cli` has it
    sys.exit(cli.main(request["argv"]))  # SystemExit unwinds out of _serve: the interpreter's own exit


if __name__ == "__main__":
    _serve()

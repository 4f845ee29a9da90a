"""Expected failures as one line for people, with a documented exit status. Standard library only.

Exit statuses (README, "Exit status"):

    0  success
    1  the job failed (it started; some output may be written)
    2  usage or pre-flight error: nothing was written
    3  the job finished, but partially (dead letters) or the alias switch was refused
  130  interrupted (Ctrl-C, ``interrupted``); writes are idempotent, so a rerun completes it

``translate`` turns the library exceptions that an expected failure raises (qdrant-client
connection errors, the embedded store's shard locks, transformers / huggingface_hub model
loading, missing input files) into a ``CliError`` whose message names the thing (URL with
credentials redacted, folder, model id) and what to do. It reads exception types by name
and tracebacks by file, so this module never imports torch, Beam or qdrant-client.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from types import TracebackType

from transforms.types import first_line  # noqa: F401 - the commands import it from here

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3


class CliError(Exception):
    """An expected failure: ``str(exc)`` is the whole message for the user."""

    exit_status = EXIT_FAILED


class UsageError(CliError):
    """Flags that cannot work together, or a value the command refuses; nothing was written."""

    exit_status = EXIT_USAGE


class PreflightError(CliError):
    """A check before the job starts failed (store, model, inputs); nothing was written."""

    exit_status = EXIT_USAGE


class JobFailed(CliError):
    """The job started and failed."""

    exit_status = EXIT_FAILED


class JobAbandoned(JobFailed):
    """The job was given up while the runner may still wait (``--job-timeout``, a lost local worker:
    ``pipelines.runner``); the command exits at once."""


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C while ``pipelines.runner`` watched the job from another thread: the job was cancelled and
    its local workers killed; ``corpus-etl`` exits at once with status 130, as Beam's threads may never end."""


# The first line of an exception that stands for a KeyboardInterrupt (Beam: "KeyboardInterrupt [while running ...]").
_INTERRUPT = re.compile(r"^(?:[\w.]+: )?KeyboardInterrupt\b")


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is a Ctrl-C that a runner re-raised as another exception. Beam turns a
    KeyboardInterrupt in a step into ``RuntimeError("KeyboardInterrupt [while running 'STEP']")``:
    chained to the interrupt in-process, only that message where it crossed from a worker."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, KeyboardInterrupt) or _INTERRUPT.match(first_line(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


class PartialResult(CliError):
    """The job finished, but not everything it was asked for is done (dead letters, alias refused)."""

    exit_status = EXIT_PARTIAL


_MODEL_HINT = "offline? set {flag} to a local directory"
# transforms.io.edge_store.open_shard: "store in use by another process: DIR/COLLECTION/shard-NNN stayed locked for Ns (...)".
_STORE_IN_USE = re.compile(r"store in use by another process: (?P<path>\S.*?) stayed locked for (?P<wait>\d+)s")
_BEAM_STEP = re.compile(r" \[while running '[^\]]*'\]")
_CONNECTION_TYPES = {
    "ResponseHandlingException",  # qdrant-client REST: wraps httpx errors
    "ConnectionError", "ConnectionRefusedError", "ConnectionResetError", "ConnectionAbortedError",
    "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
    "RemoteProtocolError", "NetworkError", "TransportError", "TimeoutError", "gaierror",
}  # fmt: skip
# What Beam's runners say when an SDK worker process dies under a running bundle (kill -9, out of memory).
_WORKER_LOST = ("Channel closed prematurely", "Worker subprocess exited with return code")


def worker_lost(detail: str) -> str:
    """The message of a job that lost an SDK worker process (``detail``: how it was noticed)."""
    return (
        f"the job failed: an SDK worker process was lost mid-job ({detail}): killed, or out of memory? "
        "Rerun the job: its writes are idempotent"
    )


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _frames(tb: TracebackType | None) -> Iterator[str]:
    while tb is not None:
        yield tb.tb_frame.f_code.co_filename.replace("\\", "/")
        tb = tb.tb_next


def _raised_in(exc: BaseException, package: str) -> bool:
    """Whether ``exc`` (or an exception it chains to) passed through ``package``'s files."""
    needle = f"/{package}/"
    return any(needle in f for e in _chain(exc) for f in _frames(e.__traceback__))


def raised_by_job(exc: BaseException) -> bool:
    """Whether ``exc`` came out of a running Beam job (the runner), not a pre-flight check."""
    return _raised_in(exc, "apache_beam/runners")


def _type_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for e in _chain(exc) for cls in type(e).__mro__}


def _innermost_reason(exc: BaseException) -> str:
    """The most specific message in the chain: e.g. ``[Errno 111] Connection refused``."""
    reasons = [_grpc_reason(e) or first_line(e) for e in _chain(exc) if str(e).strip()]
    return reasons[-1] if reasons else type(exc).__name__


def _grpc_reason(exc: BaseException) -> str | None:
    """``UNAVAILABLE: failed to connect ...`` for a grpc.RpcError (its str() is a multi-line repr)."""
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if not (callable(code) and callable(details)):
        return None
    try:
        return f"{getattr(code(), 'name', code())}: {(details() or '').strip().splitlines()[0]}"
    except Exception:  # noqa: BLE001 - an RpcError without a status
        return None


def _qdrant_answer(exc: BaseException) -> str | None:
    """``400 Bad Request: Wrong input: ...``: the status and Qdrant's own message of an error answer in the
    chain (qdrant-client's ``UnexpectedResponse`` holds the body, whose first line its str() leaves out;
    ``ResourceExhaustedResponse`` is a 429 with Retry-After), or a gRPC status that is not a connection's."""
    for e in _chain(exc):
        status = getattr(e, "status_code", None)
        if isinstance(status, int):
            content = getattr(e, "content", b"") or b""
            try:
                body = json.loads(content)
                message = (body.get("status") or {}).get("error") if isinstance(body, dict) else None
            except Exception:  # noqa: BLE001 - not JSON (a proxy's page): its text, shortened
                message = content.decode("utf-8", "replace")
            message = " ".join(str(message or "").split())[:300] or "no message"
            return f"{status} {getattr(e, 'reason_phrase', '') or ''}".rstrip() + f": {message}"
        if type(e).__name__ == "ResourceExhaustedResponse":
            return f"429 Too Many Requests: {first_line(e)}"
        reason = _grpc_reason(e)
        if reason:
            return reason
    return None


def _grpc_unavailable(exc: BaseException) -> bool:
    for e in _chain(exc):
        code = getattr(e, "code", None)
        if callable(code):
            with contextlib.suppress(Exception):
                if getattr(code(), "name", "") in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    return True
    return False


def translate(
    exc: BaseException,
    *,
    qdrant_url: str | None = None,
    models: dict[str, str] | None = None,
) -> CliError | None:
    """The ``CliError`` for an expected failure, or None for a bug (shown with its type; ``-v`` traceback).

    ``models`` maps a flag to its model id (``{"--model": "Qwen/..."}``): a model that fails to
    load is named by the flag whose id its message mentions, else by the first.
    """
    from pipelines.security import redact_url

    if isinstance(exc, CliError):
        return exc
    in_job = raised_by_job(exc)
    kind: type[CliError] = JobFailed if in_job else PreflightError
    prefix = "the job failed: " if in_job else ""
    names = _type_names(exc)

    in_use = _store_in_use(exc)
    if in_use is not None:
        # Mid-job, part of the output may be written: a rerun (idempotent) is what finishes it.
        if in_job:
            todo = "rerun this job when the other one has finished (its writes are idempotent; jobs"
        else:
            todo = "wait for the other job to finish (jobs"
        return kind(f"{prefix}{in_use}; {todo} writing different collections can run together), or raise --store-lock-wait")

    if _raised_in(exc, "transformers") or _raised_in(exc, "huggingface_hub"):
        if isinstance(exc, (OSError, ValueError)) or "HfHubHTTPError" in names or "OfflineModeIsEnabled" in names:
            subject, hint = _which_model(exc, models or {})
            return kind(f"{prefix}cannot load {subject}: {first_line(exc)} ({hint})")

    if _raised_in(exc, "qdrant_client"):
        url = redact_url(qdrant_url) or "the configured URL"
        status = next((getattr(e, "status_code", None) for e in _chain(exc) if getattr(e, "status_code", None)), None)
        if status in (401, 403):
            return kind(
                f"{prefix}Qdrant at {url} refused the request ({status}): check the key that --qdrant-api-key-env names"
            )
        if names & _CONNECTION_TYPES or _grpc_unavailable(exc):
            return kind(f"{prefix}cannot reach Qdrant at {url}: {_innermost_reason(exc)}; is the server running?")
        answer = _qdrant_answer(exc)
        if answer is not None:
            request = next((r for e in _chain(exc) if (r := getattr(e, "qdrant_request", None))), "a request")
            return kind(f"{prefix}Qdrant at {url} answered {request} with {answer}")

    lost = next((m for e in _chain(exc) for m in _WORKER_LOST if m in str(e)), None)
    if in_job and lost:
        return JobFailed(worker_lost(f"Beam: {lost}"))

    if in_job:
        return None  # a failure inside the job that is not one of the above: shown as a failed job
    if str(exc).startswith("Pipeline has validations errors"):  # Beam lists them on the lines after this one
        return UsageError("Beam options: " + "; ".join(line.strip() for line in str(exc).splitlines()[1:] if line.strip()))
    if names & {"FileNotFoundError", "NotADirectoryError", "IsADirectoryError", "PermissionError", "BeamIOError"}:
        return PreflightError(first_line(exc))
    if names & {"ValueError", "DeviceUnavailableError"}:
        return PreflightError(first_line(exc))
    return None


def _store_in_use(exc: BaseException) -> str | None:
    """``store folder DIR is in use by another process: COLLECTION/shard-NNN stayed locked for Ns`` for the
    embedded store's ``StoreInUseError`` anywhere in the chain, or None.

    Read from the message, so one that crossed from a worker process as text is found too; the
    library's WAL detail and Beam's ``[while running 'STEP']`` are left out (``-v`` shows them).
    """
    for e in _chain(exc):
        match = _STORE_IN_USE.search(str(e))
        if match:
            shard = match["path"].rstrip("/")
            folder = shard.rsplit("/", 2)[0] if shard.count("/") >= 2 else shard  # DIR/COLLECTION/shard-NNN
            part = shard[len(folder) + 1 :] or shard
            return f"store folder {folder} is in use by another process: {part} stayed locked for {match['wait']}s"
        if type(e).__name__ == "StoreInUseError":  # a message of another shape: its first line, without Beam's step
            return _BEAM_STEP.sub("", first_line(e))
    return None


def _which_model(exc: BaseException, models: dict[str, str]) -> tuple[str, str]:
    """(``model ID``, what to do) for the flag whose id the error mentions; all of them when none is named."""
    text = " ".join(str(e) for e in _chain(exc))
    named = {flag: model for flag, model in models.items() if model and model in text} or models
    if len(named) == 1:
        flag, model = next(iter(named.items()))
        return f"model {model}", _MODEL_HINT.format(flag=flag)
    if not named:
        return "the model", _MODEL_HINT.format(flag="--model")
    listed = " or ".join(f"{flag} {model}" for flag, model in named.items())
    return f"a model ({listed})", "offline? set it to a local directory"

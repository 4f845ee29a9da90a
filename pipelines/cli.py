"""The ``corpus-etl`` command: one subcommand per job or tool.

Flags are parsed first, by ``pipelines.flags`` (standard library only), so ``--help`` and
argument errors answer in a fraction of a second; the job's module (torch, Beam,
qdrant-client) is imported only then. Every expected failure ends here as one line,
``corpus-etl COMMAND: error: ...``, with the exit status of ``pipelines.errors``
(``-v`` adds the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

from pipelines import flags
from pipelines.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    JobAbandoned,
    JobInterrupted,
    first_line,
    interrupted,
    raised_by_job,
    translate,
)
from pipelines.security import check_qdrant_flags, redact_text

# 128 + SIGINT, as a shell reports a command ended by Ctrl-C.
EXIT_INTERRUPTED = 130

COMMANDS = {
    "index": ("pipelines.index", "embed Parquet documents into a Qdrant collection (Beam job)"),
    "label": ("pipelines.label", "label query logs with Qwen3-Reranker into eval and distillation sets (Beam job)"),
    "search": ("pipelines.search", "search a collection"),
    "evaluate": ("pipelines.evaluate", "nDCG@10 / MRR@10 / Recall@k of a collection on BEIR queries and qrels"),
    "copy": ("pipelines.copy", "copy an embedded collection into a Qdrant server collection (optionally switch an alias)"),
    "dump": ("pipelines.dump", "write every point of a collection to one Parquet file, sorted by id"),
    "prune-collections": ("pipelines.prune", "delete an alias's oldest dated collections, keeping N and its target"),
    "sample-data": ("pipelines.sample", "write a small real-text corpus, queries, qrels and a query log"),
}
# Commands whose parser lives in pipelines.flags: (parser factory, whether unknown --flags go to Beam).
# Their modules take the parsed flags in ``run_args(args, beam_args)``; a command missing here is
# run the slow way, ``module.run(argv)``, with the same error handling.
PARSERS: dict[str, tuple[Callable[[], argparse.ArgumentParser], bool]] = {
    "index": (flags.index_parser, True),
    "label": (flags.label_parser, True),
    "search": (flags.search_parser, False),
    "evaluate": (flags.evaluate_parser, False),
    "prune-collections": (flags.prune_parser, False),
    "sample-data": (flags.sample_parser, False),
    "dump": (flags.dump_parser, False),
    "copy": (flags.copy_parser, False),
}


def usage() -> str:
    lines = ["usage: corpus-etl COMMAND [options]   (corpus-etl COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<18} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines) + "\n\n" + flags.EXIT_STATUS_EPILOG


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return EXIT_OK if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"corpus-etl: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    module_name = COMMANDS[name][0]
    if name not in PARSERS:
        verbose = "-v" in rest or "--verbose" in rest
        return _run(name, lambda: importlib.import_module(module_name).run(rest), verbose, argparse.Namespace())
    make_parser, takes_beam_args = PARSERS[name]
    parser = make_parser()
    if takes_beam_args:  # argparse exits with status 2 and its usage on a bad flag, before any import
        args, beam_args = flags.split_beam_args(parser, rest)
    else:
        args, beam_args = parser.parse_args(rest), []

    def job() -> Any:
        if hasattr(args, "qdrant_url"):
            check_qdrant_flags(args)  # refuse an API key over plain http before anything connects
        # Before transformers / huggingface_hub are imported: they read it once, at import.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        return importlib.import_module(module_name).run_args(args, beam_args)

    return _run(name, job, bool(getattr(args, "verbose", False)), args)


def _run(name: str, job: Callable[[], Any], verbose: bool, args: argparse.Namespace) -> int:
    """Run ``job``; map its outcome to one line on stderr and an exit status."""
    try:
        result = job()
    except KeyboardInterrupt as exc:
        return _last_line(f"corpus-etl {name}: interrupted", EXIT_INTERRUPTED, now=isinstance(exc, JobInterrupted))
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line and a status
        if interrupted(exc):  # Ctrl-C inside a running job: Beam re-raises it as another exception
            return _last_line(f"corpus-etl {name}: interrupted", EXIT_INTERRUPTED)
        if verbose:
            print(redact_text("".join(traceback.format_exception(exc))), end="", file=sys.stderr)
        try:
            error = translate(exc, qdrant_url=getattr(args, "qdrant_url", None), models=_models(args))
        except Exception:  # noqa: BLE001 - a bug in the translation must not hide the failure itself
            error = None
        if error is not None:
            message, status = str(error), error.exit_status
        elif raised_by_job(exc):  # Beam re-raises a step's error with its type and step in the message
            reason = first_line(exc)
            if not re.match(r"^[\w.]+(Error|Exception): ", reason):
                reason = f"{type(exc).__name__}: {reason}"
            message, status = f"the job failed: {reason}", EXIT_FAILED
        else:
            message, status = f"{type(exc).__name__}: {first_line(exc)}", EXIT_FAILED
        hint = "" if verbose or error is not None else " (-v shows the traceback)"
        # A library's message may quote the URL it was given, credentials and all.
        return _last_line(redact_text(f"corpus-etl {name}: error: {message}{hint}"), status,
                          now=isinstance(exc, JobAbandoned))  # fmt: skip
    partial = result.get("partial") if isinstance(result, dict) else None
    if partial:
        return _last_line(f"corpus-etl {name}: partial: {partial}", EXIT_PARTIAL)
    return EXIT_OK


def _last_line(line: str, status: int, *, now: bool = False) -> int:
    """Write the command's one line on stderr (one write, newline included: a runner thread's late output
    cannot land inside it) and return ``status``. ``now``: the runner stopped a job whose threads may never
    end and log on as they die (``JobAbandoned``, ``JobInterrupted``): logging is silenced so the line stays
    the last, and the process exits at once instead of waiting for them."""
    if now:
        logging.disable(logging.CRITICAL)
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    if now:
        sys.stdout.flush()
        os._exit(status)
    return status


def _models(args: argparse.Namespace) -> dict[str, str]:
    """The model flags a command loads (label with --candidates loads no embedding model)."""
    models = {flag: getattr(args, attr) for flag, attr in (("--model", "model"), ("--reranker", "reranker"))
              if getattr(args, attr, None)}
    if getattr(args, "candidates", None):
        models.pop("--model", None)
    return models


if __name__ == "__main__":
    sys.exit(main())

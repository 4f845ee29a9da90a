"""Pre-flight checks that a worker runs when the job starts: for jobs built without the store or the input.

A job built as a Dataflow template or dry run (``pipelines.launch``) is built where the
store and the input may be unreachable, so the driver's checks (the store, the names in it,
the collection, every input file's footer) cannot run there. ``LaunchChecks`` runs the same
checks as the job's first steps, on one worker, in order: the store first, then each input,
whose checked file list is what the job reads. Nothing downstream starts before they pass,
and a failing check fails the job in its first minutes with the message the driver would have
printed (``LaunchCheckFailed``), instead of an hour later, or never.

    checks = p | "LaunchChecks" >> LaunchChecks(store_check, {"input": check_input})
    checks["input"]       # the input files, checked (read these)
    checks["dead_letter"] # files skipped with --skip-bad-files, one dead letter each
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import apache_beam as beam

from transforms.types import DEAD, DeadLetter

# What an input check returns: the files to read, and a dead letter per file it left out.
InputCheck = Callable[[], tuple[list[str], list[DeadLetter]]]


class LaunchCheckFailed(RuntimeError):
    """A pre-flight check failed in the worker that ran it; the job fails with this message."""


def _check_store(_: Any, check: Callable[[], Any] | None) -> bool:
    if check is not None:
        try:
            check()
        except Exception as exc:
            raise LaunchCheckFailed(f"pre-flight check of the store failed: {type(exc).__name__}: {exc}") from exc
    return True


class _CheckInput(beam.DoFn):
    def __init__(self, name: str, check: InputCheck) -> None:
        self.name, self.check = name, check

    def process(self, _: bool):
        try:
            files, skipped = self.check()
        except Exception as exc:
            raise LaunchCheckFailed(f"pre-flight check of --{self.name} failed: {type(exc).__name__}: {exc}") from exc
        yield from files
        for letter in skipped:
            yield beam.pvalue.TaggedOutput(DEAD, letter)


class LaunchChecks(beam.PTransform):
    """PBegin → ``{name: checked files, ..., "dead_letter": skipped files}``; see the module docstring."""

    def __init__(self, store_check: Callable[[], Any] | None, inputs: Mapping[str, InputCheck]) -> None:
        super().__init__()
        self.store_check, self.inputs = store_check, dict(inputs)

    def expand(self, pbegin):
        ready = (
            pbegin
            | "Start" >> beam.Create([None])
            | "CheckStore" >> beam.Map(_check_store, self.store_check)
        )
        out: dict[str, Any] = {}
        dead = []
        for name, check in self.inputs.items():
            checked = ready | f"Check[{name}]" >> beam.ParDo(_CheckInput(name, check)).with_outputs(DEAD, main="files")
            out[name] = checked.files
            dead.append(checked[DEAD])
        out[DEAD] = tuple(dead) | "SkippedFiles" >> beam.Flatten(pipeline=pbegin.pipeline)
        return out

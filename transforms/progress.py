"""A progress line every few seconds on long local runs, from every phase.

Beam's DirectRunner returns from ``run()`` only when the job is done, so progress is
reported from inside the workers: each process keeps its own totals per phase (read,
chunk, embed, write, rerank) and logs a line (documents/s, tokens/s) at once on its first
element, then at most once per interval, so even a short job shows every phase once.
On Dataflow the same lines land in the worker logs, next to the Beam counters that the
monitoring UI shows.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from apache_beam.metrics import Metrics

_LOG = logging.getLogger("corpus_etl.progress")


# Rates are per second since the job started in this process (``reset_reporters``, called by
# the driver), or since this module was imported in a worker: a phase's clock starting at its
# first element would make the first line's rates meaningless.
_JOB_START = time.monotonic()
# Whether this process started the job (``reset_reporters``): lines of other processes (DirectRunner's
# multi_processing workers, a worker pool's SDK workers) name their process, since each keeps its own totals.
_IN_DRIVER = False


class ProgressReporter:
    def __init__(self, label: str, interval_s: float = 30.0, start: float | None = None) -> None:
        self.label = label
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._start = time.monotonic() if start is None else start
        self._last: float | None = None  # None: the first add() logs at once
        self.totals: dict[str, int] = {}

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                self.totals[key] = self.totals.get(key, 0) + value
            now = time.monotonic()
            if self._last is not None and now - self._last < self.interval_s:
                return
            self._last = now
            line = self.line(now)
        _LOG.info(line)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self._start, 1e-9)
        if elapsed < 1.0:  # a rate over a fraction of a second says nothing
            parts = [f"{k}={v}" for k, v in sorted(self.totals.items())]
        else:
            parts = [f"{k}={v} ({v / elapsed:,.1f}/s)" for k, v in sorted(self.totals.items())]
        return f"[{self.label}] {elapsed:,.0f}s " + " ".join(parts)


_REPORTERS: dict[str, ProgressReporter] = {}
_REPORTERS_LOCK = threading.Lock()


def reset_reporters() -> None:
    """Forget every phase's totals: the next job in this process starts its lines (and rates) afresh."""
    global _JOB_START, _IN_DRIVER
    with _REPORTERS_LOCK:
        _REPORTERS.clear()
        _JOB_START = time.monotonic()
        _IN_DRIVER = True


def reporter(label: str, interval_s: float = 30.0) -> ProgressReporter:
    """The process-wide reporter for ``label`` (one per worker process, shared by its threads)."""
    with _REPORTERS_LOCK:
        rep = _REPORTERS.get(label)
        if rep is None:
            shown = label if _IN_DRIVER else f"{label} pid {os.getpid()}"  # one worker's totals, not the job's
            rep = _REPORTERS[label] = ProgressReporter(shown, interval_s, start=_JOB_START)
        rep.interval_s = interval_s
        return rep


class _Report:
    """Pass-through step that adds ``counts(element)`` to the phase's reporter."""

    def __init__(self, label: str, interval_s: float, counts: Callable[[Any], dict[str, int]]) -> None:
        self.label = label
        self.interval_s = interval_s
        self.counts = counts

    def __call__(self, element: Any) -> Any:
        reporter(self.label, self.interval_s).add(**self.counts(element))
        return element


def report_progress(label: str, interval_s: float, counts: Callable[[Any], dict[str, int]]):
    """A Beam step (``pcoll | "P" >> report_progress(...)``) that logs ``label``'s progress, elements unchanged."""
    import apache_beam as beam

    return beam.Map(_Report(label, interval_s, counts))


def disable_library_progress_bars() -> None:
    """No tqdm bars from huggingface_hub downloads or transformers' "Loading weights" in batch logs."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - both come with transformers
        return
    disable_progress_bars()
    hf_logging.disable_progress_bar()


# Counters "<step>_ms": milliseconds spent in a step's own work (chunk, upsert), summed over threads and workers;
# read back by ``pipelines.common.step_seconds`` for the run summary's time split. The model steps need none:
# RunInference times them itself.
TIME_COUNTER = "{step}_ms"


def count_time(step: str, seconds: float) -> None:
    """Add ``seconds`` of ``step``'s own work to its ``<step>_ms`` counter."""
    Metrics.counter("corpus_etl", TIME_COUNTER.format(step=step)).inc(round(seconds * 1000))

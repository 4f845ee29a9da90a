"""A progress line every few seconds on long local runs.

Beam's DirectRunner returns from ``run()`` only when the job is done, so progress is
reported from inside the workers: each process keeps its own totals and logs a line
(documents/s, tokens/s) at most once per interval. On Dataflow the same lines land in
the worker logs, next to the Beam counters that the monitoring UI shows.
"""

from __future__ import annotations

import logging
import threading
import time

_LOG = logging.getLogger("corpus_etl.progress")


class ProgressReporter:
    def __init__(self, label: str, interval_s: float = 30.0) -> None:
        self.label = label
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last = self._start
        self.totals: dict[str, int] = {}

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                self.totals[key] = self.totals.get(key, 0) + value
            now = time.monotonic()
            if now - self._last < self.interval_s:
                return
            self._last = now
            line = self.line(now)
        _LOG.info(line)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self._start, 1e-9)
        parts = [f"{k}={v} ({v / elapsed:,.1f}/s)" for k, v in sorted(self.totals.items())]
        return f"[{self.label}] {elapsed:,.0f}s " + " ".join(parts)


_REPORTERS: dict[str, ProgressReporter] = {}
_REPORTERS_LOCK = threading.Lock()


def reporter(label: str, interval_s: float = 30.0) -> ProgressReporter:
    """The process-wide reporter for ``label`` (one per worker process, shared by its threads)."""
    with _REPORTERS_LOCK:
        rep = _REPORTERS.get(label)
        if rep is None:
            rep = _REPORTERS[label] = ProgressReporter(label, interval_s)
        rep.interval_s = interval_s
        return rep

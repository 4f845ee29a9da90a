"""Progress lines: a phase logs on its first element, then at most once per interval."""

from __future__ import annotations

import logging

from transforms.progress import ProgressReporter, reporter, reset_reporters


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "corpus_etl.progress"]


def test_first_element_logs_at_once_then_once_per_interval(caplog):
    rep = ProgressReporter("embed", interval_s=3600)
    with caplog.at_level(logging.INFO, logger="corpus_etl.progress"):
        rep.add(documents=2, tokens=100)
        rep.add(documents=3, tokens=50)
    lines = _lines(caplog)
    assert len(lines) == 1
    assert lines[0].startswith("[embed] 0s ") and lines[0].endswith("documents=2 tokens=100")


def test_rates_are_since_the_job_started(caplog):
    rep = ProgressReporter("write", interval_s=0, start=0.0)
    assert rep.line(now=10.0) == "[write] 10s "
    rep.totals = {"points": 50}
    assert rep.line(now=10.0) == "[write] 10s points=50 (5.0/s)"


def test_reset_starts_every_phase_afresh(caplog):
    reset_reporters()
    with caplog.at_level(logging.INFO, logger="corpus_etl.progress"):
        reporter("read", 3600).add(documents=1)
        reporter("read", 3600).add(documents=1)
        reset_reporters()  # the next job in this process
        reporter("read", 3600).add(documents=1)
    assert [line.split(" ", 2)[2] for line in _lines(caplog)] == ["documents=1", "documents=1"]


def test_a_worker_process_names_itself_in_its_lines():
    # A process that did not start the job (DirectRunner's multi_processing workers, SDK workers of a pool)
    # keeps its own totals: its lines say whose they are. The driver's (reset_reporters) stay as they were.
    import subprocess
    import sys

    code = ("import logging, os, sys; logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stdout)\n"
            "from transforms.progress import reporter, reset_reporters\n"
            "print('pid', os.getpid()); reporter('embed', 3600).add(chunks=4)\n"
            "reset_reporters(); reporter('embed', 3600).add(chunks=4)\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    pid = out[0].split()[1]
    assert out[1].startswith(f"[embed pid {pid}] ") and out[1].endswith(" chunks=4")
    assert out[2].startswith("[embed] ") and out[2].endswith(" chunks=4")

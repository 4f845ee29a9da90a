"""Test hooks for the multi-process tests: model loads per process, and pauses at known moments.

Off unless ``CORPUS_ETL_TEST_HOOKS`` names a folder (one environment lookup per call). The
variable is read in the process that runs the step, so it reaches DirectRunner's
``multi_processing`` workers (children of the driver) and a worker pool's SDK workers
(children of the pool, which must be started with it).

- ``record_model_load(kind, model)``: appends ``pid<TAB>kind<TAB>model`` to ``DIR/model_loads.tsv``
  (one ``O_APPEND`` write: lines of concurrent processes never interleave). The tests check that
  each worker process loads each model once, whatever the number of bundles.
- ``pause_point(name)``: when ``DIR/pause_at`` holds ``name``, the first process to get there
  writes ``name<TAB>pid`` to ``DIR/paused.tsv`` (created exclusively: one process pauses, the
  others go on, as a stuck worker would leave them) and sleeps until it is killed. The crash
  tests kill the job, or that worker, at a known moment this way, without timing races; a file
  rather than a variable, so one worker pool serves paused and unpaused jobs. Names: ``embed`` (a worker is about to
  embed a batch), ``write`` (a shard's first batch is written, its other batches are not),
  ``finish`` (the index job's steps are done; deletions, HNSW and the alias switch are not).
"""

from __future__ import annotations

import os
import time

ENV = "CORPUS_ETL_TEST_HOOKS"
LOADS_FILE = "model_loads.tsv"
PAUSE_AT_FILE = "pause_at"
PAUSED_FILE = "paused.tsv"


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def record_model_load(kind: str, model: str) -> None:
    """``pid<TAB>kind<TAB>model`` in ``$CORPUS_ETL_TEST_HOOKS/model_loads.tsv`` (when set)."""
    folder = os.environ.get(ENV)
    if folder:
        _append(os.path.join(folder, LOADS_FILE), f"{os.getpid()}\t{kind}\t{model}\n")


def pause_point(name: str) -> None:
    """Sleep here until killed when ``$CORPUS_ETL_TEST_HOOKS/pause_at`` holds ``name`` (the first process only)."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    try:
        with open(os.path.join(folder, PAUSE_AT_FILE), encoding="utf-8") as f:
            wanted = f.read().strip()
    except FileNotFoundError:
        return
    if wanted != name:
        return
    try:
        fd = os.open(os.path.join(folder, PAUSED_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return  # another process paused here first
    try:
        os.write(fd, f"{name}\t{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    while True:  # until the test kills this process (or the job's --job-timeout does)
        time.sleep(3600)

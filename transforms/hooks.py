"""A test hook: pause a job at a known moment, so that a test can kill it (or one worker) there.

Off unless ``CORPUS_ETL_TEST_HOOKS`` names a folder (one environment lookup per call). The
variable is read in the process that runs the step, so it reaches DirectRunner's
``multi_processing`` workers (children of the driver) and a worker pool's SDK workers
(children of the pool, which must be started with it).

``pause_point(name)``: when ``DIR/pause_at`` holds ``name``, the first process to get there
writes ``name<TAB>pid`` to ``DIR/paused.tsv`` (created exclusively: one process pauses, the
others go on, as a stuck worker would leave them) and sleeps until it is killed. The crash
tests kill the job, or that worker, at a known moment this way, without timing races; a file
rather than a variable, so one worker pool serves paused and unpaused jobs. Names: ``embed``
(a worker is about to embed a batch), ``write`` (a shard's first batch is written, its other
batches are not), ``finish`` (the index job's steps are done; deletions, HNSW and the alias
switch are not).

(Model loads per process are logged by ``transforms.inference.handlers``: ``CORPUS_ETL_LOAD_LOG``.)
"""

from __future__ import annotations

import os
import time

ENV = "CORPUS_ETL_TEST_HOOKS"
PAUSE_AT_FILE = "pause_at"
PAUSED_FILE = "paused.tsv"


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

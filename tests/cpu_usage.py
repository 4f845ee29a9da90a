"""CPU seconds per test, for trimming the suite: ``make test PYTEST_ARGS="-p tests.cpu_usage"``.

Wall time says little on 2 cores shared by two pytest workers and the jobs' subprocesses: a test
waits for the other worker's jobs as much as for its own work. CPU time does not: each test's
own (``RUSAGE_SELF``) and that of the child processes reaped during it (``RUSAGE_CHILDREN``: the
``corpus-etl`` subprocesses a test runs, with their SDK workers). A child reaped later counts
where it is reaped: the forked-CLI zygote's commands at its module's end, the portable worker
pool's workers when the pool ends.

Each pytest process appends one JSON line per test to ``$CORPUS_ETL_CPU_USAGE_DIR/<pid>.jsonl``
(default ``./cpu_usage``); ``python -m tests.cpu_usage [DIR]`` prints the files and tests that
cost the most.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import resource
import sys
import time

import pytest

ENV = "CORPUS_ETL_CPU_USAGE_DIR"


def _cpu() -> tuple[float, float]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    own, children = _cpu()
    start = time.monotonic()
    yield
    own_after, children_after = _cpu()
    folder = os.environ.get(ENV, "cpu_usage")
    os.makedirs(folder, exist_ok=True)
    row = {"id": item.nodeid, "self": own_after - own, "children": children_after - children,
           "wall": time.monotonic() - start}  # fmt: skip
    with open(os.path.join(folder, f"{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def report(folder: str, top: int = 30) -> str:
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*.jsonl"))):
        with open(path) as f:
            rows += [json.loads(line) for line in f]
    files: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    for r in rows:
        totals = files[r["id"].split("::")[0]]
        totals[0] += r["self"]
        totals[1] += r["children"]
        totals[2] += r["wall"]
    cpu = sum(r["self"] + r["children"] for r in rows)
    lines = [f"{len(rows)} tests, {cpu:.0f} CPU s (tests' own and their reaped children's), "
             f"{sum(r['wall'] for r in rows):.0f} s of wall time summed over tests", "",
             "  CPU s   own  child  wall s  file"]  # fmt: skip
    for name, (own, child, wall) in sorted(files.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))[:top]:
        lines.append(f"{own + child:7.0f} {own:5.0f} {child:6.0f} {wall:7.0f}  {name}")
    lines += ["", "  CPU s  wall s  test"]
    for r in sorted(rows, key=lambda r: -(r["self"] + r["children"]))[:top]:
        lines.append(f"{r['self'] + r['children']:7.0f} {r['wall']:7.0f}  {r['id']}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(sys.argv[1] if len(sys.argv) > 1 else os.environ.get(ENV, "cpu_usage")))

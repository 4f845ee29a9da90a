"""Torch threads per worker process: W busy processes on one machine, each with N threads.

    python bench/worker_threads.py [--processes 2] [--pairs 24] [--write]

What ``pipelines.common.worker_cpu_threads`` decides for DirectRunner's ``multi_processing``:
each of W workers gets cores / W torch threads instead of torch's default (one per core). The
bench starts W processes at once, each scoring the same pairs with the Qwen3-Reranker-0.6B
config (random weights, the real cost) after an untimed warm-up, once with cores / W threads
each and once with one thread per core each (the default before), alternating, and one
process alone with all cores (the same work done serially, the ideal). It reports each
process's scoring seconds and the pairs per second of the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.common import command, machine, report  # noqa: E402

DOC = "The module provides functions for parsing command line arguments, with subcommands and help. " * 3
SECTION = "Torch threads per worker process (CPU)"


def score(model_dir: str, threads: int, pairs: int) -> float:
    import torch

    torch.set_num_threads(threads)
    from transforms.models.reranker import Qwen3Reranker

    model = Qwen3Reranker(model_dir, device="cpu").load()
    batch = [(f"how do I parse arguments {i}", DOC) for i in range(pairs)]
    model.score(batch[:2])
    started = time.perf_counter()
    model.score(batch)
    return time.perf_counter() - started


def run_processes(model_dir: str, processes: int, threads: int, pairs: int) -> list[float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", model_dir, str(threads), str(pairs)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO) for _ in range(processes)]
    out = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a scoring process failed")
    return [json.loads(o.strip().splitlines()[-1])["seconds"] for o in out]


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--one":
        print(json.dumps({"seconds": score(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))}))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=24, help="pairs each process scores")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    from tests.qwen_offline import RERANKER_CONFIGS, build_qwen3_reranker

    cores = len(os.sched_getaffinity(0))
    share = max(1, cores // args.processes)
    model_dir = str(build_qwen3_reranker(os.path.join(tempfile.mkdtemp(prefix="bench-threads-"), "r"),
                                         RERANKER_CONFIGS.get("0.6b")))  # fmt: skip
    rows = []
    for _ in range(args.repeats):
        for label, n, threads in (
            (f"{args.processes} processes × {share} thread(s) (cores / workers: the job's default now)", args.processes, share),
            (f"{args.processes} processes × {cores} threads (one per core each: torch's default)", args.processes, cores),
            (f"1 process × {cores} threads (the same work serially: the ideal)", 1, cores),
        ):
            secs = run_processes(model_dir, n, threads, args.pairs)
            # The lone process does one process's share; the machine's work is processes × pairs.
            rate = n * args.pairs / max(secs) if n > 1 else args.pairs / secs[0]
            rows.append((label, secs, rate))
            print(f"{label}: {', '.join(f'{s:.1f}' for s in secs)} s; {rate:.2f} pairs/s", flush=True)
    lines = [
        f"Command: `{command('bench/worker_threads.py')}`  ",
        f"Machine: {machine()}  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ",
        f"Qwen3-Reranker-0.6B config (random weights), {args.pairs} pairs of ~60 tokens per process, fp32, all processes "
        "started at once; scoring time after an untimed warm-up (model load excluded).",
        "",
        "| setting | scoring s per process | pairs/s of the machine |",
        "|---|---|---|",
        *(f"| {label} | {', '.join(f'{s:.1f}' for s in secs)} | {rate:.2f} |" for label, secs, rate in rows),
    ]
    report(os.path.join(REPO, "BENCHMARKS.md"), SECTION, lines, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The fixed CPU cost of a small in-process label job, with and without the tokenizer hand-over.

    python bench/job_overhead.py [--repeats 5] [--write]

A label job checks its reranker in the driver before the pipeline runs (``check_reranker``: config,
tokenizer, weights present), then the worker loads it. On DirectRunner the worker is the driver's own
process, and the check leaves its tokenizer to that load (``transforms.models.settings.hand_over_tokenizer``)
instead of the load parsing Qwen3's tokenizer.json again. This runs the same small job (3 queries, 3
candidates each from a run file, the tiny random-weight Qwen3 reranker on the real Qwen tokenizer: the
job is its fixed costs) alternately with the hand-over and with it turned off, in one process, and prints
the CPU seconds (user + system, this process) and wall seconds of each run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from apache_beam.testing.test_pipeline import TestPipeline  # noqa: E402

import transforms.models.reranker as reranker_module  # noqa: E402
from bench.common import command, machine, report  # noqa: E402
from pipelines import label  # noqa: E402
from pipelines.sample import write_sample  # noqa: E402

TITLE = "Label job fixed cost on CPU: the reranker's tokenizer parsed once"


def _inputs(tmp: str) -> tuple[dict[str, str], str, str]:
    sample = write_sample(os.path.join(tmp, "sample"))
    with open(sample["queries"]) as f:
        queries = [json.loads(line) for line in f][:3]
    docs = pq.read_table(sample["corpus"], columns=["id"]).column("id").to_pylist()
    log = os.path.join(tmp, "log.parquet")
    pq.write_table(pa.Table.from_pylist([{"query_id": q["_id"], "query": q["text"]} for q in queries]), log)
    run = os.path.join(tmp, "run.trec")
    with open(run, "w") as f:
        for i, q in enumerate(queries):
            for rank, doc in enumerate(docs[3 * i : 3 * i + 3], 1):
                f.write(f"{q['_id']} Q0 {doc} {rank} {1 / rank:.3f} bm25\n")
    return sample, log, run


def run_once(tmp: str, n: int, sample: dict[str, str], log: str, run: str, reranker: str) -> tuple[float, float]:
    out = os.path.join(tmp, f"out-{n}")
    argv = ["--queries", log, "--out", out, "--reranker", reranker, "--candidates", run, "--corpus", sample["corpus"],
            "--query-id-column", "query_id", "--eval-fraction", "1.0", "--top-k", "3", "--device", "cpu"]  # fmt: skip
    cpu, wall = time.process_time(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = label.run(argv, test_pipeline=TestPipeline())
    assert summary["status"] == "ok" and summary["pairs_scored"] == 9, summary
    return time.process_time() - cpu, time.perf_counter() - wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each mode, alternated")
    parser.add_argument("--write", action="store_true", help="replace this bench's section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)  # the jobs' progress lines
    from tests.beam_speed import memoize_dofn_specs
    from tests.qwen_offline import build_qwen3_reranker

    memoize_dofn_specs()  # as in the test suite, whose label jobs this cost is about
    keep = reranker_module.hand_over_tokenizer
    results: dict[str, list[tuple[float, float]]] = {"hand-over": [], "no hand-over": []}
    with tempfile.TemporaryDirectory() as tmp:
        sample, log, run = _inputs(tmp)
        reranker = str(build_qwen3_reranker(os.path.join(tmp, "reranker")))
        size = os.path.getsize(os.path.join(reranker, "tokenizer.json"))
        run_once(tmp, -1, sample, log, run, reranker)  # warm-up: imports, first Beam pipeline
        for n in range(args.repeats * len(results)):
            mode = list(results)[n % len(results)]
            reranker_module.hand_over_tokenizer = keep if mode == "hand-over" else (lambda *a, **k: None)
            results[mode].append(run_once(tmp, n, sample, log, run, reranker))
        reranker_module.hand_over_tokenizer = keep
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"`{command('bench/job_overhead.py', argv)}`, {machine()}, {when}, load {os.getloadavg()[0]:.1f}.", "",
            "One in-process label job (DirectRunner) of 3 queries x 3 candidates from a run file, the tiny random-weight "
            f"Qwen3 reranker on the real Qwen tokenizer ({size / 1e6:.1f} MB tokenizer.json): the job is its fixed costs. Modes "
            f"alternated, {args.repeats} runs each, after one warm-up run; CPU = this process's user + system.", "",
            "| mode | CPU s per job (median) | CPU s each | wall s (median) |", "|---|---|---|---|"]  # fmt: skip
    for mode, rows in results.items():
        cpu = [c for c, _ in rows]
        body.append(f"| {mode} | {statistics.median(cpu):.2f} | {' '.join(f'{c:.2f}' for c in cpu)} | "
                    f"{statistics.median(w for _, w in rows):.2f} |")  # fmt: skip
    median = {mode: statistics.median(c for c, _ in rows) for mode, rows in results.items()}
    saved = median["no hand-over"] - median["hand-over"]
    body += ["", f"The hand-over saves {saved:.2f} CPU s per in-process label job here (the second parse of "
             "tokenizer.json and Qwen2Tokenizer's set-up). A job whose workers are other processes parses it in each "
             "worker as before; its driver keeps the checked tokenizer (one slot) unused."]  # fmt: skip
    report(os.path.join(ROOT, "BENCHMARKS.md"), TITLE, body, args.write)


if __name__ == "__main__":
    main()

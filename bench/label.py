"""Label pipeline throughput: pairs/s of the whole job, and where the time goes.

    python bench/label.py [--reranker tiny|0.6b] [--queries N] [--top-k K] [--write]
    python bench/label.py --device cuda --embedder 0.6b --reranker 0.6b --copies 8 --top-k 50 --write   # a GPU

Builds the stdlib sample corpus, indexes it with the offline MiniLM model (``--embedder 0.6b``: the
Qwen3-Embedding-0.6B config with random weights, for GPU machines without MiniLM; not timed),
then runs `corpus-etl label` on DirectRunner and reads the split from its summary (``time in steps``, the
job's own Beam metrics): retrieval = query embedding (RunInference latency of that step) + Qdrant search;
scoring = reranker RunInference latency; writing = the dataset writer; the rest is Beam
(reading, shuffles, joins) and model loading. `--reranker 0.6b` uses the exact
Qwen3-Reranker-0.6B config with random weights (same cost as the real one).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from apache_beam.testing.test_pipeline import TestPipeline  # noqa: E402

from bench.common import command, machine, replace_section  # noqa: E402
from pipelines import index, label  # noqa: E402
from pipelines.sample import QUERIES, write_sample  # noqa: E402

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def run_once(args, tmp: str, reranker: str, embedder: str, qdrant: str, log: str, out: str) -> dict:
    argv = [
        "--queries", log, "--out", out, "--reranker", reranker, "--collection", "docs",
        "--model", embedder, "--qdrant-path", qdrant,
        "--top-k", str(args.top_k), "--device", args.device, "--progress-interval", "30",
    ]  # fmt: skip
    started = time.perf_counter()
    summary = label.run(argv, test_pipeline=TestPipeline())
    wall = time.perf_counter() - started
    c = summary["counters"]
    pairs = c.get("judgements", 0)
    steps = summary["step_seconds"]  # the job's own split (pipelines.common.step_seconds)
    retrieval = steps.get("query", 0.0) + steps.get("search", 0.0)
    scoring = steps.get("rerank", 0.0)
    writing = steps.get("write", 0.0)
    return {"pairs": pairs, "queries": c.get("queries_labelled", 0), "wall_s": wall, "retrieval_s": retrieval,
            "scoring_s": scoring, "writing_s": writing, "pairs_per_s": pairs / wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reranker", choices=["tiny", "0.6b"], default="tiny")
    parser.add_argument("--embedder", choices=["minilm", "tiny", "0.6b"], default="minilm",
                        help="first stage: MiniLM (offline), or a random-weight Qwen3-Embedding config")
    parser.add_argument("--device", default="cpu", help="both models' device (cpu | cuda)")
    parser.add_argument("--workdir", default=None, help="corpus, index, models and outputs (default: temp)")
    parser.add_argument("--queries", type=int, default=25, help="distinct queries in the log (max 25 x copies)")
    parser.add_argument("--copies", type=int, default=1, help="repeat the query set with suffixes to get more queries")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--write", action="store_true", help="record the figures in BENCHMARKS.md")
    args = parser.parse_args(argv)

    import torch

    from tests.qwen_offline import (
        EMBEDDING_CONFIGS,
        RERANKER_CONFIGS,
        TINY_QWEN3,
        build_qwen3_embedding,
        build_qwen3_reranker,
    )

    tmp = args.workdir or tempfile.mkdtemp(prefix="bench-label-")
    cuda = args.device.startswith("cuda")
    weights = {"dtype": torch.bfloat16, "device": torch.device(args.device)} if cuda else {}
    sample = write_sample(os.path.join(tmp, "sample"))
    qdrant = os.path.join(tmp, "qdrant")
    embedder = MINILM
    if args.embedder != "minilm":
        config = TINY_QWEN3 if args.embedder == "tiny" else EMBEDDING_CONFIGS[args.embedder]
        embedder = str(build_qwen3_embedding(os.path.join(tmp, "embedder"), config, check=False, **weights))
    index.run(["--input", sample["corpus"], "--collection", "docs", "--model", embedder, "--device", args.device,
               "--qdrant-path", qdrant, "--title-column", "title", "--chunk-tokens", "128", "--chunk-overlap", "16"],
              test_pipeline=TestPipeline())  # fmt: skip
    texts = [t for t, _ in QUERIES.values()]
    log_rows = [{"query_id": None, "query": f"{t} (variant {c})" if c else t, "count": 1}
                for c in range(args.copies) for t in texts][: args.queries * args.copies]  # fmt: skip
    log = os.path.join(tmp, "log.parquet")
    pq.write_table(pa.Table.from_pylist(log_rows), log)
    reranker = str(build_qwen3_reranker(os.path.join(tmp, "reranker"), RERANKER_CONFIGS.get(args.reranker), **weights))
    r = run_once(args, tmp, reranker, embedder, qdrant, log, os.path.join(tmp, "out"))
    other = max(r["wall_s"] - r["retrieval_s"] - r["scoring_s"] - r["writing_s"], 0.0)
    share = {k: v / r["wall_s"] for k, v in
             (("retrieval", r["retrieval_s"]), ("scoring", r["scoring_s"]), ("writing", r["writing_s"]), ("other", other))}
    lines = [
        "| reranker | queries | pairs | wall s | pairs/s | retrieval | scoring | writing | Beam + loading |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {args.reranker} | {r['queries']} | {r['pairs']} | {r['wall_s']:.1f} | {r['pairs_per_s']:.1f} | "
        f"{share['retrieval']:.0%} ({r['retrieval_s']:.1f}s) | {share['scoring']:.0%} ({r['scoring_s']:.1f}s) | "
        f"{share['writing']:.0%} ({r['writing_s']:.2f}s) | {share['other']:.0%} ({other:.1f}s) |",
    ]
    print("\n".join(lines))
    if args.write:
        cmd = command("bench/label.py", argv)
        first_stage = "MiniLM" if args.embedder == "minilm" else f"Qwen3-Embedding {args.embedder} config (random weights)"
        where = f"models on {torch.cuda.get_device_name(0)}" if cuda else "CPU only"
        body = [
            f"Command: `{cmd}`  ",
            f"Machine: {machine()}  ",
            f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ",
            f"Python {platform.python_version()}; first stage: {first_stage} index of the stdlib sample corpus "
            f"(chunks of 128 tokens), top {args.top_k}; DirectRunner; {where}.",
            "",
            *lines,
            "",
            "Shares come from the job's own Beam metrics: RunInference batch latency of the query-embedding and "
            "reranking steps, the Qdrant search time, and the writer's time; the rest is Beam itself "
            "(Parquet read, shuffles, joins) and model loading.",
        ]
        title = f"Label pipeline on CPU ({args.reranker} reranker)" if not cuda else (
            f"Label pipeline on {torch.cuda.get_device_name(0)} ({args.reranker} reranker, {args.embedder} embedder)")
        replace_section(os.path.join(ROOT, "BENCHMARKS.md"), title, body)  # the repository's, from any folder


if __name__ == "__main__":
    main()

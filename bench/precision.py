"""``--precision`` on CPU: speed and parity of the encoder's forward passes, per precision.

    python bench/precision.py [--docs 600] [--repeats 3] [--write]

``TextEncoder`` with MiniLM encodes the long-document corpus of ``bench/index_cpu.py``
(``long_documents()``, a few hundred tokens each, truncated at 256) at each precision, with
the job's defaults otherwise (2,048-token passes, one single-thread pass per core). Runs
alternate precisions after an untimed warm-up of each; the encode is timed alone
(tokenised ids in, vectors out), so the figure is the forward passes' rate. Parity is against
fp32: 1 - cosine per document (max, mean), and top-10 identity for the 25 queries of
``pipelines/sample.py`` (embedded once in fp32) searched exactly over the documents' vectors.
Also reports whether this CPU multiplies bf16 in hardware, which decides ``--precision auto``.
The bf16 rows run twice: as the job runs them, with the Linear layers' weights prepacked for
oneDNN (``transforms.models.prepack``), and with ``CORPUS_ETL_CPU_PREPACK=0``.

``--reranker``: the same for the Qwen3-Reranker-0.6B config with random weights (the real cost;
``tests.qwen_offline``), scoring ``--pairs`` (query, document) pairs of stdlib prose, fp32 against
bf16-mixed: pairs/s and the largest |P(yes) difference|. Random weights say nothing about a
trained model's sensitivity, so that column is a bound on arithmetic, not on label quality.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from bench.common import command as bench_command  # noqa: E402
from bench.common import machine, report  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SECTION = "Precision on CPU: MiniLM forward passes on long documents"
RERANK_SECTION = "Precision on CPU: Qwen3-Reranker-0.6B config scoring"
UNPACKED = " (not prepacked)"  # the same precision with CORPUS_ETL_CPU_PREPACK=0 (transforms.models.prepack)
ROWS = ("fp32", "bf16-mixed", "bf16-mixed" + UNPACKED, "bf16", "bf16" + UNPACKED)


def load(cls, model: str, row: str, **kwargs):
    """``cls(model, precision=...)`` loaded on CPU, with oneDNN prepacking off for the ``UNPACKED`` rows."""
    from transforms.models import prepack

    before = os.environ.get(prepack.ENV)
    os.environ[prepack.ENV] = "0" if row.endswith(UNPACKED) else "1"
    try:
        return cls(model, device="cpu", precision=row.removesuffix(UNPACKED), **kwargs).load()
    finally:
        if before is None:
            del os.environ[prepack.ENV]
        else:
            os.environ[prepack.ENV] = before
TOP_K = 10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=600, help="long documents to encode")
    parser.add_argument("--repeats", type=int, default=3, help="timed encodes of each precision")
    parser.add_argument("--reranker", action="store_true", help="score reranker pairs instead (fp32, bf16-mixed)")
    parser.add_argument("--pairs", type=int, default=16, help="with --reranker: pairs scored per run")
    parser.add_argument("--write", action="store_true", help="replace this bench's section of BENCHMARKS.md")
    parser.add_argument("--title", help="the section's title (default: the bench's own), e.g. to keep another CPU's")
    args = parser.parse_args(argv)
    command = bench_command("bench/precision.py", argv)
    if args.reranker:
        return rerank(args, command)


    from bench.index_cpu import long_documents
    from pipelines.sample import QUERIES
    from transforms.models.devices import cpu_has_native_bf16
    from transforms.models.encoder import TextEncoder

    texts = [d["text"] for d in long_documents()[: args.docs]]
    encoders = {row: load(TextEncoder, MODEL, row) for row in ROWS}
    ids = encoders["fp32"].tokenize(texts)
    tokens = sum(len(x) for x in ids)
    for enc in encoders.values():
        enc.encode_ids(ids[:64])  # warm-up: oneDNN builds its kernels for each dtype
    seconds: dict[str, list[float]] = {p: [] for p in ROWS}
    vectors: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for p, enc in encoders.items():
            started = time.perf_counter()
            out, failures = enc.encode_ids(ids)
            seconds[p].append(time.perf_counter() - started)
            assert not failures
            vectors[p] = np.stack(out)
            print(f"{p:>28}: {seconds[p][-1]:6.2f} s  {tokens / seconds[p][-1]:8.0f} tokens/s", flush=True)

    queries = encoders["fp32"].encode([text for text, _ in QUERIES.values()], is_query=True)
    top = {p: np.argsort(-(queries @ v.T), axis=1)[:, :TOP_K] for p, v in vectors.items()}
    base = statistics.median(seconds["fp32"])
    rows = []
    for p in ROWS:
        cos = (vectors[p] * vectors["fp32"]).sum(axis=1)
        same = int(sum((top[p][q] == top["fp32"][q]).all() for q in range(len(queries))))
        overlap = np.mean([len(set(top[p][q]) & set(top["fp32"][q])) / TOP_K for q in range(len(queries))])
        med = statistics.median(seconds[p])
        rows.append(
            f"| {p} | {tokens / med:.0f} | {med:.2f} | {', '.join(f'{s:.2f}' for s in seconds[p])} | "
            f"{base / med:.2f}× | {1 - cos.min():.1e} | {1 - cos.mean():.1e} | {same}/{len(queries)} | {overlap:.3f} |"
        )
    auto = "bf16-mixed" if cpu_has_native_bf16() else "fp32"
    body = [
        *_header(command, f"so `--precision auto` runs the encoder {auto} here"),
        f"- Corpus: {len(texts)} documents of `long_documents()`, {tokens} MiniLM tokens (truncated at 256)",
        "- `TextEncoder.encode_ids` timed alone, job defaults otherwise (2,048-token passes, one single-thread pass "
        f"per core); {args.repeats} runs each, alternating, after a warm-up of each",
        "- Parity against fp32: 1 - cosine per document; top-10 of the 25 `pipelines/sample.py` queries (embedded "
        "in fp32) searched exactly over each precision's vectors",
        "",
        "| precision | tokens/s (median) | median s | per-run s | speed-up vs fp32 | max 1 - cos | mean 1 - cos "
        "| identical top-10 | top-10 overlap |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    report(os.path.join(REPO, "BENCHMARKS.md"), args.title or SECTION, body, args.write)
    return 0


def _header(command: str, auto: str) -> list[str]:
    """Command, machine (with whether it multiplies bf16 in hardware) and date lines of a section."""
    import torch

    from transforms.models.devices import cpu_has_native_bf16

    return [
        f"Command: `{command}`",
        "",
        f"- Machine: {machine()}; bf16 in hardware (AVX512-BF16 or AMX): "
        f"{'yes' if cpu_has_native_bf16() else 'no'}, {auto}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the end",
    ]


def rerank(args: argparse.Namespace, command: str) -> int:
    import tempfile

    from bench.index_cpu import long_documents
    from tests.qwen_offline import RERANKER_CONFIGS, build_qwen3_reranker
    from transforms.models.reranker import Qwen3Reranker

    model_dir = str(build_qwen3_reranker(os.path.join(tempfile.mkdtemp(prefix="bench-precision-"), "r"),
                                         RERANKER_CONFIGS.get("0.6b")))  # fmt: skip
    docs = [d["text"][:600] for d in long_documents()[: args.pairs]]
    pairs = [(f"what does module {i} provide", doc) for i, doc in enumerate(docs)]
    models = {row: load(Qwen3Reranker, model_dir, row) for row in ("fp32", "bf16-mixed", "bf16-mixed" + UNPACKED)}
    tokens = sum(models["fp32"].count_tokens(pair) for pair in pairs)
    for m in models.values():
        m.score(pairs[:2])  # warm-up
    seconds: dict[str, list[float]] = {p: [] for p in models}
    scores: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for p, m in models.items():
            started = time.perf_counter()
            scores[p] = np.array(m.score(pairs))
            seconds[p].append(time.perf_counter() - started)
            print(f"{p:>28}: {seconds[p][-1]:6.2f} s  {len(pairs) / seconds[p][-1]:6.2f} pairs/s", flush=True)
    base = statistics.median(seconds["fp32"])
    rows = [
        f"| {p} | {len(pairs) / statistics.median(s):.2f} | {tokens / statistics.median(s):.0f} | "
        f"{', '.join(f'{x:.2f}' for x in s)} | {base / statistics.median(s):.2f}× | "
        f"{np.abs(scores[p] - scores['fp32']).max():.1e} |"
        for p, s in seconds.items()
    ]
    body = [
        *_header(command, "but `--precision auto` keeps the reranker at fp32 on CPU whatever this says"),
        f"- {len(pairs)} pairs (a short query, 600 characters of a long document), {tokens} prompt tokens; "
        f"`Qwen3Reranker.score` timed alone, {args.repeats} runs each, alternating, after a warm-up",
        "- Random weights: the |P(yes)| column bounds arithmetic, not a trained model's labels",
        "",
        "| precision | pairs/s (median) | tokens/s | per-run s | speed-up vs fp32 | max abs P(yes) difference |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    report(os.path.join(REPO, "BENCHMARKS.md"), args.title or RERANK_SECTION, body, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

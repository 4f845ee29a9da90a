"""GPU reranking throughput: the Qwen3-Reranker model card's loop vs ``Qwen3Reranker``.

    python bench/gpu_rerank.py [--size 0.6b|4b|8b] [--queries N] [--candidates K] [--write]
    python bench/gpu_rerank.py --device cpu --queries 1 --candidates 40 --write   # ratios on CPU
    python bench/gpu_rerank.py --smoke           # tiny config, few pairs, CPU: checks it runs

The model is Qwen3-Reranker with the exact published config of ``--size`` and random bf16
weights (same FLOPs and memory as the real one; the scores are meaningless), built with
``tests.qwen_offline``. The workload is a labelling job's: ``--queries`` queries of
~20 tokens, each with ``--candidates`` (100) documents of 50-512 tokens (mean ~300) cut
from the Python standard library's docstrings.

Compared, on the same pairs:

* the model card's code (``process_inputs`` + ``compute_logits``: full-vocabulary logits
  at every position), one query's candidates per batch (``--ref-batch``);
* ``Qwen3Reranker.score`` called per query (100 pairs a call, as ``RerankByQuery`` groups
  them): the two-row head, length-sorted token-budget batches, and the query's prompt head
  run once per forward pass (``share_prefix``, the default);
* the same without the shared head (``share_prefix=False``), which isolates that gain;
* ``Qwen3Reranker.score`` over all pairs at once: heads shared, sorting by length across
  queries (several heads per forward pass).

Reported: pairs/s, tokens/s (real prompt tokens), padding overhead, peak GPU memory, the
largest score difference to ours (bf16 noise), and MFU = 2 * non-embedding params *
tokens/s / 800e12 (H100 bf16 peak as counted here; attention and the card's full-vocabulary
head are not counted as useful work). ``--write`` appends a dated section to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.gpu_embed import (  # noqa: E402
    MFU_FORMULA,
    REPO_ROOT,
    SMOKE_NOTE,
    Result,
    budget_batches,
    command_line,
    device_name,
    peak_gib,
    realish_texts,
    reset_memory,
    sample_lengths,
    stdlib_text,
    table_header,
    timed,
    write_section,
)
from tests.qwen_offline import RERANKER_CONFIGS, TINY_QWEN3, build_qwen3_reranker, non_embedding_params  # noqa: E402
from transforms.models.reranker import DEFAULT_INSTRUCTION, Qwen3Reranker  # noqa: E402


def tokens_run(ids: list[list[int]], heads: list[int], token_budget: int, shared: bool) -> int:
    """Tokens the forward passes of ``Qwen3Reranker.score_ids`` compute, pads included: per
    pass, whole padded pairs, or (shared) each distinct head once plus the padded rest."""
    lengths = [len(x) for x in ids]
    total = 0
    for batch in budget_batches(lengths, token_budget):
        distinct = {tuple(ids[i][: heads[i]]) for i in batch}
        if not shared or len(distinct) == len(batch):  # _forward_shared falls back to one plain pass
            total += max(lengths[i] for i in batch) * len(batch)
        else:
            total += max(map(len, distinct)) * len(distinct)
            total += max(lengths[i] - heads[i] for i in batch) * len(batch)
    return total


CPU_NOTE = " Run on CPU: MFU is relative to the H100 bf16 peak and meaningless here; the ratios are the figures."


class CardLoop:
    """The Qwen3-Reranker model card's scoring code, on ``device`` in ``dtype``."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, max_length: int = 8192) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.max_length = max_length
        self.token_false_id = self.tokenizer.convert_tokens_to_ids("no")
        self.token_true_id = self.tokenizer.convert_tokens_to_ids("yes")
        prefix = (
            "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
            'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
        )
        suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        self.prefix_tokens = self.tokenizer.encode(prefix, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(suffix, add_special_tokens=False)
        self.padded_tokens = 0

    @staticmethod
    def format_instruction(instruction, query, doc):
        if instruction is None:
            instruction = "Given a web search query, retrieve relevant passages that answer the query"
        return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"

    def process_inputs(self, pairs):
        inputs = self.tokenizer(
            pairs,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=self.max_length - len(self.prefix_tokens) - len(self.suffix_tokens),
        )
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix_tokens + ele + self.suffix_tokens
        inputs = self.tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=self.max_length)
        for key in inputs:
            inputs[key] = inputs[key].to(self.model.device)
        return inputs

    @torch.no_grad()
    def compute_logits(self, inputs):
        batch_scores = self.model(**inputs).logits[:, -1, :]
        true_vector = batch_scores[:, self.token_true_id]
        false_vector = batch_scores[:, self.token_false_id]
        batch_scores = torch.stack([false_vector, true_vector], dim=1)
        batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
        return batch_scores[:, 1].exp().tolist()

    def score(self, query_docs: list[tuple[str, str]], batch: int) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(query_docs), batch):
            pairs = [
                self.format_instruction(DEFAULT_INSTRUCTION, q, d)
                for q, d in query_docs[start : start + batch]
            ]
            inputs = self.process_inputs(pairs)
            self.padded_tokens += inputs["input_ids"].numel()
            scores.extend(self.compute_logits(inputs))
        return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(RERANKER_CONFIGS), default="0.6b")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--ref-batch", type=int, default=None, help="card loop batch (default: one query)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--token-budget", type=int, default=None, help="ours: padded tokens per forward pass")
    parser.add_argument("--model-dir", default=None, help="reuse (or keep) the random-weight model here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each of our variants (median reported)")
    parser.add_argument("--smoke", action="store_true", help="tiny config, 2 queries x 6 candidates, CPU")
    parser.add_argument(
        "--liger", action="store_true",
        help="also ours per query, head shared, with Liger-Kernel's fused kernels (kernels='liger'; CUDA)",
    )
    parser.add_argument("--write", action="store_true", help="append the figures to BENCHMARKS.md")
    parser.add_argument("--benchmarks-file", default=str(REPO_ROOT / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    # The card pads with max_length and padding=True, which transformers warns about on every batch.
    warnings.filterwarnings("ignore", message="`max_length` is ignored when `padding`")

    from transforms.models.devices import default_dtype, resolve_device

    device = resolve_device(args.device or ("cpu" if args.smoke else "cuda"))
    dtype = default_dtype(device)
    config = TINY_QWEN3 if args.smoke else RERANKER_CONFIGS[args.size]
    n_queries, n_cands = (
        (min(args.queries, 2), min(args.candidates, 6)) if args.smoke else (args.queries, args.candidates)
    )
    ref_batch = args.ref_batch or n_cands
    label = "tiny (smoke)" if args.smoke else f"Qwen3-Reranker-{args.size.upper()} config"
    params = non_embedding_params(config)

    model_dir = Path(args.model_dir or tempfile.mkdtemp(prefix="bench-rerank-"))
    if not (model_dir / "config.json").exists():
        print(f"building random-weight {label} in {model_dir} ...", flush=True)
        build_qwen3_reranker(
            model_dir,
            config,
            seed=args.seed,
            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
            device=device,
        )
        reset_memory(device)
    path = str(model_dir)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    text = stdlib_text()
    queries = realish_texts(
        tok,
        sample_lengths(n_queries, low=10, high=30, mean=20, seed=args.seed + 1),
        seed=args.seed + 1,
        text=text,
    )
    # --smoke checks the code path: short documents, as the card's loop scores every position's logits
    low, high, mean = (20, 96, 60) if args.smoke else (50, 512, 300)
    doc_lengths = sample_lengths(n_queries * n_cands, low=low, high=high, mean=mean, seed=args.seed)
    docs = realish_texts(tok, doc_lengths, seed=args.seed, text=text)
    # Grouped by query, as first-stage retrieval emits them.
    pairs = [(queries[i // n_cands], doc) for i, doc in enumerate(docs)]

    ours = Qwen3Reranker(path, device=str(device), dtype=dtype, token_budget=args.token_budget).load()
    ids = ours.encode_pairs(pairs)
    heads = ours.head_lengths(pairs, ids)
    lengths = [len(x) for x in ids]
    tokens = sum(lengths)
    print(
        f"{n_queries} queries x {n_cands} candidates = {len(pairs)} pairs, {tokens:,} prompt tokens "
        f"(mean {np.mean(lengths):.0f}/pair, of which a shared head of mean {np.mean(heads):.0f}); {label}; "
        f"{params / 1e6:,.0f}M non-embedding params; {device_name(device)}; {dtype}",
        flush=True,
    )

    def padded(rows: range, shared: bool) -> int:
        return tokens_run([ids[i] for i in rows], [heads[i] for i in rows], ours.token_budget, shared)

    per_query_rows = [range(q * n_cands, (q + 1) * n_cands) for q in range(n_queries)]

    def run_ours(name: str, shared: bool, calls: list[range]) -> Result:
        ours.share_prefix = shared
        reset_memory(device)
        scores, seconds = timed(device, lambda: [s for rows in calls for s in ours.score([pairs[i] for i in rows])])
        result = Result(name, seconds, len(pairs), tokens, sum(padded(r, shared) for r in calls), peak_gib(device))
        result.scores = np.asarray(scores)  # type: ignore[attr-defined]
        return result

    ours.score(pairs[: min(len(pairs), 16)])  # warm-up
    variants = (
        (f"Qwen3Reranker (ours), per query ({n_cands} pairs a call), head shared", True, per_query_rows),
        (f"Qwen3Reranker (ours), per query ({n_cands} pairs a call), no sharing", False, per_query_rows),
        ("Qwen3Reranker (ours), all pairs in one call, head shared", True, [range(len(pairs))]),
    )
    # Repeats interleave the variants (A B C A B C ...), so drift hits them alike; the median counts.
    runs: dict[str, list[Result]] = {name: [] for name, _, _ in variants}
    for _ in range(args.repeat):
        for name, shared, calls in variants:
            runs[name].append(run_ours(name, shared, calls))
            print(runs[name][-1].row(params, "pairs"), flush=True)
    results: list[Result] = [sorted(rs, key=lambda r: r.seconds)[len(rs) // 2] for rs in runs.values()]
    reference_scores = results[0].scores  # type: ignore[attr-defined]
    for r in results:
        r.agreement = float(np.abs(r.scores - reference_scores).max())  # type: ignore[attr-defined]
    budget = ours.token_budget
    ours = None  # frees its GPU memory before the next method
    reset_memory(device)
    failed: list[str] = []
    if args.liger:
        name = f"Qwen3Reranker (ours), per query ({n_cands} pairs a call), head shared, Liger kernels"
        try:
            ours = Qwen3Reranker(path, device=str(device), dtype=dtype, token_budget=budget, kernels="liger").load()
            ours.score(pairs[: min(len(pairs), 16)])  # warm-up (Triton compiles its kernels)
            liger_runs = [run_ours(name, True, per_query_rows) for _ in range(args.repeat)]
            row = sorted(liger_runs, key=lambda r: r.seconds)[len(liger_runs) // 2]
            row.agreement = float(np.abs(row.scores - reference_scores).max())  # type: ignore[attr-defined]
            results.append(row)
            print(row.row(params, "pairs"), flush=True)
        except Exception as exc:  # the other rows stand (one GPU lease)
            failed.append(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} |")
            print(failed[-1], flush=True)
        ours = None
        from transforms.models import liger

        liger.unpatch_rotary()  # process-wide: the card's loop below runs transformers' own
        reset_memory(device)

    card = CardLoop(path, device, dtype)
    card.score(pairs[: min(len(pairs), 16)], ref_batch)  # warm-up
    card.padded_tokens = 0
    reset_memory(device)
    scores, seconds = timed(device, lambda: card.score(pairs, ref_batch))
    results.insert(
        0,
        Result(
            f"model card loop ({ref_batch} pairs a batch, full logits)",
            seconds,
            len(pairs),
            tokens,
            card.padded_tokens,
            peak_gib(device),
            float(np.abs(np.asarray(scores) - reference_scores).max()),
        ),
    )
    print(results[0].row(params, "pairs"), flush=True)
    card = None
    reset_memory(device)
    speedups = ", ".join(f"{results[0].seconds / r.seconds:.2f}x" for r in results[1:])

    lines = [
        f"{label}, random {str(dtype).removeprefix('torch.')} weights; {n_queries} queries (mean "
        f"{np.mean([len(tok.encode(q)) for q in queries]):.0f} tokens) x {n_cands} candidates of 50-512 tokens "
        f"(mean {np.mean(doc_lengths):.0f}); {len(pairs)} pairs, {tokens:,} prompt tokens "
        f"(shared head: mean {np.mean(heads):.0f}); token budget {budget}; our rows: median of {args.repeat} "
        "interleaved runs, the card's loop: one run.",
        "",
        *table_header("max abs score diff to row 2"),
        *(r.row(params, "pairs") for r in results),
        *failed,
        "",
        "Every run of ours (s): "
        + "; ".join(f"{name.split('), ')[-1]}: " + ", ".join(f"{r.seconds:.1f}" for r in rs) for name, rs in runs.items())
        + ".",
        f"Speed-up over the card's loop (rows 2-{len(results)}): {speedups}. Padding column: tokens run (pads "
        "included; a shared head counted once per forward pass) over prompt tokens, minus one.",
        f"{MFU_FORMULA}, N_non_embedding = {params:,}, tokens = prompt tokens (a shared head's tokens "
        "count for every pair, so MFU is effective); attention FLOPs and the card's full-vocabulary head "
        "not counted." + (SMOKE_NOTE if args.smoke else CPU_NOTE if device.type == "cpu" else ""),
    ]
    print("\n".join(lines))
    if args.write:
        kind = "GPU reranking" if device.type == "cuda" else "Reranker scoring on CPU"
        title = f"{kind}: {label} on {device_name(device)}"
        write_section(Path(args.benchmarks_file), title, command_line(), device_name(device), lines)
        print(f"appended to {args.benchmarks_file}")


if __name__ == "__main__":
    main()

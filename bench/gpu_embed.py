"""GPU embedding throughput: sentence-transformers vs a plain padded loop vs ``TextEncoder``.

    python bench/gpu_embed.py [--size 0.6b|4b|8b] [--docs N] [--write]
    python bench/gpu_embed.py --smoke            # tiny config, few docs, CPU: checks it runs (also --tiny)
    python bench/gpu_embed.py --tiny --device cpu --variants padded,compiled,packed --doc-tokens 20,40

The model is Qwen3-Embedding with the exact published config of ``--size`` and random bf16
weights (same FLOPs and memory as the real one; the vectors are meaningless), built with
``tests.qwen_offline`` into a temporary directory laid out like the real repository.
Documents are 50-512 tokens (mean ~320) cut from the Python standard library's docstrings.

Compared, on the same documents:

* ``sentence-transformers`` ``encode`` at batch 32 and 512 (it sorts by characters and pads
  each batch to its longest text);
* a plain transformers loop: tokenise, sort by length, cut into padded-token-budget batches,
  last-token pooling, normalise;
* the project's ``TextEncoder`` (``transforms/models/encoder.py``), padded batches (the default;
  on CUDA the next batch is padded, pinned and copied while one runs), and the same without that
  overlap (``padded-serial``);
* the same compiled over bucketed lengths (``--backend compile``: inductor, a dynamic row count;
  compile time reported, not timed), and ``compiled-graphs``: CUDA graphs with
  ``mode="reduce-overhead"`` and a static row count per bucket (``cuda_graphs=True``);
* the same with ``packing=True``: padding-free rows of texts back to back (``--packed-attention``,
  default ``varlen``: PyTorch's FlashAttention-2 variable-length kernel on CUDA, a dense block mask on
  CPU, which only shows it runs; ``flex_attention``: transformers' block mask), eager (``packed``)
  or compiled with the row length dynamic (``packed-compiled``: ``--backend compile`` with packing;
  ``packed-compiled-dynamic``: the same under ``torch.compile(dynamic=True)``, which may compile once
  instead of twice), and both with Liger-Kernel's fused RMSNorm, rotary and SwiGLU kernels
  (``packed-liger``, ``packed-compiled-liger``: ``TextEncoder(kernels="liger")``, CUDA only);
* ``packed-job``, ``packed-liger-job``: the same rows timed as the index job calls the encoder
  (``embed_batch`` with the chunks' token counts): each row is tokenised while the previous one runs,
  where the other rows tokenise every document before the first pass (its share is in their names).

Reported: documents/s, tokens/s (real tokens, EOS included, padding not counted), padding
overhead, peak GPU memory, and MFU = 2 * non-embedding params * tokens/s / 800e12 (the
H100 bf16 peak used here; attention's own FLOPs are left out, so MFU is a lower bound).
``--write`` appends a dated section to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import functools
import gc
import logging
import os
import random
import shlex
import sys
import sysconfig
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import machine, replace_section  # noqa: E402
from tests.qwen_offline import (  # noqa: E402
    EMBEDDING_CONFIGS,
    TINY_QWEN3,
    build_qwen3_embedding,
    non_embedding_params,
)
from transforms.models.devices import budget_batches  # noqa: E402

PEAK_FLOPS = 800e12  # H100 bf16 dense peak as this project counts it
MFU_FORMULA = "MFU = 2 * N_non_embedding * tokens_per_s / 800e12"
SMOKE_NOTE = " Smoke run on CPU: MFU is relative to the H100 peak and meaningless here."
REPO_ROOT = Path(__file__).resolve().parents[1]


# -- shared with bench/gpu_rerank.py ---------------------------------------------------------------
@functools.lru_cache(maxsize=4)  # parsing 400 modules takes seconds; the smoke tests call it twice
def stdlib_text(max_files: int = 400) -> str:
    """English prose from the standard library's docstrings (module, class and function)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    for path in sorted(root.glob("*.py"))[:max_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc)
    return "\n\n".join(parts)


def sample_lengths(n: int, *, low: int, high: int, mean: float, seed: int) -> list[int]:
    """``n`` lengths in [low, high] from a scaled Beta(a, b) with the given mean (a + b = 5)."""
    rng = random.Random(seed)
    a = 5 * (mean - low) / (high - low)
    return [int(round(low + (high - low) * rng.betavariate(a, 5 - a))) for _ in range(n)]


def realish_texts(tokenizer: Any, lengths: Sequence[int], *, seed: int, text: str | None = None) -> list[str]:
    """Texts of about ``lengths`` tokens each: windows of the stdlib docstring token stream."""
    stream = tokenizer(text or stdlib_text(), add_special_tokens=False, verbose=False)["input_ids"]
    rng = random.Random(seed)
    out = []
    for n in lengths:
        start = rng.randrange(0, max(len(stream) - n, 1))
        out.append(tokenizer.decode(stream[start : start + n]).strip())
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({machine()})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def mfu(params: int, tokens_per_s: float) -> float:
    return 2 * params * tokens_per_s / PEAK_FLOPS


def write_section(path: Path, title: str, args_line: str, device: str, lines: list[str]) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"Command: `{args_line}`", "", f"Device: {device}", "", f"Date: {stamp}", "", *lines]
    replace_section(str(path), f"{title} ({stamp})", body)


def command_line() -> str:
    return "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]]
    )


def rate(x: float) -> str:
    """Three significant figures for small rates (CPU runs), thousands separators for large."""
    return f"{x:,.1f}" if x >= 100 else f"{x:.3g}"


@dataclass
class Result:
    name: str
    seconds: float
    items: int
    tokens: int
    padded_tokens: int | None
    peak_gib: float | None
    agreement: float | None = None  # min cosine (embeddings) / max |diff| (scores) against ours

    def row(self, params: int, unit: str) -> str:
        tps = self.tokens / self.seconds
        pad = f"{self.padded_tokens / self.tokens - 1:.0%}" if self.padded_tokens else "n/a"
        mem = f"{self.peak_gib:.1f}" if self.peak_gib is not None else "n/a"
        agree = f"{self.agreement:.4f}" if self.agreement is not None else "-"
        return (
            f"| {self.name} | {self.seconds:.2f} | {rate(self.items / self.seconds)} {unit}/s | {tps:,.0f} | "
            f"{mfu(params, tps):.1%} | {pad} | {mem} | {agree} |"
        )


def table_header(agreement: str) -> list[str]:
    return [
        f"| method | wall s | throughput | tokens/s | MFU | padding | peak GiB | {agreement} |",
        "|---|---|---|---|---|---|---|---|",
    ]


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    sync(device)
    started = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - started


# -- the three embedding methods ---------------------------------------------------------------
def run_sentence_transformers(
    path: str, docs: list[str], device: torch.device, dtype: torch.dtype, batch: int
):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(path, device=str(device), model_kwargs={"dtype": dtype})
    st.to(dtype)
    st.encode(docs[:batch], batch_size=batch)  # warm-up
    reset_memory(device)
    vectors, seconds = timed(device, lambda: st.encode(docs, batch_size=batch, convert_to_numpy=True))
    # sentence-transformers sorts by characters, then pads each batch to its longest text.
    lengths = [len(x) for x in st.tokenizer(docs, truncation=True, max_length=st.max_seq_length)["input_ids"]]
    by_chars = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
    padded = sum(
        max(lengths[i] for i in by_chars[s : s + batch]) * len(by_chars[s : s + batch])
        for s in range(0, len(docs), batch)
    )
    result = Result(
        f"sentence-transformers encode, batch {batch}",
        seconds,
        len(docs),
        sum(lengths),
        padded,
        peak_gib(device),
    )
    return np.asarray(vectors, dtype=np.float32), result


@torch.inference_mode()
def run_plain_loop(path: str, docs: list[str], device: torch.device, dtype: torch.dtype, budget: int):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()

    def encode() -> tuple[np.ndarray, int, int]:
        ids = tok(docs, truncation=True, max_length=8192)["input_ids"]
        lengths = [len(x) for x in ids]
        out = np.zeros((len(docs), model.config.hidden_size), np.float32)
        padded = 0
        for batch in budget_batches(lengths, budget):
            enc = tok.pad({"input_ids": [ids[i] for i in batch]}, padding=True, return_tensors="pt").to(
                device
            )
            hidden = model(**enc, use_cache=False).last_hidden_state[:, -1]  # left padding: last column
            out[batch] = torch.nn.functional.normalize(hidden.float(), dim=1).cpu().numpy()
            padded += enc["input_ids"].numel()
        return out, sum(lengths), padded

    encode_warm = docs[:32]
    tok(encode_warm)
    reset_memory(device)
    (vectors, tokens, padded), seconds = timed(device, encode)
    result = Result(
        f"transformers loop, sorted, {budget} token budget",
        seconds,
        len(docs),
        tokens,
        padded,
        peak_gib(device),
    )
    return vectors, result


def run_text_encoder(
    path: str,
    docs: list[str],
    device: torch.device,
    dtype: torch.dtype,
    budget: int | None,
    packed_attention: str | None = None,
    backend: str = "eager",
    overlap: bool | None = None,
    cuda_graphs: bool = False,
    kernels: str = "none",
    as_job: bool = False,
):
    """``TextEncoder`` (ours): padded batches (eager, compiled buckets or ONNX Runtime), or packed rows.

    The warm-up encodes every document once for ``compile`` (so each bucket's graph is built
    before the timed run; the compile seconds are reported in the method name), 32 otherwise.
    ``as_job``: timed through ``embed_batch`` with the token counts given, as the index job calls it (chunks
    bring their counts): each pass is tokenised while the previous one runs, where ``encode`` tokenises every
    text before the first pass.
    """
    from transforms.models.encoder import TextEncoder
    from transforms.models.fast import bucket_of

    encoder = TextEncoder(
        path,
        device=str(device),
        dtype=dtype,
        token_budget=budget,
        packing=packed_attention is not None,
        attn_implementation=packed_attention,
        backend=backend,
        overlap=overlap,
        cuda_graphs=cuda_graphs,
        kernels=kernels,
        cpu_workers=1,  # one pass at a time: the CPU smoke run stays comparable with the GPU rows
    ).load()
    started = time.perf_counter()
    encoder.encode(docs if backend == "compile" else docs[:32])  # warm-up (compiles every bucket)
    warm_s = time.perf_counter() - started
    reset_memory(device)
    if as_job:
        counts = encoder.count_tokens(docs)  # the chunker's n_tokens, known before the model step
        vectors, seconds = timed(device, lambda: np.stack(encoder.embed_batch(docs, counts)[0]))
    else:
        vectors, seconds = timed(device, lambda: encoder.encode(docs))
    started = time.perf_counter()
    lengths = encoder.count_tokens(docs)
    tokenise_s = time.perf_counter() - started
    sizes = [bucket_of(n, encoder.buckets) for n in lengths] if encoder.buckets else lengths
    if packed_attention:
        padded = sum(lengths)  # packed rows compute no pad token
    else:
        padded = 0
        for b in budget_batches(sizes, encoder.token_budget):
            rows = len(b)
            if backend == "compile" and cuda_graphs and device.type == "cuda":  # static rows per bucket
                rows = max(rows, encoder.token_budget // max(sizes[i] for i in b))
            padded += max(sizes[i] for i in b) * rows
    if packed_attention:
        how = f"packed rows, {packed_attention}"
        if backend == "compile":
            from transforms.models import fast

            runner = encoder._packed_runner
            mode = "torch.compile(dynamic=True)" if fast.PACKED_COMPILE_DYNAMIC else "compiled"
            how += (f", {mode}, dynamic row length ({runner.compiles} graphs, compile {runner.compile_seconds:.0f} s "
                    "at load and warm-up, not timed)")  # fmt: skip
        if encoder.kernels_patched:
            how += f", Liger kernels (RMSNorm, rotary, SwiGLU) in {encoder.kernels_patched} modules"
        if encoder.overlap:
            how += ", next row prepared while one runs"
        if as_job:
            how += (", as the index job calls it (token counts given: each row tokenised while the previous runs)"
                    if encoder.overlap else ", as the index job calls it (token counts given)")
    elif backend == "compile":
        graphs = "CUDA graphs, static rows" if cuda_graphs and device.type == "cuda" else "inductor, dynamic rows"
        how = (f"padded batches, compiled over {len(encoder._runner.shapes)} bucket shapes ({graphs}; "
               f"compile + warm-up {warm_s:.0f} s, not timed)")  # fmt: skip
    elif backend == "onnx":
        how = f"padded batches, ONNX Runtime (export {encoder._runner.export_seconds:.0f} s, not timed)"
    else:
        how = "padded batches" + ("" if encoder.overlap else ", no overlap")
        if encoder.overlap:
            how += ", next batch prepared (pinned, non-blocking copy) while one runs"
    result = Result(
        f"TextEncoder (ours), {how}, {encoder.token_budget} token budget "
        + (f"(tokenising alone {tokenise_s:.2f} s)" if as_job else f"(tokenising {tokenise_s:.2f} s of it)"),
        seconds,
        len(docs),
        sum(lengths),
        padded,
        peak_gib(device),
    )
    return vectors, result, encoder.token_budget


def run_compile_dynamic(run: Callable[[], Any]) -> Any:
    """``run`` with packed rows compiled under ``torch.compile(dynamic=True)`` (``fast.PACKED_COMPILE_DYNAMIC``),
    dynamo's caches cleared before and after, so neither this variant nor the next reuses the other's graphs."""
    import torch._dynamo

    from transforms.models import fast

    torch._dynamo.reset()
    fast.PACKED_COMPILE_DYNAMIC = True
    try:
        return run()
    finally:
        fast.PACKED_COMPILE_DYNAMIC = None
        torch._dynamo.reset()


VARIANTS = (
    "st32", "st512", "loop", "padded", "padded-serial", "compiled", "compiled-graphs", "packed", "packed-serial",
    "packed-compiled", "packed-compiled-dynamic", "packed-compiled-serial", "packed-liger", "packed-compiled-liger",
    "packed-job", "packed-liger-job", "onnx",
)
DEFAULT_VARIANTS = (
    "st32,st512,loop,padded,padded-serial,compiled,compiled-graphs,packed,packed-liger,packed-liger-job,"
    "packed-compiled,packed-compiled-liger"
)


# -- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(EMBEDDING_CONFIGS), default="0.6b")
    parser.add_argument("--docs", type=int, default=2048)
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--token-budget", type=int, default=None, help="padded tokens per forward pass")
    parser.add_argument("--model-dir", default=None, help="reuse (or keep) the random-weight model here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--packed-attention",
        default=None,
        help="attention for the packed TextEncoder rows (default: varlen, transforms.models.varlen; "
        "flex_attention; sdpa; 'none' skips them)",
    )
    parser.add_argument(
        "--smoke", "--tiny", action="store_true", help="tiny config, 24 docs, CPU unless --device: checks the script runs"
    )
    parser.add_argument(
        "--variants", default=DEFAULT_VARIANTS,
        help=f"comma-separated, from {', '.join(VARIANTS)}: sentence-transformers at batch 32 and 512, the plain "
        "loop, TextEncoder padded (overlapped preparation on CUDA), padded without overlap, compiled buckets "
        "(dynamic rows; -graphs: CUDA graphs, static rows), "
        "packed rows (eager; compiled; -liger: Liger-Kernel's fused kernels, CUDA; -job: timed as the index job "
        "calls the encoder, token counts given, each row tokenised while the previous runs), ONNX Runtime",
    )
    parser.add_argument("--doc-tokens", default="50,512", help="LOW,HIGH document lengths in tokens (mean at 62%%)")
    parser.add_argument("--write", action="store_true", help="append the figures to BENCHMARKS.md")
    parser.add_argument("--benchmarks-file", default=str(REPO_ROOT / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("transforms.models.fast").setLevel(logging.INFO)  # per-bucket compile times

    from transforms.models.devices import default_dtype, resolve_device

    device = resolve_device(args.device or ("cpu" if args.smoke else "cuda"))
    dtype = default_dtype(device)
    config = TINY_QWEN3 if args.smoke else EMBEDDING_CONFIGS[args.size]
    n_docs = min(args.docs, 24) if args.smoke else args.docs
    label = "tiny (smoke)" if args.smoke else f"Qwen3-Embedding-{args.size.upper()} config"
    params = non_embedding_params(config)

    model_dir = Path(args.model_dir or tempfile.mkdtemp(prefix="bench-embed-"))
    if not (model_dir / "config.json").exists():
        print(f"building random-weight {label} in {model_dir} ...", flush=True)
        build_qwen3_embedding(
            model_dir,
            config,
            seed=args.seed,
            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
            device=device,
            check=False,
        )
        reset_memory(device)
    path = str(model_dir)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    low, high = (int(x) for x in args.doc_tokens.split(","))
    lengths = sample_lengths(n_docs, low=low, high=high, mean=low + 0.62 * (high - low), seed=args.seed)
    docs = realish_texts(tok, lengths, seed=args.seed)
    print(
        f"{n_docs} documents, {sum(lengths):,} tokens (mean {np.mean(lengths):.0f}); {label}; "
        f"{params / 1e6:,.0f}M non-embedding params; {device_name(device)}; {dtype}",
        flush=True,
    )

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    # Ours padded first: its vectors are the reference of the agreement column, and its token budget
    # (from free GPU memory unless given) is reused by every other method, so they differ only in
    # implementation.
    ours, ours_result, budget = run_text_encoder(path, docs, device, dtype, args.token_budget)
    reset_memory(device)
    print(ours_result.row(params, "docs"), flush=True)
    packed_attention = args.packed_attention or "varlen"
    runs: dict[str, Callable[[], tuple[np.ndarray, Result]]] = {
        "st32": lambda: run_sentence_transformers(path, docs, device, dtype, 32),
        "st512": lambda: run_sentence_transformers(path, docs, device, dtype, 512),
        "loop": lambda: run_plain_loop(path, docs, device, dtype, budget),
        "padded-serial": lambda: run_text_encoder(path, docs, device, dtype, budget, overlap=False)[:2],
        "compiled": lambda: run_text_encoder(path, docs, device, dtype, budget, backend="compile")[:2],
        "compiled-graphs": lambda: run_text_encoder(
            path, docs, device, dtype, budget, backend="compile", cuda_graphs=True
        )[:2],
        "packed": lambda: run_text_encoder(path, docs, device, dtype, budget, packed_attention)[:2],
        "packed-compiled": lambda: run_text_encoder(
            path, docs, device, dtype, budget, packed_attention, backend="compile"
        )[:2],
        "packed-serial": lambda: run_text_encoder(path, docs, device, dtype, budget, packed_attention, overlap=False)[:2],
        "packed-compiled-dynamic": lambda: run_compile_dynamic(
            lambda: run_text_encoder(path, docs, device, dtype, budget, packed_attention, backend="compile")[:2]
        ),
        "packed-compiled-serial": lambda: run_text_encoder(
            path, docs, device, dtype, budget, packed_attention, backend="compile", overlap=False
        )[:2],
        "packed-liger": lambda: run_text_encoder(path, docs, device, dtype, budget, packed_attention, kernels="liger")[:2],
        "packed-job": lambda: run_text_encoder(path, docs, device, dtype, budget, packed_attention, as_job=True)[:2],
        "packed-liger-job": lambda: run_text_encoder(
            path, docs, device, dtype, budget, packed_attention, kernels="liger", as_job=True
        )[:2],
        "packed-compiled-liger": lambda: run_text_encoder(
            path, docs, device, dtype, budget, packed_attention, backend="compile", kernels="liger"
        )[:2],
        "onnx": lambda: run_text_encoder(path, docs, device, dtype, budget, backend="onnx")[:2],
    }
    results = []
    failed: list[str] = []
    for name in variants:
        if name == "padded":
            results.append(ours_result)
            continue
        if name.startswith("packed") and packed_attention == "none":
            continue
        cuda_only = ("padded-serial", "compiled-graphs", "packed-serial", "packed-compiled-serial", "packed-liger",
                     "packed-compiled-liger", "packed-liger-job")  # fmt: skip
        if name in cuda_only and device.type != "cuda":
            continue  # on CPU padded already runs without overlap, and there are no CUDA graphs or Triton kernels
        try:
            vectors, result = runs[name]()
        except Exception as exc:  # one broken variant must not cost the others' figures (one GPU lease)
            traceback.print_exc()
            failed.append(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''} |")
            reset_memory(device)
            print(failed[-1], flush=True)
            continue
        finally:
            if name.endswith("-liger"):  # its rotary patch is process-wide: the next variants run without it
                from transforms.models import liger

                liger.unpatch_rotary()
        result.agreement = float((vectors * ours).sum(axis=1).min())
        results.append(result)
        reset_memory(device)
        print(result.row(params, "docs"), flush=True)

    # Every row's timed region tokenises its documents; this is that share, measured alone.
    started = time.perf_counter()
    tok(docs, truncation=True, max_length=high + 16)
    tokenise_s = time.perf_counter() - started
    parallel = os.environ.get("TOKENIZERS_PARALLELISM", "unset")
    lines = [
        f"{label}, random {str(dtype).removeprefix('torch.')} weights; {n_docs} documents of {low}-{high} tokens "
        f"(mean {np.mean(lengths):.0f}), {sum(r.tokens for r in results[-1:]):,} tokens.",
        "",
        *table_header("min cosine to ours"),
        *(r.row(params, "docs") for r in results),
        *failed,
        "",
        f"{MFU_FORMULA}, N_non_embedding = {params:,}; attention FLOPs not counted."
        + (SMOKE_NOTE if args.smoke else ""),
        f"Tokenising the documents alone, one call of the tokenizer: {tokenise_s:.2f} s (TOKENIZERS_PARALLELISM="
        f"{parallel}), inside every row's wall time; TextEncoder tokenises slices on up to 8 threads where that "
        "setting turns the pool off.",
    ]
    print("\n".join(lines))
    if args.write:
        title = f"GPU embedding: {label} on {device_name(device)}"
        write_section(Path(args.benchmarks_file), title, command_line(), device_name(device), lines)
        print(f"appended to {args.benchmarks_file}")


if __name__ == "__main__":
    main()

"""Where one Qwen3-Embedding-0.6B forward pass spends its GPU time (model only: no tokeniser, no Beam).

    python bench/gpu_profile.py [--size 0.6b] [--tokens 65536] [--device cuda]
    python bench/gpu_profile.py --tiny --device cpu     # checks the script runs

Random bf16 weights with the published config, built straight on the device (nothing saved).
Times, with CUDA events (median of 10 after 3 warm-ups), the same token count laid out as:
no padding (mask None: transformers takes sdpa's causal fast path), left padding with a 4D mask
(what an embedding batch of uneven texts is), short rows, eager attention, and the plain
bf16 matrix product of the MLP's up-projection as the ceiling. Then a torch.profiler table of
the padded case: which kernels take the time. ``--packed`` adds one packed row of texts of 50-512
tokens with ``attn_implementation="varlen"`` (the encoder's default on CUDA), eager and compiled (``--liger``:
and both with Liger-Kernel's fused kernels), and profiles the compiled packed pass instead. Prints only;
the conclusions go into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tests.qwen_offline import EMBEDDING_CONFIGS, TINY_QWEN3, non_embedding_params  # noqa: E402

PEAK = 800e12


def timed(fn, device: torch.device, warm: int = 3, reps: int = 10) -> float:
    for _ in range(warm):
        fn()
    if device.type != "cuda":
        import time

        out = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return sorted(out)[len(out) // 2]
    torch.cuda.synchronize(device)
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return sorted(out)[len(out) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(EMBEDDING_CONFIGS), default="0.6b")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per forward pass")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the padded case")
    parser.add_argument("--packed", action="store_true", help="also time packed rows (varlen), eager and compiled")
    parser.add_argument(
        "--liger", action="store_true",
        help="with --packed: also the packed row with Liger-Kernel's fused RMSNorm, rotary and SwiGLU, eager and "
        "compiled (CUDA, liger-kernel installed)",
    )
    args = parser.parse_args(argv)
    from transformers import Qwen3Config, Qwen3Model

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = dict(TINY_QWEN3 if args.tiny else EMBEDDING_CONFIGS[args.size])
    params = non_embedding_params(cfg)
    config = Qwen3Config(**cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3Model(config).to(dtype).eval()
    vocab, hidden, inter = config.vocab_size, config.hidden_size, config.intermediate_size
    rows: list[str] = []

    def report(name: str, seconds: float, tokens: int, flops_per_token: float | None = None) -> None:
        tps = tokens / seconds
        fl = (flops_per_token or 2 * params) * tps
        rows.append(f"| {name} | {seconds * 1e3:.1f} | {tps:,.0f} | {fl / 1e12:.0f} | {fl / PEAK:.1%} |")
        print(rows[-1], flush=True)

    n = args.tokens
    a = torch.randn(n, hidden, device=device, dtype=dtype)
    w = torch.randn(hidden, inter, device=device, dtype=dtype)
    report(f"matmul {n}x{hidden} @ {hidden}x{inter} (ceiling)", timed(lambda: a @ w, device), n, 2 * hidden * inter)

    def batch(b: int, length: int, pad_fraction: float):
        ids = torch.randint(1000, vocab - 1000, (b, length), device=device)
        mask = torch.ones(b, length, dtype=torch.long, device=device)
        # Left padding on every other row, up to pad_fraction of its length (embedding batches pad left).
        for r in range(0, b, 2):
            mask[r, : int(length * pad_fraction)] = 0
        real = int(mask.sum())
        return ids, (mask if pad_fraction else None), real

    @torch.inference_mode()
    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    length = 512 if not args.tiny else 64
    cases = [
        ("sdpa, no padding (mask None)", "sdpa", length, 0.0),
        ("sdpa, left padding (4D mask)", "sdpa", length, 0.3),
        ("sdpa, short rows (128), no padding", "sdpa", 128 if not args.tiny else 16, 0.0),
        ("sdpa, short rows (128), left padding", "sdpa", 128 if not args.tiny else 16, 0.3),
        ("eager attention, left padding", "eager", length, 0.3),
    ]
    for name, attn, ln, pad in cases:
        model.set_attn_implementation(attn)
        ids, mask, real = batch(max(1, n // ln), ln, pad)
        report(f"{name}, {ids.shape[0]}x{ln}", timed(lambda i=ids, m=mask: forward(i, m), device), ids.numel())
    model.set_attn_implementation("sdpa")
    if args.compile:  # inductor fuses the norms, rotary and activations that eager runs one kernel each
        compiled = torch.compile(model)
        ids, mask, _ = batch(max(1, n // length), length, 0.3)

        @torch.inference_mode()
        def forward_compiled():
            return compiled(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

        report(f"sdpa, left padding, torch.compile, {ids.shape[0]}x{length}", timed(forward_compiled, device), ids.numel())
    profiled = forward
    if args.packed:
        profiled = packed_cases(model, n, length, vocab, device, report, liger=args.liger)
    print("\n| case | ms | tokens/s (padded) | TFLOP/s | MFU |\n|---|---|---|---|---|")
    print("\n".join(rows), flush=True)

    ids, mask, _ = batch(max(1, n // length), length, 0.3)
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiled(ids, mask)
    with profile(activities=acts) as prof:
        profiled(ids, mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))


def packed_cases(model, n: int, longest: int, vocab: int, device: torch.device, report, liger: bool = False):
    """Time one packed row of ``n`` tokens (texts of 50..``longest``), varlen eager then compiled, and with
    ``liger`` the same on a copy of the model with Liger's kernels (``transforms.models.liger``); returns
    the compiled pass (arguments ignored) for the profiler table."""
    import random

    from transforms.models import varlen

    rng = random.Random(0)
    lengths: list[int] = []
    while sum(lengths) < n:
        lengths.append(min(rng.randint(min(50, longest), longest), n - sum(lengths)))
    cu = varlen.boundaries(lengths, device)
    starts = torch.repeat_interleave(cu[:-1].long(), torch.tensor(lengths, device=device))
    positions = (torch.arange(n, device=device) - starts)[None]
    ids = torch.randint(1000, vocab - 1000, (1, n), device=device)
    kwargs = varlen.forward_kwargs(cu, max(lengths))
    varlen.register()
    model.set_attn_implementation(varlen.NAME)

    @torch.inference_mode()
    def run(m):
        return m(input_ids=ids, position_ids=positions, use_cache=False, **kwargs).last_hidden_state

    label = f"varlen, one packed row of {len(lengths)} texts ({n} tokens, no padding)"
    report(f"{label}, eager", timed(lambda: run(model), device), n)
    compiled = torch.compile(model)
    report(f"{label}, torch.compile", timed(lambda: run(compiled), device), n)
    if liger:
        import copy

        from transforms.models import liger as liger_kernels

        fused = copy.deepcopy(model)
        try:
            liger_kernels.apply(fused)
            report(f"{label}, eager, Liger kernels", timed(lambda: run(fused), device), n)
            fused_compiled = torch.compile(fused)
            report(f"{label}, torch.compile, Liger kernels", timed(lambda: run(fused_compiled), device), n)
        except Exception as exc:  # the rows above still print (one GPU lease)
            print(f"| {label}, Liger kernels | failed: {type(exc).__name__}: {exc} |", flush=True)
        finally:  # Liger's rotary patch is process-wide: the profiled pass below stays the unpatched one
            liger_kernels.unpatch_rotary()
        del fused
    return lambda *_: run(compiled)


if __name__ == "__main__":
    main()

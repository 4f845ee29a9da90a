"""Attention kernels for one packed row of texts (Qwen3-0.6B's heads), against the one the encoder uses.

    python bench/gpu_attention.py [--tokens 65536] [--flex]
    python bench/gpu_attention.py --device cpu --tokens 512    # checks the script runs (fallbacks only)

The compiled packed pass spends ~20 % of its GPU time in attention (``bench/gpu_profile.py --packed``,
BENCHMARKS.md), all of it PyTorch's bundled FlashAttention-2 variable-length kernel. This times, on
the same packed row (texts of 50-512 tokens; 16 query heads over 8 key/value heads, head size 128,
causal, bf16), every variable-length route PyTorch ships:

* ``fa2``: ``aten._flash_attention_forward`` with ``cu_seq_lens`` (``transforms.models.varlen``, GQA in the kernel);
* ``varlen_attn``: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch >= 2.9's public wrapper);
* cuDNN's attention with cumulative lengths (``aten._cudnn_attention_forward``, what SDPA runs for nested
  tensors; nested SDPA itself refuses ``is_causal``), with GQA heads and with key/value heads repeated;
* the memory-efficient (CUTLASS) kernel with cumulative lengths, key/value heads repeated (the repeat timed);
* ``flex``: ``flex_attention`` compiled, with a causal document block mask (``--flex``; it compiles on CUDA and runs
  eagerly on CPU).

Each: median of 10 after 3 warm-ups (CUDA events), the causal attention FLOPs per second, and the largest
difference from ``fa2``'s output. A route that fails is a row with its error, not a crash.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import traceback
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.gpu_profile import timed  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--flex", action="store_true", help="also flex_attention (compiles)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hq, hkv, d = 16, 8, 128
    rng = random.Random(0)
    lengths: list[int] = []
    while sum(lengths) < args.tokens:
        lengths.append(min(rng.randint(50, 512), args.tokens - sum(lengths)))
    n, longest = sum(lengths), max(lengths)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    cu = cu.to(device)
    torch.manual_seed(0)
    q = torch.randn(n, hq, d, device=device, dtype=dtype)
    k = torch.randn(n, hkv, d, device=device, dtype=dtype)
    v = torch.randn(n, hkv, d, device=device, dtype=dtype)
    flops = 2 * 2 * d * hq * sum(x * (x + 1) / 2 for x in lengths)  # QK^T and PV over the causal half
    print(f"one packed row: {len(lengths)} texts, {n} tokens (longest {longest}); {hq}/{hkv} heads of {d}; {dtype}")

    def rep(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(hq // hkv, dim=1)

    def fa2() -> torch.Tensor:
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, longest, longest, 0.0, True, False)[0]

    def varlen_attn() -> Callable[[], torch.Tensor]:
        import inspect

        from torch.nn.attention.varlen import varlen_attn as f

        if "enable_gqa" in inspect.signature(f).parameters:
            return lambda: f(q, k, v, cu, cu, longest, longest, enable_gqa=True)
        kr, vr = rep(k), rep(v)  # torch 2.11's has no GQA: key/value heads repeated (not timed)
        return lambda: f(q, kr, vr, cu, cu, longest, longest)

    def cudnn(gqa: bool) -> Callable[[], torch.Tensor]:
        kk, vv = (k, v) if gqa else (rep(k), rep(v))
        return lambda: torch.ops.aten._cudnn_attention_forward(
            q, kk, vv, None, cu, cu, longest, longest, False, 0.0, True
        )[0]

    def efficient() -> torch.Tensor:
        # custom_mask_type 1: causal from the top left of each text's block
        out = torch.ops.aten._efficient_attention_forward(
            q[None], rep(k)[None], rep(v)[None], None, cu, cu, longest, longest, 0.0, 1, False
        )[0]
        return out[0]

    def flex() -> Callable[[], torch.Tensor]:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.searchsorted(cu[1:].long(), torch.arange(n, device=device), right=True)

        def mask(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)

        block = create_block_mask(mask, None, None, n, n, device=device)
        # eager on CPU: the smoke run checks the route (mask, GQA, layout), not inductor's C++ build
        compiled = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
        qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
        return lambda: compiled(qt, kt, vt, block_mask=block, enable_gqa=True)[0].transpose(0, 1)

    routes: list[tuple[str, Callable[[], Callable[[], torch.Tensor]]]] = [
        ("fa2 (aten._flash_attention_forward, the encoder's)", lambda: fa2),
        ("varlen_attn (torch.nn.attention.varlen)", varlen_attn),
        ("cuDNN (aten._cudnn_attention_forward with cum_seq), GQA heads", lambda: cudnn(True)),
        ("cuDNN, key/value heads repeated", lambda: cudnn(False)),
        ("memory-efficient (aten._efficient_attention_forward), key/value heads repeated", lambda: efficient),
    ]
    if args.flex:
        routes.append(("flex_attention compiled, document block mask", flex))
    reference = fa2() if device.type == "cuda" else None
    rows = []
    for name, build in routes:
        try:
            fn = build()
            with torch.no_grad():  # nested tensors refuse inference tensors
                out = fn()
                diff = "" if reference is None else f"{(out.float() - reference.float()).abs().max().item():.3g}"
                seconds = timed(fn, device)
            rows.append(f"| {name} | {seconds * 1e3:.2f} | {flops / seconds / 1e12:.0f} | {diff} |")
        except Exception as exc:  # a route this torch or card lacks is a row
            traceback.print_exc(limit=1)
            rows.append(f"| {name} | failed: {str(exc).splitlines()[0][:120]} | | |")
        print(rows[-1], flush=True)
    print("\n| route | ms | TFLOP/s (causal) | max abs diff vs fa2 |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

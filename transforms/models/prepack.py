"""oneDNN weight prepacking of ``nn.Linear`` layers for bf16 matrix products on CPU.

Under bf16 autocast (``--precision bf16-mixed``) each ``nn.Linear`` call casts its fp32 weight
to bf16, and oneDNN reorders it into its blocked layout, on every forward pass. Inductor's
``freezing`` does both once, when it compiles (``mkldnn._reorder_linear_weight`` and
``mkldnn._linear_pointwise``, torch/_inductor/fx_passes/mkldnn_fusion.py). This module does the
same in eager mode, without compiling: each Linear becomes a ``PackedLinear`` that holds its
weight already cast and reordered.

What it guarantees:

* **The same products.** A packed layer computes what the Linear computes under bf16 autocast:
  input, weight and bias in bf16, fp32 accumulation, a bf16 result. Each layer is checked
  against that product on random rows when it is packed, and left as it was if they differ
  by more than bf16 rounding. On this project's Zen 4 machine MiniLM's vectors came out
  bitwise equal (``tests/test_prepack.py`` allows bf16 rounding, so as not to depend on the CPU).
* **Memory.** The Linear, with its fp32 weight, is dropped for the packed bf16 copy, so unless the
  weight is shared elsewhere those layers take half the memory they took.
* **Where it applies.** Only on CPU, where the model computes in bf16 (``bf16-mixed`` or bf16
  weights), and only where torch has oneDNN and its packed-linear ops and oneDNN packs bf16 on this
  CPU (AVX512BW/VL/DQ or AVX-NE-CONVERT: ``torch.ops.mkldnn._is_mkldnn_bf16_supported``, the check
  inductor's freezing makes before it packs). On an AVX2-only CPU (AMD Zen 3, say) the packing op
  raises, so the layers stay plain Linears under autocast. If packing still raises on a CPU that the
  check admitted, the layers not yet packed stay as they are, with a warning. fp32 is left alone: MKL's
  packed fp32 GEMM measured no faster than eager's, which runs near the core's FMA peak
  (BENCHMARKS.md, "Issue 13").
* **What it leaves out.** The output projection of a causal LM (the reranker reads two of its
  rows directly).
* **Switching it off.** ``CORPUS_ETL_CPU_PREPACK=0`` in the worker's environment.

Measured on a 2-core Zen 4 machine (BENCHMARKS.md, "Precision on CPU"): MiniLM's passes over long
documents, 11,253 tokens/s prepacked against 10,635 under bf16-mixed (+6%), +8% with bf16 weights;
the Qwen3-Reranker-0.6B config +7% under bf16-mixed. On one thread, compiling with inductor's
freezing reached the same rate as eager prepacked, after ~10 s of compiling per shape; at two
threads freezing added nothing to ``--backend compile``.
"""

from __future__ import annotations

import logging
import os

import torch

_LOG = logging.getLogger(__name__)

ENV = "CORPUS_ETL_CPU_PREPACK"
_BF16_RELATIVE = 2.0**-7  # two bf16 rounding steps, relative to the layer's largest output


def available() -> bool:
    """torch has oneDNN and the packed-linear ops that inductor's freezing uses, oneDNN packs bf16 on
    this CPU (``onednn_packs_bf16``), and ``ENV`` is not ``0``."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return False
    ops = getattr(torch.ops, "mkldnn", None)
    names = ("_reorder_linear_weight", "_linear_pointwise")
    return ops is not None and all(hasattr(ops, name) for name in names) and onednn_packs_bf16()


def onednn_packs_bf16() -> bool:
    """Whether oneDNN takes bf16 weights on this CPU (AVX512BW/VL/DQ or AVX-NE-CONVERT on x86).

    Without them ``_reorder_linear_weight`` raises "bf16 path needs the cpu support ...".
    """
    probe = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    return probe is not None and bool(probe())


def applies(device: torch.device, weights: torch.dtype, autocast: torch.dtype | None) -> bool:
    """Whether prepacking applies to a model on ``device`` computing in this precision."""
    bf16 = autocast == torch.bfloat16 or (autocast is None and weights == torch.bfloat16)
    return device.type == "cpu" and bf16 and available()


class PackedLinear(torch.nn.Module):
    """An ``nn.Linear`` whose weight is cast to bf16 and reordered for oneDNN once, not on every call.

    Its products are bf16 whether or not autocast is on; the result is bf16 under autocast (as a
    Linear's is there) and in the input's dtype otherwise.

    ``rows_hint``: the rows (tokens) a typical call multiplies, which oneDNN picks its layout for;
    any row count works. The packed weight is not a parameter: ``state_dict`` no longer holds it.
    """

    def __init__(self, linear: torch.nn.Linear, rows_hint: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        with torch.no_grad():
            weight = linear.weight.detach().to(torch.bfloat16)
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
            self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, self.bias, "none", [], "")
        # Under autocast a Linear returns bf16; outside it, the input's dtype, so the layers around it
        # (norms, attention) see the dtypes they would see without prepacking.
        return out if torch.is_autocast_enabled("cpu") else out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _matches(linear: torch.nn.Linear, packed: PackedLinear, generator: torch.Generator) -> bool:
    x = torch.randn(16, linear.in_features, generator=generator)
    with torch.no_grad():
        bias = None if linear.bias is None else linear.bias.to(torch.bfloat16)
        want = torch.nn.functional.linear(x.to(torch.bfloat16), linear.weight.to(torch.bfloat16), bias).float()
        got = packed(x).float()
    scale = float(want.abs().max()) or 1.0
    return got.shape == want.shape and float((got - want).abs().max()) <= _BF16_RELATIVE * scale


def prepack_linears(model: torch.nn.Module, *, rows_hint: int = 2048) -> int:
    """Replace the CPU ``nn.Linear`` layers of ``model`` by ``PackedLinear`` in place; returns how many.

    The causal LM head (``get_output_embeddings``) stays as it is. A layer whose packed product
    differs from the plain bf16 one (beyond bf16 rounding) stays as it is, with a warning. If oneDNN
    raises while packing, that layer and the ones after it stay as they are, with a warning.
    """
    head = getattr(model, "get_output_embeddings", lambda: None)()
    generator = torch.Generator().manual_seed(0)
    packed = refused = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head or child.weight.device.type != "cpu":
                continue
            try:
                candidate = PackedLinear(child, rows_hint)
            except RuntimeError as e:  # oneDNN refused this CPU or dtype: the rest would fail alike
                _LOG.warning("oneDNN prepacking: stopped after %d linear layer(s), the rest stay plain: %s", packed, e)
                return packed
            if not _matches(child, candidate, generator):
                refused += 1
                continue
            setattr(parent, name, candidate)
            packed += 1
    if refused:
        _LOG.warning("oneDNN prepacking: %d linear layer(s) left unpacked, their packed product differed", refused)
    return packed

"""Liger-Kernel's fused Triton kernels in Qwen3's layers on CUDA (``kernels="liger"``: ``TorchModel``, so
``TextEncoder`` and ``Qwen3Reranker``, which put them in at load, before any compiling).

Eager transformers runs each of Qwen3's RMSNorms as ~6 kernels (cast, square, mean, rsqrt, two
products), its rotary embedding as ~12 (slices, negation, concatenation, products, sums, for q and k)
and SwiGLU as 2, every one a round trip through GPU memory. On one H100 a packed pass of the 0.6B
config took 355 ms eager against 160 ms compiled, where inductor fuses them (BENCHMARKS.md, GPU
2026-11-27). Liger-Kernel (``pip install corpus-etl[liger]``), a maintained library of Triton kernels
for transformers models, has one kernel for each: RMSNorm (``casting_mode="llama"``: the norm in fp32,
cast back to the input dtype before the weight, as ``Qwen3RMSNorm``), rotary embedding (in place, on q
and k together, in the (tokens, heads, head_dim) layout that FlashAttention's varlen kernel then reads
without a copy) and SiLU times up-projection. ``apply(model)`` puts them into an already loaded model:

* instance by instance for the norms (``Qwen3RMSNorm``: input, post-attention, q, k and final) and the
  MLPs (``Qwen3MLP``), so only this model changes;
* for the rotary embedding, through ``transformers.models.qwen3.modeling_qwen3.apply_rotary_pos_emb``,
  a module function that Qwen3's attention calls by name: that one patch is process-wide. The patched
  function runs Liger's kernel on CUDA tensors only and the original elsewhere, so a CPU model in
  the same process computes exactly as before.

Every patched forward does the same: Liger on CUDA, the original otherwise (Triton has no CPU
backend). Parity with the unpatched model is tested on CUDA (``tests/test_liger.py``, ``gpu``).
``kernels="auto"`` (the jobs' ``--kernels`` default) puts them in only where they run: a Qwen3 model with
SiLU MLPs, loaded onto a CUDA GPU of compute capability 8.0 or more, with liger-kernel installed; anything
else loads as it is (``resolve``). On an
H200 they made the encoder's packed eager passes 1.93x faster end to end (343.7k tokens/s against
177.8k, and ahead of the compiled pass, 286.8k), a packed pass alone 472.5k tokens/s against compiled
437.5k, and the reranker's per-query scoring ~2x (BENCHMARKS.md, "GPU: Liger-Kernel's fused kernels").
"""

from __future__ import annotations

import importlib.util
import types
from typing import Any

import torch

KERNELS = ("auto", "none", "liger")


def check(kernels: str, backend: str = "eager") -> str:
    """``kernels`` as a model with ``backend`` takes it (``--backend onnx`` runs an exported graph, not the patched
    torch model: ``auto`` means none there, ``liger`` is refused); raises ``ValueError`` for an unknown one."""
    if kernels not in KERNELS:
        raise ValueError(f"--kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if backend == "onnx" and kernels != "none":
        if kernels == "liger":
            raise ValueError("--kernels liger patches the torch model: it runs with --backend eager or compile")
        return "none"
    return kernels


def installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve(kernels: str, model: torch.nn.Module) -> str:
    """What ``kernels`` means for this loaded ``model``: ``auto`` is ``liger`` where ``apply`` can put the
    kernels in and they were measured (the model on a CUDA GPU of compute capability 8.0 or more, Ampere on,
    Qwen3 layers with SiLU MLPs, liger-kernel installed), else ``none``; ``liger`` and ``none`` stand
    (``apply`` says why ``liger`` cannot run)."""
    if check(kernels) != "auto":
        return kernels
    return "liger" if _on_cuda(model) and _is_qwen3(model) and installed() else "none"


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _on_cuda(model: torch.nn.Module) -> bool:
    """On a CUDA GPU of compute capability 8.0 or more: older ones (T4, V100) have no bf16 in hardware and
    Liger-Kernel is tested on Ampere and later; there ``auto`` leaves the model as it is."""
    device = _device(model)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def _is_qwen3(model: torch.nn.Module) -> bool:
    from transformers.models.qwen3 import modeling_qwen3

    mlps = [m for m in model.modules() if isinstance(m, modeling_qwen3.Qwen3MLP)]
    return bool(mlps) and all(m.config.hidden_act in ("silu", "swish") for m in mlps)


def apply(model: torch.nn.Module) -> int:
    """Put Liger's kernels into ``model``'s Qwen3 layers (a ``Qwen3Model`` or a model holding one, on
    CUDA); returns how many modules were patched. Raises ``ImportError`` without liger-kernel and
    ``ValueError`` for a model that is not Qwen3 or not on a GPU."""
    from transformers.models.qwen3 import modeling_qwen3

    device = _device(model)
    if device.type != "cuda":
        raise ValueError(f"Liger's kernels are Triton kernels for CUDA; the model is on {device}")
    if not installed():
        raise ImportError("kernels='liger' needs the liger-kernel package: pip install 'corpus-etl[liger]'")
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction  # an install that does not import fails here,
    from liger_kernel.ops.rope import LigerRopeFunction  # before any module is patched
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    patched = 0
    for module in model.modules():
        if isinstance(module, modeling_qwen3.Qwen3RMSNorm):
            module.forward = types.MethodType(_norm_forward(LigerRMSNormFunction, type(module).forward), module)
            patched += 1
        elif isinstance(module, modeling_qwen3.Qwen3MLP):
            if module.config.hidden_act not in ("silu", "swish"):
                raise ValueError(f"Liger's SwiGLU computes SiLU; this model's MLP uses {module.config.hidden_act!r}")
            module.forward = types.MethodType(_mlp_forward(LigerSiLUMulFunction, type(module).forward), module)
            patched += 1
    if not patched:
        raise ValueError(f"kernels='liger' is for Qwen3 models; {type(model).__name__} has no Qwen3 layers")
    original = modeling_qwen3.apply_rotary_pos_emb
    if not getattr(original, "_liger", False):
        modeling_qwen3.apply_rotary_pos_emb = _rotary(LigerRopeFunction, original)
    return patched


def _norm_forward(function: Any, original: Any) -> Any:
    def forward(self: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if not hidden.is_cuda:
            return original(self, hidden)
        # offset 0, "llama" casting (Qwen3RMSNorm's), not in place
        return function.apply(hidden, self.weight, self.variance_epsilon, 0.0, "llama", False)

    return forward


def _mlp_forward(function: Any, original: Any) -> Any:
    def forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            return original(self, x)
        return self.down_proj(function.apply(self.gate_proj(x), self.up_proj(x)))

    return forward


def _rotary(function: Any, original: Any) -> Any:
    def apply_rotary_pos_emb(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not q.is_cuda or args or set(kwargs) - {"unsqueeze_dim"}:  # CPU, or a call this was not written for
            return original(q, k, cos, sin, *args, **kwargs)
        return function.apply(q, k, cos, sin, None, kwargs.get("unsqueeze_dim", 1))

    apply_rotary_pos_emb._liger = True  # type: ignore[attr-defined]
    apply_rotary_pos_emb._original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def unpatch_rotary() -> None:
    """Undo ``apply``'s process-wide rotary patch: for benches and tests that compare patched and unpatched models
    in one process (the patched models' norms and MLPs keep Liger's kernels)."""
    from transformers.models.qwen3 import modeling_qwen3

    patched = modeling_qwen3.apply_rotary_pos_emb
    if getattr(patched, "_liger", False):
        modeling_qwen3.apply_rotary_pos_emb = patched._original

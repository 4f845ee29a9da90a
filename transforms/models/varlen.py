"""Padding-free attention for packed rows: ``attn_implementation="varlen"`` (``TextEncoder(packing=True)``).

A packed forward pass is one row of texts back to back. transformers' own routes for such rows
need either the ``flash-attn`` package (``flash_attention_2``, not installable everywhere) or a
block mask (``flex_attention``, which builds the mask and compiles again for every new row
length: 0.47x the padded path on an H200, BENCHMARKS.md). PyTorch ships FlashAttention-2's
variable-length kernel itself (``aten._flash_attention_forward`` with cumulative sequence
lengths, the kernel behind ``torch.nn.attention.varlen``), so this module registers it with
transformers' ``AttentionInterface`` under the name ``varlen``:

* the boundaries come in as transformers' own flash kwargs, ``cu_seq_lens_q`` / ``cu_seq_lens_k``
  (int32, ``(texts + 1,)``) and ``max_length_q`` / ``max_length_k``, passed to the model's forward
  and handed by every layer to its attention function;
* GQA (Qwen3: 16 query heads over 8 key/value heads) runs natively in the kernel;
* causal or not follows the attention module's ``is_causal`` (Qwen3 causal, BERT not);
* the attention mask transformers would build is skipped (``None``): the boundaries are the mask.

The kernel runs bf16/fp16 on CUDA. Elsewhere (CPU, fp32) the same function computes a dense
block-diagonal mask from the boundaries and calls SDPA: quadratic in the row, correct, and traceable
by ``torch.compile``, which is how its parity and the compiled packed path are tested without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "varlen"
_REGISTERED: list[bool] = []


def available() -> bool:
    """Whether this transformers lets an attention function skip the mask: ``AttentionMaskInterface``
    (transformers >= 4.53). Older versions would build a dense (T, T) mask for a packed row of T tokens."""
    try:
        from transformers import AttentionInterface  # noqa: F401
        from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
    except ImportError:
        return False
    return True


def register() -> str:
    """Register ``varlen`` with transformers' attention and mask interfaces (once); returns the name."""
    if not _REGISTERED:
        if not available():
            import transformers

            raise ImportError(
                f"attn_implementation='varlen' (packed rows) needs transformers >= 4.53, found "
                f"{transformers.__version__}: upgrade it, or run with --packing off"
            )
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(NAME, varlen_attention)
        AttentionMaskInterface.register(NAME, _no_mask)
        _REGISTERED.append(True)
    return NAME


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


def boundaries(lengths: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``cu_seq_lens``: int32 ``[0, l0, l0 + l1, ...]`` for texts of ``lengths`` packed back to back."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu.to(device)


def forward_kwargs(cu: torch.Tensor, longest: int) -> dict[str, Any]:
    """The model's forward kwargs for one packed row: transformers' flash kwargs, handed to every layer."""
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def uses_kernel(query: torch.Tensor) -> bool:
    """Whether ``varlen_attention`` runs FlashAttention's kernel for ``query`` (else the dense fallback)."""
    return query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query`` ``(1, Hq, T, D)``, ``key``/``value`` ``(1, Hkv, T, D)``
    for one packed row; returns ``(1, T, Hq, D)`` and no weights, as transformers' sdpa function does."""
    if cu_seq_lens_q is None:
        raise ValueError(
            "attn_implementation='varlen' needs packed rows: pass cu_seq_lens_q/cu_seq_lens_k and "
            "max_length_q/max_length_k to the model's forward (TextEncoder(packing=True) does)"
        )
    if query.shape[0] != 1:
        raise ValueError(f"attn_implementation='varlen' takes one packed row, got a batch of {query.shape[0]}")
    cu_k = cu_seq_lens_q if cu_seq_lens_k is None else cu_seq_lens_k
    causal = bool(getattr(module, "is_causal", True))
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D)
    if uses_kernel(q):
        # no int(): under torch.compile these may be symbolic, and int() would specialise them
        max_q = max_length_q if max_length_q is not None else query.shape[2]
        max_k = max_length_k if max_length_k is not None else max_q
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seq_lens_q, cu_k, max_q, max_k, dropout, causal, False, scale=scaling
        )[0]
    else:
        out = _dense(q, k, v, cu_seq_lens_q, causal, scaling)
    return out.unsqueeze(0), None


def _dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, causal: bool, scaling: float | None
) -> torch.Tensor:
    """The reference: SDPA over the row with a block-diagonal (and causal) boolean mask."""
    n = q.shape[0]
    position = torch.arange(n, device=q.device)
    # the whole cu, not cu[1:]: slicing makes torch.compile guard on its length (a recompile for one-text rows)
    segment = torch.searchsorted(cu.to(position.dtype), position, right=True)
    allowed = segment[:, None] == segment[None, :]
    if causal:
        allowed = allowed & (position[:, None] >= position[None, :])
    if k.shape[1] != q.shape[1]:  # GQA by repeating key/value heads (SDPA's enable_gqa needs torch >= 2.5)
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=allowed, scale=scaling
    )
    return out[0].transpose(0, 1)

"""``attn_implementation="varlen"`` (``transforms/models/varlen.py``): the packed-row attention.

On CPU the function runs its dense reference (a block-diagonal mask); its result is checked
here against SDPA run text by text, for causal and bidirectional models, with GQA. The CUDA
kernel's own check is ``test_cuda_kernel_matches_reference`` (``gpu``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transforms.models import varlen
from transforms.models.encoder import TextEncoder

LENGTHS = [5, 1, 12, 7]


class _Module(torch.nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.is_causal = causal


def _qkv(dtype=torch.float32, device="cpu", heads=4, kv_heads=2, dim=16):
    g = torch.Generator().manual_seed(0)
    n = sum(LENGTHS)
    q = torch.randn(1, heads, n, dim, generator=g, dtype=torch.float32)
    k = torch.randn(1, kv_heads, n, dim, generator=g, dtype=torch.float32)
    v = torch.randn(1, kv_heads, n, dim, generator=g, dtype=torch.float32)
    return (x.to(device=device, dtype=dtype) for x in (q, k, v))


def _text_by_text(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    outs, start = [], 0
    for n in LENGTHS:
        part = slice(start, start + n)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, :, part], k[:, :, part], v[:, :, part], is_causal=causal, scale=scale, enable_gqa=True
        ))  # fmt: skip
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2)  # (1, T, H, D)


@pytest.mark.parametrize("causal", [True, False])
def test_rows_attend_within_their_text_only(causal):
    q, k, v = _qkv()
    cu = varlen.boundaries(LENGTHS)
    assert cu.tolist() == [0, 5, 6, 18, 25] and cu.dtype == torch.int32
    out, weights = varlen.varlen_attention(_Module(causal), q, k, v, None, 0.25, **varlen.forward_kwargs(cu, 12))
    assert weights is None and out.shape == (1, sum(LENGTHS), 4, 16)
    torch.testing.assert_close(out, _text_by_text(q, k, v, causal, 0.25), atol=1e-5, rtol=1e-5)


def test_needs_the_boundaries_and_one_row():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="needs packed rows: pass cu_seq_lens_q"):
        varlen.varlen_attention(_Module(True), q, k, v, None)
    cu = varlen.boundaries(LENGTHS)
    with pytest.raises(ValueError, match="one packed row, got a batch of 2"):
        varlen.varlen_attention(_Module(True), q.expand(2, -1, -1, -1), k, v, None, **varlen.forward_kwargs(cu, 12))


def test_minilm_packs_with_varlen_and_matches_padded(minilm_path):
    """BERT is bidirectional: sdpa's packed rows would mix texts (refused, test_embed), varlen keeps
    them apart, so packing now works for MiniLM too."""
    texts = ["a b c", "The capital of France is Paris; its river is the Seine.", "x", "word " * 40]
    padded = TextEncoder(minilm_path, device="cpu", dtype=torch.float32).load().encode(texts)
    packed = TextEncoder(minilm_path, device="cpu", dtype=torch.float32, packing=True).load()
    assert packed.model.config._attn_implementation == "varlen"
    got = packed.encode(texts)
    assert float(np.abs(got - padded).max()) <= 1e-5


@pytest.mark.parametrize(
    ("backend", "attn", "match"),
    [("onnx", None, "packing runs with --backend eager, or compile with attn_implementation='varlen'"),
     ("compile", "flex_attention", "got backend 'compile' with 'flex_attention'")],
)  # fmt: skip
def test_packing_refuses_backends_it_cannot_run(backend, attn, match):
    with pytest.raises(ValueError, match=match):
        TextEncoder("unused", packing=True, backend=backend, attn_implementation=attn)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_kernel_matches_reference(causal):
    q, k, v = _qkv(dtype=torch.bfloat16, device="cuda")
    cu = varlen.boundaries(LENGTHS, "cuda")
    assert varlen.uses_kernel(q)
    out, _ = varlen.varlen_attention(_Module(causal), q, k, v, None, 0.25, **varlen.forward_kwargs(cu, 12))
    want = _text_by_text(q.float(), k.float(), v.float(), causal, 0.25)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


# -- when packing applies (--packing) ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("setting", "device", "weights", "backend", "attn", "want"),
    [
        (None, "cuda", torch.bfloat16, "eager", None, True),  # a GPU job's default: the varlen kernel runs
        (None, "cuda", torch.float16, "compile", "varlen", True),
        (None, "cuda", torch.float32, "eager", None, False),  # --precision fp32: no kernel, padded
        (None, "cuda", torch.bfloat16, "onnx", None, False),
        (None, "cuda", torch.bfloat16, "eager", "sdpa", False),  # an attention asked for is kept
        (None, "cpu", torch.float32, "eager", None, False),  # CPU: the workers run padded passes
        (None, "cpu", torch.bfloat16, "eager", None, False),
        (True, "cpu", torch.float32, "eager", None, True),  # asked for: always
        (False, "cuda", torch.bfloat16, "eager", None, False),
    ],
)  # fmt: skip
def test_packing_auto_applies_where_the_kernel_runs(setting, device, weights, backend, attn, want):
    from transforms.models.encoder import resolve_packing

    assert resolve_packing(setting, torch.device(device), weights, backend, attn) is want


def test_packing_auto_needs_a_transformers_that_can_skip_the_mask(monkeypatch):
    """Before transformers 4.53 a packed row would get a dense (T, T) mask: auto stays padded, and
    asking for varlen says what to do."""
    from transforms.models.encoder import resolve_packing

    assert varlen.available()  # the pinned transformers
    monkeypatch.setattr(varlen, "available", lambda: False)
    monkeypatch.setattr(varlen, "_REGISTERED", [])
    assert resolve_packing(None, torch.device("cuda"), torch.bfloat16, "eager", None) is False
    with pytest.raises(ImportError, match=r"needs transformers >= 4.53, found .*--packing off"):
        varlen.register()


def test_encoder_on_cpu_stays_padded_by_default(minilm_path):
    encoder = TextEncoder(minilm_path, device="cpu").load()
    assert encoder.packing is False and encoder.attn_implementation is None
    assert "packed rows" not in encoder.describe_compute()


def test_packing_flag_reaches_the_encoder(minilm_path):
    from pipelines.configs import index_config
    from pipelines.flags import index_parser
    from pipelines.index import embedding_handler
    from transforms.models.settings import EmbeddingSpec

    base = ["--input", "x.parquet", "--collection", "c"]
    spec = EmbeddingSpec.read(minilm_path)
    for flag, want in (("auto", None), ("on", True), ("off", False)):
        config = index_config(index_parser().parse_known_args([*base, "--packing", flag])[0])
        assert config.packing == flag
        assert embedding_handler(config, spec)._model_args["packing"] is want
    assert index_config(index_parser().parse_known_args(base)[0]).packing == "auto"
    with pytest.raises(ValueError, match="--packing on runs with --backend eager or compile, not onnx"):
        index_config(index_parser().parse_known_args([*base, "--packing", "on", "--backend", "onnx"])[0])

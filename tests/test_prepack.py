"""oneDNN weight prepacking (``transforms.models.prepack``): where it applies, and that it changes no result.

A prepacked Linear must compute what the plain one computes under bf16 autocast. On this
project's Zen 4 machine MiniLM's vectors came out bitwise equal; the tests allow bf16 rounding
of the last products (1e-6 cosine), far below the 1e-4 that ``--precision`` itself is held to.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from transforms.models import prepack
from transforms.models.encoder import TextEncoder

# Tests that pack need oneDNN's packed-linear ops and a CPU it packs bf16 on; the others run everywhere.
packs = pytest.mark.skipif(
    not prepack.available(),
    reason="oneDNN does not pack bf16 here (no packed-linear ops, or a CPU without AVX512BW/VL/DQ or AVX-NE-CONVERT)",
)

TEXTS = [
    "The csv module implements classes to read and write tabular data in CSV format.",
    "gzip files",
    "How do I parse command line options? " * 20,
    "x",
]
CPU = torch.device("cpu")


def _linears(model: torch.nn.Module) -> int:
    return sum(type(m) is torch.nn.Linear for m in model.modules())


@packs
@pytest.mark.parametrize(
    ("device", "weights", "autocast", "want"),
    [
        ("cpu", torch.float32, torch.bfloat16, True),  # bf16-mixed
        ("cpu", torch.bfloat16, None, True),  # bf16 weights
        ("cpu", torch.float32, None, False),  # fp32: MKL's packed GEMM measured no faster
        ("cpu", torch.float16, None, False),
        ("cuda", torch.bfloat16, None, False),
        ("cuda", torch.float32, torch.bfloat16, False),
    ],
)
def test_prepacking_applies_to_bf16_on_cpu_only(device, weights, autocast, want):
    assert prepack.applies(torch.device(device), weights, autocast) is want


@packs
def test_the_environment_switches_it_off(monkeypatch):
    monkeypatch.setenv(prepack.ENV, "0")
    assert not prepack.applies(CPU, torch.float32, torch.bfloat16)
    monkeypatch.setenv(prepack.ENV, "1")
    assert prepack.applies(CPU, torch.float32, torch.bfloat16)


def test_the_packing_check_agrees_with_onednn_on_this_cpu():
    """``onednn_packs_bf16`` says yes exactly where oneDNN's reorder takes a bf16 weight (an AVX2-only
    CPU, like AMD Zen 3, raises; one with AVX512BW/VL/DQ packs)."""
    if not hasattr(getattr(torch.ops, "mkldnn", None), "_reorder_linear_weight"):
        pytest.skip("torch without oneDNN's packed linear ops")
    weight = torch.randn(8, 16).to(torch.bfloat16)
    if prepack.onednn_packs_bf16():
        assert torch.ops.mkldnn._reorder_linear_weight(weight, 4).dtype == torch.bfloat16
    else:
        with pytest.raises(RuntimeError, match="bf16 path needs the cpu support"):
            torch.ops.mkldnn._reorder_linear_weight(weight, 4)


def test_where_onednn_cannot_pack_bf16_mixed_runs_on_plain_linears(minilm_path, monkeypatch):
    """On such a CPU the job loads and encodes in bf16-mixed with its Linear layers as they are."""
    monkeypatch.setattr(prepack, "onednn_packs_bf16", lambda: False)
    assert not prepack.available() and not prepack.applies(CPU, torch.float32, torch.bfloat16)
    enc = TextEncoder(minilm_path, device="cpu", precision="bf16-mixed", cpu_workers=1).load()
    assert enc.prepacked == 0 and _linears(enc.model) == 37
    assert "prepacked" not in enc.describe_compute()
    assert enc.encode(TEXTS).shape == (len(TEXTS), 384)


def test_packing_that_raises_leaves_the_layers_as_they_are(monkeypatch, caplog):
    """A refusal the check did not foresee stops packing; the model keeps working unpacked."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = model(x)

    def refuse(self, linear, rows_hint):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or ...")

    monkeypatch.setattr(prepack.PackedLinear, "__init__", refuse)
    with caplog.at_level(logging.WARNING, logger=prepack.__name__):
        assert prepack.prepack_linears(model) == 0
    assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
    assert "stopped after 0 linear layer(s), the rest stay plain: mkldnn_reorder_linear_weight" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


@pytest.fixture(scope="module")
def unpacked_mixed(minilm_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(prepack.ENV, "0")
        return TextEncoder(minilm_path, device="cpu", precision="bf16-mixed", cpu_workers=1).load()


@packs
def test_bf16_mixed_minilm_prepacks_every_linear_and_gives_the_same_vectors(minilm_path, unpacked_mixed):
    packed = TextEncoder(minilm_path, device="cpu", precision="bf16-mixed", cpu_workers=1).load()
    assert unpacked_mixed.prepacked == 0 and _linears(unpacked_mixed.model) == 37
    assert packed.prepacked == 37 and _linears(packed.model) == 0  # 6 layers x 6, and the pooler
    assert "37 linear layers prepacked" in packed.describe_compute()
    want, got = unpacked_mixed.encode(TEXTS), packed.encode(TEXTS)
    assert (want * got).sum(axis=1).min() >= 1 - 1e-6
    np.testing.assert_allclose(got, want, atol=2e-4)


@packs
def test_prepacked_passes_on_worker_threads_match_one_at_a_time(minilm_path, keep_torch_threads, monkeypatch):
    """The packed weights are read by the encoder's --cpu-workers threads at once. (Same token budget
    everywhere: bf16 products move with batch boundaries.)"""
    kwargs = dict(device="cpu", precision="bf16-mixed", token_budget=256)
    parallel = TextEncoder(minilm_path, cpu_workers=2, **kwargs).load()
    serial = TextEncoder(minilm_path, cpu_workers=1, **kwargs).load()
    monkeypatch.setenv(prepack.ENV, "0")
    plain = TextEncoder(minilm_path, cpu_workers=1, **kwargs).load()
    assert parallel._pool is not None and parallel.prepacked == serial.prepacked == 37
    got = parallel.encode(TEXTS)
    np.testing.assert_array_equal(got, serial.encode(TEXTS))
    np.testing.assert_allclose(got, plain.encode(TEXTS), atol=2e-4)


@pytest.mark.parametrize(("precision", "backend"), [("fp32", "eager"), ("bf16-mixed", "compile")])
def test_fp32_and_the_traced_backends_keep_the_model_as_loaded(minilm_path, precision, backend):
    enc = TextEncoder(minilm_path, device="cpu", precision=precision, backend=backend, cpu_workers=1).load()
    assert enc.prepacked == 0 and _linears(enc.model) == 37
    assert "prepacked" not in enc.describe_compute()


@packs
def test_reranker_prepacks_its_decoder_and_keeps_the_output_projection(qwen3_reranker_dir, monkeypatch):
    from transforms.models.reranker import Qwen3Reranker

    pairs = [("what is gzip", TEXTS[0]), ("csv files", TEXTS[2]), ("csv files", "x")]
    packed = Qwen3Reranker(str(qwen3_reranker_dir), device="cpu", precision="bf16-mixed").load()
    monkeypatch.setenv(prepack.ENV, "0")
    plain = Qwen3Reranker(str(qwen3_reranker_dir), device="cpu", precision="bf16-mixed").load()
    layers = packed.model.config.num_hidden_layers
    assert packed.prepacked == 7 * layers  # q, k, v, o and the three MLP projections
    assert type(packed.model.get_output_embeddings()) is torch.nn.Linear
    np.testing.assert_allclose(packed.score(pairs), plain.score(pairs), atol=1e-3)


@packs
def test_a_layer_whose_packed_product_differs_is_left_alone(monkeypatch, caplog):
    """The check at packing time can refuse: a packed product off by one is not used."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    good = prepack.PackedLinear.forward
    monkeypatch.setattr(prepack.PackedLinear, "forward", lambda self, x: good(self, x) + (self.out_features == 8))
    with caplog.at_level(logging.WARNING, logger=prepack.__name__):
        assert prepack.prepack_linears(model) == 1
    assert type(model[0]) is prepack.PackedLinear and type(model[2]) is torch.nn.Linear
    assert "1 linear layer(s) left unpacked" in caplog.text


@packs
def test_a_packed_layer_computes_the_autocast_product():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(3, 7, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = linear(x)
        got = prepack.PackedLinear(linear, rows_hint=21)(x)
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == (3, 7, 40)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=float(want.abs().max()) * 2**-7)


@packs
def test_outside_autocast_a_packed_layer_returns_the_input_dtype():
    """Code that calls the model without autocast (a hook, a traced runner) keeps consistent dtypes."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(5, 96)
    with torch.no_grad():
        got = prepack.PackedLinear(linear, rows_hint=5)(x)
        want = linear(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=float(want.abs().max()) * 2**-6)

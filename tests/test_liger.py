"""``TextEncoder(kernels="liger")``: Liger-Kernel's fused Qwen3 kernels on CUDA (``transforms.models.liger``).

On CPU: the option is refused where it cannot run, and the patched forwards hand CPU tensors to the
original code unchanged (Triton has no CPU backend). On CUDA (``gpu``): the patched model's vectors
against the card's fp32 reference and the unpatched bf16 model.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from transformers.models.qwen3 import modeling_qwen3

from tests.test_qwen_embed_parity import DOCS, CardReference
from transforms.models import liger
from transforms.models.encoder import TextEncoder


class _Refuses:
    """Stands in for a Liger autograd function: the CPU path must never call it."""

    @staticmethod
    def apply(*args, **kwargs):
        raise AssertionError("a Liger kernel was called for CPU tensors")


def test_unknown_kernels_are_refused(qwen3_embedding_dir):
    with pytest.raises(ValueError, match="kernels must be one of auto, none, liger"):
        TextEncoder(str(qwen3_embedding_dir), kernels="triton")


def test_liger_is_refused_with_onnx(qwen3_embedding_dir):
    with pytest.raises(ValueError, match="--backend eager or compile"):
        TextEncoder(str(qwen3_embedding_dir), kernels="liger", backend="onnx")


def test_liger_is_refused_on_cpu(qwen3_embedding_dir):
    encoder = TextEncoder(str(qwen3_embedding_dir), device="cpu", dtype=torch.float32, kernels="liger")
    with pytest.raises(ValueError, match="Triton kernels for CUDA; the model is on cpu"):
        encoder.load()


def test_liger_is_refused_on_cpu_for_the_reranker_too(qwen3_reranker_dir):
    from transforms.models.reranker import Qwen3Reranker

    reranker = Qwen3Reranker(str(qwen3_reranker_dir), device="cpu", kernels="liger")
    with pytest.raises(ValueError, match="Triton kernels for CUDA; the model is on cpu"):
        reranker.load()


def test_auto_loads_a_cpu_model_as_it_is(qwen3_embedding_dir):
    """``--kernels auto`` (the jobs' default) on CPU: nothing put in, the counters say none, the same vectors."""
    auto = TextEncoder(str(qwen3_embedding_dir), device="cpu", dtype=torch.float32, kernels="auto").load()
    plain = TextEncoder(str(qwen3_embedding_dir), device="cpu", dtype=torch.float32).load()
    assert auto.kernels_patched == 0 and auto.compute_info()["kernels"] == "none"
    assert "Liger" not in auto.describe_compute()
    np.testing.assert_array_equal(auto.encode(DOCS), plain.encode(DOCS))


def test_auto_with_onnx_means_none(qwen3_embedding_dir):
    assert TextEncoder(str(qwen3_embedding_dir), kernels="auto", backend="onnx").kernels == "none"


def test_auto_puts_the_kernels_in_only_where_they_run(qwen3_embedding_dir, monkeypatch):
    """``resolve``'s three conditions, each alone missing: a GPU, a Qwen3 model (SiLU MLPs), the package. The
    device and the package are what this machine cannot vary, so they are stood in for."""
    from transformers import BertConfig, BertModel

    qwen3 = TextEncoder(str(qwen3_embedding_dir), device="cpu", dtype=torch.float32).load().model
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    assert liger.resolve("auto", qwen3) == "none"  # on CPU
    monkeypatch.setattr(liger, "_on_cuda", lambda model: True)
    monkeypatch.setattr(liger, "installed", lambda: True)
    assert liger.resolve("auto", qwen3) == "liger"
    assert liger.resolve("auto", bert) == "none"  # no Qwen3 layers
    assert liger.resolve("none", qwen3) == "none" and liger.resolve("liger", bert) == "liger"  # they stand
    for mlp in (m for m in qwen3.modules() if isinstance(m, modeling_qwen3.Qwen3MLP)):
        monkeypatch.setattr(mlp.config, "hidden_act", "gelu")
    assert liger.resolve("auto", qwen3) == "none"  # Liger's SwiGLU computes SiLU
    monkeypatch.setattr(mlp.config, "hidden_act", "silu")
    monkeypatch.setattr(liger, "installed", lambda: False)
    assert liger.resolve("auto", qwen3) == "none"


def test_auto_with_a_broken_install_loads_the_model_as_it_is(qwen3_embedding_dir, monkeypatch, caplog):
    """liger-kernel found but not importable (a Triton that does not match the torch): ``auto`` warns and loads
    the model unpatched; ``liger`` fails at load, saying why. The GPU and the package are stood in for."""
    import builtins

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name.startswith("liger_kernel"):
            raise ImportError("cannot import name 'triton_key' from 'triton.compiler.compiler'")
        return real_import(name, *args, **kwargs)

    plain = TextEncoder(str(qwen3_embedding_dir), device="cpu", dtype=torch.float32).load()
    monkeypatch.setattr(liger, "_on_cuda", lambda model: True)
    monkeypatch.setattr(liger, "installed", lambda: True)
    monkeypatch.setattr(liger, "_device", lambda model: torch.device("cuda"))
    monkeypatch.setattr(builtins, "__import__", broken)
    auto = TextEncoder(str(qwen3_embedding_dir), device="cpu", dtype=torch.float32, kernels="auto").load()
    assert auto.kernels_patched == 0 and auto.compute_info()["kernels"] == "none"
    assert "--kernels auto: liger-kernel is installed but does not import (ImportError: cannot import" in caplog.text
    np.testing.assert_array_equal(auto.encode(DOCS), plain.encode(DOCS))
    with pytest.raises(ImportError, match="triton_key"):
        TextEncoder(str(qwen3_embedding_dir), device="cpu", dtype=torch.float32, kernels="liger").load()


def test_patched_forwards_leave_cpu_tensors_to_the_original_code(qwen3_embedding_dir, monkeypatch):
    """What ``apply`` installs, with stand-ins that fail if called: every norm, MLP and the rotary
    function run their own code on CPU, bitwise."""
    encoder = TextEncoder(str(qwen3_embedding_dir), device="cpu", dtype=torch.float32).load()
    before = encoder.encode(DOCS)
    model = encoder.model
    norms = [m for m in model.modules() if isinstance(m, modeling_qwen3.Qwen3RMSNorm)]
    mlps = [m for m in model.modules() if isinstance(m, modeling_qwen3.Qwen3MLP)]
    layers = model.config.num_hidden_layers
    assert (len(norms), len(mlps)) == (4 * layers + 1, layers)  # input, post-attention, q, k; the final norm
    import types

    for m in norms:
        monkeypatch.setattr(m, "forward", types.MethodType(liger._norm_forward(_Refuses, type(m).forward), m))
    for m in mlps:
        monkeypatch.setattr(m, "forward", types.MethodType(liger._mlp_forward(_Refuses, type(m).forward), m))
    rotary = liger._rotary(_Refuses, modeling_qwen3.apply_rotary_pos_emb)
    monkeypatch.setattr(modeling_qwen3, "apply_rotary_pos_emb", rotary)
    np.testing.assert_array_equal(encoder.encode(DOCS), before)


# -- CUDA --------------------------------------------------------------------------------------------
needs_liger = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
    reason="needs CUDA and liger-kernel",
)


@pytest.fixture(autouse=True)
def _rotary_restored():
    """``apply``'s rotary patch is process-wide: the tests after these run transformers' own."""
    yield
    liger.unpatch_rotary()


@pytest.mark.gpu
@needs_liger
def test_cuda_liger_kernels_match_card_and_unpatched(qwen3_embedding_dir):
    """Eager packed rows (the default on a GPU). Compiled, the bench's ``packed-compiled-liger`` row reports its
    cosine to the unpatched vectors: a compile here would cost a lease's test stage a minute."""
    want = CardReference(qwen3_embedding_dir).embed(DOCS)
    plain = TextEncoder(str(qwen3_embedding_dir), device="cuda").load().encode(DOCS)
    fused = TextEncoder(str(qwen3_embedding_dir), device="cuda", kernels="liger").load()
    assert fused.kernels_patched == 5 * fused.model.config.num_hidden_layers + 1
    assert fused.packing  # packed rows, the default on a GPU
    got = fused.encode(DOCS)
    assert float((got * want).sum(axis=1).min()) > 0.99  # bf16 against the fp32 card
    assert float((got * plain).sum(axis=1).min()) > 0.999  # against the same model unpatched
    # The rotary patch is process-wide; a CPU model in the same process still computes as before.
    cpu = TextEncoder(str(qwen3_embedding_dir), device="cpu", dtype=torch.float32).load()
    np.testing.assert_allclose(cpu.encode(DOCS), want, atol=1e-4)


@pytest.mark.gpu
@needs_liger
def test_cuda_auto_puts_the_kernels_in(qwen3_embedding_dir):
    """``--kernels auto`` (the jobs' default) on a GPU with liger-kernel installed: the kernels, counted."""
    encoder = TextEncoder(str(qwen3_embedding_dir), device="cuda", kernels="auto").load()
    assert encoder.kernels_patched == 5 * encoder.model.config.num_hidden_layers + 1
    assert encoder.compute_info()["kernels"] == "liger"


@pytest.mark.gpu
@needs_liger
def test_cuda_liger_kernels_in_the_reranker(qwen3_reranker_dir):
    from tests.test_qwen_rerank import PAIRS
    from transforms.models.reranker import Qwen3Reranker

    plain = Qwen3Reranker(str(qwen3_reranker_dir), device="cuda").load()
    fused = Qwen3Reranker(str(qwen3_reranker_dir), device="cuda", kernels="liger").load()
    assert fused.kernels_patched == 5 * fused.model.config.num_hidden_layers + 1
    for shared in (False, True):  # the shared prompt head runs through the KV cache
        plain.share_prefix = fused.share_prefix = shared
        np.testing.assert_allclose(fused.score(PAIRS), plain.score(PAIRS), atol=2e-2)  # P(yes), bf16


def test_unpatch_rotary_gives_back_transformers_own():
    original = modeling_qwen3.apply_rotary_pos_emb
    modeling_qwen3.apply_rotary_pos_emb = liger._rotary(_Refuses, original)
    liger.unpatch_rotary()
    assert modeling_qwen3.apply_rotary_pos_emb is original
    liger.unpatch_rotary()  # nothing patched: nothing to undo
    assert modeling_qwen3.apply_rotary_pos_emb is original


def test_kernels_flag_reaches_every_model(minilm_path):
    """``--kernels`` (default auto) from both jobs' flags to the handlers' model arguments; refused where it
    cannot mean anything (liger with --backend onnx) before a job is built."""
    from pipelines.configs import IndexConfig, index_config, label_config
    from pipelines.flags import index_parser, label_parser
    from pipelines.index import embedding_handler
    from pipelines.label import query_handler, reranker_handler
    from transforms.models.settings import EmbeddingSpec

    spec = EmbeddingSpec.read(minilm_path)
    index_args = ["--input", "x", "--collection", "c"]
    assert index_config(index_parser().parse_known_args(index_args)[0]).kernels == "auto"
    config = index_config(index_parser().parse_known_args([*index_args, "--kernels", "none"])[0])
    assert embedding_handler(config, spec)._model_args["kernels"] == "none"
    label = label_config(label_parser().parse_known_args(
        ["--queries", "q", "--out", "o", "--collection", "c", "--kernels", "liger"])[0])  # fmt: skip
    assert reranker_handler(label)._model_args["kernels"] == query_handler(label, spec)._model_args["kernels"] == "liger"
    assert label_config(label_parser().parse_known_args(["--queries", "q", "--out", "o", "--collection", "c"])[0]).kernels == "auto"
    with pytest.raises(SystemExit):
        index_parser().parse_args([*index_args, "--kernels", "triton"])
    with pytest.raises(ValueError, match="--kernels liger patches the torch model"):
        IndexConfig(input="x", collection="c", model="m", backend="onnx", kernels="liger")
    IndexConfig(input="x", collection="c", model="m", backend="onnx")  # auto: ONNX Runtime runs it as it is

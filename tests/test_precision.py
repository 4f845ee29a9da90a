"""``--precision``: the rule that picks it, its parity with fp32, and the flag's way to the models.

bf16-mixed keeps fp32 weights and runs matrix products in bf16 under ``torch.autocast``. Parity
is measured against fp32 on real text (MiniLM: cosine >= 1 - 1e-4 per text, the fast paths'
bar) and on the tiny random Qwen3 models (their own bounds, stated below). Autocast runs
anywhere on CPU (emulated without AVX512-BF16, only slower), so these tests do not depend on the
machine; ``--precision auto`` does, and its rule is tested with the CPU's answer faked.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from transforms.models import devices
from transforms.models.devices import Precision, resolve_precision
from transforms.models.encoder import TextEncoder

FP32 = Precision(torch.float32)
BF16 = Precision(torch.bfloat16)
MIXED = Precision(torch.float32, torch.bfloat16)


def _real_texts() -> list[str]:
    """Stdlib module documentation: real prose of a few hundred tokens, as the index job sees."""
    import argparse
    import collections
    import csv
    import difflib
    import email
    import json as json_module
    import logging
    import pathlib

    modules = (argparse, collections, csv, difflib, email, json_module, logging, pathlib)
    texts = [inspect.getdoc(m) or "" for m in modules]
    texts += ["gzip files", "How do I parse command line options?", "x"]
    return [t for t in texts if t]


TEXTS = _real_texts()


@pytest.mark.parametrize(
    ("precision", "device", "cpu_mixed", "native", "want"),
    [
        ("auto", "cpu", True, True, MIXED),  # the encoder on a CPU with bf16 in hardware
        ("auto", "cpu", True, False, FP32),  # emulated bf16 buys nothing: fp32
        ("auto", "cpu", False, True, FP32),  # the reranker: bf16-mixed not measured for it
        ("auto", "cuda", True, True, BF16),  # GPUs keep bf16 weights
        ("fp32", "cpu", True, True, FP32),
        ("bf16", "cpu", False, False, BF16),
        ("fp16", "cuda", False, False, Precision(torch.float16)),
        ("bf16-mixed", "cpu", False, False, MIXED),  # asked for: given, whatever the CPU
        ("bf16-mixed", "cuda", False, False, MIXED),
    ],
)
def test_precision_rule(precision, device, cpu_mixed, native, want, monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision(precision, torch.device(device), cpu_mixed=cpu_mixed) == want


def test_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"--precision must be one of auto, fp32, bf16, fp16, bf16-mixed, got 'int8'"):
        TextEncoder("any", precision="int8")


@pytest.mark.parametrize(
    ("flags", "want"),
    [({"_is_avx512_bf16_supported": True, "_is_amx_tile_supported": False}, True),
     ({"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": True}, True),
     ({"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": False}, False)],
)  # fmt: skip
def test_native_bf16_is_avx512_bf16_or_amx(flags, want, monkeypatch):
    for name, value in flags.items():
        monkeypatch.setattr(torch.cpu, name, lambda value=value: value)
    assert devices.cpu_has_native_bf16() is want


@pytest.fixture(scope="module")
def minilm_fp32(minilm_path):
    return TextEncoder(minilm_path, device="cpu", precision="fp32").load()


@pytest.fixture(scope="module")
def minilm_mixed(minilm_path):
    return TextEncoder(minilm_path, device="cpu", precision="bf16-mixed").load()


def test_bf16_mixed_minilm_is_within_1e4_cosine_of_fp32_on_real_text(minilm_fp32, minilm_mixed):
    assert minilm_mixed.precision == MIXED and minilm_mixed.model.dtype == torch.float32
    fp32, mixed = minilm_fp32.encode(TEXTS), minilm_mixed.encode(TEXTS)
    assert mixed.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(mixed, axis=1), 1.0, atol=1e-5)
    cosines = (fp32 * mixed).sum(axis=1)
    assert cosines.min() >= 1 - 1e-4, cosines  # 4.0e-5 measured
    # and autocast did run: bf16 products move the vectors (fp32 twice is bitwise equal)
    assert np.abs(fp32 - mixed).max() > 1e-5


def test_bf16_mixed_vectors_move_with_their_batch_but_stay_within_1e4_cosine(minilm_mixed):
    # A padded pass is not batch-invariant: bf16 products move a vector with its neighbours (on this Zen 4 machine
    # 8.2e-4 per component at most, min cosine 1 - 8.8e-6, 32 long documents alone against in one batch; how much
    # depends on the CPU's kernels, so only the bound is asserted). Batches are deterministic, so a rerun writes the
    # same bits (tests/test_index_pipeline.py); this bounds what a different batch would change.
    batched = minilm_mixed.encode(TEXTS)
    alone = np.stack([minilm_mixed.encode([t])[0] for t in TEXTS])
    cosines = (batched * alone).sum(axis=1)
    assert cosines.min() >= 1 - 1e-4, cosines


def test_bf16_mixed_holds_in_every_cpu_worker_thread(minilm_path, minilm_fp32, keep_torch_threads):
    """Autocast is per thread: passes on the encoder's worker threads must run it too (the same
    passes one at a time give the same vectors; fp32 passes would not)."""
    kwargs = dict(device="cpu", precision="bf16-mixed", token_budget=256)
    parallel = TextEncoder(minilm_path, cpu_workers=2, **kwargs).load()
    serial = TextEncoder(minilm_path, cpu_workers=1, **kwargs).load()
    assert parallel._pool is not None and serial._pool is None
    got = parallel.encode(TEXTS)
    np.testing.assert_array_equal(got, serial.encode(TEXTS))
    assert np.abs(got - minilm_fp32.encode(TEXTS)).max() > 1e-5


def test_auto_runs_bf16_mixed_where_the_cpu_multiplies_bf16(minilm_path, minilm_mixed, minilm_fp32, monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    native = TextEncoder(minilm_path, device="cpu").load()
    assert native.precision == MIXED
    np.testing.assert_array_equal(native.encode(TEXTS[:3]), minilm_mixed.encode(TEXTS[:3]))
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    other = TextEncoder(minilm_path, device="cpu").load()
    assert other.precision == FP32
    np.testing.assert_array_equal(other.encode(TEXTS[:3]), minilm_fp32.encode(TEXTS[:3]))


def test_bf16_mixed_qwen3_embedding_stays_close_to_fp32(qwen3_embedding_dir):
    """The tiny random Qwen3 (last-token pooling, left padding) through the same autocast."""
    fp32 = TextEncoder(str(qwen3_embedding_dir), device="cpu", precision="fp32").load()
    mixed = TextEncoder(str(qwen3_embedding_dir), device="cpu", precision="bf16-mixed").load()
    cosines = (fp32.encode(TEXTS) * mixed.encode(TEXTS)).sum(axis=1)
    assert cosines.min() >= 1 - 5e-4, cosines  # 1.1e-4 measured


def test_bf16_mixed_reranker_scores_stay_close_to_fp32(qwen3_reranker_dir):
    from transforms.models.reranker import Qwen3Reranker

    pairs = [("what is gzip", TEXTS[0][:400]), ("csv files", TEXTS[2][:300]), ("csv files", "x")]
    fp32 = Qwen3Reranker(str(qwen3_reranker_dir), device="cpu", precision="fp32").load()
    mixed = Qwen3Reranker(str(qwen3_reranker_dir), device="cpu", precision="bf16-mixed").load()
    shared = Qwen3Reranker(str(qwen3_reranker_dir), device="cpu", precision="bf16-mixed", share_prefix=True).load()
    want, got = np.array(fp32.score(pairs)), np.array(mixed.score(pairs))
    assert np.abs(want - got).max() <= 1e-2, (want, got)  # 2.5e-3 measured
    assert np.abs(want - got).max() > 0  # autocast ran
    np.testing.assert_allclose(shared.score(pairs), got, atol=1e-2)


def test_onnx_refuses_bf16_mixed_and_auto_means_fp32_there():
    with pytest.raises(ValueError, match="--backend onnx .* --precision bf16-mixed needs --backend eager or compile"):
        TextEncoder("any", backend="onnx", precision="bf16-mixed")
    from pipelines.configs import IndexConfig

    with pytest.raises(ValueError, match="--precision bf16-mixed needs --backend eager or compile"):
        IndexConfig(input="x", collection="c", model="m", backend="onnx", precision="bf16-mixed")


def test_precision_flag_reaches_every_model(minilm_path):
    from pipelines.configs import index_config, label_config
    from pipelines.flags import index_parser, label_parser, search_parser
    from pipelines.index import embedding_handler
    from pipelines.label import query_handler, reranker_handler
    from transforms.models.settings import EmbeddingSpec

    spec = EmbeddingSpec.read(minilm_path)
    args, _ = index_parser().parse_known_args(["--input", "x", "--collection", "c", "--precision", "bf16-mixed"])
    config = index_config(args)
    assert config.precision == "bf16-mixed"
    assert embedding_handler(config, spec)._model_args["precision"] == "bf16-mixed"
    assert index_config(index_parser().parse_known_args(["--input", "x", "--collection", "c"])[0]).precision == "auto"

    label = label_config(label_parser().parse_known_args(
        ["--queries", "q", "--out", "o", "--collection", "c", "--precision", "fp32"])[0])  # fmt: skip
    assert label.precision == "fp32"
    assert reranker_handler(label)._model_args["precision"] == "fp32"
    assert query_handler(label, spec)._model_args["precision"] == "fp32"
    assert search_parser().parse_args(["q", "--collection", "c", "--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        index_parser().parse_args(["--input", "x", "--collection", "c", "--precision", "int8"])


def test_precision_is_not_in_the_reindexing_fingerprint(minilm_path):
    """As the device never was: a rerun at another precision keeps the stored vectors (they differ
    from fp32's by less than 1e-4 cosine) instead of re-embedding the corpus."""
    from pipelines.configs import IndexConfig
    from pipelines.index import embedding_settings
    from transforms.models.settings import EmbeddingSpec

    spec = EmbeddingSpec.read(minilm_path)
    settings = [embedding_settings(IndexConfig(input="x", collection="c", model=minilm_path, precision=p), spec)
                for p in ("fp32", "bf16-mixed")]  # fmt: skip
    assert settings[0] == settings[1]

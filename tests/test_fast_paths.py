"""The encoder's fast paths against eager: length buckets, ONNX Runtime, torch.compile, CPU workers, overlap.

Parity is cosine >= 1 - 1e-4 per text against the eager encoder (in practice ~1 - 1e-7). The
compiled path runs one bucket and two batch sizes on purpose: inductor compiles each new shape
on CPU for seconds, and the whole file must stay under a minute.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from transforms.models.devices import budget_batches
from transforms.models.encoder import TextEncoder
from transforms.models.fast import CompiledRunner, bucket_of, length_buckets

SHORT = ["a b c", "gzip files", "regular expressions"]  # all within the 16-token bucket
TEXTS = SHORT + ["JSON encoder and decoder. " * 20, "tar archives " * 60]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1)


@pytest.fixture(scope="module")
def eager(minilm_path):
    # fp32: batch boundaries move bf16-mixed vectors by up to ~1e-3 per component (tests/test_precision.py), which would hide
    # what these tests look for.
    return TextEncoder(minilm_path, device="cpu", cpu_workers=1, precision="fp32").load()


def test_length_buckets_are_few_and_cover_every_length():
    buckets = length_buckets(256)
    assert buckets == [16, 24, 32, 48, 64, 96, 128, 184, 256]
    assert len(length_buckets(8192)) == 19  # Qwen3's 32k-token models stay bounded too
    for n in range(1, 257):
        b = bucket_of(n, buckets)
        assert b >= n and (b == 16 or b <= 1.5 * n)  # at most ~41% padding past the first bucket
    assert bucket_of(300, buckets) == 300  # past the last bucket: the length itself


def _record_passes(encoder: TextEncoder) -> list[list[int]]:
    """The token counts of each forward pass's texts, as the encoder runs them (any thread)."""
    passes: list[list[int]] = []
    forward = encoder._forward

    def recording(ids):
        passes.append(sorted(len(x) for x in ids))
        return forward(ids)

    encoder._forward = recording
    return passes


def test_cpu_workers_give_the_vectors_of_one_pass_at_a_time(minilm_path, eager, keep_torch_threads):
    """The passes are the same whatever the number of workers (a multiple of four of them: ``even_passes``),
    so are the vectors. Before, a batch with fewer passes than workers was cut again, by the worker count."""
    parallel = TextEncoder(minilm_path, device="cpu", token_budget=256, cpu_workers=2, precision="fp32").load()
    serial = TextEncoder(minilm_path, device="cpu", token_budget=256, cpu_workers=1, precision="fp32").load()
    assert parallel.cpu_workers == 2
    assert TextEncoder(minilm_path, device="cpu").cpu_workers_setting is None  # default: one pass at a time
    # 33 texts: 3 greedy passes of 256 tokens, cut into 4 even ones; TEXTS: 3 passes whose even cut would overflow.
    texts = SHORT + [f"module {i}: " + "data structures and algorithms " * 4 for i in range(30)]
    for few, count in ((texts, 4), (TEXTS, 3)):
        lengths = serial.count_tokens(few)
        assert len(budget_batches(lengths, 256)) == 3
        ran = {}
        for name, encoder in (("parallel", parallel), ("serial", serial)):
            passes = _record_passes(encoder)
            got = encoder.encode(few)
            del encoder._forward
            ran[name] = (sorted(passes), got)
        assert len(ran["serial"][0]) == count
        assert ran["parallel"][0] == ran["serial"][0]
        assert sorted(n for p in ran["serial"][0] for n in p) == sorted(lengths)
        np.testing.assert_allclose(ran["parallel"][1], ran["serial"][1], atol=1e-6)
        np.testing.assert_allclose(ran["parallel"][1], eager.encode(few), atol=1e-5)


def test_overlapped_preparation_gives_the_same_vectors(minilm_path, eager):
    overlapped = TextEncoder(
        minilm_path, device="cpu", token_budget=256, overlap=True, cpu_workers=1, precision="fp32"
    ).load()
    assert overlapped.overlap
    np.testing.assert_allclose(overlapped.encode(TEXTS), eager.encode(TEXTS), atol=1e-5)
    # Texts tokenised batch by batch in the preparing thread, batches cut by known token counts.
    lengths = eager.count_tokens(TEXTS)
    vectors, failures = overlapped.encode_texts(TEXTS, lengths)
    assert not failures
    np.testing.assert_allclose(np.stack(vectors), eager.encode(TEXTS), atol=1e-5)


def test_out_of_memory_preparing_a_pass_ahead_runs_it_unprepared(minilm_path, eager, caplog):
    """With ``overlap`` the next pass's tensors are made (pinned, copied) while one runs; out of memory there ran
    nothing of the Beam batch. Now that pass runs as a serial one would (and splits on out-of-memory there)."""
    overlapped = TextEncoder(
        minilm_path, device="cpu", token_budget=256, overlap=True, cpu_workers=1, precision="fp32"
    ).load()
    prepare, failed = overlapped._prepare, []

    def out_of_memory_once(ids):
        if not failed:
            failed.append(len(ids))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return prepare(ids)

    overlapped._prepare = out_of_memory_once
    with caplog.at_level(logging.WARNING, logger="transforms.models.encoder"):
        got = overlapped.encode(TEXTS)
    assert failed and "out of memory preparing a pass of" in caplog.text
    np.testing.assert_allclose(got, eager.encode(TEXTS), atol=1e-5)
    # Any other error in preparing still fails the call, as it did.
    overlapped._prepare = lambda ids: (_ for _ in ()).throw(ValueError("bad ids"))
    with pytest.raises(ValueError, match="bad ids"):
        overlapped.encode(TEXTS)


def test_backend_and_cpu_workers_flags_reach_the_config():
    from pipelines.configs import index_config
    from pipelines.flags import index_parser

    base = ["--input", "x.parquet", "--collection", "c"]
    config = index_config(index_parser().parse_args(base + ["--backend", "onnx", "--cpu-workers", "1"]))
    assert (config.backend, config.cpu_workers) == ("onnx", 1)
    assert index_config(index_parser().parse_args(base)).backend == "eager"
    with pytest.raises(ValueError, match="--backend"):
        TextEncoder("m", backend="tensorrt")


@pytest.mark.parametrize(
    ("beam_args", "flag", "omp", "want"),
    [
        ([], None, None, None),  # in-process DirectRunner: torch's default
        (["--direct_running_mode=multi_processing", "--direct_num_workers=2"], None, None, "cores/2"),
        (["--direct_running_mode=multi_threading", "--direct_num_workers=4"], None, None, "cores/4"),
        (["--direct_running_mode=multi_processing", "--direct_num_workers=0"], None, None, "cores/cpu_count"),
        (["--direct_running_mode=multi_processing", "--direct_num_workers=1"], None, None, None),
        (["--direct_running_mode=multi_processing", "--direct_num_workers=2"], None, "3", None),  # the user's choice
        (["--direct_running_mode=multi_processing", "--direct_num_workers=2"], 3, "1", 3),  # the flag wins
        (["--runner=DataflowRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"], None, None, None),
        (["--runner=PortableRunner", "--direct_num_workers=2"], 2, None, 2),
    ],
)
def test_worker_cpu_threads_divide_the_cores_among_local_workers(beam_args, flag, omp, want, monkeypatch):
    import os

    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.common import worker_cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if omp:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)))  # an 8-core machine
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    expected = {"cores/2": 4, "cores/4": 2, "cores/cpu_count": 1}.get(want, want)
    assert worker_cpu_threads(PipelineOptions(beam_args), flag) == expected


def test_cpu_threads_flag_reaches_both_jobs_and_the_worker(minilm_path, keep_torch_threads):
    import torch

    from pipelines.configs import index_config, label_config
    from pipelines.flags import index_parser, label_parser
    from transforms.inference.embed import EmbeddingModelHandler

    base = ["--input", "x.parquet", "--collection", "c"]
    assert index_config(index_parser().parse_args(base + ["--cpu-threads", "3"])).cpu_threads == 3
    assert index_config(index_parser().parse_args(base)).cpu_threads is None
    label = label_parser().parse_args(["--queries", "q.parquet", "--out", "o", "--collection", "c", "--cpu-threads", "2"])
    assert label_config(label).cpu_threads == 2
    with pytest.raises(ValueError, match="--cpu-threads must be >= 1"):
        index_config(index_parser().parse_args(base + ["--cpu-threads", "0"]))
    torch.set_num_threads(2)
    model = EmbeddingModelHandler(minilm_path, device="cpu", cpu_workers=1, cpu_threads=1).load_model()
    assert torch.get_num_threads() == 1 and model.cpu_workers == 1


@pytest.mark.parametrize("which", ["minilm", "qwen3"])
def test_onnx_backend_matches_eager_and_reuses_its_export(which, minilm_path, qwen3_embedding_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    monkeypatch.setenv("CORPUS_ETL_CACHE", str(tmp_path))
    path = minilm_path if which == "minilm" else str(qwen3_embedding_dir)
    reference = TextEncoder(path, device="cpu", cpu_workers=1, precision="fp32").load().encode(TEXTS)
    fast = TextEncoder(path, device="cpu", backend="onnx").load()
    assert fast.precision.autocast is None  # --precision auto: the exported graph runs fp32
    assert fast._runner.export_seconds > 0
    assert _cosines(fast.encode(TEXTS), reference).min() >= 1 - 1e-4
    assert _cosines(fast.encode(TEXTS[:1]), reference[:1]).min() >= 1 - 1e-4  # one row: the batch axis is dynamic
    again = TextEncoder(path, device="cpu", backend="onnx").load()
    assert again._runner.export_seconds == 0.0  # the cached export


@pytest.mark.parametrize(("which", "precision"), [("minilm", "fp32"), ("qwen3", "fp32"), ("minilm", "bf16-mixed")])
def test_compiled_backend_matches_eager_on_bucketed_lengths(which, precision, minilm_path, qwen3_embedding_dir):
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("torch.compile on CPU needs a C compiler")
    import torch._inductor.config

    path = minilm_path if which == "minilm" else str(qwen3_embedding_dir)
    reference = TextEncoder(path, device="cpu", cpu_workers=1, precision=precision).load().encode(SHORT)
    fast = TextEncoder(path, device="cpu", backend="compile", precision=precision).load()
    with torch._inductor.config.patch(compile_threads=1):  # no pool of compile workers to start
        got = fast.encode(SHORT)
        assert _cosines(got, reference).min() >= 1 - 1e-4
        if precision != "fp32":  # autocast traced into the graph, and still fp32's vectors to 1e-4
            fp32 = TextEncoder(path, device="cpu", cpu_workers=1, precision="fp32").load().encode(SHORT)
            assert _cosines(got, fp32).min() >= 1 - 1e-4 and np.abs(got - fp32).max() > 1e-5
        assert _cosines(fast.encode(SHORT[:2]), reference[:2]).min() >= 1 - 1e-4  # another row count, same graph
    assert fast._runner.shapes == {(-1, 16)}  # one bucket, batch dimension dynamic


def test_encoder_passes_build_no_kv_cache(qwen3_embedding_dir):
    """Qwen3's config enables the KV cache, which an encoder never reads back: on the H200 the 0.6B
    held ~30 GB of keys and values at a 262k-token pass (BENCHMARKS.md). Eager and compiled passes
    must build none."""
    encoder = TextEncoder(str(qwen3_embedding_dir), device="cpu", cpu_workers=1).load()
    caches = []
    hook = encoder.model.register_forward_hook(lambda module, args, out: caches.append(out.past_key_values))
    try:
        encoder.encode(SHORT)
        assert caches and all(cache is None for cache in caches)

        # The compiled path calls the model with the same arguments (a plain stand-in for the
        # compiled model, so nothing is compiled here).
        runner = CompiledRunner(encoder.model, buckets=[16, 32], token_budget=64)
        runner.compiled = encoder.model
        ids = torch.tensor([[1, 2, 3, 4] * 4])
        runner(ids, torch.ones_like(ids))
        assert len(caches) == 2 and caches[-1] is None
    finally:
        hook.remove()


def test_each_jobs_cpu_threads_set_its_encoders_workers(minilm_path, keep_torch_threads):
    """``--cpu-workers``' default (0) is the worker's torch threads, which ``--cpu-threads`` sets: also for a later
    job in the same process (tests, an in-process DirectRunner), after an earlier encoder set torch's threads to 1."""
    from transforms.inference.embed import EmbeddingModelHandler

    first = EmbeddingModelHandler(minilm_path, device="cpu", cpu_workers=0, cpu_threads=2).load_model()
    second = EmbeddingModelHandler(minilm_path, device="cpu", cpu_workers=0, cpu_threads=3).load_model()
    third = EmbeddingModelHandler(minilm_path, device="cpu", cpu_workers=0, cpu_threads=1).load_model()
    assert (first.cpu_workers, second.cpu_workers, third.cpu_workers) == (2, 3, 1)
    assert torch.get_num_threads() == 1  # the last load: one thread per pass (or its one worker's)


def test_embed_batch_counts_the_models_own_tokens_also_when_passes_are_tokenised_one_by_one(minilm_path, eager):
    """The ``tokens`` of ``embed_batch`` (the jobs' precision and layout counters) are the model's own, on either
    path: with ``overlap`` each pass is tokenised as it is prepared, cut by the chunker's counts, which can differ."""
    overlapped = TextEncoder(
        minilm_path, device="cpu", token_budget=256, overlap=True, cpu_workers=1, precision="fp32"
    ).load()
    own = eager.count_tokens(TEXTS)
    chunker = [n - 1 for n in own]  # e.g. a title's tokens counted apart from the text's
    for encoder in (overlapped, eager):
        vectors, failures, tokens = encoder.embed_batch(TEXTS, chunker)
        assert not failures and len(vectors) == len(TEXTS)
        assert tokens == sum(own)

"""The embedding handler in Beam: plain RunInference, the token-batched Embed transform, dead letters."""

from __future__ import annotations

import dataclasses
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests import recording
from transforms.inference.embed import Embed, EmbeddingModelHandler
from transforms.models.devices import TokenBudgets, budget_batches
from transforms.models.encoder import TextEncoder
from transforms.types import DEAD, Chunk, Query

TEXTS = ["a short one", "JSON encoder and decoder. " * 20, "regular expressions", "gzip files " * 60]


def _chunks() -> list[Chunk]:
    return [Chunk(f"d{i}", 0, t, 0, len(t), len(t.split()) + 2, t) for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def encoder(minilm_path):
    # fp32 here and in the handlers compared with it: --precision auto runs bf16-mixed on a CPU with bf16,
    # whose vectors move by up to ~1e-3 per component with batch boundaries (tests/test_precision.py).
    return TextEncoder(minilm_path, device="cpu", precision="fp32").load()


def _vectors_close(expected: dict[str, np.ndarray], atol: float = 1e-5):
    def check(actual):
        got = {e.chunk.doc_id: np.asarray(e.vector) for e in actual}
        assert sorted(got) == sorted(expected)
        for key, vec in expected.items():
            np.testing.assert_allclose(got[key], vec, atol=atol)

    return check


class _RecordingHandler(recording.Recording, EmbeddingModelHandler):
    pass


def test_the_handler_cuts_a_batch_into_forward_passes_by_padded_tokens(minilm_path, encoder):
    """Sorted by length, then cut where (rows x longest) would pass the forward budget."""
    budget = 128
    handler = _RecordingHandler(
        minilm_path, device="cpu", budgets=TokenBudgets(forward=budget, batch=10_000), cpu_workers=1
    )  # one pass at a time: the recorded order is the sorted order
    lengths = [len(ids) for ids in encoder.tokenize(TEXTS)]
    order = sorted(range(len(TEXTS)), key=lambda i: lengths[i])
    expected = [(len(group), max(lengths[order[i]] for i in group)) for group in budget_batches(sorted(lengths), budget)]
    assert len(expected) < len(TEXTS)  # the budget lets some texts share a pass: a real check
    recording.reset()
    model = handler.load_model()
    list(handler.run_inference(_chunks(), model))
    assert recording.PASSES == expected
    assert recording.BATCH_WEIGHTS == [sum(c.n_tokens for c in _chunks())]


def test_plain_run_inference_batches_by_tokens(minilm_path, encoder):
    """Plain RunInference with the handler: Beam batches by the elements' token weights."""
    expected = {f"d{i}": v for i, v in enumerate(encoder.encode(TEXTS))}
    weights = sorted(c.n_tokens for c in _chunks())
    batch = weights[-1] + weights[0]  # no batch may hold the two longest chunks
    handler = _RecordingHandler(minilm_path, device="cpu", budgets=TokenBudgets(forward=64, batch=batch), precision="fp32")
    recording.reset()
    with TestPipeline() as p:
        out = p | beam.Create(_chunks()) | RunInference(handler)
        assert_that(out, _vectors_close(expected))
    recording.assert_within_budgets(batch, 64)
    assert sum(recording.BATCH_WEIGHTS) == sum(weights)
    assert sum(rows for rows, _ in recording.PASSES) == len(TEXTS)


def test_embed_transform_and_matryoshka_dim(minilm_path, encoder):
    full = encoder.encode(TEXTS)
    cut = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    with TestPipeline() as p:
        out = p | beam.Create(_chunks()) | Embed(EmbeddingModelHandler(minilm_path, device="cpu", dim=64, precision="fp32"))
        assert_that(out["embedded"], _vectors_close({f"d{i}": v for i, v in enumerate(cut)}), label="vectors")
        assert_that(out[DEAD], equal_to([]), label="no dead letters")


def test_queries_get_the_query_prompt(qwen3_embedding_dir):
    encoder = TextEncoder(str(qwen3_embedding_dir), device="cpu").load()
    assert encoder.prompt(is_query=True).startswith("Instruct: ")
    expected = encoder.encode(["what is json"], is_query=True)[0]
    assert not np.allclose(expected, encoder.encode(["what is json"])[0])  # the prompt changes the vector
    handler = EmbeddingModelHandler(str(qwen3_embedding_dir), device="cpu", kind="query")
    with TestPipeline() as p:
        out = p | beam.Create([Query("q1", "what is json")]) | Embed(handler)

        def check(actual):
            ((query, vector),) = actual
            assert query == Query("q1", "what is json")
            np.testing.assert_allclose(vector, expected, atol=1e-5)

        assert_that(out["embedded"], check)


class _FailsOnGzip(EmbeddingModelHandler):
    """A handler whose batch fails when it holds a given text: stands in for a model error."""

    def run_inference(self, batch, model, inference_args=None):
        if any("gzip" in c.embed_text for c in batch):
            raise RuntimeError("device-side assert triggered")
        return super().run_inference(batch, model, inference_args)


def test_a_failing_batch_becomes_dead_letters_and_the_rest_goes_on(minilm_path):
    chunks = _chunks()
    # A budget so small that every chunk is its own batch: only the gzip one fails.
    handler = _FailsOnGzip(minilm_path, device="cpu", budgets=TokenBudgets(forward=1, batch=1))
    with TestPipeline() as p:
        out = p | beam.Create(chunks) | Embed(handler)
        assert_that(out["embedded"] | beam.Map(lambda e: e.chunk.doc_id), equal_to(["d0", "d1", "d2"]), label="ok")
        assert_that(
            out[DEAD] | beam.Map(lambda d: (d.stage, d.source, d.reason)),
            equal_to([("embed", "d3", "inference failed for its batch: RuntimeError: device-side assert triggered")]),
            label="dead",
        )


@pytest.mark.parametrize("mode", ["mean", "max", "cls", "lasttoken"])
def test_pool_packed_equals_pool_on_padded_rows(mode):
    from transforms.models.encoder import pool, pool_packed

    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 1, 5]
    rows = [torch.randn(n, 4, generator=gen) for n in lengths]
    width = max(lengths)
    hidden = torch.zeros(len(rows), width, 4)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        hidden[i, : len(row)] = row
        mask[i, : len(row)] = 1
    packed = pool_packed(torch.cat(rows), torch.tensor(lengths), mode)
    torch.testing.assert_close(packed, pool(hidden, mask, mode))


def test_packing_is_refused_where_texts_would_mix(minilm_path):
    """BERT's bidirectional attention ignores restarting positions: packed texts would attend to
    each other under sdpa, so the load-time check refuses it instead of writing wrong vectors (varlen,
    packing's default, keeps them apart: tests/test_varlen.py)."""
    with pytest.raises(ValueError, match=r"packing is not supported with attention 'sdpa' \(packed vs padded cosine"):
        TextEncoder(minilm_path, device="cpu", packing=True, attn_implementation="sdpa").load()


@pytest.mark.parametrize(
    ("device", "accelerator", "cuda_here", "gpu"),
    [
        ("cuda", None, False, True),  # asked for: the workers have one, this machine need not
        ("cuda:1", None, False, True),
        ("cpu", "type:nvidia-l4;count:1", True, False),  # --device cpu wins over hints and local GPUs
        ("auto", "type:nvidia-l4;count:1", False, True),  # Dataflow: a launcher without a GPU, GPU workers
        ("auto", None, True, True),  # DirectRunner: the workers are this machine
        ("auto", None, False, False),
    ],
)
def test_gpu_jobs_get_beam_batches_of_gpu_passes(minilm_path, monkeypatch, device, accelerator, cuda_here, gpu):
    """Without --max-batch-tokens, Beam batches hold four forward passes of the device the model steps will run on:
    1,048,576 tokens for a GPU's 262,144-token passes (with batches of CPU passes the index job on an H100 ran at a
    third of the encoder's rate), 32,768 on CPU. The flag, when given, sizes both on any device."""
    import torch

    from pipelines.configs import IndexConfig
    from pipelines.index import embedding_handler, read_spec
    from transforms.models.devices import GPU_FORWARD_TOKENS, expects_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_here)
    assert expects_gpu(device, accelerator) is gpu
    hints = (("accelerator", accelerator),) if accelerator else ()
    config = IndexConfig(input="docs.parquet", collection="c", model=minilm_path, device=device, resource_hints=hints)
    assert config.expects_gpu is gpu
    handler = embedding_handler(config, read_spec(config))
    assert handler.budgets == TokenBudgets(forward=None, batch=4 * (GPU_FORWARD_TOKENS if gpu else 8192))
    # --share-model auto: one model per machine where it runs on a GPU and a machine runs several worker processes
    assert (config.shares_model(several_processes=True), config.shares_model(several_processes=False)) == (gpu, False)
    from apache_beam.options.pipeline_options import PipelineOptions

    dataflow, here = PipelineOptions(["--runner=DataflowRunner"]), PipelineOptions([])
    assert (config.model_copies(dataflow), config.model_copies(here)) == ("machine" if gpu else "process", "process")
    for setting, shared in (("machine", True), ("process", False)):
        explicit = dataclasses.replace(config, share_model=setting)
        assert explicit.shares_model(several_processes=True) is explicit.shares_model(several_processes=False) is shared
    assert embedding_handler(config, read_spec(config), shared=True).share_model_across_processes()
    assert not handler.share_model_across_processes()
    assert TokenBudgets.from_flag(4096, 512, gpu=gpu) == TokenBudgets(forward=4096, batch=16_384)
    assert TokenBudgets.from_flag(None, 2_000_000, gpu=gpu).batch == 2_000_000  # the longest input fits alone


@pytest.mark.parametrize(("device", "gpu"), [("cuda", True), ("cpu", False)])
def test_label_reranking_batches_follow_the_device_too(device, gpu):
    from pipelines.configs import LabelConfig
    from pipelines.label import reranker_handler
    from transforms.models.devices import GPU_FORWARD_TOKENS

    config = LabelConfig(queries="q.parquet", out="out", collection="c", device=device)
    assert reranker_handler(config).budgets.batch == 4 * (GPU_FORWARD_TOKENS if gpu else 8192)
    assert config.shares_model(several_processes=True) is gpu  # --share-model auto
    assert reranker_handler(config, shared=True).share_model_across_processes()


@pytest.mark.parametrize(
    ("args", "several"),
    [
        ([], False),  # DirectRunner in this process
        (["--direct_running_mode=multi_threading", "--direct_num_workers=4"], False),
        (["--direct_running_mode=multi_processing", "--direct_num_workers=2"], True),
        (["--direct_running_mode=multi_processing", "--direct_num_workers=1"], False),
        (["--direct_running_mode=multi_processing", "--direct_num_workers=0"], True),  # one per core
        (["--runner=DataflowRunner"], True),  # a process per vCPU
        (["--runner=PortableRunner"], True),
        (["--runner=FlinkRunner"], True),
    ],
)
def test_which_runners_run_several_worker_processes_on_a_machine(args, several):
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.common import several_worker_processes

    assert several_worker_processes(PipelineOptions(args)) is several


def test_share_model_takes_three_settings():
    from pipelines.configs import IndexConfig, LabelConfig

    with pytest.raises(ValueError, match="--share-model must be one of auto, machine, process, got 'gpu'"):
        IndexConfig(input="docs.parquet", collection="c", model="m", share_model="gpu")
    with pytest.raises(ValueError, match="--share-model must be one of"):
        LabelConfig(queries="q.parquet", out="out", collection="c", share_model="")


def test_a_model_shared_across_processes_serves_both_workers(minilm_path, encoder, tmp_path, monkeypatch):
    """``large_model`` (``--share-model machine``, the default on a GPU): two worker processes, one model load;
    the handler reaches the model only through method calls, which is all Beam's cross-process proxy carries."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from transforms.inference.handlers import LOAD_LOG_ENV

    loads = tmp_path / "loads.txt"
    monkeypatch.setenv(LOAD_LOG_ENV, str(loads))  # read by the worker processes, children of this one
    texts = [f"{t} ({i})" for i in range(60) for t in TEXTS[:2]]
    chunks = [Chunk(f"d{i}", 0, t, 0, len(t), len(t.split()) + 4, t) for i, t in enumerate(texts)]
    expected = dict(zip((c.doc_id for c in chunks), encoder.encode(texts)))
    handler = EmbeddingModelHandler(
        minilm_path, device="cpu", precision="fp32", large_model=True, budgets=TokenBudgets(forward=256, batch=512)
    )
    options = PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    with TestPipeline(options=options) as p:
        out = p | beam.Create(chunks) | beam.Reshuffle() | Embed(handler)
        assert_that(out["embedded"], _vectors_close(expected), label="vectors")
        pids = out["embedded"] | beam.Map(lambda _: os.getpid()) | beam.Distinct()
        assert_that(pids | beam.combiners.Count.Globally(), equal_to([2]), label="both workers embedded")
    assert len(loads.read_text().splitlines()) == 1  # one model for the two processes


class _NonFiniteOnGzip:
    """The real encoder, except that the gzip text's vector comes back NaN (fp16 overflow) and the regex one's inf."""

    def __init__(self, inner: TextEncoder) -> None:
        self.inner = inner

    def embed_batch(self, texts, lengths, *, is_query=False):
        vectors, failures, n_tokens = self.inner.embed_batch(texts, lengths, is_query=is_query)
        bad = {"gzip": np.nan, "regular": np.inf}
        return [next((np.full_like(v, x) for w, x in bad.items() if w in t), v) for t, v in zip(texts, vectors)], \
            failures, n_tokens

    def compute_info(self):
        return self.inner.compute_info()


def test_a_non_finite_vector_is_a_dead_letter_and_the_rest_of_its_batch_is_written(minilm_path, encoder):
    from transforms.inference.embed import NON_FINITE
    from transforms.types import DeadLetter, EmbeddedChunk

    handler = EmbeddingModelHandler(minilm_path, device="cpu")
    out = list(handler.run_inference(_chunks(), _NonFiniteOnGzip(encoder)))
    assert [e.chunk.doc_id for e in out if isinstance(e, EmbeddedChunk)] == ["d0", "d1"]
    assert [(d.stage, d.source, d.reason) for d in out if isinstance(d, DeadLetter)] == [
        ("embed", "d2", NON_FINITE), ("embed", "d3", NON_FINITE)]


class _NoVectorFor:
    """A model that embeds nothing of the texts holding ``word``: they come back failed (out of memory alone)."""

    def __init__(self, inner: TextEncoder, word: str) -> None:
        self.inner, self.word = inner, word

    def embed_batch(self, texts, lengths, *, is_query=False):
        vectors, _, n_tokens = self.inner.embed_batch(texts, lengths, is_query=is_query)
        failed = [i for i, t in enumerate(texts) if self.word in t]
        reason = "out of memory on a single element: CUDA out of memory"
        return [None if i in failed else v for i, v in enumerate(vectors)], [(i, reason) for i in failed], n_tokens

    def compute_info(self):
        return self.inner.compute_info()


def test_a_query_that_fails_alone_is_a_dead_letter_named_by_its_id(minilm_path, encoder):
    """As a failed batch's dead letters (``_source_and_record``): a query's source is its id, not ``""``."""
    from transforms.types import DeadLetter

    handler = EmbeddingModelHandler(minilm_path, device="cpu", kind="query")
    queries = [Query("q1", "what is json"), Query("q2", "gzip files")]
    out = list(handler.run_inference(queries, _NoVectorFor(encoder, "gzip")))
    assert [q.query_id for q, _ in out[:1]] == ["q1"]
    assert [(d.stage, d.source, d.reason) for d in out if isinstance(d, DeadLetter)] == [
        ("embed", "q2", "out of memory on a single element: CUDA out of memory")]


class _RaisingModel:
    def embed_batch(self, texts, lengths, *, is_query=False):
        raise RuntimeError("device-side assert triggered")


class _RaisingHandler(EmbeddingModelHandler):
    def load_model(self):
        return _RaisingModel()


def test_a_batch_whose_model_raises_counts_as_a_failed_batch(minilm_path):
    """RunInference counts a batch whose ``run_inference`` raises in ``failed_batches_counter``; the handler's
    results must be computed inside that call (not in a generator Beam lists after it) for the count to see it."""
    from apache_beam.metrics.metric import MetricsFilter

    chunks = [dataclasses.replace(c, n_tokens=10) for c in _chunks()]  # one length bucket: one batch
    p = TestPipeline()
    out = p | beam.Create(chunks) | Embed(_RaisingHandler(minilm_path, device="cpu", budgets=TokenBudgets(batch=10_000)))
    assert_that(out["embedded"], equal_to([]), label="none embedded")
    assert_that(out[DEAD] | beam.Map(lambda d: d.source), equal_to(["d0", "d1", "d2", "d3"]), label="all dead")
    result = p.run()
    result.wait_until_finish()
    failed = result.metrics().query(MetricsFilter().with_name("failed_batches_counter"))["counters"]
    assert sum(c.committed for c in failed) == 1  # one batch of the four chunks

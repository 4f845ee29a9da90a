"""Qdrant collection checks, the idempotent writer and the retry policy (local mode, real client)."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from qdrant_client import models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from pipelines.common import counters
from transforms.qdrant import (
    QdrantConfig,
    WriteToQdrant,
    close_client,
    ensure_collection,
    is_transient,
    point_bytes,
    search_documents,
    shared_client,
    to_point,
    with_retries,
)
from transforms.types import Chunk, EmbeddedChunk, point_id


def test_point_ids_are_stable_across_runs_and_releases():
    # Pinned: changing the id scheme would orphan every point of every existing index.
    assert point_id("doc-1", 0) == "39d1629c-71b6-5ee9-805d-c0a7e0c583c2"
    assert point_id("doc-1", 1) != point_id("doc-1", 0) != point_id("doc-2", 0)


def _item(doc: str, i: int, vec: list[float], text: str = "t") -> EmbeddedChunk:
    chunk = Chunk(doc, i, text, 0, len(text), 3, text, title="T", metadata={"lang": "en"})
    return EmbeddedChunk(chunk, tuple(vec))


@pytest.fixture()
def qdrant(tmp_path):
    config = QdrantConfig(path=str(tmp_path / "q"))
    yield config
    close_client(config)


def test_collection_is_created_once_and_a_mismatch_is_refused(qdrant):
    client, _ = shared_client(qdrant)
    assert ensure_collection(client, "c", 4) is True
    assert ensure_collection(client, "c", 4) is False
    with pytest.raises(ValueError, match="exists with size 4 and distance Cosine; this job writes size 8"):
        ensure_collection(client, "c", 8)
    client.create_collection("dot", vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT))
    with pytest.raises(ValueError, match="distance Dot"):
        ensure_collection(client, "dot", 4)


def test_payload_carries_position_text_and_provenance():
    point = to_point(_item("d", 2, [1, 0, 0, 0], "hello"), "m")
    assert point.id == point_id("d", 2)
    assert point.payload == {
        "doc_id": "d", "chunk_index": 2, "text": "hello", "char_start": 0, "char_end": 5, "n_tokens": 3,
        "model": "m", "content_hash": "2cf24dba5fb0a30e", "title": "T", "lang": "en",
    }  # fmt: skip


def _write(qdrant, items, **kwargs):
    p = TestPipeline()
    _ = p | beam.Create(items) | WriteToQdrant(qdrant, "c", "m", **kwargs)
    result = p.run()
    result.wait_until_finish()
    return counters(result)


def test_rewrites_overwrite_and_batches_respect_the_byte_bound(qdrant):
    client, _ = shared_client(qdrant)
    ensure_collection(client, "c", 4)
    items = [_item(f"d{i}", 0, [1, i, 0, 0], "x" * 200) for i in range(10)]
    bound = 3 * point_bytes(to_point(items[0], "m")) + 10  # three points per request
    first = _write(qdrant, items, batch_bytes=bound)
    assert first["points_written"] == 10 and first["upsert_batches"] == 4
    changed = [_item("d0", 0, [0, 0, 1, 0], "y")] + items[1:]
    _write(qdrant, changed)
    assert client.count("c", exact=True).count == 10  # same ids: overwritten, not duplicated
    (d0,) = client.retrieve("c", [point_id("d0", 0)], with_vectors=True)
    assert d0.payload["text"] == "y" and d0.vector == pytest.approx([0, 0, 1, 0])


def test_a_shorter_document_loses_its_stale_chunks(qdrant):
    client, _ = shared_client(qdrant)
    ensure_collection(client, "c", 2)

    def doc(doc_id: str, n: int) -> list[EmbeddedChunk]:
        return [
            EmbeddedChunk(Chunk(doc_id, i, "t", 0, 1, 3, "t", n_chunks=n), (1.0, float(i))) for i in range(n)
        ]

    _write(qdrant, doc("long", 4) + doc("other", 3))
    assert _write(qdrant, doc("long", 4) + doc("other", 3)).get("documents_pruned_of_stale_chunks", 0) == 0
    counts = _write(qdrant, doc("long", 2))  # the document was edited down to two chunks
    assert counts["documents_pruned_of_stale_chunks"] == 1
    left = sorted((p.payload["doc_id"], p.payload["chunk_index"]) for p in client.scroll("c", limit=100)[0])
    assert left == [("long", 0), ("long", 1), ("other", 0), ("other", 1), ("other", 2)]


def test_search_groups_chunks_by_document(qdrant):
    client, _ = shared_client(qdrant)
    ensure_collection(client, "c", 2)
    _write(qdrant, [_item("a", 0, [1, 0]), _item("a", 1, [0.9, 0.1]), _item("b", 0, [0.5, 0.5]), _item("c", 0, [0, 1])])
    hits = search_documents(client, "c", [1, 0], top_k=2)
    assert [(c.doc_id, c.rank, p["chunk_index"]) for c, p in hits] == [("a", 1, 0), ("b", 2, 0)]
    assert hits[0][0].score == pytest.approx(1.0)


def _unexpected(status: int) -> UnexpectedResponse:
    return UnexpectedResponse(status, "x", b"{}", {})


@pytest.mark.parametrize(
    "exc,transient",
    [
        (_unexpected(503), True),
        (_unexpected(429), True),
        (_unexpected(400), False),
        (_unexpected(404), False),
        (ResponseHandlingException(ConnectionError("reset")), True),
        (ValueError("bad vector"), False),
    ],
)
def test_transient_errors_are_told_from_client_errors(exc, transient):
    assert is_transient(exc) is transient


def test_transient_errors_are_retried_then_succeed():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _unexpected(503)
        return "ok"

    assert with_retries(flaky, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2


def test_client_errors_are_not_retried():
    calls = []

    def bad():
        calls.append(1)
        raise _unexpected(400)

    with pytest.raises(UnexpectedResponse):
        with_retries(bad, sleep=lambda s: None)
    assert calls == [1]


def test_retries_give_up_after_the_last_attempt():
    calls = []

    def down():
        calls.append(1)
        raise _unexpected(503)

    with pytest.raises(UnexpectedResponse):
        with_retries(down, attempts=4, sleep=lambda s: None)
    assert len(calls) == 4


def test_api_key_is_read_from_the_named_variable_only(monkeypatch):
    import pickle

    config = QdrantConfig(url="http://localhost:1", api_key_env="CORPUS_ETL_TEST_KEY")
    monkeypatch.setenv("CORPUS_ETL_TEST_KEY", "s3cret-value")
    assert b"s3cret-value" not in pickle.dumps(config) and "s3cret-value" not in repr(config)
    monkeypatch.delenv("CORPUS_ETL_TEST_KEY", raising=False)
    with pytest.raises(RuntimeError, match="CORPUS_ETL_TEST_KEY"):
        config.connect()
    with pytest.raises(ValueError, match="only applies with --qdrant-url"):
        QdrantConfig(path="x", api_key_env="K")


def test_alias_switches_atomically_between_collections(qdrant):
    from transforms.qdrant import point_alias

    client, _ = shared_client(qdrant)
    for name, vec in (("v1", [1.0, 0.0]), ("v2", [0.0, 1.0])):
        ensure_collection(client, name, 2)
        client.upsert(name, [models.PointStruct(id=point_id(name, 0), vector=vec, payload={"doc_id": name})])
    assert point_alias(client, "live", "v1") is None
    assert [c.doc_id for c, _ in search_documents(client, "live", [1, 0], 5)] == ["v1"]
    assert point_alias(client, "live", "v2") == "v1"
    assert [c.doc_id for c, _ in search_documents(client, "live", [1, 0], 5)] == ["v2"]
    assert [(a.alias_name, a.collection_name) for a in client.get_aliases().aliases] == [("live", "v2")]
    with pytest.raises(ValueError, match="is the name of a collection"):
        point_alias(client, "v1", "v2")

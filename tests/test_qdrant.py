"""The store interface on both stores (Qdrant Edge on disk; qdrant-client in memory for the server),
the idempotent writer and the retry policy."""

from __future__ import annotations

import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from qdrant_client import models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from pipelines.common import counters
from transforms.io.edge_store import EdgeStore
from transforms.io.qdrant import (
    QdrantConfig,
    ServerStore,
    WriteToQdrant,
    _UpsertPoints,
    is_transient,
    point_bytes,
    store_point,
    to_point,
    with_retries,
)
from transforms.io.store import CollectionSpec, StorePoint
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
    """An embedded store with one shard (batch counts below are exact per shard)."""
    config = QdrantConfig(path=str(tmp_path / "q"), shards=1)
    yield config


def _store(config: QdrantConfig) -> EdgeStore:
    return EdgeStore(config.path or "", shards=config.shards)


@pytest.fixture(params=["edge", "server"])
def any_store(request, tmp_path):
    """Both implementations: the embedded store, and the server store over qdrant-client (in memory)."""
    if request.param == "edge":
        store = EdgeStore(str(tmp_path / "edge"), shards=3)
    else:
        from qdrant_client import QdrantClient

        store = ServerStore(client=QdrantClient(":memory:"))
    yield store
    store.close()


def test_collection_is_created_once_and_a_mismatch_is_refused(any_store):
    assert any_store.ensure_collection("c", CollectionSpec(4)) is True
    assert any_store.ensure_collection("c", CollectionSpec(4)) is False
    with pytest.raises(ValueError, match="exists with size 4 and distance Cosine; this job's vectors have size 8 \\(Cosine\\)"):
        any_store.ensure_collection("c", CollectionSpec(8))
    with pytest.raises(ValueError, match="collection 'missing' does not exist"):
        any_store.ensure_collection("missing", CollectionSpec(4), create=False)


def test_the_model_and_settings_recorded_are_those_of_the_last_run(any_store):
    from transforms.io.store import model_held

    any_store.ensure_collection("c", CollectionSpec(4, model="m", settings={"dim": None, "chunk_tokens": 64}))
    assert any_store.collection_spec("c") == CollectionSpec(4, model="m", settings={"dim": None, "chunk_tokens": 64})
    assert model_held(any_store, "c") is None  # empty: it holds no vectors yet, of any model
    any_store.record_collection("c", CollectionSpec(4, model="m", settings={"dim": None, "chunk_tokens": 96}))
    assert any_store.collection_spec("c") == CollectionSpec(4, model="m", settings={"dim": None, "chunk_tokens": 96})
    any_store.upsert("c", [StorePoint(point_id("d", 0), [1.0, 0, 0, 0], {"doc_id": "d", "model": "old"})])
    assert model_held(any_store, "c") == "m"  # what the collection records comes first
    # A collection that records nothing (another tool made it): the model its points name.
    any_store.ensure_collection("bare", CollectionSpec(4))
    assert any_store.collection_spec("bare") == CollectionSpec(4)
    any_store.upsert("bare", [StorePoint(point_id("d", 0), [1.0, 0, 0, 0], {"doc_id": "d", "model": "p"})])
    assert model_held(any_store, "bare") == "p"


def test_a_server_collection_with_another_distance_is_refused():
    from qdrant_client import QdrantClient

    client = QdrantClient(":memory:")
    client.create_collection("dot", vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT))
    with pytest.raises(ValueError, match="distance Dot"):
        ServerStore(client=client).ensure_collection("dot", CollectionSpec(4))


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
    store = _store(qdrant)
    store.ensure_collection("c", CollectionSpec(4))
    items = [_item(f"d{i}", 0, [1, i, 0, 0], "x" * 200) for i in range(10)]
    bound = 3 * point_bytes(to_point(items[0], "m")) + 10  # three points per request
    first = _write(qdrant, items, batch_bytes=bound)
    assert first["points_written"] == 10 and first["upsert_batches"] == 4
    changed = [_item("d0", 0, [0, 0, 1, 0], "y")] + items[1:]
    _write(qdrant, changed)
    assert store.count("c") == 10  # same ids: overwritten, not duplicated
    (d0,) = store.retrieve("c", [point_id("d0", 0)], with_vectors=True)
    assert d0.payload["text"] == "y" and d0.vector == pytest.approx([0, 0, 1, 0])


def test_the_server_writer_bounds_batches_by_bytes_and_count():
    from qdrant_client import QdrantClient

    sizes: list[int] = []

    class Recording(ServerStore):
        def upsert(self, collection, points):
            sizes.append(len(points))
            super().upsert(collection, points)

    store = Recording(client=QdrantClient(":memory:"))
    store.ensure_collection("c", CollectionSpec(4))
    items = [_item(f"d{i}", 0, [1, i, 0, 0], "x" * 200) for i in range(10)]
    bound = 3 * point_bytes(to_point(items[0], "m")) + 10
    fn = _UpsertPoints(QdrantConfig(url="http://unused:6333"), "c", "m", 4, bound)
    fn.store = store
    fn.start_bundle()
    for item in items:
        fn.process(item)
    fn.finish_bundle()
    assert sizes == [3, 3, 3, 1] and store.count("c") == 10
    fn = _UpsertPoints(QdrantConfig(url="http://unused:6333"), "c", "m", 4, 8 * 1024 * 1024)
    fn.store, sizes[:] = store, []
    fn.start_bundle()
    for item in items:
        fn.process(item)
    fn.finish_bundle()
    assert sizes == [4, 4, 2] and store.count("c") == 10


def _doc(doc_id: str, n: int) -> list[EmbeddedChunk]:
    return [EmbeddedChunk(Chunk(doc_id, i, "t", 0, 1, 3, "t", n_chunks=n), (1.0, float(i))) for i in range(n)]


@pytest.mark.parametrize("shards", [1, 3])
def test_a_shorter_document_loses_its_stale_chunks(tmp_path, shards):
    qdrant = QdrantConfig(path=str(tmp_path / "q"), shards=shards)
    store = _store(qdrant)
    store.ensure_collection("c", CollectionSpec(2))
    _write(qdrant, _doc("long", 4) + _doc("other", 3))
    assert _write(qdrant, _doc("long", 4) + _doc("other", 3)).get("documents_pruned_of_stale_chunks", 0) == 0
    counts = _write(qdrant, _doc("long", 2))  # the document was edited down to two chunks
    assert counts["documents_pruned_of_stale_chunks"] == 1
    left = sorted((p.payload["doc_id"], p.payload["chunk_index"]) for p in store.scroll("c"))
    assert left == [("long", 0), ("long", 1), ("other", 0), ("other", 1), ("other", 2)]


def test_write_batch_prunes_stale_chunks_on_both_stores(any_store):
    any_store.ensure_collection("c", CollectionSpec(2))
    points = [store_point(item, "m") for item in _doc("long", 4) + _doc("other", 3)]
    assert any_store.write_batch("c", points, {"long": 4, "other": 3}) == 0
    shorter = [store_point(item, "m") for item in _doc("long", 2)]
    assert any_store.write_batch("c", shorter, {"long": 2}) == 1
    left = sorted((p.payload["doc_id"], p.payload["chunk_index"]) for p in any_store.scroll("c"))
    assert left == [("long", 0), ("long", 1), ("other", 0), ("other", 1), ("other", 2)]
    assert any_store.count("c") == 5


def test_search_groups_chunks_by_document(any_store):
    any_store.ensure_collection("c", CollectionSpec(2))
    items = [_item("a", 0, [1, 0]), _item("a", 1, [0.9, 0.1]), _item("b", 0, [0.5, 0.5]), _item("c", 0, [0, 1])]
    any_store.upsert("c", [store_point(i, "m") for i in items])
    hits = any_store.search_documents("c", [1, 0], top_k=2)
    assert [(c.doc_id, c.rank, p["chunk_index"]) for c, p in hits] == [("a", 1, 0), ("b", 2, 0)]
    assert hits[0][0].score == pytest.approx(1.0)


def test_documents_tied_at_the_cutoff_are_taken_by_doc_id_on_both_stores(any_store):
    """Duplicates (one text under several doc ids) score exactly alike: which of them make the top k is
    decided by doc_id on both stores, not by the order a server's grouping met them."""
    any_store.ensure_collection("c", CollectionSpec(2))
    twins = ["e", "d", "c", "b", "a"]
    points = [StorePoint(point_id(d, 0), [1.0, 0.0], {"doc_id": d, "chunk_index": 0}) for d in twins]
    points += [StorePoint(point_id(d, 0), [1.0, y], {"doc_id": d, "chunk_index": 0}) for d, y in (("y", 0.1), ("z", 0.05))]
    any_store.upsert("c", points)
    expected = ["a", "b", "c", "d", "e", "z", "y"]
    for k in range(1, 9):
        assert [c.doc_id for c, _ in any_store.search_documents("c", [1.0, 0.0], k)] == expected[:k]


def test_a_point_without_a_doc_id_is_no_document_in_search_on_both_stores(any_store):
    """A server's grouping by doc_id skips such a point (another tool wrote it): so does the embedded store,
    rather than returning a document named 'None'."""
    import uuid

    any_store.ensure_collection("c", CollectionSpec(2))
    any_store.upsert("c", [
        StorePoint(point_id("a", 0), [0.0, 1.0], {"doc_id": "a", "chunk_index": 0}),
        StorePoint(str(uuid.uuid5(uuid.NAMESPACE_URL, "stray")), [1.0, 0.0], {"chunk_index": 0}),
    ])  # fmt: skip
    assert [c.doc_id for c, _ in any_store.search_documents("c", [1.0, 0.0], 5)] == ["a"]


def _three_chunks(store) -> list[StorePoint]:
    store.ensure_collection("c", CollectionSpec(2))
    points = [store_point(item, "m") for item in _doc("a", 3)]
    store.upsert("c", points)
    return points


def test_an_empty_upsert_writes_nothing_on_both_stores(any_store):
    _three_chunks(any_store)
    any_store.upsert("c", [])  # nothing to write: done, not an error
    assert any_store.count("c") == 3


def test_deleting_the_stale_chunks_of_no_document_deletes_nothing_on_both_stores(any_store):
    _three_chunks(any_store)
    any_store.delete_chunks_from("c", {})  # a filter of no condition would match every point
    assert any_store.count("c") == 3


def test_retrieve_gives_each_point_once_on_both_stores(any_store):
    points = _three_chunks(any_store)
    asked = [points[1].id, points[1].id, point_id("missing", 0), points[0].id]
    assert sorted(p.id for p in any_store.retrieve("c", asked)) == sorted([points[0].id, points[1].id])
    assert any_store.retrieve("c", []) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_vector_is_refused_naming_the_point_on_both_stores(any_store, bad):
    """A server refuses it; the embedded store would store it and rank it nowhere: both refuse the batch."""
    any_store.ensure_collection("c", CollectionSpec(2))
    good = StorePoint(point_id("a", 0), [1.0, 0.0], {"doc_id": "a", "chunk_index": 0})
    broken = StorePoint(point_id("b", 3), [0.5, bad], {"doc_id": "b", "chunk_index": 3})
    message = f"point {broken.id} (doc_id 'b', chunk_index 3) has a non-finite vector value; nothing of this batch was written to 'c'"
    with pytest.raises(ValueError) as caught:
        any_store.upsert("c", [good, broken])
    assert str(caught.value) == message
    assert any_store.count("c") == 0


def test_the_embedded_writer_refuses_a_non_finite_vector_and_a_vector_of_another_size(tmp_path):
    store = EdgeStore(str(tmp_path / "q"), shards=1)
    store.ensure_collection("c", CollectionSpec(2))
    _, _, (path,) = store._shards("c")
    short = StorePoint(point_id("s", 0), [1.0], {"doc_id": "s", "chunk_index": 0})
    with pytest.raises(ValueError) as caught:
        store.upsert("c", [short])
    assert str(caught.value) == (
        f"point {short.id} (doc_id 's', chunk_index 0) has a vector of size 1; collection 'c' holds vectors of size 2"
    )
    broken = StorePoint(point_id("b", 0), [float("nan"), 0.0], {"doc_id": "b", "chunk_index": 0})
    with store.shard(path) as shard, pytest.raises(ValueError, match=f"^point {broken.id} .*non-finite"):
        store.write_shard(shard, [broken], {"b": 1}, collection="c", size=2)
    assert store.count("c") == 0


def test_a_server_collection_of_named_vectors_has_no_spec():
    """Only one unnamed vector is what the jobs read and write: a spec of size 0 would let dump write nonsense."""
    from qdrant_client import QdrantClient

    client = QdrantClient(":memory:")
    client.create_collection("named", vectors_config={"dense": models.VectorParams(size=4, distance=models.Distance.COSINE)})
    with pytest.raises(ValueError, match=r"^collection 'named' uses named vectors \['dense'\]; expected one unnamed vector$"):
        ServerStore(client=client).collection_spec("named")


def test_embedded_search_equals_a_brute_force_top_k(tmp_path):
    """Many chunks per document across shards: grouped exact search == numpy max-per-document top k."""
    rng = np.random.default_rng(7)
    store = EdgeStore(str(tmp_path / "q"), shards=4)
    store.ensure_collection("c", CollectionSpec(16))
    docs = [f"doc{i:03d}" for i in range(120)]
    vectors, owners, points = [], [], []
    for d in docs:
        for j in range(int(rng.integers(1, 9))):
            v = rng.standard_normal(16)
            vectors.append(v / np.linalg.norm(v))
            owners.append(d)
            points.append(StorePoint(point_id(d, j), v.tolist(), {"doc_id": d, "chunk_index": j}))
    store.upsert("c", points)
    matrix = np.stack(vectors)
    queries = rng.standard_normal((5, 16))
    batch = store.search_documents_batch("c", queries.tolist(), 25)
    for q, batched in zip(queries, batch):
        scores = matrix @ (q / np.linalg.norm(q))
        best: dict[str, float] = {}
        for d, s in zip(owners, scores):
            best[d] = max(best.get(d, -2.0), float(s))
        expected = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:25]
        got = store.search_documents("c", q.tolist(), 25)
        assert [c.doc_id for c, _ in got] == [d for d, _ in expected]
        assert [(c.doc_id, c.score) for c, _ in batched] == [(c.doc_id, c.score) for c, _ in got]
        np.testing.assert_allclose([c.score for c, _ in got], [s for _, s in expected], atol=1e-5)


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


def test_alias_switches_atomically_between_collections(any_store):
    for name, vec in (("v1", [1.0, 0.0]), ("v2", [0.0, 1.0])):
        any_store.ensure_collection(name, CollectionSpec(2))
        any_store.upsert(name, [StorePoint(point_id(name, 0), vec, {"doc_id": name})])
    assert any_store.point_alias("live", "v1") is None
    assert [c.doc_id for c, _ in any_store.search_documents("live", [1, 0], 5)] == ["v1"]
    assert any_store.point_alias("live", "v2") == "v1"
    assert [c.doc_id for c, _ in any_store.search_documents("live", [1, 0], 5)] == ["v2"]
    assert any_store.aliases() == {"live": "v2"}
    assert any_store.count("live") == 1 and any_store.collection_exists("live")
    with pytest.raises(ValueError, match="is the name of a collection"):
        any_store.point_alias("v1", "v2")


def test_embedded_aliases_live_in_one_file_that_another_process_reads(tmp_path):
    store = EdgeStore(str(tmp_path / "q"))
    store.ensure_collection("v1", CollectionSpec(2))
    store.point_alias("live", "v1")
    assert json.loads((tmp_path / "q" / "aliases.json").read_text()) == {"aliases": {"live": "v1"}}
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [".store.lock", "aliases.json", "v1"]
    meta = json.loads((tmp_path / "q" / "v1" / "collection.json").read_text())
    assert (meta["size"], meta["distance"], meta["shards"]) == (2, "Cosine", 4)
    assert store.ensure_collection("live", CollectionSpec(2)) is False  # the alias's collection exists
    with pytest.raises(ValueError, match="'live' is an alias; a collection cannot take its name"):
        store.create_collection("live", CollectionSpec(2), shards=1)

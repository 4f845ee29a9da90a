"""`dump`, `copy`, an HNSW build and the old local-mode folder error, on real stores."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from qdrant_client import QdrantClient
from qdrant_client.http.exceptions import UnexpectedResponse

from pipelines import cli, copy, dump
from transforms.io.edge_store import EdgeStore, LegacyLocalModeError
from transforms.io.qdrant import ServerStore, copy_points, point_bytes
from transforms.io.store import CollectionSpec, HnswSettings, StorePoint
from transforms.types import point_id


def _points(n: int = 30, dim: int = 8, seed: int = 3) -> list[StorePoint]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        v = rng.standard_normal(dim)
        payload = {"doc_id": f"d{i // 2}", "chunk_index": i % 2, "text": f"chunk {i}"}
        if i % 3 == 0:
            payload["lang"] = "en"  # a field only some points have: null elsewhere
        if i == 4:
            payload["id"] = "clash"  # a payload field named like a dump column
        out.append(StorePoint(point_id(f"d{i // 2}", i % 2), (v / np.linalg.norm(v)).tolist(), payload))
    return out


@pytest.fixture()
def edge(tmp_path):
    store = EdgeStore(str(tmp_path / "edge"), shards=3)
    store.ensure_collection("c", CollectionSpec(8, model="m"))
    store.upsert("c", _points())
    return store


def test_dump_writes_every_point_sorted_by_id_with_payload_columns(edge, tmp_path):
    edge.point_alias("live", "c")
    out = tmp_path / "c.parquet"
    assert cli.main(["dump", "--collection", "live", "--qdrant-path", edge.path, "--out", str(out)]) == 0
    table = pq.read_table(out)
    expected = sorted(_points(), key=lambda p: p.id)
    assert table.column_names == ["id", "chunk_index", "doc_id", "lang", "payload_id", "text", "vector"]
    assert table.column("id").to_pylist() == [p.id for p in expected]
    assert table.column("lang").to_pylist() == [p.payload.get("lang") for p in expected]
    assert table.column("payload_id").to_pylist() == [p.payload.get("id") for p in expected]
    assert table.column("chunk_index").to_pylist() == [p.payload["chunk_index"] for p in expected]
    np.testing.assert_allclose(table.column("vector").to_pylist(), [p.vector for p in expected], atol=1e-6)


def test_dump_gives_the_same_file_on_both_stores(edge, tmp_path):
    server = ServerStore(client=QdrantClient(":memory:"))
    server.ensure_collection("c", CollectionSpec(8))
    server.upsert("c", _points())
    dump.dump(edge, "c", str(tmp_path / "edge.parquet"))
    dump.dump(server, "c", str(tmp_path / "server.parquet"))
    a, b = pq.read_table(tmp_path / "edge.parquet"), pq.read_table(tmp_path / "server.parquet")
    assert a.drop(["vector"]).equals(b.drop(["vector"]))
    np.testing.assert_allclose(a.column("vector").to_pylist(), b.column("vector").to_pylist(), atol=1e-6)


def test_dump_of_a_missing_collection_is_one_error_line(edge, tmp_path, capsys):
    rc = cli.main(["dump", "--collection", "nope", "--qdrant-path", edge.path, "--out", str(tmp_path / "x.parquet")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"corpus-etl dump: error: collection 'nope' does not exist at edge:{edge.path}"


def test_copy_into_an_embedded_target_keeps_ids_and_switches_the_alias(edge, tmp_path):
    target = str(tmp_path / "target")
    argv = ["--collection", "c", "--qdrant-path", edge.path, "--to-path", target, "--to-collection", "c2",
            "--alias", "live", "--batch-points", "7"]  # fmt: skip
    first = copy.run(argv)
    assert (first["points"], first["batches"], first["points_in_target"], first["created"]) == (30, 5, 30, True)
    assert first["alias"] == {"name": "live", "previous": None}
    again = copy.run(argv)  # a rerun overwrites the same ids
    assert (again["points_in_target"], again["created"], again["alias"]["previous"]) == (30, False, "c2")
    dump.dump(edge, "c", str(tmp_path / "source.parquet"))
    dump.dump(EdgeStore(target), "live", str(tmp_path / "target.parquet"))
    a, b = pq.read_table(tmp_path / "source.parquet"), pq.read_table(tmp_path / "target.parquet")
    assert a.drop(["vector"]).equals(b.drop(["vector"]))
    np.testing.assert_allclose(a.column("vector").to_pylist(), b.column("vector").to_pylist(), atol=1e-6)


def test_copy_into_a_server_store_creates_the_collection_and_switches_its_alias(edge):
    server = ServerStore(client=QdrantClient(":memory:"))
    report = copy.copy_collection(edge, "c", server, "docs-v1", alias="docs")
    assert (report["created"], report["points"], report["points_in_target"]) == (True, 30, 30)
    assert server.aliases() == {"docs": "docs-v1"}
    (p,) = server.retrieve("docs", [point_id("d3", 1)], with_vectors=True)
    (q,) = edge.retrieve("c", [point_id("d3", 1)], with_vectors=True)
    assert p.payload == q.payload and p.vector == pytest.approx(q.vector, abs=1e-6)
    server.ensure_collection("small", CollectionSpec(4))
    with pytest.raises(ValueError, match="exists with size 4"):
        copy.copy_collection(edge, "c", server, "small")


def test_copy_batches_by_bytes_and_retries_transient_errors(edge):
    sizes, failures = [], [UnexpectedResponse(503, "busy", b"{}", {})]

    class Flaky(EdgeStore):
        def upsert(self, collection, points):
            if failures:
                raise failures.pop()
            sizes.append(len(points))
            super().upsert(collection, points)

    target = Flaky(edge.path + "-t")
    target.ensure_collection("c", CollectionSpec(8))
    points = sorted(_points(), key=lambda p: p.id)
    bound = 4 * max(point_bytes(p) for p in points)
    stats = copy_points(points, target, "c", batch_bytes=bound, sleep=lambda s: None)
    assert stats["retries"] == 1 and stats["points"] == 30 and sum(sizes) == 30
    assert all(n <= 4 for n in sizes) and stats["batches"] == len(sizes) >= 8
    assert target.count("c") == 30


def test_hnsw_build_is_recorded_and_searches_agree_with_exact(tmp_path):
    rng = np.random.default_rng(0)
    store = EdgeStore(str(tmp_path / "q"), shards=2)
    store.ensure_collection("c", CollectionSpec(16))
    store.upsert("c", [
        StorePoint(point_id(f"d{i}", 0), rng.standard_normal(16).tolist(), {"doc_id": f"d{i}", "chunk_index": 0})
        for i in range(3000)
    ])  # fmt: skip
    report = store.build_index("c", HnswSettings(m=16, ef_construct=64, full_scan_threshold_kb=1))
    assert (report["m"], report["ef_construct"], report["indexed_vectors"]) == (16, 64, 3000)
    assert store.meta("c").hnsw == {"m": 16, "ef_construct": 64}
    assert store.count("c") == 3000
    # ef as large as the collection: the graph search visits every point, so it equals exact search.
    for q in rng.standard_normal((3, 16)).tolist():
        exact = store.search_documents("c", q, 10)
        approx = store.search_documents("c", q, 10, hnsw_ef=3000)
        assert [c.doc_id for c, _ in approx] == [c.doc_id for c, _ in exact]


def test_a_local_mode_folder_gets_one_clear_error_line(tmp_path, capsys):
    from qdrant_client import models

    old = str(tmp_path / "old")
    client = QdrantClient(path=old)
    client.create_collection("docs", vectors_config=models.VectorParams(size=4, distance=models.Distance.COSINE))
    client.close()
    with pytest.raises(LegacyLocalModeError, match="qdrant-client local-mode folder"):
        EdgeStore(old)
    rc = cli.main(["dump", "--collection", "docs", "--qdrant-path", old, "--out", str(tmp_path / "x.parquet")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"corpus-etl dump: error: {old} is a qdrant-client local-mode folder (collections: docs)")
    assert "Reindex into a new folder: corpus-etl index" in err[0]


@pytest.mark.parametrize("kind", ["edge", "server"])
def test_an_empty_collection_dumps_0_rows_with_the_collections_vector_size(kind, tmp_path, capsys):
    """An interrupted run, or one whose every document was a dead letter, leaves a collection without
    points: its dump is a 0-row file whose vector column still has the collection's size."""
    import pyarrow as pa

    out = tmp_path / "empty.parquet"
    if kind == "edge":
        store = EdgeStore(str(tmp_path / "edge"), shards=2)
        store.ensure_collection("empty", CollectionSpec(8, model="m"))
        store.point_alias("live", "empty")
        assert cli.main(["dump", "--collection", "live", "--qdrant-path", store.path, "--out", str(out)]) == 0
        assert capsys.readouterr().out == f"dump: 0 points of live at edge:{store.path} -> {out}\n"
    else:
        store = ServerStore(client=QdrantClient(":memory:"))
        store.ensure_collection("empty", CollectionSpec(8))
        store.point_alias("live", "empty")
        assert dump.dump(store, "live", str(out)) == 0
    table = pq.read_table(out)
    assert table.num_rows == 0
    assert table.schema == pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), 8))])


def test_a_payload_field_of_several_types_is_written_as_json_text_with_a_warning(tmp_path, caplog):
    """A metadata column that is an int in one input file and a string in another, or a map stored as
    [[key, value]]: no one Arrow type holds the values, so the column keeps each as JSON text."""
    store = EdgeStore(str(tmp_path / "edge"), shards=1)
    store.ensure_collection("c", CollectionSpec(4))
    payloads = {"a": {"tag": 7, "pairs": [["k", 1]]}, "b": {"tag": "seven", "pairs": [["j", 2]]}, "c": {"lang": "en"}}
    store.upsert("c", [StorePoint(point_id(d, 0), [1.0, 0.0, 0.0, 0.0], {"doc_id": d, **p}) for d, p in payloads.items()])
    with caplog.at_level("WARNING", logger="pipelines.dump"):
        assert dump.dump(store, "c", str(tmp_path / "c.parquet")) == 3
    table = pq.read_table(tmp_path / "c.parquet")
    docs = table.column("doc_id").to_pylist()
    assert sorted(docs) == ["a", "b", "c"]
    expected_tag = {"a": "7", "b": '"seven"', "c": None}
    expected_pairs = {"a": '[["k", 1]]', "b": '[["j", 2]]', "c": None}
    assert table.column("tag").to_pylist() == [expected_tag[d] for d in docs]
    assert table.column("pairs").to_pylist() == [expected_pairs[d] for d in docs]
    assert table.column("lang").to_pylist() == [{"c": "en"}.get(d) for d in docs]  # one type: kept as it is
    for name in ("pairs", "tag"):
        assert table.schema.field(name).metadata == {b"corpus_etl.encoding": b"json"}
    assert table.schema.field("lang").metadata is None
    warned = [r.getMessage() for r in caplog.records]
    assert [m.split(" (")[0] for m in warned] == ["payload field 'pairs' has values no one Parquet type holds",
                                                  "payload field 'tag' has values no one Parquet type holds"]
    assert warned[1].startswith("payload field 'tag' has values no one Parquet type holds (int/str: ")
    assert all(m.endswith("is written as JSON text") for m in warned)

"""`dump`, `copy`, an HNSW build and the old local-mode folder error, on real stores."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from qdrant_client import QdrantClient
from qdrant_client.http.exceptions import UnexpectedResponse

from pipelines import cli, copy, dump
from pipelines.errors import PreflightError
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


def test_the_copy_report_names_a_server_without_its_credentials(edge):
    server = ServerStore(client=QdrantClient(":memory:"))
    server.where = "https://ops:s3cret@qdrant.example:6333"  # as a --to-url with credentials would give it
    report = copy.copy_collection(edge, "c", server, "docs-v1")
    assert "s3cret" not in report["target"] and report["target"].endswith("qdrant.example:6333/docs-v1")


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


def test_hnsw_build_is_recorded_and_searches_agree_with_exact(tmp_path, caplog):
    rng = np.random.default_rng(0)
    store = EdgeStore(str(tmp_path / "q"), shards=2)
    store.ensure_collection("c", CollectionSpec(16))
    store.upsert("c", [
        StorePoint(point_id(f"d{i}", 0), rng.standard_normal(16).tolist(), {"doc_id": f"d{i}", "chunk_index": 0})
        for i in range(3000)
    ])  # fmt: skip
    q0 = rng.standard_normal(16).tolist()
    with caplog.at_level("WARNING", logger="transforms.io.edge_store"):
        for _ in range(2):  # no index yet: the search is exact, and says so once
            assert store.search_documents("c", q0, 10, hnsw_ef=8) == store.search_documents("c", q0, 10)
    assert [r.getMessage() for r in caplog.records] == [
        "hnsw_ef 8: collection 'c' has no HNSW index (index it with --hnsw); this search is exact"
    ]
    caplog.clear()
    report = store.build_index("c", HnswSettings(m=16, ef_construct=64, full_scan_threshold_kb=1))
    assert (report["m"], report["ef_construct"], report["indexed_vectors"]) == (16, 64, 3000)
    assert store.meta("c").hnsw == {"m": 16, "ef_construct": 64}
    assert store.count("c") == 3000
    # ef as large as the collection: the graph search visits every point, so it equals exact search.
    for q in rng.standard_normal((3, 16)).tolist():
        exact = store.search_documents("c", q, 10)
        approx = store.search_documents("c", q, 10, hnsw_ef=3000)
        assert [c.doc_id for c, _ in approx] == [c.doc_id for c, _ in exact]
    assert not caplog.records  # indexed: nothing to say


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


# -- copy: names on the target are checked before anything is written ----------------------
def _target(kind: str, tmp_path):
    """A target holding docs-20261201 (5 points) that alias ``docs`` serves, on either store."""
    store = EdgeStore(str(tmp_path / "target"), shards=2) if kind == "edge" else ServerStore(client=QdrantClient(":memory:"))
    store.ensure_collection("docs-20261201", CollectionSpec(8))
    store.upsert("docs-20261201", _points(5, seed=9))
    store.point_alias("docs", "docs-20261201")
    return store


def _state(store) -> tuple:
    """Everything a copy could change on a target: collections, aliases, each collection's ids."""
    names = store.collections()
    return names, store.aliases(), {n: sorted(p.id for p in store.scroll(n, with_vectors=False)) for n in names}


@pytest.mark.parametrize("kind", ["edge", "server"])
@pytest.mark.parametrize(
    ("to_collection", "alias", "message"),
    [
        ("docs", None, "--to-collection 'docs' is an alias (of 'docs-20261201') at {where}; copy into a new collection "
                       "and pass --alias docs to switch it when the copy is done"),
        ("docs-20261202", "docs-20261201", "--alias 'docs-20261201' is the name of a collection at {where}, not an "
                                           "alias; choose another --alias"),
        ("docs-20261202", "docs-20261202", "--alias 'docs-20261202' is also --to-collection; the alias must have "
                                           "another name"),
    ],
)
def test_copy_refuses_target_names_before_writing_anything(kind, to_collection, alias, message, edge, tmp_path):
    target = _target(kind, tmp_path)
    before = _state(target)
    with pytest.raises(PreflightError) as caught:
        copy.copy_collection(edge, "c", target, to_collection, alias=alias)
    assert str(caught.value) == message.format(where=target.where)
    assert caught.value.exit_status == 2
    assert _state(target) == before  # no collection created, no point written, no alias moved


def test_copy_into_an_alias_on_an_embedded_target_exits_2_and_leaves_its_collection_alone(edge, tmp_path, capsys):
    """The reviewer's case: the second copy names the alias the first one switched."""
    target = str(tmp_path / "tgt")
    base = ["copy", "--qdrant-path", edge.path, "--to-path", target]
    assert cli.main([*base, "--collection", "c", "--to-collection", "docs-20261201", "--alias", "docs"]) == 0
    other = EdgeStore(str(tmp_path / "st"), shards=1)
    other.ensure_collection("inc", CollectionSpec(8))
    other.upsert("inc", _points(4, seed=11))
    capsys.readouterr()
    rc = cli.main(["copy", "--collection", "inc", "--qdrant-path", other.path, "--to-path", target,
                   "--to-collection", "docs"])  # fmt: skip
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [
        f"corpus-etl copy: error: --to-collection 'docs' is an alias (of 'docs-20261201') at edge:{target}; copy into "
        "a new collection and pass --alias docs to switch it when the copy is done"
    ]
    assert EdgeStore(target).count("docs-20261201") == 30  # only the first copy's points


def test_copy_with_an_alias_that_is_a_collection_exits_2_before_creating_the_target(edge, tmp_path, capsys):
    target = str(tmp_path / "tgt")
    base = ["copy", "--collection", "c", "--qdrant-path", edge.path, "--to-path", target]
    assert cli.main([*base, "--to-collection", "docs-20261201", "--alias", "docs"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--to-collection", "docs-20261202", "--alias", "docs-20261201"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"corpus-etl copy: error: --alias 'docs-20261201' is the name of a collection at edge:{target}, not an alias; "
        "choose another --alias"
    ]
    assert EdgeStore(target).collections() == ["docs-20261201"]  # docs-20261202 was never created


@pytest.mark.parametrize("name", ["c", "live"])
def test_copy_onto_itself_exits_2(edge, capsys, name):
    """The same folder and the collection the source names (itself, or through an alias): nothing to copy,
    where a copy would have reported every point as copied."""
    edge.point_alias("live", "c")
    rc = cli.main(["copy", "--collection", name, "--qdrant-path", edge.path, "--to-path", edge.path + "/."])
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [
        f"corpus-etl copy: error: --to-collection 'c' at edge:{edge.path} is the collection --collection {name!r} "
        "names: a copy onto itself; give another --to-collection, --to-path or --to-url"
    ]
    assert edge.collections() == ["c"] and edge.count("c") == 30


# -- copy: a shard another process holds ---------------------------------------------------
_HOLD = "import sys\nfrom qdrant_edge import EdgeShard\ns = EdgeShard.load(sys.argv[1])\nprint('holding', flush=True)\nsys.stdin.read()\n"


def _holding(shard: str):
    """A process holding ``shard``'s lock (the way a running job does) until the block ends."""
    import subprocess
    import sys

    from tests.processes import started

    return started([sys.executable, "-c", _HOLD, shard], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_copy_from_a_locked_source_exits_2_with_the_store_lock_line_and_writes_nothing(edge, tmp_path, capsys):
    from tests.processes import wait_for_line

    target = str(tmp_path / "tgt")
    shard = f"{edge.path}/c/shard-001"
    with _holding(shard) as proc:
        wait_for_line(proc, "holding")
        rc = cli.main(["copy", "--collection", "c", "--qdrant-path", edge.path, "--to-path", target,
                       "--to-collection", "c2", "--store-lock-wait", "0.2"])  # fmt: skip
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [
        f"corpus-etl copy: error: store folder {edge.path} is in use by another process: c/shard-001 stayed locked for "
        "0s; wait for the other job to finish (jobs writing different collections can run together), or raise "
        "--store-lock-wait"
    ]
    assert EdgeStore(target).collections() == []  # the target was not created


def test_copy_into_a_locked_target_fails_with_status_1_and_a_rerun_finishes_it(edge, tmp_path, capsys):
    from tests.processes import wait_for_line

    target = EdgeStore(str(tmp_path / "tgt"), shards=2)
    target.ensure_collection("c2", CollectionSpec(8, model="m"))  # as a first copy records it: its model is read
    argv = ["copy", "--collection", "c", "--qdrant-path", edge.path, "--to-path", target.path, "--to-collection", "c2",
            "--store-lock-wait", "0.2"]  # fmt: skip
    with _holding(f"{target.path}/c2/shard-001") as proc:
        wait_for_line(proc, "holding")
        rc = cli.main(argv)
    assert rc == 1
    assert capsys.readouterr().err.splitlines() == [
        f"corpus-etl copy: error: the copy failed after it started writing 'c2': store folder {target.path} is in use "
        "by another process: c2/shard-001 stayed locked for 0s; wait for the other job to finish (jobs writing "
        "different collections can run together), or raise --store-lock-wait (rerun the copy to finish it: points "
        "keep their ids)"
    ]
    assert cli.main(argv) == 0
    assert target.count("c2") == 30


# -- the store-lock line, before a job and inside one --------------------------------------
_LOCKED = ("store in use by another process: /srv/st/inc/shard-000 stayed locked for 3s (Service runtime error: "
           "failed to open WAL /srv/st/inc/shard-000/wal: Can't init WAL: Kind(WouldBlock))")  # fmt: skip


def test_a_locked_shard_is_one_store_lock_line_before_and_inside_a_beam_job(capsys):
    """Before a job (search, dump, copy): status 2. Inside one (the index job's SkipUnchanged): status 1,
    the same line after 'the job failed:', without the library's WAL detail or Beam's step."""
    import argparse

    import apache_beam as beam

    from pipelines.cli import _run
    from transforms.io.store import StoreInUseError

    def preflight():
        raise StoreInUseError(_LOCKED)

    def look_up(_):
        raise StoreInUseError(_LOCKED)

    def job():
        with beam.Pipeline() as p:
            _ = p | beam.Create([1]) | "SkipUnchanged" >> beam.Map(look_up)

    # Across a process boundary only the text is left, raised by the runner.
    text = f"StoreInUseError: {_LOCKED} [while running 'SkipUnchanged/LookUpStoredPoints']"
    from_a_worker = compile(f"raise RuntimeError({text!r})", "/venv/apache_beam/runners/portability/x.py", "exec")

    what = "store folder /srv/st is in use by another process: inc/shard-000 stayed locked for 3s"
    assert _run("search", preflight, False, argparse.Namespace()) == 2
    assert capsys.readouterr().err == (
        f"corpus-etl search: error: {what}; wait for the other job to finish (jobs writing different collections "
        "can run together), or raise --store-lock-wait\n"
    )
    in_job = (
        f"corpus-etl index: error: the job failed: {what}; rerun this job when the other one has finished (its "
        "writes are idempotent; jobs writing different collections can run together), or raise --store-lock-wait\n"
    )
    assert _run("index", job, False, argparse.Namespace()) == 1
    assert capsys.readouterr().err == in_job
    assert _run("index", lambda: exec(from_a_worker), False, argparse.Namespace()) == 1
    assert capsys.readouterr().err == in_job


@pytest.mark.parametrize("kind", ["edge", "server"])
def test_copy_onto_a_collection_of_another_model_exits_2_and_writes_nothing(kind, edge, tmp_path):
    target = _target(kind, tmp_path)
    target.record_collection("docs-20261201", CollectionSpec(8, model="other/model"))
    before = _state(target)
    with pytest.raises(PreflightError) as caught:
        copy.copy_collection(edge, "c", target, "docs-20261201")
    assert str(caught.value) == (
        f"--to-collection 'docs-20261201' at {target.where} holds vectors of model other/model; --collection 'c' "
        "holds vectors of m. Vectors of two models cannot be compared, so nothing was written: copy into a new "
        "--to-collection")
    assert caught.value.exit_status == 2 and _state(target) == before
    target.record_collection("docs-20261201", CollectionSpec(8, model="m"))  # the same model: copied into
    assert copy.copy_collection(edge, "c", target, "docs-20261201")["points_in_target"] == 30  # 5 ids in common

"""Reading the corpus from gs:// through Beam's GCS filesystem and the real google-cloud-storage
client, against gcp-storage-emulator started here (STORAGE_EMULATOR_HOST)."""

from __future__ import annotations

import re
import socket

import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from pipelines import index
from transforms.io.edge_store import EdgeStore
from transforms.io.parquet import validate_columns

pytestmark = pytest.mark.slow


@pytest.fixture()
def gcs(monkeypatch):
    from gcp_storage_emulator.server import create_server
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="corpus")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    # No Application Default Credentials here: without this Beam spends ~30 s retrying the
    # lookup before it connects anonymously, which is what it would end up doing anyway.
    from apache_beam.internal.gcp import auth

    monkeypatch.setattr(auth._Credentials, "_credentials_init", True)
    monkeypatch.setattr(auth._Credentials, "_credentials", None)
    try:
        yield storage.Client(project="test", credentials=AnonymousCredentials())
    finally:
        server.stop()


def test_index_reads_gs_paths(gcs, sample_dir, minilm_path, tmp_path):
    import pyarrow.parquet as pq

    # 12 of the sample's documents, twice: what is read from gs:// is the point, not how much is embedded
    part = tmp_path / "part.parquet"
    pq.write_table(pq.read_table(sample_dir["corpus"]).slice(0, 12), part)
    bucket = gcs.bucket("corpus")
    bucket.blob("docs/part-0.parquet").upload_from_filename(str(part))
    bucket.blob("docs/part-1.parquet").upload_from_filename(str(part))
    bucket.blob("other/ignored.txt").upload_from_string("not parquet")

    assert validate_columns("gs://corpus/docs/*.parquet", ["id", "text"]) == [
        "gs://corpus/docs/part-0.parquet",
        "gs://corpus/docs/part-1.parquet",
    ]
    with pytest.raises(ValueError, match=r"\(gs://corpus/docs/part-0.parquet: missing column.*gs://corpus/docs/part-1.parquet: missing"):
        validate_columns("gs://corpus/docs/*.parquet", ["body"])

    qdrant = str(tmp_path / "q")
    summary = index.run(
        [
            "--input", "gs://corpus/docs/*.parquet", "--collection", "gcs", "--model", minilm_path,
            "--qdrant-path", qdrant, "--chunk-tokens", "0", "--dead-letter", str(tmp_path / "dead.jsonl"),
        ],
        test_pipeline=TestPipeline(),
    )  # fmt: skip
    n = 12
    c = summary["counters"]
    # Both files hold the same ids: each id is indexed once from part-1 (the last file wins), part-0's copy is a
    # dead letter naming its row.
    assert (c["rows_read"], c["documents_read"], c["points_written"], c["dead_letters"]) == (2 * n, n, n, n)
    assert EdgeStore(qdrant).count("gcs") == n
    dead = (tmp_path / "dead.jsonl").read_text().splitlines()
    assert len(dead) == n and all(
        re.search(r'"source": "row \d+ of gs://corpus/docs/part-0.parquet"', line) for line in dead
    )


def test_label_reads_and_writes_gs_paths(gcs, sample_dir, qwen3_reranker_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import label

    bucket = gcs.bucket("corpus")
    bucket.blob("docs/corpus.parquet").upload_from_filename(sample_dir["corpus"])
    log = tmp_path / "log.parquet"
    pq.write_table(pa.Table.from_pylist([{"query_id": "q1", "query": "encode JSON", "count": 2}]), log)
    bucket.blob("logs/log.parquet").upload_from_filename(str(log))
    bucket.blob("runs/bm25.trec").upload_from_string("q1 Q0 json 1 9.5 bm25\nq1 Q0 csv 2 7.0 bm25\n")
    label.run(
        ["--queries", "gs://corpus/logs/*.parquet", "--out", "gs://corpus/labels", "--reranker", str(qwen3_reranker_dir),
         "--candidates", "gs://corpus/runs/bm25.trec", "--corpus", "gs://corpus/docs/*.parquet",
         "--eval-fraction", "1.0", "--device", "cpu"],
        test_pipeline=TestPipeline(),
    )  # fmt: skip
    names = sorted(b.name for b in gcs.list_blobs("corpus", prefix="labels/"))
    assert names == sorted(
        f"labels/{n}"
        for n in ("queries.jsonl", "qrels/test.tsv", "qrels/test.trec", "runs/retrieval.trec", "runs/rerank.trec",
                  "distillation/train.parquet", "manifest.json", "report.md", "teacher_scores.png", "run_stats.json",
                  "dead_letters.jsonl")
    )  # fmt: skip
    run = bucket.blob("labels/runs/retrieval.trec").download_as_text().splitlines()
    assert [line.split()[:4] for line in run] == [["q1", "Q0", "json", "1"], ["q1", "Q0", "csv", "2"]]
    assert bucket.blob("labels/queries.jsonl").download_as_text() == '{"_id": "q1", "text": "encode JSON"}\n'


def test_a_folder_marker_object_is_not_an_input_file(gcs, tmp_path):
    # The Cloud Console's "Create folder" (and gcsfuse, Hadoop's connector) leaves an empty object "docs/",
    # which "docs/*" matches: it was refused as an unreadable Parquet file (the job stopped, or ran partial).
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transforms.io.parquet import check_files

    pq.write_table(pa.table({"id": ["a"], "text": ["alpha"]}), tmp_path / "a.parquet")
    bucket = gcs.bucket("corpus")
    bucket.blob("docs/").upload_from_string(b"")
    bucket.blob("docs/part-0.parquet").upload_from_filename(str(tmp_path / "a.parquet"))
    for pattern in ("gs://corpus/docs/*", "gs://corpus/docs/", "gs://corpus/docs/**"):
        assert check_files(pattern, ["id", "text"]) == (["gs://corpus/docs/part-0.parquet"], [])
    bucket.blob("empty/").upload_from_string(b"")
    with pytest.raises(FileNotFoundError, match="no files match"):
        check_files("gs://corpus/empty/*", ["id", "text"])


def test_dump_writes_gs_paths(gcs, tmp_path):
    import io

    import pyarrow.parquet as pq

    from pipelines import dump
    from transforms.io.store import CollectionSpec, StorePoint
    from transforms.types import point_id

    store = EdgeStore(str(tmp_path / "q"), shards=2)
    store.ensure_collection("c", CollectionSpec(2))
    points = [StorePoint(point_id(f"d{i}", 0), [1.0, float(i)], {"doc_id": f"d{i}", "chunk_index": 0}) for i in range(5)]
    store.upsert("c", points)
    dump.run(["--collection", "c", "--qdrant-path", store.path, "--out", "gs://corpus/dumps/c.parquet"])
    table = pq.read_table(io.BytesIO(gcs.bucket("corpus").blob("dumps/c.parquet").download_as_bytes()))
    assert table.column("id").to_pylist() == sorted(p.id for p in points)
    assert table.column_names == ["id", "chunk_index", "doc_id", "vector"] and table.num_rows == 5


def test_outputs_in_a_missing_bucket_are_refused_before_the_job(gcs, sample_dir, qwen3_reranker_dir, tmp_path, capsys):
    """Before: each job ran to its end (every chunk embedded, every pair scored), then failed with the storage
    client's bare ``InvalidResponse: (404, ...)`` (status 1); a template retried its upload for ten minutes."""
    from pipelines import dump, label
    from pipelines.errors import PreflightError

    gcs.bucket("corpus").blob("docs/part-0.parquet").upload_from_filename(sample_dir["corpus"])
    docs, qdrant = "gs://corpus/docs/*.parquet", str(tmp_path / "q")
    index_args = ["--input", docs, "--collection", "c", "--model", "sentence-transformers/all-MiniLM-L6-v2",
                  "--qdrant-path", qdrant, "--chunk-tokens", "0"]  # fmt: skip
    missing = "bucket gs://nobucket does not exist; create it or write elsewhere"
    for flag in ("--dead-letter", "--summary-out"):
        with pytest.raises(PreflightError, match=f"^{flag} gs://nobucket/out.jsonl: {missing}$"):
            index.run([*index_args, flag, "gs://nobucket/out.jsonl"], test_pipeline=TestPipeline())
    label_args = ["--queries", str(sample_dir["query_log"]), "--reranker", str(qwen3_reranker_dir),
                  "--candidates", str(tmp_path / "run.trec"), "--corpus", docs, "--device", "cpu"]  # fmt: skip
    with pytest.raises(PreflightError, match=f"^--out gs://nobucket/labels: {missing}$"):
        label.run([*label_args, "--out", "gs://nobucket/labels"], test_pipeline=TestPipeline())
    with pytest.raises(PreflightError, match=f"^--out gs://nobucket/c.parquet: {missing}$"):
        dump.run(["--collection", "c", "--qdrant-path", qdrant, "--out", "gs://nobucket/c.parquet"])
    dataflow = ["--runner=DataflowRunner", "--project=test-project", "--region=us-central1",
                "--sdk_container_image=img:1", "--sdk_location=container", "--experiments=use_runner_v2"]  # fmt: skip
    for flag, options in (("--template_location", ["--temp_location=gs://corpus/tmp"]),
                          ("--temp_location", ["--template_location=gs://corpus/t/index.json"])):  # fmt: skip
        with pytest.raises(PreflightError, match=f"^{flag} gs://nobucket/x: {missing}$"):
            index.run([*index_args, *dataflow, *options, f"{flag}=gs://nobucket/x"])
    assert not (tmp_path / "q").exists() and [b.name for b in gcs.list_blobs("corpus")] == ["docs/part-0.parquet"]


def test_a_bucket_that_cannot_be_looked_at_is_a_warning_not_a_refusal(gcs, monkeypatch, caplog):
    # Writing objects needs no storage.buckets.get (roles/storage.objectAdmin lacks it): a 403 on the
    # look-up must not refuse a job that could write there.
    from apache_beam.io.gcp import gcsio

    from pipelines.common import check_output_locations

    def forbidden(self, bucket):
        raise PermissionError("403 caller does not have storage.buckets.get access")

    monkeypatch.setattr(gcsio.GcsIO, "get_bucket", forbidden)
    with caplog.at_level("WARNING", logger="pipelines.common"):
        check_output_locations({"--summary-out": "gs://locked/summary.json"})
    assert [r.getMessage() for r in caplog.records if r.name == "pipelines.common"] == [
        "--summary-out gs://locked/summary.json: could not check bucket gs://locked "
        "(403 caller does not have storage.buckets.get access); going on"
    ]

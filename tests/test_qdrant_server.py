"""The server path under failure, against a fake Qdrant REST server (``tests/fake_qdrant.py``) and a real
``QdrantClient(url=...)``: what is retried and how long it waits, what is raised at once, the one line a
command prints, and that the API key and URL credentials never show."""

from __future__ import annotations

import httpx
import pytest
from qdrant_client import QdrantClient
from qdrant_client.common.client_exceptions import QdrantException, ResourceExhaustedResponse
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from pipelines import cli
from tests.fake_qdrant import FakeQdrant, Reply
from transforms.io.qdrant import QdrantConfig, ServerStore, copy_points, is_transient, with_retries
from transforms.io.store import StorePoint
from transforms.types import point_id

KEY = "s3cret-key-value"


def _points(n: int = 6) -> list[StorePoint]:
    return [StorePoint(point_id(f"d{i // 2}", i % 2), [1.0, float(i), 0.0, 0.0], {"doc_id": f"d{i // 2}",
            "chunk_index": i % 2}) for i in range(n)]  # fmt: skip


@pytest.fixture()
def fake():
    with FakeQdrant() as server:
        server.add_collection("docs", 4)
        yield server


def _store(fake: FakeQdrant) -> ServerStore:
    return ServerStore(client=QdrantClient(url=fake.url, timeout=5, check_compatibility=False))


UPSERT = ("PUT", "/collections/docs/points")


@pytest.mark.parametrize(
    "exc,transient",
    [
        (ResourceExhaustedResponse("Too many requests", 3), True),  # a 429 with Retry-After
        (QdrantException("Retry-After header value is not a valid integer: Wed, 21 Oct 2015 07:28:00 GMT"), True),
        (ResponseHandlingException(httpx.ReadTimeout("timed out")), True),
        (ResponseHandlingException(httpx.RemoteProtocolError("peer closed connection")), True),
        (ResponseHandlingException(httpx.LocalProtocolError("Illegal header value b'x\\n'")), False),
        (QdrantException("something else"), False),
    ],
)
def test_overload_and_network_errors_are_transient_and_requests_that_cannot_be_sent_are_not(exc, transient):
    assert is_transient(exc) is transient


@pytest.mark.parametrize(
    "retry_after, wait",
    [("7", 7.0), ("120", 30.0)],  # honoured, up to max_delay_s: the total wait stays bounded
)
def test_a_429_with_retry_after_is_retried_after_the_wait_the_server_asks(fake, retry_after, wait):
    fake.fail(*UPSERT, Reply(429, "Too many requests", {"Retry-After": retry_after}))
    store, sleeps = _store(fake), []
    with_retries(lambda: store.upsert("docs", _points()), sleep=sleeps.append)
    assert sleeps == [wait] and fake.calls(*UPSERT) == 2 and store.count("docs") == 6


def test_a_429_whose_retry_after_is_a_date_is_retried_with_backoff(fake):
    fake.fail(*UPSERT, Reply(429, "Too many requests", {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}))
    store, sleeps = _store(fake), []
    with_retries(lambda: store.upsert("docs", _points()), sleep=sleeps.append, base_delay_s=0.25)
    assert len(sleeps) == 1 and 0 <= sleeps[0] <= 0.25 and fake.calls(*UPSERT) == 2


def test_a_copy_retries_failures_after_the_server_applied_a_batch_without_duplicating_a_point(fake):
    """503 before applying, a 500 after applying (the answer lost), a connection closed mid-answer, a
    timeout: each batch is sent again with the same ids; the server ends with each point once."""
    fake.fail(*UPSERT, Reply(503), Reply(500, apply=True), Reply(close=True), Reply(delay_s=1.5, apply=True))
    store = ServerStore(client=QdrantClient(url=fake.url, timeout=1, check_compatibility=False))
    points = _points(8)
    stats = copy_points(points, store, "docs", batch_points=4, sleep=lambda s: None)
    assert stats == {"points": 8, "batches": 2, "retries": 4}
    assert fake.calls(*UPSERT) == 6
    assert sorted(fake.collections["docs"]["points"]) == sorted(p.id for p in points)


def test_a_client_error_is_raised_at_once(fake):
    fake.fail(*UPSERT, Reply(400, "Wrong input: Vector dimension error: expected dim: 4, got 3"), Reply(503))
    with pytest.raises(UnexpectedResponse) as info:
        with_retries(lambda: _store(fake).upsert("docs", _points()), sleep=lambda s: pytest.fail("slept"))
    assert info.value.status_code == 400 and fake.calls(*UPSERT) == 1
    assert info.value.qdrant_request == "upsert on collection 'docs'"


def test_a_refused_request_is_one_line_naming_the_server_operation_collection_and_qdrants_message(fake, capsys,
                                                                                                   tmp_path):
    fake.fail("POST", "/collections/docs/points/scroll", Reply(400, "Wrong input: Bad offset"))
    url = fake.url.replace("http://", "http://ops:pw@")
    rc = cli.main(["dump", "--collection", "docs", "--out", str(tmp_path / "d.parquet"), "--qdrant-url", url])
    err = capsys.readouterr().err
    assert err == (f"corpus-etl dump: error: Qdrant at {fake.url.replace('http://', 'http://***@')} answered scroll "
                   "on collection 'docs' with 400 Bad Request: Wrong input: Bad offset\n")  # fmt: skip
    assert rc == 2  # before anything was written


def test_an_overloaded_server_is_one_line_with_its_status(fake, capsys):
    fake.fail("GET", "/collections", Reply(503, "Service is overloaded"))
    rc = cli.main(["prune-collections", "--alias", "docs", "--keep", "1", "--dry-run", "--qdrant-url", fake.url])
    assert capsys.readouterr().err == (f"corpus-etl prune-collections: error: Qdrant at {fake.url} answered list "
                                       "collections with 503 Service Unavailable: Service is overloaded\n")  # fmt: skip
    assert rc == 2


def test_a_failed_delete_in_prune_is_one_line(fake, capsys):
    for name in ("live-20260101", "live-20260102", "live-20260103"):
        fake.add_collection(name, 4)
    fake.aliases["live"] = "live-20260103"
    fake.fail("DELETE", "/collections/live-20260101", Reply(500, "Service internal error: disk full"))
    rc = cli.main(["prune-collections", "--alias", "live", "--keep", "1", "--qdrant-url", fake.url])
    assert capsys.readouterr().err == (
        f"corpus-etl prune-collections: error: deleting collection 'live-20260101' failed: Qdrant at {fake.url} "
        "answered delete collection on collection 'live-20260101' with 500 Internal Server Error: Service internal "
        "error: disk full; nothing was deleted\n"
    )
    assert rc == 1


def test_an_api_key_read_with_a_trailing_newline_is_sent_without_it(monkeypatch, capsys, tmp_path):
    with FakeQdrant(api_key=KEY) as fake:
        fake.add_collection("docs", 4)
        monkeypatch.setenv("CORPUS_ETL_TEST_KEY", KEY + "\n")  # as a mounted secret file often gives it
        rc = cli.main(["dump", "--collection", "docs", "--out", str(tmp_path / "d.parquet"), "--qdrant-url", fake.url,
                       "--qdrant-api-key-env", "CORPUS_ETL_TEST_KEY"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0 and KEY not in out.out + out.err
    assert {h.get("api-key") for _, path, h in fake.requests if path != "/"} == {KEY}


def test_an_api_key_a_header_cannot_carry_is_refused_without_showing_it(monkeypatch, capsys, tmp_path):
    with FakeQdrant(api_key=KEY) as fake:
        monkeypatch.setenv("CORPUS_ETL_TEST_KEY", "s3cret\nkey")
        rc = cli.main(["dump", "--collection", "docs", "--out", str(tmp_path / "d.parquet"), "--qdrant-url", fake.url,
                       "--qdrant-api-key-env", "CORPUS_ETL_TEST_KEY"])  # fmt: skip
    out = capsys.readouterr()
    assert out.err == ("corpus-etl dump: error: environment variable CORPUS_ETL_TEST_KEY (--qdrant-api-key-env) holds "
                       "a character an HTTP header cannot carry (at position 6); an API key is printable ASCII\n")
    assert rc == 2 and "s3cret" not in out.out + out.err and not fake.requests


def test_a_wrong_api_key_is_one_line_without_the_key(monkeypatch, capsys, tmp_path):
    with FakeQdrant(api_key=KEY) as fake:
        monkeypatch.setenv("CORPUS_ETL_TEST_KEY", "wrong-" + KEY)
        rc = cli.main(["dump", "--collection", "docs", "--out", str(tmp_path / "d.parquet"), "--qdrant-url", fake.url,
                       "--qdrant-api-key-env", "CORPUS_ETL_TEST_KEY"])  # fmt: skip
    out = capsys.readouterr()
    assert out.err == (f"corpus-etl dump: error: Qdrant at {fake.url} refused the request (401): check the key that "
                       "--qdrant-api-key-env names\n")
    assert rc == 2 and KEY not in out.out + out.err


def test_dump_and_prune_name_the_server_without_its_credentials(fake, capsys, tmp_path):
    url = fake.url.replace("http://", "http://ops:pw@") + "?api_key=k3y"
    assert cli.main(["dump", "--collection", "docs", "--out", str(tmp_path / "d.parquet"), "--qdrant-url", url]) == 0
    assert cli.main(["prune-collections", "--alias", "a", "--keep", "1", "--dry-run", "--qdrant-url", url]) == 0
    assert cli.main(["dump", "--collection", "nope", "--out", str(tmp_path / "e.parquet"), "--qdrant-url", url]) == 2
    out = capsys.readouterr()
    assert "pw" not in out.out + out.err and "k3y" not in out.out + out.err
    redacted = fake.url.replace("http://", "http://***@") + "?api_key=***"
    assert out.out.splitlines()[0] == f"dump: 0 points of docs at {redacted} -> {tmp_path / 'd.parquet'}"
    assert out.out.splitlines()[1].startswith(f"prune-collections: a -> (no such alias yet) at {redacted}: ")


def test_the_config_reads_the_key_stripped(monkeypatch):
    monkeypatch.setenv("CORPUS_ETL_TEST_KEY", f"  {KEY}\r\n")
    from transforms.io.qdrant import api_key_from_env

    assert api_key_from_env("CORPUS_ETL_TEST_KEY") == KEY
    assert QdrantConfig(url="http://localhost:1", api_key_env="CORPUS_ETL_TEST_KEY").api_key_env == "CORPUS_ETL_TEST_KEY"


def test_a_refused_write_inside_a_beam_job_is_named_by_translate(fake):
    import apache_beam as beam

    from pipelines.errors import EXIT_FAILED, translate
    from transforms.io.qdrant import WriteToQdrant
    from transforms.types import Chunk, EmbeddedChunk

    items = [EmbeddedChunk(Chunk("d", i, "t", 0, 1, 3, "t", n_chunks=2), (1.0, float(i), 0.0, 0.0)) for i in range(2)]
    fake.fail(*UPSERT, Reply(400, "Wrong input: Vector dimension error: expected dim: 4, got 3"))
    with pytest.raises(Exception) as info:
        with beam.Pipeline() as p:
            p | beam.Create(items) | WriteToQdrant(QdrantConfig(url=fake.url), "docs", "m")
    error = translate(info.value, qdrant_url=fake.url)
    assert str(error) == (f"the job failed: Qdrant at {fake.url} answered upsert on collection 'docs' with 400 Bad "
                          "Request: Wrong input: Vector dimension error: expected dim: 4, got 3")  # fmt: skip
    assert error.exit_status == EXIT_FAILED and fake.calls(*UPSERT) == 1  # not retried


def _chunk(doc: str, text: str = "t"):
    from transforms.types import Chunk

    return Chunk(doc, 0, text, 0, len(text), 3, text, n_chunks=1)


def test_the_index_job_s_lookups_and_stale_chunk_deletes_retry_a_briefly_overloaded_server(fake):
    # Idempotent reads and deletes: a 503 (or a reset connection) is retried in the step, as the writer retries
    # its batches, instead of failing the bundle (DirectRunner does not retry a bundle: the job failed).
    from transforms.io.incremental import _SkipUnchanged

    fake.fail("POST", "/collections/docs/points/delete", Reply(503))
    fake.fail("POST", "/collections/docs/points", Reply(503), Reply(close=True))
    step = _SkipUnchanged(lambda: _store(fake), "docs", lambda c: {"fingerprint": "f"})
    step.setup()
    step.start_bundle()
    assert list(step.process(_chunk("d1"))) == []
    out = [w.value for w in step.finish_bundle()]
    assert [c.doc_id for c in out] == ["d1"]  # no stored point: to embed
    assert (fake.calls("POST", "/collections/docs/points/delete"), fake.calls("POST", "/collections/docs/points")) == (
        2, 3)


class _OverloadedOnce:
    """A store whose first search answers 503, as a server under load does; then it finds one document."""

    def __init__(self) -> None:
        self.calls = 0

    def search_documents_batch(self, collection, vectors, top_k):
        from transforms.types import Candidate

        self.calls += 1
        if self.calls == 1:
            raise UnexpectedResponse(503, "Service Unavailable", b"{}", httpx.Headers())
        return [[(Candidate("d1", 0.9, 1), {"text": "one"})] for _ in vectors]


def test_the_label_job_s_searches_retry_a_briefly_overloaded_server():
    from transforms.io.retrieve import _SearchIndex
    from transforms.types import Query

    step = _SearchIndex(QdrantConfig(url="http://127.0.0.1:1"), "docs", top_k=1)
    step.store = _OverloadedOnce()
    step.start_bundle()
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import MIN_TIMESTAMP

    assert list(step.process((Query("q1", "a question"), [0.1, 0.2]), GlobalWindow(), MIN_TIMESTAMP)) == []
    pairs = [w.value for w in step.finish_bundle()]
    assert [(p.query_id, p.doc_id, p.first_stage_rank) for p in pairs] == [("q1", "d1", 1)]
    assert step.store.calls == 2

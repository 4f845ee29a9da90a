"""Qdrant: connection settings, the server store, and the idempotent point writer.

``--qdrant-path`` is the embedded store (Qdrant Edge, ``transforms/edge_store.py``);
``--qdrant-url`` is a server through qdrant-client (``ServerStore`` here). Both sit behind
``transforms.io.store.VectorStore``; jobs call only that interface.

Guarantees:
- Point ids are ``uuid5(doc_id:chunk_index)``: a retried bundle (Beam retries with new
  batch boundaries), a rerun or a replay overwrites the same points; nothing duplicates.
- Upserts are sent in batches bounded by point count and by bytes (default 8 MiB, well
  under Qdrant's 32 MiB request limit), with ``wait=True`` (server) or through the WAL
  (embedded), so a finished bundle means durable points.
- A document that now has fewer chunks than when it was last indexed loses its stale
  points. Chunks are numbered 0..n-1, so a document has stale points exactly when the
  point ``(doc_id, n_chunks)`` exists: that is checked by id (one ``retrieve`` per upsert
  batch, O(1) per document, on a server and in the embedded store, where it stays within
  the document's shard), and only documents that did shrink get a filtered delete of
  ``chunk_index >= n_chunks``. Only indexes this run never writes are deleted, so the
  order of bundles does not matter.
- Server writes are retried as a whole batch (upsert, probe, delete); embedded writes are
  not retried here (a shard held by another process is waited for, see ``edge_store``),
  and Beam retries a failed element, which rewrites the same ids.
- Transient failures (connection errors, timeouts, HTTP 429/5xx, gRPC UNAVAILABLE and the
  like) are retried with exponential backoff and jitter, waiting at least the server's
  ``Retry-After`` (up to the longest wait); client errors (HTTP 4xx, gRPC INVALID_ARGUMENT...)
  are raised at once, tagged with the operation and collection (``qdrant_request``) for
  ``pipelines.errors.translate``, which adds Qdrant's own message: retrying them cannot succeed.
- Why not ``QdrantClient.upload_points``: it batches by count only and retries every
  error alike; a Beam bundle also needs its points durable before it commits, which a
  per-bundle buffer flushed in ``finish_bundle`` gives directly.
- Secrets by reference: the config holds the *name* of the environment variable with
  the API key, never the key, so nothing secret is pickled into the job graph or logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.hooks import pause_point
from transforms.io.incremental import fingerprint
from transforms.io.store import CollectionSpec, StorePoint, VectorStore, check_vectors
from transforms.progress import count_time, reporter
from transforms.types import Candidate, Chunk, EmbeddedChunk, first_line

if TYPE_CHECKING:
    from qdrant_client import QdrantClient


class _LazyModels:
    """``qdrant_client.models``, imported at first use. qdrant-client is the server path's client: the embedded
    store's jobs never import it (about a second of every driver's and SDK worker's start on 2 cores)."""

    def __getattr__(self, name: str) -> Any:
        from qdrant_client import models as loaded

        return getattr(loaded, name)


models: Any = _LazyModels()


def _is_local_mode(client: QdrantClient) -> bool:
    from qdrant_client.local.qdrant_local import QdrantLocal

    return isinstance(getattr(client, "_client", None), QdrantLocal)


def _client_errors() -> tuple[type[BaseException], ...] | None:
    """qdrant-client's (UnexpectedResponse, ResourceExhaustedResponse, QdrantException, ResponseHandlingException),
    or None where it was never imported: then no exception can be one of them."""
    if "qdrant_client" not in sys.modules:
        return None
    from qdrant_client.common.client_exceptions import QdrantException, ResourceExhaustedResponse
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    return UnexpectedResponse, ResourceExhaustedResponse, QdrantException, ResponseHandlingException


_LOG = logging.getLogger(__name__)
T = TypeVar("T")

RESERVED_PAYLOAD_KEYS = frozenset(
    {"doc_id", "chunk_index", "text", "char_start", "char_end", "title", "model", "content_hash", "n_tokens",
     "fingerprint"}
)
MAX_REQUEST_BYTES = 32 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class QdrantConfig:
    """Where the collection lives: the embedded store on disk (``path``) or a server (``url``).

    ``shards`` (embedded only) is the shard count of collections this config creates;
    ``lock_wait_s`` how long an embedded operation waits for a shard another process holds.
    """

    path: str | None = "./qdrant_data"
    url: str | None = None
    api_key_env: str | None = None
    prefer_grpc: bool = False
    timeout_s: int = 60
    shards: int = 4
    lock_wait_s: float = 300.0

    def __post_init__(self) -> None:
        if self.url:
            object.__setattr__(self, "path", None)
        if not self.url and not self.path:
            raise ValueError("give --qdrant-path (embedded store) or --qdrant-url (server)")
        if self.api_key_env and not self.url:
            raise ValueError("--qdrant-api-key-env only applies with --qdrant-url")

    @property
    def where(self) -> str:
        return self.url or f"edge:{os.path.abspath(self.path or '')}"

    @property
    def embedded(self) -> bool:
        return not self.url

    def connect(self) -> QdrantClient:
        """A qdrant-client for the server (``url``); with only a ``path``, qdrant-client's local mode."""
        from qdrant_client import QdrantClient

        if self.url:
            api_key = None
            if self.api_key_env:
                api_key = api_key_from_env(self.api_key_env)
            return QdrantClient(url=self.url, api_key=api_key, prefer_grpc=self.prefer_grpc, timeout=self.timeout_s)
        os.makedirs(self.path or ".", exist_ok=True)
        return QdrantClient(path=self.path)


def api_key_from_env(name: str) -> str:
    """The API key in the environment variable ``name``, surrounding whitespace removed.

    A key read from a file or a mounted secret often ends in a newline, which no key holds; sent
    as is, httpx refuses the header with the key in its message (``Illegal header value b'KEY\\n'``),
    which would reach logs and the error line. Any other character a header cannot carry is refused
    here, naming the variable and never the value.
    """
    key = (os.environ.get(name) or "").strip()
    if not key:
        raise RuntimeError(f"environment variable {name} (--qdrant-api-key-env) is not set")
    bad = next((i for i, ch in enumerate(key) if not " " <= ch <= "~"), None)
    if bad is not None:
        raise ValueError(
            f"environment variable {name} (--qdrant-api-key-env) holds a character an HTTP header cannot carry "
            f"(at position {bad}); an API key is printable ASCII"
        )
    return key


_CLIENTS: dict[QdrantConfig, tuple[QdrantClient, Any]] = {}
_CLIENTS_LOCK = threading.Lock()


def client_lock(client: QdrantClient) -> Any:
    """What calls on ``client`` are made under: a re-entrant lock for local mode, which is not
    thread-safe; nothing for a server, whose HTTP and gRPC clients are, so threads run in parallel."""
    return threading.RLock() if _is_local_mode(client) else contextlib.nullcontext()


def shared_client(config: QdrantConfig) -> tuple[QdrantClient, Any]:
    """One client per config per process, and its lock (``client_lock``).

    Local mode holds a file lock on its folder, so a second client in the same process
    would fail; every DoFn instance, the driver and the CLI share this one. For a server,
    one client per process reuses its connections.
    """
    with _CLIENTS_LOCK:
        entry = _CLIENTS.get(config)
        if entry is None:
            client = config.connect()
            entry = _CLIENTS[config] = (client, client_lock(client))
        return entry


def close_client(config: QdrantConfig) -> None:
    with _CLIENTS_LOCK:
        entry = _CLIENTS.pop(config, None)
    if entry:
        entry[0].close()


def ensure_collection(
    client: QdrantClient, name: str, size: int, *, create: bool = True, metadata: dict[str, Any] | None = None
) -> bool:
    """Create ``name`` (``size``-d, cosine, with the collection ``metadata`` when given) when missing;
    return whether it was created.

    An existing collection with another size or distance is an error: writing into it
    would fail point by point, or worse, mix incomparable vectors.
    """
    if client.collection_exists(name):
        params = client.get_collection(name).config.params.vectors
        if not isinstance(params, models.VectorParams):
            raise ValueError(f"collection {name!r} uses named vectors {sorted(params or {})}; expected one unnamed vector")
        if params.size != size or params.distance != models.Distance.COSINE:
            raise ValueError(
                f"collection {name!r} exists with size {params.size} and distance {params.distance.value}; "
                f"this job's vectors have size {size} (Cosine). Use another --collection, or a --dim that matches."
            )
        return False
    if not create:
        raise ValueError(f"collection {name!r} does not exist")
    client.create_collection(name, vectors_config=models.VectorParams(size=size, distance=models.Distance.COSINE),
                             **({"metadata": metadata} if metadata else {}))  # fmt: skip
    if not _is_local_mode(client):
        # Grouping by document and stale-chunk deletes use these on a server (local mode has none).
        client.create_payload_index(name, "doc_id", models.PayloadSchemaType.KEYWORD)
        client.create_payload_index(name, "chunk_index", models.PayloadSchemaType.INTEGER)
    return True


# The key of the collection metadata (recent Qdrant servers keep it; an older one, none) under which ServerStore
# records the model and settings: a key of its own, so other tools' metadata is left alone and an update replaces
# ours whole.
METADATA_KEY = "corpus_etl"


def collection_metadata(spec: CollectionSpec) -> dict[str, Any] | None:
    """What ``ServerStore`` records of ``spec`` in the collection's metadata; None when it names no model."""
    if spec.model is None:
        return None
    return {METADATA_KEY: {"model": spec.model, "settings": dict(spec.settings)}}


def point_alias(client: QdrantClient, alias: str, collection: str) -> str | None:
    """Point ``alias`` at ``collection`` atomically; return the collection it pointed at before.

    The blue/green step of scheduled reindexing: index into a new collection, then switch
    the alias that searches use, in one request, so readers never see a half-built index.
    """
    if client.collection_exists(alias) and not any(a.alias_name == alias for a in client.get_aliases().aliases):
        raise ValueError(f"--alias {alias!r} is the name of a collection, not an alias")
    previous = next((a.collection_name for a in client.get_aliases().aliases if a.alias_name == alias), None)
    ops: list[Any] = []
    if previous is not None:
        ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
    ops.append(
        models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=collection, alias_name=alias))
    )
    client.update_collection_aliases(change_aliases_operations=ops)
    return previous


# -- retries -------------------------------------------------------------------------------
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
_TRANSIENT_GRPC = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "INTERNAL", "UNKNOWN"}


def is_transient(exc: BaseException) -> bool:
    """Whether retrying ``exc`` can succeed: network trouble and overload yes, bad requests no.

    qdrant-client raises a 429 that carries ``Retry-After`` (REST, or gRPC RESOURCE_EXHAUSTED with
    ``retry-after``) as ``ResourceExhaustedResponse``, and one whose ``Retry-After`` is not a number
    of seconds (an HTTP date) as a bare ``QdrantException`` saying so: both are overload.
    """
    errors = _client_errors()
    if errors is not None:
        unexpected, exhausted, qdrant_error, handling = errors
        if isinstance(exc, unexpected):
            return exc.status_code is None or exc.status_code in _TRANSIENT_HTTP
        if isinstance(exc, exhausted):
            return True
        if isinstance(exc, qdrant_error) and str(exc).startswith("Retry-After header value"):
            return True
        if isinstance(exc, handling):
            # It wraps whatever sending raised: a network error or timeout, or a response that does not
            # parse, or a request httpx refuses to build (an illegal header value): only the first is transient.
            return is_transient(exc.source) if isinstance(exc.source, Exception) else True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    code = getattr(exc, "code", None)
    if callable(code):  # grpc.RpcError
        try:
            return getattr(code(), "name", "") in _TRANSIENT_GRPC
        except Exception:  # noqa: BLE001 - an RpcError without a status
            return False
    if "httpx" not in sys.modules:  # nothing imported it, so nothing raised its errors
        return False
    import httpx

    return isinstance(exc, httpx.TransportError) and not isinstance(exc, _httpx_request_errors())


@cache
def _httpx_request_errors() -> tuple[type[BaseException], ...]:
    """httpx's errors for a request that cannot be sent as built (retrying sends it as built again)."""
    try:
        import httpx
    except ImportError:
        return ()
    return (httpx.LocalProtocolError, httpx.UnsupportedProtocol, httpx.ProxyError)


def retry_after(exc: BaseException) -> float | None:
    """The seconds the server asked to wait before a retry (``Retry-After`` in seconds), or None."""
    errors = _client_errors()
    if errors is None:
        return None
    unexpected, exhausted = errors[:2]
    seconds = getattr(exc, "retry_after_s", None) if isinstance(exc, exhausted) else None
    if seconds is None and isinstance(exc, unexpected) and exc.headers:
        with contextlib.suppress(TypeError, ValueError):
            seconds = float(exc.headers.get("Retry-After"))  # a 503 may carry one too
    return max(0.0, float(seconds)) if seconds is not None else None


def with_retries(
    fn: Callable[[], T],
    *,
    attempts: int = 6,
    base_delay_s: float = 0.5,
    max_delay_s: float = 30.0,
    on_retry: Callable[[BaseException, int], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn``; retry transient errors with exponential backoff and full jitter, at most ``attempts`` calls.

    A server's ``Retry-After`` is honoured as the least wait, up to ``max_delay_s`` (a server asking for
    more is retried then anyway, so a job's total wait stays bounded: at most ``attempts - 1`` waits of
    ``max_delay_s``). Client errors are raised at once.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or attempt == attempts:
                raise
            delay = random.uniform(0, min(max_delay_s, base_delay_s * 2 ** (attempt - 1)))
            asked = retry_after(exc)
            if asked is not None:
                delay = max(delay, min(asked, max_delay_s))
            if on_retry:
                on_retry(exc, attempt)
            _LOG.warning("transient Qdrant error (attempt %d/%d), retrying in %.1fs: %s", attempt, attempts, delay,
                         first_line(exc))  # fmt: skip
            sleep(delay)
    raise AssertionError("unreachable")


# -- points --------------------------------------------------------------------------------
def chunk_payload(chunk: Chunk, model_id: str, digest: str = "") -> dict[str, Any]:
    """The payload of a chunk's point. ``fingerprint`` (with the settings ``digest``) is what the
    vector depends on: incremental runs compare it to skip chunks (``transforms.io.incremental``)."""
    payload: dict[str, Any] = {
        "doc_id": chunk.doc_id,
        "chunk_index": chunk.chunk_index,
        "text": chunk.text,
        "char_start": chunk.char_start,
        "char_end": chunk.char_end,
        "n_tokens": chunk.n_tokens,
        "model": model_id,
        "content_hash": chunk.content_hash,
    }
    if digest:
        payload["fingerprint"] = fingerprint(chunk.embed_text, digest)
    if chunk.title is not None:
        payload["title"] = chunk.title
    payload.update(chunk.metadata)
    return payload


def to_point(item: EmbeddedChunk, model_id: str, digest: str = "") -> models.PointStruct:
    chunk = item.chunk
    return models.PointStruct(id=chunk.point_id, vector=list(item.vector), payload=chunk_payload(chunk, model_id, digest))


def stale_chunks_filter(doc_id: str, n_chunks: int) -> models.Filter:
    """Points of ``doc_id`` beyond its current last chunk (left over from a longer version)."""
    return models.Filter(
        must=[
            models.FieldCondition(key="doc_id", match=models.MatchValue(value=doc_id)),
            models.FieldCondition(key="chunk_index", range=models.Range(gte=n_chunks)),
        ]
    )


def point_bytes(point: models.PointStruct | StorePoint) -> int:
    """Size of the point in a JSON request, closely enough to bound a batch under the limit."""
    vector = point.vector if isinstance(point.vector, list) else []
    return 20 * len(vector) + len(json.dumps(point.payload, ensure_ascii=False).encode("utf-8")) + 64


def store_point(item: EmbeddedChunk, model_id: str, digest: str = "") -> StorePoint:
    """The chunk as a store point: same id and payload as ``to_point``, the vector as a list."""
    return StorePoint(item.chunk.point_id, list(item.vector), chunk_payload(item.chunk, model_id, digest))


class PointBuffer:
    """Points of one batch, bounded by count and by bytes, with the chunk-0 documents in it."""

    def __init__(self, batch_points: int, batch_bytes: int) -> None:
        self.batch_points, self.batch_bytes = batch_points, batch_bytes
        self.points: list[StorePoint] = []
        self.bytes = 0
        self.first_chunks: dict[str, int] = {}

    def fits(self, size: int) -> bool:
        return not self.points or self.bytes + size <= self.batch_bytes

    def add(self, point: StorePoint, size: int, item: EmbeddedChunk | None = None) -> None:
        self.points.append(point)
        self.bytes += size
        if item is not None and item.chunk.chunk_index == 0:
            self.first_chunks[item.chunk.doc_id] = item.chunk.n_chunks

    @property
    def full(self) -> bool:
        return len(self.points) >= self.batch_points

    def take(self) -> tuple[list[StorePoint], dict[str, int]]:
        out = (self.points, self.first_chunks)
        self.points, self.bytes, self.first_chunks = [], 0, {}
        return out


class _Counters:
    def __init__(self) -> None:
        self.written = Metrics.counter("corpus_etl", "points_written")
        self.batches = Metrics.counter("corpus_etl", "upsert_batches")
        self.retries = Metrics.counter("corpus_etl", "upsert_retries")
        self.pruned = Metrics.counter("corpus_etl", "documents_pruned_of_stale_chunks")


class _Writer(beam.DoFn):
    """What both writers hold: where to write, how points are built and batched, their counters."""

    def __init__(self, config: QdrantConfig, collection: str, model_id: str, batch_points: int, batch_bytes: int,
                 digest: str = "", progress_interval_s: float = 30.0):
        self.config = config
        self.collection = collection
        self.model_id = model_id
        self.batch_points = batch_points
        self.batch_bytes = batch_bytes
        self.digest = digest
        self.progress_interval_s = progress_interval_s
        self.counters = _Counters()


class _UpsertPoints(_Writer):
    """Server writer: a per-bundle buffer, flushed (upsert + stale-chunk prune, retried as one) when full."""

    def setup(self) -> None:
        from transforms.io.store import open_store

        self.store = open_store(self.config)

    def start_bundle(self) -> None:
        self.buffer = PointBuffer(self.batch_points, self.batch_bytes)

    def process(self, item: EmbeddedChunk):
        point = store_point(item, self.model_id, self.digest)
        size = point_bytes(point)
        if not self.buffer.fits(size):
            self._flush()
        self.buffer.add(point, size, item)
        if self.buffer.full:
            self._flush()

    def finish_bundle(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self.buffer.points:
            return
        points, docs = self.buffer.take()
        started = time.perf_counter()
        pruned = with_retries(
            lambda: self.store.write_batch(self.collection, points, docs),
            on_retry=lambda exc, attempt: self.counters.retries.inc(),
        )
        count_time("upsert", time.perf_counter() - started)
        if pruned:
            self.counters.pruned.inc(pruned)
        self.counters.written.inc(len(points))
        self.counters.batches.inc()
        reporter("write", self.progress_interval_s).add(points=len(points), batches=1)


def copy_points(
    points: Iterable[StorePoint],
    target: VectorStore,
    collection: str,
    *,
    batch_points: int = 256,
    batch_bytes: int = 8 * 1024 * 1024,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, int]:
    """Upsert ``points`` (ids kept) into ``target`` as the writer does: batches bounded by count
    and bytes, each retried on transient errors. Returns points, batches and retries."""
    if not 0 < batch_bytes < MAX_REQUEST_BYTES:
        raise ValueError(f"batch_bytes must be in (0, {MAX_REQUEST_BYTES})")
    stats = {"points": 0, "batches": 0, "retries": 0}
    buffer = PointBuffer(batch_points, batch_bytes)

    def on_retry(exc: BaseException, attempt: int) -> None:
        stats["retries"] += 1

    def flush() -> None:
        batch, _ = buffer.take()
        with_retries(lambda: target.upsert(collection, batch), on_retry=on_retry, sleep=sleep)
        stats["points"] += len(batch)
        stats["batches"] += 1

    for point in points:
        size = point_bytes(point)
        if not buffer.fits(size):
            flush()
        buffer.add(point, size)
        if buffer.full:
            flush()
    if buffer.points:
        flush()
    return stats


class _KeyByShard(beam.DoFn):
    """``EmbeddedChunk`` → ``(shard, chunk)``: the embedded collection's shard of the chunk's document."""

    def __init__(self, config: QdrantConfig, collection: str) -> None:
        self.config, self.collection = config, collection

    def setup(self) -> None:
        from transforms.io.edge_store import EdgeStore

        self.shards = EdgeStore(self.config.path or ".").meta(self.collection).shards

    def process(self, item: EmbeddedChunk):
        from transforms.io.edge_store import shard_of

        yield shard_of(item.chunk.doc_id, self.shards), item


class _WriteShard(_Writer):
    """Embedded writer: all of one shard's points, written by this worker alone, in bounded batches.

    Beam's ``GroupByKey`` on the shard number hands each shard to one ``process`` call,
    so no two workers write a shard at once; the shard is opened once for the call (a
    process still holding it makes this wait, see ``open_shard``) and closed after it.
    A retried element rewrites the same ids.
    """

    def setup(self) -> None:
        from transforms.io.edge_store import EdgeStore

        self.store = EdgeStore(self.config.path or ".", lock_wait_s=self.config.lock_wait_s)

    def process(self, element: tuple[int, Any]):
        index, items = element
        name, meta, paths = self.store._shards(self.collection)
        buffer = PointBuffer(self.batch_points, self.batch_bytes)
        with self.store.shard(paths[index]) as shard:

            def flush() -> None:
                points, docs = buffer.take()
                started = time.perf_counter()
                pruned = self.store.write_shard(shard, points, docs, collection=self.collection, size=meta.size)
                count_time("upsert", time.perf_counter() - started)
                if pruned:
                    self.counters.pruned.inc(pruned)
                self.counters.written.inc(len(points))
                self.counters.batches.inc()
                reporter("write", self.progress_interval_s).add(points=len(points), batches=1)
                pause_point("write")

            for item in items:
                point = store_point(item, self.model_id, self.digest)
                size = point_bytes(point)
                if not buffer.fits(size):
                    flush()
                buffer.add(point, size, item)
                if buffer.full:
                    flush()
            if buffer.points:
                flush()
        return []


class WriteToQdrant(beam.PTransform):
    """Upsert ``EmbeddedChunk`` s as points; see the module docstring for what is guaranteed.

    On a server, each bundle writes its own batches. In the embedded store, points are
    shuffled to their shard first (``GroupByKey``), so each shard has one writer at a time
    and worker processes never fight over a shard's lock.

    The collection must exist (the pipeline's ``run`` calls ``ensure_collection`` before
    the job starts, so a size mismatch fails before any work is done).
    """

    def __init__(
        self,
        config: QdrantConfig,
        collection: str,
        model_id: str,
        *,
        batch_points: int = 256,
        batch_bytes: int = 8 * 1024 * 1024,
        settings_digest: str = "",
        progress_interval_s: float = 30.0,
    ) -> None:
        super().__init__()
        if not 0 < batch_bytes < MAX_REQUEST_BYTES:
            raise ValueError(f"batch_bytes must be in (0, {MAX_REQUEST_BYTES})")
        self.args = (config, collection, model_id, batch_points, batch_bytes, settings_digest, progress_interval_s)

    def expand(self, pcoll):
        config, collection = self.args[0], self.args[1]
        if not config.embedded:
            return pcoll | "Upsert" >> beam.ParDo(_UpsertPoints(*self.args))
        return (
            pcoll
            | "KeyByShard" >> beam.ParDo(_KeyByShard(config, collection))
            | "GroupByShard" >> beam.GroupByKey()
            | "Upsert" >> beam.ParDo(_WriteShard(*self.args))
        )


# -- search --------------------------------------------------------------------------------
def search_documents(
    client: QdrantClient, collection: str, vector: Sequence[float], top_k: int, *, hnsw_ef: int | None = None
) -> list[tuple[Candidate, dict[str, Any]]]:
    """Top ``top_k`` documents for a query vector: chunk hits grouped by ``doc_id``, max score each.

    Qdrant's grouping API does the aggregation server-side, with the server's own search
    parameters unless ``hnsw_ef`` is given. Ties are broken by ``doc_id`` so the order is
    deterministic, at the cutoff too: the server picks among documents tied there in its own
    order, so one group more is asked for, and while the last group returned ties the ``top_k``-th,
    twice as many (duplicated documents score exactly alike). Returns each candidate with its best
    chunk's payload.
    """
    params = models.SearchParams(hnsw_ef=hnsw_ef) if hnsw_ef else None
    limit = top_k + 1
    while True:
        result = client.query_points_groups(
            collection, query=list(vector), group_by="doc_id", limit=limit, group_size=1, with_payload=True,
            search_params=params,
        )
        hits = [(str(g.id), float(g.hits[0].score), g.hits[0].payload or {}) for g in result.groups]
        hits.sort(key=lambda h: (-h[1], h[0]))
        if len(hits) < limit or hits[-1][1] < hits[top_k - 1][1]:
            break  # every group there is, or one past the cutoff scores below it: no tie left unseen
        limit *= 2
    return [(Candidate(doc_id=d, score=s, rank=i + 1), p) for i, (d, s, p) in enumerate(hits[:top_k])]


# -- the server store ------------------------------------------------------------------------
class ServerStore(VectorStore):
    """``VectorStore`` over qdrant-client: a Qdrant server (``--qdrant-url``), or any client given.

    Every call is the one qdrant-client call the jobs made before the interface existed
    (``wait=True`` upserts and deletes, server-side grouping, one alias request), under
    the client's lock (``client_lock``: local mode only). The writer and ``copy_points`` retry
    ``write_batch`` / ``upsert`` as a whole on transient errors, and the jobs' idempotent reads retry
    theirs (``SkipUnchanged``'s lookups and stale-chunk deletes, the label job's searches: ``with_retries``);
    single calls here are not retried, so a command's pre-flight check fails
    at once on a server that is down. A failed call's exception carries ``qdrant_request`` (the
    operation and collection), which ``pipelines.errors.translate`` puts in its one line.
    """

    def __init__(self, config: QdrantConfig | None = None, *, client: QdrantClient | None = None) -> None:
        if client is not None:
            self.client, self.lock = client, client_lock(client)
            self.where = "client"
        elif config is not None:
            self.client, self.lock = shared_client(config)
            self.where = config.where
        else:
            raise ValueError("ServerStore needs a config or a client")

    def _call(self, operation: str, collection: str | None, fn: Callable[[], T]) -> T:
        """``fn()`` under the client's lock; its exception tagged with what was asked of the server."""
        try:
            with self.lock:
                return fn()
        except Exception as exc:
            if getattr(exc, "qdrant_request", None) is None:  # the innermost call names it
                with contextlib.suppress(AttributeError):
                    exc.qdrant_request = f"{operation} on collection {collection!r}" if collection else operation
            raise

    def ensure_collection(self, name: str, spec: CollectionSpec, *, create: bool = True) -> bool:
        return self._call("ensure collection", name, lambda: ensure_collection(
            self.client, name, spec.size, create=create, metadata=collection_metadata(spec)))  # fmt: skip

    def collection_spec(self, name: str) -> CollectionSpec:
        """The size, and the model and settings recorded in the collection's metadata. A server that keeps no
        collection metadata records nothing (``model`` None). Named vectors (not what the jobs write) are a
        ``ValueError``, as in ``ensure_collection``."""
        with self.lock:
            name = self.aliases().get(name, name)  # the collection's own config, whatever the server resolves
            if not self.collection_exists(name):
                raise ValueError(f"collection {name!r} does not exist")
            config = self._call("get collection", name, lambda: self.client.get_collection(name).config)
        params = config.params.vectors
        if not isinstance(params, models.VectorParams):
            raise ValueError(f"collection {name!r} uses named vectors {sorted(params or {})}; expected one unnamed vector")
        size = params.size
        recorded = (getattr(config, "metadata", None) or {}).get(METADATA_KEY) or {}
        return CollectionSpec(size, model=recorded.get("model"), settings=dict(recorded.get("settings") or {}))

    def record_collection(self, name: str, spec: CollectionSpec) -> None:
        metadata = collection_metadata(spec)
        if metadata:
            self._call("update collection metadata", name, lambda: self.client.update_collection(name, metadata=metadata))

    def collection_exists(self, name: str) -> bool:
        return self._call("collection exists", name, lambda: self.client.collection_exists(name))

    def upsert(self, collection: str, points: Sequence[StorePoint]) -> None:
        if not points:  # a server answers an empty batch with an error; the embedded store writes nothing
            return
        check_vectors(points, collection)  # the server checks sizes; NaN would not even be valid JSON
        structs = [models.PointStruct(id=p.id, vector=list(p.vector or ()), payload=p.payload) for p in points]
        self._call("upsert", collection, lambda: self.client.upsert(collection, points=structs, wait=True))

    @staticmethod
    def _point(r: Any, with_vectors: bool) -> StorePoint:
        vector = r.vector if with_vectors else None
        return StorePoint(str(r.id), list(vector) if vector is not None else None, dict(r.payload or {}))

    def retrieve(
        self, collection: str, ids: Sequence[str], *, with_payload: bool = True, with_vectors: bool = False
    ) -> list[StorePoint]:
        ids = list(dict.fromkeys(ids))  # a server answers a repeated id once per mention: each point once
        found = self._call("retrieve", collection, lambda: self.client.retrieve(
            collection, ids, with_payload=with_payload, with_vectors=with_vectors))  # fmt: skip
        return [self._point(r, with_vectors) for r in found]

    def delete_chunks_from(self, collection: str, docs: Mapping[str, int]) -> None:
        if not docs:  # a filter whose ``should`` is empty matches every point: it would empty the collection
            return
        stale = [stale_chunks_filter(d, n) for d, n in sorted(docs.items())]
        self._call("delete stale chunks", collection, lambda: self.client.delete(
            collection, points_selector=models.FilterSelector(filter=models.Filter(should=stale)), wait=True))  # fmt: skip

    def search_documents(
        self, collection: str, vector: Sequence[float], top_k: int, *, hnsw_ef: int | None = None
    ) -> list[tuple[Candidate, dict[str, Any]]]:
        return self._call("search", collection, lambda: search_documents(
            self.client, collection, vector, top_k, hnsw_ef=hnsw_ef))  # fmt: skip

    def count(self, collection: str) -> int:
        return self._call("count", collection, lambda: self.client.count(collection, exact=True).count)

    def scroll(self, collection: str, *, with_vectors: bool = True, page: int = 256) -> Iterator[StorePoint]:
        offset = None
        while True:
            records, offset = self._call("scroll", collection, lambda offset=offset: self.client.scroll(
                collection, limit=page, offset=offset, with_payload=True, with_vectors=with_vectors))  # fmt: skip
            for r in records:
                yield self._point(r, with_vectors)
            if offset is None:
                return

    def aliases(self) -> dict[str, str]:
        found = self._call("list aliases", None, lambda: self.client.get_aliases().aliases)
        return {a.alias_name: a.collection_name for a in found}

    def collections(self) -> list[str]:
        found = self._call("list collections", None, lambda: self.client.get_collections().collections)
        return sorted(c.name for c in found)

    def delete_collection(self, name: str) -> None:
        """Refused as the embedded store refuses (``VectorStore.delete_collection``): a server would delete
        an alias's collection and the alias with it. Checked, then deleted: not one step on a server."""
        with self.lock:
            aliases = self.aliases()
            if name in aliases:
                raise ValueError(f"{name!r} is an alias, not a collection")
            if not self.collection_exists(name):
                raise ValueError(f"collection {name!r} does not exist")
            pointing = sorted(a for a, c in aliases.items() if c == name)
            if pointing:
                raise ValueError(f"collection {name!r} is the target of alias(es) {', '.join(pointing)}")
            self._call("delete collection", name, lambda: self.client.delete_collection(name))

    def point_alias(self, alias: str, collection: str) -> str | None:
        return self._call(f"point alias {alias!r} at", collection, lambda: point_alias(self.client, alias, collection))

    def write_batch(self, collection: str, points: Sequence[StorePoint], first_chunks: Mapping[str, int]) -> int:
        """Upsert, probe and prune under one hold of the client lock (local mode), so no other
        thread's call falls between them."""
        with self.lock:  # re-entrant: the calls below take it again
            return super().write_batch(collection, points, first_chunks)

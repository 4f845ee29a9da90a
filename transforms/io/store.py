"""The vector store interface every job uses, and how a ``QdrantConfig`` picks its implementation.

Two implementations, one contract:

- ``EdgeStore`` (``transforms/edge_store.py``): ``--qdrant-path DIR``, Qdrant Edge embedded
  in the process, collections and aliases on disk, many writer processes at once.
- ``ServerStore`` (``transforms/qdrant.py``): ``--qdrant-url URL``, qdrant-client against a
  Qdrant server, with retries on transient errors and byte-bounded batches.

What every implementation guarantees:

- ``upsert`` is durable when it returns (``wait=True`` on a server, the write-ahead log on
  disk), and idempotent: the same id overwrites the same point. A batch holding a vector that
  is not finite (or, embedded, not of the collection's size) is refused whole, before any write.
- ``search_documents``: chunk hits grouped by ``doc_id``, the max chunk score per document,
  ties broken by ``doc_id`` (at the top-k cutoff too); points without a ``doc_id`` are no
  document. The embedded store is exact unless ``hnsw_ef`` is given; a server searches with
  its own index settings (HNSW once a collection is indexed) unless ``hnsw_ef`` is given.
- Empty inputs are no-ops (``upsert([])``, ``delete_chunks_from({})``, ``retrieve([])``).
- ``point_alias`` switches an alias in one atomic step and returns its previous target;
  every method taking a collection name also takes an alias.
- ``scroll`` yields every point of a collection exactly once.

Nothing here imports qdrant-client or qdrant-edge: ``open_store`` imports the one it needs.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from transforms.types import Candidate, point_id

if TYPE_CHECKING:
    from transforms.io.qdrant import QdrantConfig


@dataclasses.dataclass(frozen=True)
class StorePoint:
    """One point as the stores exchange it: a string id, its vector (``None`` when not read), its payload."""

    id: str
    vector: list[float] | None
    payload: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class CollectionSpec:
    """What a collection holds: the vector size (cosine distance) and, where the store records it, the model
    and the embedding settings its vectors were made with (``pipelines.index.embedding_settings``: model,
    revision, dim, max_length, chunking). ``model`` None: nothing recorded (another tool made it)."""

    size: int
    model: str | None = None
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class HnswSettings:
    """An HNSW build: ``m`` edges per node, ``ef_construct`` candidates while building.

    ``full_scan_threshold_kb``: a segment smaller than this is scanned exactly instead of
    walking its graph (Qdrant's default, 10 MB); benchmarks of recall set it to 1 so the
    graph is what gets measured.
    """

    m: int = 16
    ef_construct: int = 100
    full_scan_threshold_kb: int = 10_000

    def __post_init__(self) -> None:
        if self.m < 4 or self.ef_construct < 4:
            raise ValueError(f"HNSW m and ef_construct must be >= 4, got m={self.m} ef_construct={self.ef_construct}")


class StoreInUseError(RuntimeError):
    """The embedded store's shard stayed locked by another process for longer than the wait allows."""


class VectorStore(abc.ABC):
    """The operations the writer, search, evaluate, label, copy and dump use; nothing else touches Qdrant."""

    where: str

    @abc.abstractmethod
    def ensure_collection(self, name: str, spec: CollectionSpec, *, create: bool = True) -> bool:
        """Create ``name`` when missing (cosine, ``spec.size``); return whether it was created.

        An existing collection with another size or distance is a ``ValueError``, before any write.
        With ``create=False`` a missing collection is a ``ValueError``. ``name`` may be an alias.
        """

    @abc.abstractmethod
    def collection_spec(self, name: str) -> CollectionSpec:
        """What ``name`` (a collection or an alias) records: its size, and the model and settings of the last
        run that wrote it (``record_collection``), or none. A missing collection is a ``ValueError``."""

    @abc.abstractmethod
    def record_collection(self, name: str, spec: CollectionSpec) -> None:
        """Record ``spec.model`` and ``spec.settings`` as what the collection ``name`` now holds (the size is
        fixed at creation), so its metadata describes the last run that wrote it, not the first."""

    @abc.abstractmethod
    def collection_exists(self, name: str) -> bool:
        """Whether ``name`` is a collection or an alias of one."""

    @abc.abstractmethod
    def upsert(self, collection: str, points: Sequence[StorePoint]) -> None:
        """Insert or overwrite ``points`` (by id); durable when it returns. No point is a no-op.

        A non-finite vector value is a ``ValueError`` naming the point (``check_vectors``), before any write.
        """

    @abc.abstractmethod
    def retrieve(
        self, collection: str, ids: Sequence[str], *, with_payload: bool = True, with_vectors: bool = False
    ) -> list[StorePoint]:
        """The points among ``ids`` that exist, each once (any order); vectors only when asked."""

    @abc.abstractmethod
    def delete_chunks_from(self, collection: str, docs: Mapping[str, int]) -> None:
        """Delete, for each ``doc_id: n`` of ``docs``, the points of ``doc_id`` with ``chunk_index >= n``.

        A filtered delete (``doc_id`` match and ``chunk_index`` range): the stale chunks a
        document left behind when it got shorter. No document deletes nothing.
        """

    @abc.abstractmethod
    def search_documents(
        self, collection: str, vector: Sequence[float], top_k: int, *, hnsw_ef: int | None = None
    ) -> list[tuple[Candidate, dict[str, Any]]]:
        """Top ``top_k`` documents: chunk hits grouped by ``doc_id`` (max score), ties by ``doc_id``.

        Embedded: exact unless ``hnsw_ef`` is given; a server: its index unless ``hnsw_ef`` is given.
        Points without a ``doc_id`` are skipped. Each candidate comes with its best chunk's payload.
        """

    def search_documents_batch(
        self, collection: str, vectors: Sequence[Sequence[float]], top_k: int, *, hnsw_ef: int | None = None
    ) -> list[list[tuple[Candidate, dict[str, Any]]]]:
        """``search_documents`` for each vector, in order (a store may share work between them)."""
        return [self.search_documents(collection, v, top_k, hnsw_ef=hnsw_ef) for v in vectors]

    @abc.abstractmethod
    def count(self, collection: str) -> int:
        """Exact number of points."""

    @abc.abstractmethod
    def scroll(self, collection: str, *, with_vectors: bool = True, page: int = 256) -> Iterator[StorePoint]:
        """Every point once, with payload (and vectors unless told otherwise)."""

    @abc.abstractmethod
    def aliases(self) -> dict[str, str]:
        """Alias name -> collection name."""

    @abc.abstractmethod
    def point_alias(self, alias: str, collection: str) -> str | None:
        """Point ``alias`` at ``collection`` atomically; return the collection it pointed at before.

        An alias that is the name of a collection is a ``ValueError``.
        """

    def collections(self) -> list[str]:
        """Every collection's name (aliases not included), sorted."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its collections")

    def delete_collection(self, name: str) -> None:
        """Delete the collection ``name`` and its points. A ``ValueError``, with nothing deleted: a missing
        collection, an alias, a collection an alias points at (a server would drop the alias with it)."""
        raise NotImplementedError(f"{type(self).__name__} cannot delete collections")

    def build_index(self, collection: str, hnsw: HnswSettings) -> dict[str, Any]:
        """Build an HNSW index over the collection now; a report of what was built."""
        raise NotImplementedError(f"{type(self).__name__} builds its index itself")

    def close(self) -> None:  # noqa: B027 - most stores hold nothing to release
        """Release files and connections; the store object must not be used afterwards."""

    # -- composed operations --------------------------------------------------------------
    def shrunk_documents(self, collection: str, docs: Mapping[str, int]) -> list[str]:
        """Documents of ``docs`` (``doc_id: n_chunks``) that still have a point at ``n_chunks``.

        Chunks are numbered ``0..n-1``, so exactly those documents were longer before and
        hold stale points: checked by id, O(1) per document.
        """
        if not docs:
            return []
        probe = {point_id(d, n): d for d, n in docs.items()}
        found = self.retrieve(collection, list(probe), with_payload=False, with_vectors=False)
        return sorted(probe[p.id] for p in found)

    def write_batch(self, collection: str, points: Sequence[StorePoint], first_chunks: Mapping[str, int]) -> int:
        """Upsert ``points``, then prune stale chunks of the documents in ``first_chunks``.

        ``first_chunks`` maps each document whose chunk 0 is in ``points`` to its chunk count.
        Returns how many documents lost stale chunks. Only indexes this run never writes
        are deleted, so the order of batches does not matter.
        """
        self.upsert(collection, points)
        shrunk = self.shrunk_documents(collection, first_chunks)
        if shrunk:
            self.delete_chunks_from(collection, {d: first_chunks[d] for d in shrunk})
        return len(shrunk)


def check_vectors(points: Sequence[StorePoint], collection: str, size: int | None = None) -> None:
    """Refuse (``ValueError``, naming the first bad point) a batch with a non-finite vector value, or, when
    ``size`` is given, a vector of another size. A server refuses both; the embedded store would keep NaN and
    rank the point nowhere, so both stores check here, before anything of the batch is written."""
    def where(p: StorePoint) -> str:  # built only for the point refused: this runs on every write
        return f"point {p.id} (doc_id {p.payload.get('doc_id')!r}, chunk_index {p.payload.get('chunk_index')})"

    for p in points:
        vector = p.vector if p.vector is not None else ()
        if size is not None and len(vector) != size:
            raise ValueError(f"{where(p)} has a vector of size {len(vector)}; collection {collection!r} holds vectors "
                             f"of size {size}")  # fmt: skip
        # sum() is one C loop: a NaN or inf anywhere makes it non-finite (finite values that overflow it are
        # told apart by the second look, which runs only then).
        if not math.isfinite(sum(vector)) and not all(math.isfinite(x) for x in vector):
            raise ValueError(f"{where(p)} has a non-finite vector value; nothing of this batch was written to "
                             f"{collection!r}")  # fmt: skip


def model_held(store: VectorStore, name: str) -> str | None:
    """The model whose vectors the collection ``name`` holds: the one it records, else (a collection made
    before stores recorded it) the ``model`` payload of one of its points. None when it holds no point
    (an empty collection takes any model) or neither says."""
    first = next(iter(store.scroll(name, with_vectors=False, page=1)), None)
    if first is None:
        return None
    return store.collection_spec(name).model or first.payload.get("model")


def same_model(a: str, b: str) -> bool:
    """Whether two ``--model`` values name the same model: equal once resolved (a hub id and the local
    folder it stands for, a relative and an absolute path)."""
    from transforms.models.settings import resolve_model  # transformers: only when a model is compared

    return a == b or resolve_model(a) == resolve_model(b)


def group_documents(
    hits: Sequence[tuple[str, float, dict[str, Any]]], top_k: int
) -> list[tuple[Candidate, dict[str, Any]]]:
    """``(doc_id, score, payload)`` chunk hits → the ``top_k`` documents, max score each, ties by ``doc_id``."""
    best: dict[str, tuple[float, dict[str, Any]]] = {}
    for doc_id, score, payload in hits:
        if doc_id not in best or score > best[doc_id][0]:
            best[doc_id] = (score, payload)
    ordered = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top_k]
    return [(Candidate(doc_id=d, score=s, rank=i + 1), p) for i, (d, (s, p)) in enumerate(ordered)]


def open_store(config: QdrantConfig, *, keep_open: bool = False) -> VectorStore:
    """The store ``config`` names: a server (``url``) or the embedded store on disk (``path``).

    ``keep_open`` (embedded only) keeps shards open between calls, for a process that
    owns the store for a while (``search``, ``evaluate``); workers leave it off so other
    processes can take the shards between their writes.
    """
    if config.url:
        from transforms.io.qdrant import ServerStore

        return ServerStore(config)
    from transforms.io.edge_store import EdgeStore

    return EdgeStore(config.path or ".", shards=config.shards, lock_wait_s=config.lock_wait_s, keep_open=keep_open)

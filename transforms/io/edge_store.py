"""The embedded store: Qdrant Edge shards on disk, behind the ``VectorStore`` interface.

Layout of ``--qdrant-path DIR``::

    DIR/aliases.json                 {"aliases": {"live": "docs-2026-11-24"}}, replaced atomically
    DIR/.store.lock                  flock held while collections or aliases are created or switched
    DIR/<collection>/collection.json size, distance, model, settings (the last run's), shards, HNSW build
    DIR/<collection>/shard-000/ ...  one Qdrant Edge shard each (its own segments and WAL)

Guarantees and design:

- **Routing.** A point lives in shard ``sha1(doc_id) % shards`` (its id when the payload has
  no ``doc_id``): every chunk of a document sits in one shard, so the stale-chunk probe and
  its filtered delete touch one shard, and grouping chunks by document never spans shards.
  The shard count is fixed when the collection is created.
- **Many writers.** Each shard's write-ahead log is locked by the process that opened it
  (a second open fails at once with ``WouldBlock``). The index job routes points to shards
  through Beam's shuffle (``GroupByKey`` on the shard number), so each shard is written by
  one worker at a time; a process that still finds a shard locked (another job reading it, a
  retry racing a dying worker) waits with backoff, up to ``lock_wait_s``, then fails with
  ``StoreInUseError`` ("store in use by another process"). Jobs writing different
  collections never share a lock.
- **Durability.** The WAL is always on: an upsert is durable when it returns, a ``kill -9``
  loses nothing that returned, and the next open replays the log. A shard is opened only
  for the duration of one operation (or one shard's share of a job) unless ``keep_open``.
- **Search** queries every shard exactly (``SearchParams(exact=True)``) unless ``hnsw_ef``
  is given, asks each shard for enough chunks to cover ``top_k`` documents, and merges.
- **Old folders.** A folder written by qdrant-client's local mode (``meta.json`` at its
  root) is refused with one line saying what it is and how to reindex.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from transforms.io.store import (
    CollectionSpec,
    HnswSettings,
    StoreInUseError,
    StorePoint,
    VectorStore,
    check_vectors,
    group_documents,
)
from transforms.types import Candidate

_LOG = logging.getLogger(__name__)

FORMAT = "corpus-etl/qdrant-edge-collection"
FORMAT_VERSION = 1
ALIASES_FILE = "aliases.json"
DEFAULT_SHARDS = 4


class LegacyLocalModeError(ValueError):
    """The folder was written by qdrant-client's local mode, which this store cannot read."""


@dataclasses.dataclass(frozen=True)
class CollectionMeta:
    """``DIR/<collection>/collection.json``: fixed at creation except ``hnsw`` (set by an index build) and
    ``model``/``settings`` (``record_collection``: those of the last index run that wrote the collection)."""

    size: int
    shards: int
    distance: str = "Cosine"
    model: str | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    hnsw: dict[str, Any] | None = None
    routing: str = "sha1(doc_id) % shards"
    format: str = FORMAT
    version: int = FORMAT_VERSION


def shard_of(key: str, shards: int) -> int:
    """The shard of a routing key (a doc id): stable across processes, runs and Python versions."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % shards


def routing_key(point: StorePoint) -> str:
    doc_id = point.payload.get("doc_id")
    return str(doc_id) if doc_id is not None else point.id


def _atomic_write_json(path: str, obj: Any) -> None:
    """Write then rename: a reader sees the old file or the new one, never half of one."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_not_legacy(path: str) -> None:
    """Refuse a folder written by qdrant-client's local mode, with the way out."""
    meta = os.path.join(path, "meta.json")
    if os.path.isfile(meta) or os.path.isdir(os.path.join(path, "collection")) and not os.path.isfile(
        os.path.join(path, "collection", "collection.json")
    ):
        try:
            with open(meta) as f:
                names = sorted(json.load(f).get("collections", {}))
        except (OSError, ValueError):
            names = []
        listed = f" (collections: {', '.join(names)})" if names else ""
        raise LegacyLocalModeError(
            f"{path} is a qdrant-client local-mode folder{listed}, the format --qdrant-path used before the "
            f"Qdrant Edge store; it cannot be read any more. Reindex into a new folder: corpus-etl index "
            f"--input ... --collection NAME --qdrant-path NEW_DIR (or move {path} away and rerun index into it)"
        )


class _Slot:
    """One shard path in this process: a lock so threads take turns, and the open shard, if any."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.shard: Any = None
        self.pins = 0


_SLOTS: dict[str, _Slot] = {}
_SLOTS_LOCK = threading.Lock()


def _slot(path: str) -> _Slot:
    with _SLOTS_LOCK:
        return _SLOTS.setdefault(path, _Slot())


def _is_lock_error(exc: BaseException) -> bool:
    return "WouldBlock" in str(exc)


def open_shard(path: str, *, lock_wait_s: float, config: Any = None, sleep=time.sleep) -> Any:
    """``EdgeShard.load`` that waits while another process holds the shard's WAL lock.

    Backoff with jitter from 20 ms to 1 s; after ``lock_wait_s`` the lock error becomes
    ``StoreInUseError``. Any other error is raised at once.
    """
    from qdrant_edge import EdgeShard

    deadline = time.monotonic() + lock_wait_s
    delay = 0.02
    while True:
        try:
            return EdgeShard.load(path, config) if config is not None else EdgeShard.load(path)
        except Exception as exc:  # qdrant_edge raises plain Exception
            if not _is_lock_error(exc):
                raise
            if time.monotonic() >= deadline:
                raise StoreInUseError(
                    f"store in use by another process: {path} stayed locked for {lock_wait_s:.0f}s ({exc})"
                ) from exc
            sleep(random.uniform(delay / 2, delay))
            delay = min(1.0, delay * 2)


class EdgeStore(VectorStore):
    """Collections of Qdrant Edge shards under one folder; see the module docstring."""

    def __init__(
        self, path: str, *, shards: int = DEFAULT_SHARDS, lock_wait_s: float = 300.0, keep_open: bool = False
    ) -> None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        self.path = os.path.abspath(path)
        self.default_shards = shards
        self.lock_wait_s = lock_wait_s
        self.keep_open = keep_open
        self.where = f"edge:{self.path}"
        self._pinned: set[str] = set()
        self._said_exact: set[str] = set()  # collections searched with hnsw_ef but no index (warned once)
        if os.path.isdir(self.path):
            check_not_legacy(self.path)

    # -- files -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _store_lock(self) -> Iterator[None]:
        """Cross-process lock for creating collections and switching aliases (not for writes)."""
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, ".store.lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _collection_dir(self, name: str) -> str:
        if not name or "/" in name or name.startswith(".") or name == ALIASES_FILE:
            raise ValueError(f"invalid collection name {name!r}")
        return os.path.join(self.path, name)

    def aliases(self) -> dict[str, str]:
        try:
            with open(os.path.join(self.path, ALIASES_FILE)) as f:
                return dict(json.load(f)["aliases"])
        except FileNotFoundError:
            return {}

    def resolve(self, name: str) -> str:
        """The collection ``name`` stands for (itself, or the collection an alias points at)."""
        return self.aliases().get(name, name)

    def _is_collection(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self._collection_dir(name), "collection.json"))

    def collection_exists(self, name: str) -> bool:
        return self._is_collection(self.resolve(name))

    def meta(self, name: str) -> CollectionMeta:
        collection = self.resolve(name)
        path = os.path.join(self._collection_dir(collection), "collection.json")
        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            check_not_legacy(self.path)
            raise ValueError(f"collection {name!r} does not exist in {self.path}") from None
        if raw.get("format") != FORMAT:
            raise ValueError(f"{path} is not a corpus-etl collection (format {raw.get('format')!r})")
        return CollectionMeta(**raw)

    def collection_spec(self, name: str) -> CollectionSpec:
        meta = self.meta(name)
        return CollectionSpec(meta.size, model=meta.model, settings=dict(meta.settings))

    def record_collection(self, name: str, spec: CollectionSpec) -> None:
        self._update_meta(name, model=spec.model, settings=dict(spec.settings))

    def _update_meta(self, name: str, **changes: Any) -> None:
        """Rewrite ``collection.json`` with ``changes``, read afresh under the store lock: two updates
        (a recorded run, an HNSW build) never undo each other."""
        collection = self.resolve(name)
        with self._store_lock():
            meta = dataclasses.replace(self.meta(collection), **changes)
            _atomic_write_json(os.path.join(self._collection_dir(collection), "collection.json"), dataclasses.asdict(meta))

    def _shard_paths(self, collection: str, meta: CollectionMeta) -> list[str]:
        folder = self._collection_dir(collection)
        return [os.path.join(folder, f"shard-{i:03d}") for i in range(meta.shards)]

    def _edge_config(self, meta: CollectionMeta, hnsw: HnswSettings | None = None) -> Any:
        from qdrant_edge import (
            Distance,
            EdgeConfig,
            EdgeOptimizersConfig,
            EdgeVectorParams,
            HnswIndexConfig,
        )

        vectors = EdgeVectorParams(size=meta.size, distance=Distance.Cosine)
        if hnsw is None:
            return EdgeConfig(vectors=vectors)
        return EdgeConfig(
            vectors=vectors,
            hnsw_config=HnswIndexConfig(
                m=hnsw.m, ef_construct=hnsw.ef_construct, full_scan_threshold=hnsw.full_scan_threshold_kb
            ),
            optimizers=EdgeOptimizersConfig(indexing_threshold=1),
        )

    # -- shards ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def shard(self, path: str, *, config: Any = None) -> Iterator[Any]:
        """The open shard at ``path``, held by this thread for the block.

        Opened here unless this process already has it open; closed at the end of the block
        unless the store (or another store of this process) keeps it open.
        """
        slot = _slot(path)
        with slot.lock:
            if slot.shard is None:
                slot.shard = open_shard(path, lock_wait_s=self.lock_wait_s, config=config)
            try:
                yield slot.shard
            finally:
                if self.keep_open and path not in self._pinned:
                    self._pinned.add(path)
                    slot.pins += 1
                if slot.pins == 0 and slot.shard is not None:
                    shard, slot.shard = slot.shard, None
                    shard.close()

    def _shards(self, name: str) -> tuple[str, CollectionMeta, list[str]]:
        collection = self.resolve(name)
        meta = self.meta(collection)
        return collection, meta, self._shard_paths(collection, meta)

    def close(self) -> None:
        for path in sorted(self._pinned):
            slot = _slot(path)
            with slot.lock:
                slot.pins -= 1
                if slot.pins == 0 and slot.shard is not None:
                    shard, slot.shard = slot.shard, None
                    shard.close()
        self._pinned.clear()

    # -- collections -----------------------------------------------------------------------
    def ensure_collection(self, name: str, spec: CollectionSpec, *, create: bool = True) -> bool:
        if self.collection_exists(name):
            meta = self.meta(name)
            if meta.size != spec.size or meta.distance != "Cosine":
                raise ValueError(
                    f"collection {name!r} exists with size {meta.size} and distance {meta.distance}; "
                    f"this job's vectors have size {spec.size} (Cosine). Use another --collection, or a --dim that matches."
                )
            return False
        if not create:
            check_not_legacy(self.path)
            raise ValueError(f"collection {name!r} does not exist")
        return self.create_collection(name, spec, shards=self.default_shards)

    def create_collection(self, name: str, spec: CollectionSpec, *, shards: int) -> bool:
        """Create the collection's folder, shards (with payload indexes) and config; False when it exists."""
        from qdrant_edge import EdgeShard, PayloadSchemaType, UpdateOperation

        with self._store_lock():
            if name in self.aliases():
                raise ValueError(f"{name!r} is an alias; a collection cannot take its name")
            if self._is_collection(name):
                return False
            folder = self._collection_dir(name)
            if os.path.exists(folder):  # a creation that died half-way: nothing was written into it
                shutil.rmtree(folder)
            meta = CollectionMeta(size=spec.size, shards=shards, model=spec.model, settings=dict(spec.settings))
            building = folder + f".creating-{uuid.uuid4().hex[:8]}"
            os.makedirs(building)
            for i in range(shards):
                shard = EdgeShard.create(os.path.join(building, f"shard-{i:03d}"), self._edge_config(meta))
                shard.update(UpdateOperation.create_field_index("doc_id", PayloadSchemaType.Keyword))
                shard.update(UpdateOperation.create_field_index("chunk_index", PayloadSchemaType.Integer))
                shard.close()
            _atomic_write_json(os.path.join(building, "collection.json"), dataclasses.asdict(meta))
            os.replace(building, folder)
            return True

    def collections(self) -> list[str]:
        if not os.path.isdir(self.path):
            return []
        return sorted(n for n in os.listdir(self.path) if not n.startswith(".") and n != ALIASES_FILE
                      and self._is_collection(n))  # fmt: skip

    def delete_collection(self, name: str) -> None:
        """Renamed out of sight under the store lock (one step: no reader sees half a collection), then removed.

        A collection an alias points at is refused (``ValueError``); a process still writing
        it keeps writing into the removed files, as a server drops a deleted collection's writes.
        """
        with self._store_lock():
            if name in self.aliases():
                raise ValueError(f"{name!r} is an alias, not a collection")
            if not self._is_collection(name):
                raise ValueError(f"collection {name!r} does not exist")
            pointing = sorted(a for a, c in self.aliases().items() if c == name)
            if pointing:
                raise ValueError(f"collection {name!r} is the target of alias(es) {', '.join(pointing)}")
            doomed = os.path.join(self.path, f".deleting-{name}-{uuid.uuid4().hex[:8]}")
            os.replace(self._collection_dir(name), doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def point_alias(self, alias: str, collection: str) -> str | None:
        with self._store_lock():
            if self._is_collection(alias):
                raise ValueError(f"--alias {alias!r} is the name of a collection, not an alias")
            if not self._is_collection(collection):
                raise ValueError(f"collection {collection!r} does not exist")
            aliases = self.aliases()
            previous = aliases.get(alias)
            aliases[alias] = collection
            _atomic_write_json(os.path.join(self.path, ALIASES_FILE), {"aliases": dict(sorted(aliases.items()))})
            return previous

    # -- points ----------------------------------------------------------------------------
    @staticmethod
    def to_edge_points(points: Sequence[StorePoint]) -> list[Any]:
        from qdrant_edge import Point

        return [Point(p.id, p.vector if isinstance(p.vector, list) else list(p.vector or ()), p.payload) for p in points]

    def upsert(self, collection: str, points: Sequence[StorePoint]) -> None:
        _, meta, paths = self._shards(collection)
        check_vectors(points, collection, meta.size)  # before any shard is written
        by_shard: dict[int, list[StorePoint]] = {}
        for p in points:
            by_shard.setdefault(shard_of(routing_key(p), meta.shards), []).append(p)
        for i in sorted(by_shard):
            with self.shard(paths[i]) as shard:
                self.upsert_into(shard, by_shard[i])

    @classmethod
    def upsert_into(cls, shard: Any, points: Sequence[StorePoint]) -> None:
        from qdrant_edge import UpdateOperation

        if points:
            shard.update(UpdateOperation.upsert_points(cls.to_edge_points(points)))

    @staticmethod
    def _record(r: Any, with_vectors: bool) -> StorePoint:
        vector = r.vector if with_vectors else None
        if isinstance(vector, dict):  # named vectors: ours is the default ""
            vector = vector.get("")
        return StorePoint(str(r.id), list(vector) if vector is not None else None, dict(r.payload or {}))

    def retrieve(
        self, collection: str, ids: Sequence[str], *, with_payload: bool = True, with_vectors: bool = False
    ) -> list[StorePoint]:
        _, _, paths = self._shards(collection)
        out: list[StorePoint] = []
        if not ids:
            return out
        for path in paths:
            with self.shard(path) as shard:
                out += self.retrieve_from(shard, ids, with_payload=with_payload, with_vectors=with_vectors)
        return out

    @classmethod
    def retrieve_from(cls, shard: Any, ids: Sequence[str], *, with_payload: bool, with_vectors: bool) -> list[StorePoint]:
        records = shard.retrieve(list(ids), with_payload=with_payload, with_vector=with_vectors)
        return [cls._record(r, with_vectors) for r in records]

    @staticmethod
    def stale_filter(docs: Mapping[str, int]) -> Any:
        from qdrant_edge import FieldCondition, Filter, MatchValue, RangeFloat

        return Filter(
            should=[
                Filter(
                    must=[
                        FieldCondition(key="doc_id", match=MatchValue(d)),
                        FieldCondition(key="chunk_index", range=RangeFloat(gte=float(n))),
                    ]
                )
                for d, n in sorted(docs.items())
            ]
        )

    def delete_chunks_from(self, collection: str, docs: Mapping[str, int]) -> None:
        from qdrant_edge import UpdateOperation

        _, meta, paths = self._shards(collection)
        by_shard: dict[int, dict[str, int]] = {}
        for d, n in docs.items():
            by_shard.setdefault(shard_of(d, meta.shards), {})[d] = n
        for i in sorted(by_shard):
            with self.shard(paths[i]) as shard:
                shard.update(UpdateOperation.delete_points_by_filter(self.stale_filter(by_shard[i])))

    def write_shard(
        self, shard: Any, points: Sequence[StorePoint], first_chunks: Mapping[str, int], *, collection: str, size: int
    ) -> int:
        """``write_batch`` within one open shard (every point and document of the batch routes to it) of
        ``collection``, whose vectors have ``size`` (``check_vectors``: the batch is refused before any write)."""
        from qdrant_edge import UpdateOperation

        from transforms.types import point_id

        check_vectors(points, collection, size)
        self.upsert_into(shard, points)
        if not first_chunks:
            return 0
        probe = {point_id(d, n): d for d, n in first_chunks.items()}
        found = self.retrieve_from(shard, list(probe), with_payload=False, with_vectors=False)
        shrunk = sorted(probe[p.id] for p in found)
        if shrunk:
            shard.update(UpdateOperation.delete_points_by_filter(self.stale_filter({d: first_chunks[d] for d in shrunk})))
        return len(shrunk)

    def count(self, collection: str) -> int:
        from qdrant_edge import CountRequest

        _, _, paths = self._shards(collection)
        total = 0
        for path in paths:
            with self.shard(path) as shard:
                total += shard.count(CountRequest(exact=True))
        return total

    def scroll(self, collection: str, *, with_vectors: bool = True, page: int = 256) -> Iterator[StorePoint]:
        from qdrant_edge import ScrollRequest

        _, _, paths = self._shards(collection)
        for path in paths:
            offset = None
            while True:
                with self.shard(path) as shard:
                    records, offset = shard.scroll(
                        ScrollRequest(offset=offset, limit=page, with_payload=True, with_vector=with_vectors)
                    )
                for r in records:
                    yield self._record(r, with_vectors)
                if offset is None:
                    break

    def search_documents(
        self, collection: str, vector: Sequence[float], top_k: int, *, hnsw_ef: int | None = None
    ) -> list[tuple[Candidate, dict[str, Any]]]:
        """Exact (unless ``hnsw_ef``) top documents over every shard.

        Each shard returns its top ``limit`` chunks; when they cover fewer than ``top_k``
        documents and the shard may hold more, the limit doubles. A document's best chunk is
        within its shard's top chunks whenever the document is in the global top ``top_k``,
        so the merge is exact.
        """
        return self.search_documents_batch(collection, [vector], top_k, hnsw_ef=hnsw_ef)[0]

    def search_documents_batch(
        self, collection: str, vectors: Sequence[Sequence[float]], top_k: int, *, hnsw_ef: int | None = None
    ) -> list[list[tuple[Candidate, dict[str, Any]]]]:
        """``search_documents`` for many queries, opening each shard once for all of them."""
        from qdrant_edge import SearchParams

        name, meta, paths = self._shards(collection)
        if hnsw_ef and meta.hnsw is None and name not in self._said_exact:
            # Qdrant falls back to a full scan without an index: the results are exact, not what ef asks.
            self._said_exact.add(name)
            _LOG.warning("hnsw_ef %d: collection %r has no HNSW index (index it with --hnsw); this search is exact",
                         hnsw_ef, name)
        params = SearchParams(hnsw_ef=hnsw_ef) if hnsw_ef else SearchParams(exact=True)
        queries = [[float(x) for x in v] for v in vectors]
        hits: list[list[tuple[str, float, dict[str, Any]]]] = [[] for _ in queries]
        for path in paths:
            with self.shard(path) as shard:
                for i, query in enumerate(queries):
                    hits[i] += self._search_shard(shard, query, top_k, params)
        return [group_documents(h, top_k) for h in hits]

    @staticmethod
    def _search_shard(shard: Any, query: list[float], top_k: int, params: Any) -> list[tuple[str, float, dict[str, Any]]]:
        from qdrant_edge import Query, QueryRequest

        limit = max(4 * top_k, 32)
        while True:
            found = shard.query(QueryRequest(limit=limit, query=Query.Nearest(query), with_payload=True, params=params))
            # A point without a doc_id (another tool wrote it) is no document, as a server's grouping skips it.
            hits = [(str(doc), float(p.score), dict(p.payload or {})) for p in found
                    if (doc := (p.payload or {}).get("doc_id")) is not None]  # fmt: skip
            if len({d for d, _, _ in hits}) >= top_k or len(found) < limit:
                break
            limit *= 2
        return hits

    def build_index(self, collection: str, hnsw: HnswSettings) -> dict[str, Any]:
        """Build HNSW on every shard (``optimize``), then record it in ``collection.json``.

        A kill during the build keeps every point (the build only adds index segments); a
        rerun builds again. Returns the settings, the indexed vector count and the seconds taken.
        """
        name, meta, paths = self._shards(collection)
        started = time.perf_counter()
        indexed = 0
        config = self._edge_config(meta, hnsw)
        for path in paths:
            with self.shard(path, config=config) as shard:
                shard.optimize()
                indexed += shard.info().indexed_vectors_count
        seconds = time.perf_counter() - started
        report = {"m": hnsw.m, "ef_construct": hnsw.ef_construct, "indexed_vectors": indexed, "seconds": round(seconds, 2)}
        self._update_meta(name, hnsw={"m": hnsw.m, "ef_construct": hnsw.ef_construct})
        return report

"""Incremental reindexing: embed only the chunks whose vector would change.

Every point carries a ``fingerprint`` of everything its vector depends on: the text the
model reads (title prefix included) and the embedding settings (model id and revision,
``--dim``, maximum length, chunking). Before embedding, ``SkipUnchanged`` looks up each
document's points by id (one batched ``retrieve`` per few thousand chunks: the cost follows
the documents in the input, never the collection; 2,048 chunks a lookup: with 256, the
5,000-document incremental run of ``bench/reindex.py`` took 32.1 s instead of 22.2 s, each
lookup opening the embedded store's shards) and sorts its chunks:

=====================  ===========================================  ============================
stored point           what happens                                 counted as
=====================  ===========================================  ============================
same fingerprint and   nothing: the point is left as it is          ``chunks_reused``
same payload
same fingerprint,      re-written with its stored vector (e.g. a    ``chunks_reused``,
other payload          metadata column changed): no embedding       ``payloads_updated``
other fingerprint, or  embedded and written                         ``chunks_embedded``
no point
=====================  ===========================================  ============================

A document whose every chunk is left as it is (reused, none re-written) is
``documents_unchanged``: a document whose only change is its payload (a metadata column)
is not, and its re-written chunks are ``payloads_updated``. For every document of
the input, points with ``chunk_index >= n_chunks`` are deleted (one filtered delete per
batch of documents), so a reindexed document holds exactly its new chunks whatever gaps
or leftovers an earlier crashed or partial run left. ``force=True`` embeds everything. A point an earlier version wrote, whose fingerprint
holds the older form of the model's revision (``pipelines.index.legacy_digest``), counts
as the same fingerprint when it is the one that version would give the chunk now: it is
re-written with its stored vector and this version's fingerprint, once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.types import Chunk, EmbeddedChunk

REUSED = "reused"


def settings_digest(settings: Mapping[str, Any]) -> str:
    """A short digest of the embedding settings (sorted JSON), the shared half of every fingerprint."""
    blob = json.dumps(dict(settings), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def fingerprint(embed_text: str, digest: str) -> str:
    """What a chunk's vector depends on: its model input and the settings (``settings_digest``)."""
    return hashlib.sha256(f"{digest}\n{embed_text}".encode()).hexdigest()[:32]


class _SkipUnchanged(beam.DoFn):
    """Chunks → chunks to embed (main) and stored-vector ``EmbeddedChunk`` s to re-write (``reused``)."""

    def __init__(
        self,
        open_store: Callable[[], Any],
        collection: str,
        payload_of: Callable[[Chunk], dict[str, Any]],
        *,
        batch_chunks: int = 2048,
        force: bool = False,
        legacy_digest: str | None = None,
    ) -> None:
        self.open_store = open_store
        self.collection = collection
        self.payload_of = payload_of
        self.batch_chunks = batch_chunks
        self.force = force
        self.legacy_digest = legacy_digest
        self.unchanged = Metrics.counter("corpus_etl", "documents_unchanged")
        self.reused = Metrics.counter("corpus_etl", "chunks_reused")
        self.to_embed = Metrics.counter("corpus_etl", "chunks_embedded")
        self.payloads = Metrics.counter("corpus_etl", "payloads_updated")

    def setup(self) -> None:
        self.store = self.open_store()

    def start_bundle(self) -> None:
        self.buffer: list[Chunk] = []

    def process(self, chunk: Chunk):
        # A document's chunks arrive one after another (one chunker call): cut only between
        # documents, so each document is judged whole.
        if chunk.chunk_index == 0 and len(self.buffer) >= self.batch_chunks:
            yield from self._flush()
        self.buffer.append(chunk)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        # finish_bundle has no element window: the job runs in the global window (batch).
        for out in self._flush():
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
            else:
                yield GlobalWindows.windowed_value(out)

    def _flush(self):
        chunks, self.buffer = self.buffer, []
        if not chunks:
            return
        docs = {c.doc_id: c.n_chunks for c in chunks}
        # Exact chunk sets, gaps included. Deletes by filter and lookups are idempotent: a server's transient
        # error is retried here, as the writer retries its batches, rather than failing the bundle.
        _retrying(lambda: self.store.delete_chunks_from(self.collection, docs))
        if self.force:
            self.to_embed.inc(len(chunks))
            yield from chunks
            return
        ids = [c.point_id for c in chunks]
        stored = {p.id: p.payload for p in _retrying(lambda: self.store.retrieve(self.collection, ids))}
        rewrite: list[Chunk] = []
        changed_docs: set[str] = set()
        for chunk in chunks:
            want = self.payload_of(chunk)
            have = stored.get(chunk.point_id)
            wanted_fp = want.get("fingerprint")  # None: no settings digest, nothing can be proven unchanged
            if have is None or wanted_fp is None or not self._same(chunk, have.get("fingerprint"), wanted_fp):
                changed_docs.add(chunk.doc_id)
                self.to_embed.inc()
                yield chunk
            elif have != want:
                changed_docs.add(chunk.doc_id)  # re-written: not unchanged, though nothing is embedded
                rewrite.append(chunk)
            else:
                self.reused.inc()
        if rewrite:  # same vector, other payload: write the stored vector back with the new payload
            again = [c.point_id for c in rewrite]
            vectors = {
                p.id: p.vector
                for p in _retrying(lambda: self.store.retrieve(self.collection, again, with_vectors=True))
            }
            for chunk in rewrite:
                self.reused.inc()
                self.payloads.inc()
                yield beam.pvalue.TaggedOutput(REUSED, EmbeddedChunk(chunk, tuple(vectors[chunk.point_id])))
        self.unchanged.inc(sum(1 for d in docs if d not in changed_docs))

    def _same(self, chunk: Chunk, have: Any, want: str) -> bool:
        """Whether the stored fingerprint proves the stored vector is this chunk's: it is the one wanted, or
        the one an earlier version gave it (``legacy_digest``: re-written, since the payload differs)."""
        return have == want or (self.legacy_digest is not None and have == fingerprint(chunk.embed_text,
                                                                                          self.legacy_digest))


def _retrying(fn: Callable[[], Any]) -> Any:
    """``fn()``, a transient store error retried with backoff (``transforms.io.qdrant.with_retries``)."""
    from transforms.io.qdrant import with_retries  # that module imports this one

    return with_retries(fn)


class SkipUnchanged(beam.PTransform):
    """``Chunk`` → ``{"to_embed": Chunk, "reused": EmbeddedChunk}``; see the module docstring."""

    def __init__(
        self,
        open_store: Callable[[], Any],
        collection: str,
        payload_of: Callable[[Chunk], dict[str, Any]],
        *,
        force: bool = False,
        batch_chunks: int = 2048,
        legacy_digest: str | None = None,
    ) -> None:
        super().__init__()
        self.args = (open_store, collection, payload_of)
        self.force, self.batch_chunks, self.legacy_digest = force, batch_chunks, legacy_digest

    def expand(self, chunks):
        out = chunks | "LookUpStoredPoints" >> beam.ParDo(
            _SkipUnchanged(*self.args, batch_chunks=self.batch_chunks, force=self.force,
                           legacy_digest=self.legacy_digest)
        ).with_outputs(REUSED, main="to_embed")
        return {"to_embed": out.to_embed, REUSED: out[REUSED]}


def missing_documents(stored_doc_ids: Sequence[str], held_doc_ids: set[str]) -> list[str]:
    """Documents in the collection that this run's input does not hold (``--delete-missing``), sorted.

    ``held_doc_ids``: the id of every row read, whether it became a document or a dead letter.
    """
    return sorted(set(stored_doc_ids) - held_doc_ids)

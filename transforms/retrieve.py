"""First-stage candidates for queries: from the Qdrant index, or from a TREC run file + corpus.

Both paths end in the same records: ``RerankPair`` (query, document text, first-stage
score and 1-based rank), one per (query, document), at most ``top_k`` per query.

From the index, the query is embedded with the model's query prompt (as ``search``
does) and chunk hits are grouped by ``doc_id`` by the store (max score per document); the
document text given to the reranker is its best-matching chunk, title first, which is
what the first stage actually matched.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.embed import Embed, EmbeddingModelHandler
from transforms.qdrant import QdrantConfig
from transforms.read import DEAD
from transforms.types import Candidate, DeadLetter, Document, Query, RerankPair


def candidate_text(payload: dict[str, Any]) -> str:
    title = payload.get("title")
    text = payload.get("text", "")
    return f"{title}\n{text}" if title else text


class _SearchIndex(beam.DoFn):
    """Searches queries in batches of ``BATCH`` (and at the end of a bundle).

    The embedded store opens each shard once per batch and releases it after, so worker
    processes take turns on the shards without holding them across bundles.
    """

    BATCH = 64

    def __init__(self, qdrant: QdrantConfig, collection: str, top_k: int) -> None:
        self.qdrant = qdrant
        self.collection = collection
        self.top_k = top_k
        self.no_hits = Metrics.counter("corpus_etl", "queries_without_candidates")
        self.candidates = Metrics.counter("corpus_etl", "candidates")
        self.search_ms = Metrics.counter("corpus_etl", "search_ms")

    def setup(self) -> None:
        from transforms.store import open_store

        self.store = open_store(self.qdrant)

    def teardown(self) -> None:
        self.store.close()

    def start_bundle(self) -> None:
        self.pending: list[tuple[Query, Any, Any, Any]] = []

    def process(self, element: tuple[Query, Any], window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        query, vector = element
        self.pending.append((query, vector, window, timestamp))
        if len(self.pending) >= self.BATCH:
            for pair, _, _ in self._flush():
                yield pair

    def finish_bundle(self):
        from apache_beam.utils.windowed_value import WindowedValue

        for pair, window, timestamp in self._flush():
            yield WindowedValue(pair, timestamp, [window])

    def _flush(self) -> list[tuple[RerankPair, Any, Any]]:
        pending, self.pending = self.pending, []
        if not pending:
            return []
        started = time.perf_counter()
        results = self.store.search_documents_batch(self.collection, [v for _, v, _, _ in pending], self.top_k)
        self.search_ms.inc(int((time.perf_counter() - started) * 1000))
        out = []
        for (query, _, window, timestamp), hits in zip(pending, results):
            if not hits:
                self.no_hits.inc()
            self.candidates.inc(len(hits))
            for cand, payload in hits:
                pair = RerankPair(query.query_id, query.text, cand.doc_id, candidate_text(payload), cand.score, cand.rank)
                out.append((pair, window, timestamp))
        return out


class RetrieveFromIndex(beam.PTransform):
    """``Query`` → ``RerankPair`` for the ``top_k`` documents of the collection (+ dead letters)."""

    def __init__(self, handler: EmbeddingModelHandler, qdrant: QdrantConfig, collection: str, top_k: int) -> None:
        super().__init__()
        self.handler, self.qdrant, self.collection, self.top_k = handler, qdrant, collection, top_k

    def expand(self, queries):
        embedded = queries | "EmbedQueries" >> Embed(self.handler)
        pairs = embedded["embedded"] | "SearchIndex" >> beam.ParDo(_SearchIndex(self.qdrant, self.collection, self.top_k))
        return {"pairs": pairs, DEAD: embedded[DEAD]}


# -- from a run file --------------------------------------------------------------------------
def parse_run_line(line: str) -> tuple[str, Candidate] | str:
    """A TREC run line ``qid Q0 docid rank score tag`` → ``(qid, Candidate)``, or the reason it is not one."""
    parts = line.split()
    if len(parts) != 6:
        return f"expected 6 fields 'qid Q0 docid rank score tag', got {len(parts)}"
    qid, _, doc_id, rank, score, _ = parts
    try:
        return qid, Candidate(doc_id=doc_id, score=float(score), rank=int(rank))
    except ValueError:
        return f"rank {rank!r} or score {score!r} is not a number"


class _ParseRun(beam.DoFn):
    def __init__(self, path: str) -> None:
        self.path = path

    def process(self, line: str):
        if not line.strip():
            return
        parsed = parse_run_line(line)
        if isinstance(parsed, str):
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter.of("candidates", parsed, self.path, {"line": line}))
        else:
            yield parsed


def top_candidates(candidates: Iterable[Candidate], top_k: int) -> list[Candidate]:
    """The run's ``top_k`` per query, by its rank (then score, doc id), renumbered 1..k; one per doc."""
    best: dict[str, Candidate] = {}
    for c in sorted(candidates, key=lambda c: (c.rank, -c.score, c.doc_id)):
        best.setdefault(c.doc_id, c)
    ordered = sorted(best.values(), key=lambda c: (c.rank, -c.score, c.doc_id))[:top_k]
    return [Candidate(c.doc_id, c.score, i + 1) for i, c in enumerate(ordered)]


def _query_candidates(element: tuple[str, dict[str, list]], top_k: int):
    qid, grouped = element
    queries, candidates = grouped["query"], grouped["candidates"]
    if not queries:
        return  # the run has queries the (sampled) log does not: not ours to label
    query = queries[0]
    for cand in top_candidates(candidates, top_k):
        yield cand.doc_id, (query, cand)


class _JoinDocuments(beam.DoFn):
    def __init__(self, corpus: str) -> None:
        self.corpus = corpus
        self.missing = Metrics.counter("corpus_etl", "candidates_missing_from_corpus")

    def process(self, element: tuple[str, dict[str, list]]):
        doc_id, grouped = element
        docs: list[Document] = grouped["doc"]
        for query, cand in grouped["wanted"]:
            if not docs:
                self.missing.inc()
                yield beam.pvalue.TaggedOutput(
                    DEAD,
                    DeadLetter.of(
                        "candidates", f"candidate {doc_id!r} is not in the corpus {self.corpus}", query.query_id,
                        {"query_id": query.query_id, "doc_id": doc_id, "rank": cand.rank},
                    ),
                )
                continue
            doc = docs[0]
            text = f"{doc.title}\n{doc.text}" if doc.title else doc.text
            yield RerankPair(query.query_id, query.text, doc_id, text, cand.score, cand.rank)


class RetrieveFromRun(beam.PTransform):
    """``Query`` + a TREC run file + corpus ``Document`` s → ``RerankPair`` (+ dead letters).

    Run lines are matched to queries by query id (the log must carry the ids the run uses)
    and to documents by doc id; a candidate missing from the corpus is a dead letter.
    """

    def __init__(self, run_file: str, documents: beam.PCollection, corpus: str, top_k: int) -> None:
        super().__init__()
        self.run_file, self.documents, self.corpus, self.top_k = run_file, documents, corpus, top_k

    def expand(self, queries):
        p = queries.pipeline
        run = (
            p
            | "ReadRun" >> beam.io.ReadFromText(self.run_file)
            | "ParseRun" >> beam.ParDo(_ParseRun(self.run_file)).with_outputs(DEAD, main="candidates")
        )
        top_k = self.top_k
        wanted = (
            {"query": queries | "KeyQueries" >> beam.WithKeys(lambda q: q.query_id), "candidates": run.candidates}
            | "JoinQueries" >> beam.CoGroupByKey()
            | "TopK" >> beam.FlatMap(_query_candidates, top_k)
        )
        joined = (
            {"doc": self.documents | "KeyDocs" >> beam.WithKeys(lambda d: d.doc_id), "wanted": wanted}
            | "JoinDocuments" >> beam.CoGroupByKey()
            | "Pairs" >> beam.ParDo(_JoinDocuments(self.corpus)).with_outputs(DEAD, main="pairs")
        )
        dead = (run[DEAD], joined[DEAD]) | "FlattenDead" >> beam.Flatten()
        return {"pairs": joined.pairs, DEAD: dead}

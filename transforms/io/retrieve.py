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
from collections.abc import Iterable, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.inference.embed import Embed, EmbeddingModelHandler
from transforms.io.qdrant import QdrantConfig
from transforms.types import DEAD, Candidate, DeadLetter, Document, Query, RerankPair, titled_text


def candidate_text(payload: dict[str, Any]) -> str:
    return titled_text(payload.get("title"), payload.get("text", ""))


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
        from transforms.io.store import open_store

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
    """``Query`` → ``RerankPair`` for the ``top_k`` documents of the collection (+ dead letters).

    ``embed_hints``: Beam resource hints (e.g. an accelerator) for the query embedding alone;
    the search step carries none.
    """

    def __init__(
        self, handler: EmbeddingModelHandler, qdrant: QdrantConfig, collection: str, top_k: int,
        embed_hints: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.handler, self.qdrant, self.collection, self.top_k = handler, qdrant, collection, top_k
        self.embed_hints = dict(embed_hints or {})

    def expand(self, queries):
        embed = Embed(self.handler)
        if self.embed_hints:
            embed = embed.with_resource_hints(**self.embed_hints)
        embedded = queries | "EmbedQueries" >> embed
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
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter.of("run", parsed, self.path, {"line": line}))
        else:
            yield parsed


def top_candidates(candidates: Iterable[Candidate], top_k: int) -> list[Candidate]:
    """The run's ``top_k`` per query, by its rank (then score, doc id), renumbered 1..k; one per doc."""
    best: dict[str, Candidate] = {}
    for c in sorted(candidates, key=lambda c: (c.rank, -c.score, c.doc_id)):
        best.setdefault(c.doc_id, c)
    ordered = sorted(best.values(), key=lambda c: (c.rank, -c.score, c.doc_id))[:top_k]
    return [Candidate(c.doc_id, c.score, i + 1) for i, c in enumerate(ordered)]


class _QueryCandidates(beam.DoFn):
    """A query's run lines → its top-k ``(doc_id, (query, candidate))``; run lines of a query
    that is not among the log's valid queries → one dead letter for the query id."""

    def __init__(self, top_k: int, run_file: str) -> None:
        self.top_k, self.run_file = top_k, run_file
        self.unknown = Metrics.counter("corpus_etl", "run_queries_not_in_log")

    def process(self, element: tuple[str, dict[str, list]]):
        qid, grouped = element
        queries, candidates = grouped["query"], grouped["candidates"]
        if queries:
            for cand in top_candidates(candidates, self.top_k):
                yield cand.doc_id, (queries[0], cand)
        elif candidates and not grouped["known"]:
            self.unknown.inc()
            yield beam.pvalue.TaggedOutput(
                DEAD,
                DeadLetter.of(
                    "run",
                    f"run lists a query that is not in the log: query id {qid!r} ({len(candidates)} lines)",
                    self.run_file,
                    {"query_id": qid, "lines": len(candidates)},
                ),
            )
        # else: a log query left out by --max-queries/--sample, or a query without run lines
        # (the label step reports it with its reason)


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
                        "candidates", f"candidate not in the corpus: {doc_id!r} is not in {self.corpus}", query.query_id,
                        {"query_id": query.query_id, "doc_id": doc_id, "rank": cand.rank},
                    ),
                )
                continue
            doc = docs[0]
            text = titled_text(doc.title, doc.text)
            yield RerankPair(query.query_id, query.text, doc_id, text, cand.score, cand.rank)


class RetrieveFromRun(beam.PTransform):
    """``Query`` + a TREC run file + corpus ``Document`` s → ``RerankPair`` (+ dead letters).

    Run lines are matched to queries by query id (the log must carry the ids the run uses)
    and to documents by doc id. Dead letters: a malformed run line; a candidate missing from
    the corpus (one per candidate); the run lines of a query id that is not among
    ``known_ids`` (the log's valid query ids, before sampling), one per query id.
    """

    def __init__(
        self, run_file: str, documents: beam.PCollection, corpus: str, top_k: int, known_ids: beam.PCollection
    ) -> None:
        super().__init__()
        self.run_file, self.documents, self.corpus, self.top_k = run_file, documents, corpus, top_k
        self.known_ids = known_ids

    def expand(self, queries):
        p = queries.pipeline
        run = (
            p
            # validate=False: matched when the job runs (the driver, or a template's LaunchChecks, checked it)
            | "ReadRun" >> beam.io.ReadFromText(self.run_file, validate=False)
            | "ParseRun" >> beam.ParDo(_ParseRun(self.run_file)).with_outputs(DEAD, main="candidates")
        )
        wanted = (
            {
                "query": queries | "KeyQueries" >> beam.WithKeys(lambda q: q.query_id),
                "candidates": run.candidates,
                "known": self.known_ids | "KeyKnown" >> beam.Map(lambda qid: (qid, True)),
            }
            | "JoinQueries" >> beam.CoGroupByKey()
            | "TopK" >> beam.ParDo(_QueryCandidates(self.top_k, self.run_file)).with_outputs(DEAD, main="wanted")
        )
        joined = (
            {"doc": self.documents | "KeyDocs" >> beam.WithKeys(lambda d: d.doc_id), "wanted": wanted.wanted}
            | "JoinDocuments" >> beam.CoGroupByKey()
            | "Pairs" >> beam.ParDo(_JoinDocuments(self.corpus)).with_outputs(DEAD, main="pairs")
        )
        dead = (run[DEAD], wanted[DEAD]) | "FlattenDead" >> beam.Flatten()
        return {"pairs": joined.pairs, "unknown_candidates": joined[DEAD], DEAD: dead}

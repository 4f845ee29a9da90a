"""First-stage candidates for queries: from the Qdrant index, or from a TREC run file + corpus.

Both paths end in the same records: ``RerankPair`` (query, document text, first-stage
score and 1-based rank), one per (query, document), at most ``top_k`` per query.

From the index, the query is embedded with the model's query prompt (as ``search``
does) and chunk hits are grouped by ``doc_id`` by the store (max score per document); the
document text given to the reranker is its best-matching chunk, title first, which is
what the first stage actually matched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.inference.embed import Embed, EmbeddingModelHandler
from transforms.io.qdrant import QdrantConfig, with_retries
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
        vectors = [v for _, v, _, _ in pending]
        # A search is idempotent: a server's transient error (503, a reset connection) is retried, not the bundle
        results = with_retries(lambda: self.store.search_documents_batch(self.collection, vectors, self.top_k))
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
# A run line as the job carries it: the query id it is listed under, and its candidate.
RunLine = tuple[str, Candidate]


def parse_run_line(line: str) -> RunLine | str:
    """A TREC run line ``qid Q0 docid rank score tag`` → ``(qid, Candidate)``, or the reason it is not one.

    The rank must be an integer and the score a finite number: a NaN or infinite score has
    no place in the order (``run_order``) nor in the written outputs, so its line is refused
    alone and the query's other lines still serve it.
    """
    parts = line.split()
    if len(parts) != 6:
        return f"expected 6 fields 'qid Q0 docid rank score tag', got {len(parts)}"
    qid, _, doc_id, rank, score, _ = parts
    try:
        candidate = Candidate(doc_id=doc_id, score=float(score), rank=int(rank))
    except ValueError:
        return f"rank {rank!r} or score {score!r} is not a number"
    if not math.isfinite(candidate.score):
        return f"non-finite score: {score!r} for document {doc_id!r} of query id {qid!r}"
    return qid, candidate


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


def run_order(candidate: Candidate) -> tuple[float, int, str]:
    """A run's order of a query's lines, best first, as trec_eval and ir_measures read a run:
    score descending; the rank column only breaks ties between equal scores, then the doc id.
    So a run whose rank column disagrees with its scores is taken in the order of its scores."""
    return (-candidate.score, candidate.rank, candidate.doc_id)


def best_lines(lines: Iterable[RunLine]) -> tuple[list[RunLine], list[tuple[RunLine, list[RunLine]]]]:
    """One query's run lines (pooled over every id the log gives it) → ``(best, duplicates)``.

    ``best``: each document's best line by ``run_order``, in that order. ``duplicates``: for
    each document listed more than once, ``(its best line, its other lines in run order)``,
    by doc id. Lines equal by ``run_order`` go by the query id they are listed under.
    """
    by_doc: dict[str, list[RunLine]] = {}
    for line in sorted(lines, key=lambda x: (run_order(x[1]), x[0])):
        by_doc.setdefault(line[1].doc_id, []).append(line)
    best = [listed[0] for listed in by_doc.values()]  # first seen in run order, so in run order
    duplicates = [(listed[0], listed[1:]) for _, listed in sorted(by_doc.items()) if len(listed) > 1]
    return best, duplicates


def _renumbered(best: list[RunLine], top_k: int) -> list[Candidate]:
    return [Candidate(c.doc_id, c.score, i + 1) for i, (_, c) in enumerate(best[:top_k])]


def top_candidates(candidates: Iterable[Candidate], top_k: int) -> list[Candidate]:
    """The ``top_k`` documents of a query's run lines in ``run_order``, one per document (its
    best line, see ``best_lines``), ranks renumbered 1..k: ranks and scores then agree, and
    the first-stage run written from them has ranks 1..n with non-increasing scores."""
    best, _ = best_lines(("", c) for c in candidates)
    return _renumbered(best, top_k)


def _lines(n: int) -> str:
    return f"{n} line" if n == 1 else f"{n} lines"


def _run_letter(run_file: str, reason: str, record: dict[str, Any]) -> beam.pvalue.TaggedOutput:
    # One letter may stand for several run lines: its record's "lines" is what it counts for
    # (datasets.report.dead_letter_count), so run_lines_rejected counts lines.
    return beam.pvalue.TaggedOutput(DEAD, DeadLetter.of("run", reason, run_file, record))


class _AssignRunLines(beam.DoFn):
    """The run lines listed under one query id → ``(id of the log query they serve, line)``,
    or one dead letter for all of them (its record counts the ``lines``).

    A log query answers to every id of the log rows merged into it (``Query.ids``). Lines go
    to the query whose own id they name, else to the one query the id was merged into. Dead
    letters: an id merged into several queries, none keeping it (the log gives it to
    different texts); an id only on log rows or queries that were refused (their dead letters
    say why); an id on no log row at all, "not in the log".
    """

    def __init__(self, run_file: str) -> None:
        self.run_file = run_file
        self.unknown = Metrics.counter("corpus_etl", "run_queries_not_in_log")

    def process(self, element: tuple[str, dict[str, list]]):
        qid, grouped = element
        lines: list[Candidate] = list(grouped["lines"])
        if not lines:
            return
        owners = sorted(set(grouped["owner"]))
        if qid in owners or len(owners) == 1:
            owner = qid if qid in owners else owners[0]
            for candidate in lines:
                yield owner, (qid, candidate)
            return
        n = _lines(len(lines))
        if owners:
            reason = (f"run lists a query id the log gives to several queries: {qid!r} ({n}) was merged into "
                      f"{', '.join(map(repr, owners))}")  # fmt: skip
        elif grouped["in_log"]:
            reason = (f"run lines of a query the log refused: query id {qid!r} ({n}) is only on log rows or "
                      "queries that are dead letters")  # fmt: skip
        else:
            self.unknown.inc()
            reason = f"run lists a query that is not in the log: query id {qid!r} ({n})"
        yield _run_letter(self.run_file, reason, {"query_id": qid, "lines": len(lines)})


class _QueryCandidates(beam.DoFn):
    """A log query's run lines, under any of its ids → its top-k ``(doc_id, (query, candidate))``
    (``best_lines``, ``run_order``, renumbered 1..k). The other lines of a document listed more
    than once are one dead letter per document, counting them. The lines of a query left out
    by --max-queries/--sample are dropped: the query is accounted for as not sampled."""

    def __init__(self, top_k: int, run_file: str) -> None:
        self.top_k, self.run_file = top_k, run_file
        self.duplicates = Metrics.counter("corpus_etl", "run_lines_duplicate")

    def process(self, element: tuple[str, dict[str, list]]):
        _, grouped = element
        if not grouped["query"]:
            return
        query: Query = grouped["query"][0]
        best, duplicates = best_lines(grouped["lines"])
        for (kept_id, kept), others in duplicates:
            self.duplicates.inc(len(others))
            yield _run_letter(
                self.run_file,
                f"duplicate document for the query: {kept.doc_id!r} is listed {len(others) + 1} times for query "
                f"{query.query_id!r}; kept its line with score {kept.score} (rank {kept.rank}, query id {kept_id!r})",
                {"query_id": query.query_id, "doc_id": kept.doc_id, "lines": len(others),
                 "kept": {"query_id": kept_id, "rank": kept.rank, "score": kept.score},
                 "dropped": [{"query_id": q, "rank": c.rank, "score": c.score} for q, c in others]},
            )  # fmt: skip
        for candidate in _renumbered(best, self.top_k):
            yield candidate.doc_id, (query, candidate)


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

    Run lines are matched to queries by query id and to documents by doc id. A query takes
    the lines listed under any id of the log rows merged into it (``_AssignRunLines``); its
    top ``top_k`` documents are by score (``run_order``), one line per document.

    ``log_queries``: the log's de-duplicated queries, before sampling (whose ids the run's are
    matched against); ``log_ids``: every query id on a log row, refused rows' included.
    Dead letters, stage ``"run"`` for lines (each counts the lines it stands for): a malformed
    line (one per line); a duplicate document of a query (one per document); the lines of a
    query id not in the log, of a refused query, or of an id the log gives to several queries
    (one per query id). Stage ``"candidates"``: a candidate missing from the corpus.
    """

    def __init__(
        self, run_file: str, documents: beam.PCollection, corpus: str, top_k: int,
        log_queries: beam.PCollection, log_ids: beam.PCollection,
    ) -> None:
        super().__init__()
        self.run_file, self.documents, self.corpus, self.top_k = run_file, documents, corpus, top_k
        self.log_queries, self.log_ids = log_queries, log_ids

    def expand(self, queries):
        p = queries.pipeline
        run = (
            p
            # validate=False: matched when the job runs (the driver, or a template's LaunchChecks, checked it)
            | "ReadRun" >> beam.io.ReadFromText(self.run_file, validate=False)
            | "ParseRun" >> beam.ParDo(_ParseRun(self.run_file)).with_outputs(DEAD, main="candidates")
        )
        assigned = (
            {
                "lines": run.candidates,
                "owner": self.log_queries | "QueryIds" >> beam.FlatMap(lambda q: [(i, q.query_id) for i in q.ids]),
                "in_log": (
                    self.log_ids | "DistinctLogIds" >> beam.Distinct() | "KeyLogIds" >> beam.Map(lambda i: (i, True))
                ),
            }
            | "JoinLogIds" >> beam.CoGroupByKey()
            | "AssignLines" >> beam.ParDo(_AssignRunLines(self.run_file)).with_outputs(DEAD, main="lines")
        )
        wanted = (
            {"query": queries | "KeyQueries" >> beam.WithKeys(lambda q: q.query_id), "lines": assigned.lines}
            | "JoinQueries" >> beam.CoGroupByKey()
            | "TopK" >> beam.ParDo(_QueryCandidates(self.top_k, self.run_file)).with_outputs(DEAD, main="wanted")
        )
        joined = (
            {"doc": self.documents | "KeyDocs" >> beam.WithKeys(lambda d: d.doc_id), "wanted": wanted.wanted}
            | "JoinDocuments" >> beam.CoGroupByKey()
            | "Pairs" >> beam.ParDo(_JoinDocuments(self.corpus)).with_outputs(DEAD, main="pairs")
        )
        dead = (run[DEAD], assigned[DEAD], wanted[DEAD]) | "FlattenDead" >> beam.Flatten()
        return {"pairs": joined.pairs, "unknown_candidates": joined[DEAD], DEAD: dead}

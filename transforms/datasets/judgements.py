"""Every query's outcome: its judgements (labelled, with its split) or a dead letter saying why not."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.datasets.formats import QueryJudgements, trec_id_problem
from transforms.text.queries import assign_split, derive_query_id, query_key
from transforms.types import DEAD, DeadLetter, Judgement, Query, RerankPair

# Query-level outcomes other than "labelled": each is one dead letter (stage "label").
NO_CANDIDATES = "no candidates"
ALL_UNKNOWN = "all candidates unknown"
ALL_FAILED = "all candidates failed scoring"
ALL_UNWRITABLE = "all candidates have ids TREC files cannot hold"
# A candidate refused before scoring (stage "candidates"): its doc id cannot go into qrels or runs.
UNWRITABLE_ID = "doc id cannot be written to TREC qrels or run files"


class _RefuseUnwritableCandidates(beam.DoFn):
    def __init__(self) -> None:
        self.refused = Metrics.counter("corpus_etl", "candidates_unwritable")

    def process(self, pair: RerankPair):
        problem = trec_id_problem(pair.doc_id)
        if problem is None:
            yield pair
            return
        self.refused.inc()
        record = {"query_id": pair.query_id, "doc_id": pair.doc_id, "rank": pair.first_stage_rank}
        yield beam.pvalue.TaggedOutput(
            DEAD, DeadLetter.of("candidates", f"{UNWRITABLE_ID}: {pair.doc_id!r} {problem}", pair.query_id, record)
        )


class RefuseUnwritableCandidates(beam.PTransform):
    """``RerankPair`` → ``{"pairs": the pairs whose doc id TREC files can hold, "dead_letter": the others}``.

    The index takes any non-empty id, but qrels and run files are whitespace-separated. Refusing such a
    candidate before scoring keeps its query (and its other candidates) labelled; the candidate is a
    dead letter counted in ``candidates_rejected``. Query ids need no check: the log's are refused at
    parse when they hold whitespace, and derived ones are hex.
    """

    def expand(self, pairs):
        checked = pairs | "Check" >> beam.ParDo(_RefuseUnwritableCandidates()).with_outputs(DEAD, main="pairs")
        return {"pairs": checked.pairs, DEAD: checked[DEAD]}


class _BuildQueryJudgements(beam.DoFn):
    """Joins a query with its pairs and judgements; every query comes out exactly once:
    labelled (with its split) or a dead letter saying why not."""

    def __init__(self, eval_fraction: float, first_stage: str) -> None:
        self.eval_fraction = eval_fraction
        self.first_stage = first_stage  # "index" or "run": worded into the reasons
        self.labelled = Metrics.counter("corpus_etl", "queries_labelled")
        self.rejected = Metrics.counter("corpus_etl", "queries_rejected")
        self.judgements = Metrics.counter("corpus_etl", "judgements")

    def _reject(self, query: Query, reason: str, detail: str = "") -> beam.pvalue.TaggedOutput:
        self.rejected.inc()
        record = {"query_id": query.query_id, "query": query.text, "count": query.count}
        return beam.pvalue.TaggedOutput(
            DEAD, DeadLetter.of("label", reason + (f": {detail}" if detail else ""), query.query_id, record)
        )

    def process(self, element: tuple[str, dict[str, list]]):
        _, grouped = element
        if grouped["query"]:  # pairs always come with their query; never pairs alone
            yield self._outcome(grouped["query"][0], grouped)

    def _outcome(self, query: Query, grouped: dict[str, list]) -> QueryJudgements | beam.pvalue.TaggedOutput:
        if grouped["failed"]:  # the query's own earlier dead letter (e.g. embedding) is its outcome
            self.rejected.inc()
            return beam.pvalue.TaggedOutput(DEAD, grouped["failed"][0])
        pairs: list[RerankPair] = grouped["pairs"]
        judgements: list[Judgement] = grouped["judgements"]
        qid = query.query_id
        if not pairs:
            unknown = len(grouped["unknown"])
            if unknown:
                return self._reject(query, ALL_UNKNOWN, f"the run's {unknown} candidate(s) are not in the corpus")
            if unwritable := len(grouped.get("unwritable", ())):
                return self._reject(query, ALL_UNWRITABLE, f"{unwritable} candidate(s), see the candidates dead letters")
            if self.first_stage == "run":
                derived = qid == derive_query_id(query_key(query.text))
                hint = " (the log gives this query no id, so its id was derived from the text)" if derived else ""
                ids = query.ids
                named = f"query id {qid!r}" if len(ids) == 1 else f"query ids {', '.join(map(repr, ids))} (merged)"
                return self._reject(query, NO_CANDIDATES, f"the run file lists no line for {named}{hint}")
            return self._reject(query, NO_CANDIDATES, "the index returned no hits")
        if not judgements:
            return self._reject(query, ALL_FAILED, f"{len(pairs)} pair(s), see the rerank dead letters")
        try:
            item = QueryJudgements(
                query=query,
                split=assign_split(query.text, self.eval_fraction),
                judgements=tuple(sorted(judgements, key=lambda j: j.first_stage_rank)),
                doc_texts={p.doc_id: p.doc_text for p in pairs},
            )
        except ValueError as exc:
            return self._reject(query, "unwritable", str(exc))
        self.labelled.inc()
        self.judgements.inc(len(judgements))
        return item


class BuildQueryJudgements(beam.PTransform):
    """``(query_id, {"query", "pairs", "judgements", "failed", "unknown"[, "unwritable"]})`` from a
    ``CoGroupByKey`` → ``QueryJudgements`` (``items``) and ``DeadLetter`` (``dead_letter``): one per query.

    ``first_stage`` is ``"index"`` or ``"run"``, worded into the reasons.
    """

    def __init__(self, eval_fraction: float, first_stage: str) -> None:
        super().__init__()
        self.eval_fraction = eval_fraction
        self.first_stage = first_stage

    def expand(self, grouped):
        return grouped | "Outcome" >> beam.ParDo(_BuildQueryJudgements(self.eval_fraction, self.first_stage)).with_outputs(
            DEAD, main="items"
        )

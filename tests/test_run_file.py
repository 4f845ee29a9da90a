"""The label job's candidates from a TREC run file: line parsing, order, duplicates, and
which log query each run line serves (RetrieveFromRun on a fake corpus, no models)."""

from __future__ import annotations

import json

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.datasets.report import accounting, dead_letter_count
from transforms.io.retrieve import RetrieveFromRun, best_lines, parse_run_line, top_candidates
from transforms.text.queries import DedupQueries, ParseQueryRows, QueryColumns, derive_query_id, refused_row_ids
from transforms.types import DEAD, Candidate, DeadLetter, Document

COLUMNS = QueryColumns()


# -- pure functions ------------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_a_non_finite_score_makes_a_malformed_line(score: str) -> None:
    assert parse_run_line(f"r9 Q0 tempfile 1 {score} x") == (
        f"non-finite score: {score!r} for document 'tempfile' of query id 'r9'"
    )


def test_a_run_line_parses() -> None:
    assert parse_run_line("r9 Q0 shutil 2 0.3 x\n") == ("r9", Candidate("shutil", 0.3, 2))


def test_candidates_follow_the_scores_when_the_rank_column_disagrees() -> None:
    lines = [Candidate("re", 0.1, 1), Candidate("fnmatch", 0.9, 2), Candidate("glob", 0.5, 3), Candidate("os", 0.7, 4)]
    assert top_candidates(lines, 3) == [Candidate("fnmatch", 0.9, 1), Candidate("os", 0.7, 2), Candidate("glob", 0.5, 3)]


def test_equal_scores_go_by_the_rank_column_then_the_doc_id() -> None:
    lines = [Candidate("b", 0.5, 2), Candidate("z", 0.5, 1), Candidate("a", 0.5, 2), Candidate("top", 0.6, 9)]
    assert top_candidates(lines, 10) == [
        Candidate("top", 0.6, 1), Candidate("z", 0.5, 2), Candidate("a", 0.5, 3), Candidate("b", 0.5, 4),
    ]  # fmt: skip


def test_a_document_listed_twice_keeps_its_best_line_and_names_the_others() -> None:
    json_, csv3, csv4 = Candidate("json", 0.9, 1), Candidate("csv", 0.7, 3), Candidate("csv", 0.6, 4)
    assert best_lines([("r1", csv4), ("r1", json_), ("r1", csv3)]) == (
        [("r1", json_), ("r1", csv3)],
        [(("r1", csv3), [("r1", csv4)])],
    )
    # Pooled over the ids of a merged query: the best line wins whichever id lists it.
    heap6, heap7 = Candidate("heapq", 0.4, 1), Candidate("heapq", 0.9, 1)
    assert best_lines([("r6", heap6), ("r7", heap7)]) == ([("r7", heap7)], [(("r7", heap7), [("r6", heap6)])])


def test_a_run_letter_counts_the_lines_it_stands_for() -> None:
    letters = [
        DeadLetter.of("run", "run lists a query that is not in the log: query id 'qz' (2 lines)", "run", {"query_id": "qz", "lines": 2}),
        DeadLetter.of("run", "expected 6 fields 'qid Q0 docid rank score tag', got 1", "run", {"line": "x"}),
        DeadLetter.of("parse_query", "empty query", "log", {"query": "", "lines": 7}),  # a log column named "lines"
    ]  # fmt: skip
    counts = [dead_letter_count(d) for d in letters]
    assert counts == [
        ("dead_letters/run/run lists a query that is not in the log", 2),
        ("dead_letters/run/expected 6 fields", 1),
        ("dead_letters/parse_query/empty query", 1),
    ]
    assert accounting(dict(counts), [])["run_lines_rejected"] == 3


def test_ids_of_refused_log_rows() -> None:
    def ids(row: dict) -> list[str]:
        return refused_row_ids(DeadLetter.of("parse_query", "refused", "log", row), COLUMNS)

    assert ids({"query_id": "r8", "query": "temporary files", "count": 0}) == ["r8"]
    assert ids({"query_id": None, "query": " Temporary  files ", "count": 0}) == [derive_query_id("temporary files")]
    assert ids({"query_id": "has space", "query": None, "count": 1}) == []


# -- RetrieveFromRun -----------------------------------------------------------------------------
DOCS = ["json", "csv", "re", "fnmatch", "glob", "os", "heapq", "queue", "tempfile", "shutil", "io"]
LOG = [
    {"query_id": "r1", "query": "encode python objects as JSON", "count": 1},
    {"query_id": "r4", "query": "regular expression matching", "count": 1},
    {"query_id": "r6", "query": "Priority Queue heap", "count": 1},
    {"query_id": "r7", "query": "priority queue heap", "count": 1},  # merged into r6
    {"query_id": "r8", "query": "refused for its count", "count": 0},
    {"query_id": "r9", "query": "temporary files", "count": 1},
]
RUN = [
    "r1 Q0 json 1 0.9 x", "r1 Q0 nosuch 2 0.8 x", "r1 Q0 csv 3 0.7 x", "r1 Q0 csv 4 0.6 x",
    "r4 Q0 re 1 0.1 x", "r4 Q0 fnmatch 2 0.9 x", "r4 Q0 glob 3 0.5 x", "r4 Q0 os 4 0.7 x",
    "r6 Q0 heapq 3 0.4 x", "r7 Q0 heapq 1 0.9 x", "r7 Q0 queue 2 0.8 x",
    "r8 Q0 os 1 0.5 x", "r8 Q0 io 2 0.4 x",
    "r9 Q0 tempfile 1 nan x", "r9 Q0 shutil 2 0.3 x",
    "qz Q0 re 1 0.2 x", "qz Q0 os 2 0.1 x",
]  # fmt: skip


def _retrieve(p, tmp_path, log: list[dict], run: list[str], sampled=None) -> dict:
    """The run-file path as the label job wires it: parse and de-duplicate the log, then retrieve."""
    (tmp_path / "run.trec").write_text("".join(line + "\n" for line in run))
    rows = p | "Log" >> beam.Create([("log", i, row) for i, row in enumerate(log)])
    parsed = rows | ParseQueryRows(COLUMNS)
    deduped = parsed["queries"] | DedupQueries()
    log_ids = (
        parsed["queries"] | "RowIds" >> beam.Map(lambda q: q.query_id),
        parsed[DEAD] | "RefusedIds" >> beam.FlatMap(refused_row_ids, COLUMNS),
    ) | "LogIds" >> beam.Flatten()
    queries = deduped["queries"]
    if sampled is not None:
        queries = queries | "Sample" >> beam.Filter(lambda q: q.query_id in sampled)
    docs = p | "Docs" >> beam.Create([Document(d, f"text of {d}") for d in DOCS])
    return queries | RetrieveFromRun(str(tmp_path / "run.trec"), docs, "corpus", 3, deduped["queries"], log_ids)


def _letters(out: dict):
    return out[DEAD] | "Letters" >> beam.Map(lambda d: (d.reason, json.loads(d.record).get("lines", 1)))


def test_every_run_line_serves_its_query_or_is_a_counted_dead_letter(tmp_path) -> None:
    with BeamTestPipeline() as p:
        out = _retrieve(p, tmp_path, LOG, RUN)
        pairs = out["pairs"] | beam.Map(lambda x: (x.query_id, x.doc_id, x.first_stage_score, x.first_stage_rank))
        assert_that(pairs, equal_to([
            ("r1", "json", 0.9, 1), ("r1", "csv", 0.7, 3),  # rank 2 'nosuch' is not in the corpus
            ("r4", "fnmatch", 0.9, 1), ("r4", "os", 0.7, 2), ("r4", "glob", 0.5, 3),  # by score, not rank column
            ("r6", "heapq", 0.9, 1), ("r6", "queue", 0.8, 2),  # r7's lines serve r6, which absorbed it
            ("r9", "shutil", 0.3, 1),  # its NaN line is refused alone
        ]), label="pairs")  # fmt: skip
        assert_that(_letters(out), equal_to([
            ("duplicate document for the query: 'csv' is listed 2 times for query 'r1'; kept its line with score "
             "0.7 (rank 3, query id 'r1')", 1),
            ("duplicate document for the query: 'heapq' is listed 2 times for query 'r6'; kept its line with score "
             "0.9 (rank 1, query id 'r7')", 1),
            ("non-finite score: 'nan' for document 'tempfile' of query id 'r9'", 1),
            ("run lines of a query the log refused: query id 'r8' (2 lines) is only on log rows or queries that "
             "are dead letters", 2),
            ("run lists a query that is not in the log: query id 'qz' (2 lines)", 2),
        ]), label="dead")  # fmt: skip
        assert_that(
            out["unknown_candidates"] | beam.Map(lambda d: d.reason),
            equal_to(["candidate not in the corpus: 'nosuch' is not in corpus"]),
            label="unknown",
        )
        rejected = out[DEAD] | beam.Map(lambda d: dead_letter_count(d)[1]) | beam.CombineGlobally(sum)
        # 17 lines: 8 serve a query, 1 is cut by the top-k, 1 is missing from the corpus, 7 are rejected
        assert_that(rejected, equal_to([7]), label="lines rejected")


def test_an_id_serves_the_query_that_keeps_it_and_is_ambiguous_when_none_does(tmp_path) -> None:
    log = [
        {"query_id": "x1", "query": "alpha", "count": 1}, {"query_id": "x0", "query": "ALPHA", "count": 1},
        {"query_id": "x1", "query": "beta", "count": 1}, {"query_id": "x2", "query": "Beta", "count": 1},
        {"query_id": "y0", "query": "gamma", "count": 1}, {"query_id": "y5", "query": "Gamma", "count": 1},
        {"query_id": "y1", "query": "delta", "count": 1}, {"query_id": "y5", "query": "Delta", "count": 1},
    ]  # fmt: skip
    run = ["x1 Q0 json 1 0.9 t", "x2 Q0 csv 1 0.8 t", "x0 Q0 re 1 0.7 t", "y5 Q0 os 1 0.6 t"]
    with BeamTestPipeline() as p:
        # alpha (x0, absorbing x1) is left out by sampling: its lines are dropped, not rejected
        out = _retrieve(p, tmp_path, log, run, sampled={"x1", "y0", "y1"})
        pairs = out["pairs"] | beam.Map(lambda x: (x.query_id, x.doc_id, x.first_stage_rank))
        # x1 is beta's own id (alpha only absorbed it); x2 was merged into beta
        assert_that(pairs, equal_to([("x1", "json", 1), ("x1", "csv", 2)]), label="pairs")
        assert_that(_letters(out), equal_to([
            ("run lists a query id the log gives to several queries: 'y5' (1 line) was merged into 'y0', 'y1'", 1),
        ]), label="dead")  # fmt: skip

"""`corpus-etl evaluate`'s inputs: BEIR queries and qrels, read or refused in one line naming the file and line or row.

The files are refused before the store is opened or the model loaded, so each command here runs
in-process and fails in milliseconds (nothing listens at the store path).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import cli
from pipelines.errors import EXIT_USAGE
from pipelines.evaluate import evaluate, read_qrels

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture()
def files(tmp_path):
    """Valid queries and qrels; a test overwrites the one it breaks."""
    queries, qrels = tmp_path / "queries.jsonl", tmp_path / "qrels.tsv"
    queries.write_text('{"_id": "q1", "text": "first"}\n{"_id": "q2", "text": "second"}\n')
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\n")
    return queries, qrels


def evaluate_error(capsys, queries, qrels, tmp_path) -> tuple[int, str]:
    argv = ["evaluate", "--collection", "c", "--model", MINILM, "--qdrant-path", str(tmp_path / "store"),
            "--queries", str(queries), "--qrels", str(qrels)]  # fmt: skip
    status = cli.main(argv)
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    ("which", "content", "error"),
    [
        ("queries", '{"_id": "q1", "text": "first"}\n{"_id": "q2" "text": "second"}\n',
         "{path}:2: not valid JSON (Expecting ',' delimiter at column 14)"),
        ("queries", '{"_id": "q0", "text": "zeroth"}\n\n{"_id":"q1","text":null}\n',
         "{path}:3: 'text' must be a string, got null"),
        ("qrels", "query_id doc_id score\nq1 d1 1\n",
         "{path}:1: header 'query_id doc_id score' is not BEIR's; expected 'query-id corpus-id score', or no header"),
        ("qrels", "query-id\tcorpus-id\tscore\nq1\td1\t1.0\nq2\td2\t1.5\n",
         "{path}:3: score '1.5' is not an integer grade"),
        ("qrels", "q1\td1\t1\nq2\td2\t2\nq1\td1\t1\nq1\td1\t0\n",
         "{path}:4: query 'q1' document 'd1' graded 0, but 1 at {path}:1; give each pair one grade"),
    ],
    ids=["malformed-json", "null-text", "foreign-header", "fractional-grade", "two-grades"],
)
def test_a_bad_line_is_a_usage_error_naming_the_file_and_its_line(files, tmp_path, capsys, which, content, error):
    queries, qrels = files
    path = {"queries": queries, "qrels": qrels}[which]
    path.write_text(content)
    assert evaluate_error(capsys, queries, qrels, tmp_path) == (
        EXIT_USAGE, f"corpus-etl evaluate: error: --{which}: {error.format(path=path)}\n"
    )


def test_parquet_queries_with_a_null_query_are_refused_naming_the_row(files, tmp_path, capsys):
    _, qrels = files
    queries = tmp_path / "queries.parquet"
    pq.write_table(pa.Table.from_pylist([{"query_id": "q1", "query": "first"}, {"query_id": "q2", "query": None}]),
                   queries)  # fmt: skip
    assert evaluate_error(capsys, queries, qrels, tmp_path) == (
        EXIT_USAGE, f"corpus-etl evaluate: error: --queries: row 2 of {queries}: null query (column 'query')\n"
    )


def test_parquet_queries_without_the_columns_name_the_missing_and_the_present(files, tmp_path, capsys):
    _, qrels = files
    queries = tmp_path / "queries.parquet"
    pq.write_table(pa.Table.from_pylist([{"qid": "q1", "question": "first"}]), queries)
    assert evaluate_error(capsys, queries, qrels, tmp_path) == (
        EXIT_USAGE, f"corpus-etl evaluate: error: --queries: {queries}: missing column(s) query_id or _id, query or "
        "text; the file has: qid, question\n",
    )  # fmt: skip


def test_integral_float_scores_are_grades_and_beir_trec_and_headerless_qrels_read_alike(tmp_path):
    beir, trec, bare = tmp_path / "beir.tsv", tmp_path / "q.trec", tmp_path / "bare.tsv"
    beir.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1.0\nq1\td2\t0\nq2\td3\t2\n")
    trec.write_text("q1 0 d1 1\nq1 0 d2 0.0\nq2 0 d3 2\n")
    bare.write_text("q1\td1\t1\nq1\td2\t0\nq2\td3\t2.0\n")
    expected = {"q1": {"d1": 1, "d2": 0}, "q2": {"d3": 2}}
    assert read_qrels(str(beir)) == read_qrels(str(trec)) == read_qrels(str(bare)) == expected
    assert all(type(g) is int for q in read_qrels(str(beir)).values() for g in q.values())


def test_parquet_qrels_take_integral_float_scores_and_refuse_others_naming_the_row(tmp_path):
    path = tmp_path / "qrels.parquet"
    rows = [{"query-id": "q1", "corpus-id": "d1", "score": 1.0}, {"query-id": "q1", "corpus-id": "d2", "score": 2.0}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert read_qrels(str(path)) == {"q1": {"d1": 1, "d2": 2}}
    pq.write_table(pa.Table.from_pylist([*rows, {"query-id": "q2", "corpus-id": "d3", "score": 0.5}]), path)
    with pytest.raises(ValueError) as refused:
        read_qrels(str(path))
    assert str(refused.value) == f"row 3 of {path}: score 0.5 is not an integer grade"
    pq.write_table(pa.Table.from_pylist([*rows, rows[0], {"query-id": "q1", "corpus-id": "d2", "score": 0}]), path)
    with pytest.raises(ValueError) as refused:  # a repeat with its grade is read once; another grade is refused
        read_qrels(str(path))
    assert str(refused.value) == f"row 4 of {path}: query 'q1' document 'd2' graded 0, but 2 at row 2 of {path}; " \
        "give each pair one grade"



# q1: a (relevant) ties b; trec_eval reads b first (equal scores: doc id descending), so a is 2nd.
# q2: 11 tied documents read d10, d09, ..., d00: the relevant d00 is 11th, past nDCG@10 and MRR@10.
# q3: judged, nothing relevant: 0 on every metric, and counted in the mean (trec_eval).
TIED_QRELS = {"q1": {"a": 1}, "q2": {"d00": 1}, "q3": {"x": 0}}
TIED_RUN = {"q1": {"a": 0.5, "b": 0.5}, "q2": {f"d{i:02d}": 1.0 for i in range(11)}, "q3": {"x": 1.0}}


def test_every_metric_breaks_score_ties_as_trec_eval_does():
    # MRR@10 used to come from ir_measures' MS MARCO provider (ties by doc id ascending: 1.0 and 1.0, so 0.666667)
    # while nDCG@10 and Recall@k read the same run in trec_eval's order. Values from trec_eval (pytrec_eval):
    # nDCG@10 = (1/log2(3) + 0 + 0) / 3, MRR@10 = (1/2 + 0 + 0) / 3, Recall@20 = (1 + 1 + 0) / 3.
    assert evaluate(TIED_RUN, TIED_QRELS, top_k=20) == {"nDCG@10": 0.21031, "MRR@10": 0.166667, "Recall@20": 0.666667}

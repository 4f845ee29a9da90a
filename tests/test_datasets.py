"""Label-dataset writers: grades, qrels, runs, distillation Parquet, metrics, report, manifest."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from pathlib import Path

import apache_beam as beam
import ir_measures
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from ir_measures import Qrel, ScoredDoc
from PIL import Image

from transforms.datasets.distill import DISTILLATION_SCHEMA, distillation_parquet, distillation_rows
from transforms.datasets.formats import (
    LabelDatasetsConfig,
    QueryJudgements,
    beir_queries_lines,
    grade,
    parse_thresholds,
    qrels_lines,
    trec_qrels_lines,
    trec_run_lines,
)
from transforms.datasets.metrics import evaluate_first_stage
from transforms.datasets.write import WriteLabelDatasets, build_label_files, write_files
from transforms.types import Judgement, Query

THRESHOLDS = (0.5, 0.9)


def J(qid: str, doc: str, teacher: float, first: float, rank: int) -> Judgement:
    return Judgement(
        query_id=qid, doc_id=doc, teacher_score=teacher, first_stage_score=first, first_stage_rank=rank
    )


def items() -> list[QueryJudgements]:
    """Two eval queries (one without any relevant document) and two train queries."""
    return [
        QueryJudgements(
            Query("qa", "red shoes", 3),
            "eval",
            (J("qa", "d1", 0.95, 0.1, 3), J("qa", "d2", 0.2, 0.9, 1), J("qa", "d3", 0.6, 0.5, 2)),
        ),
        QueryJudgements(Query("qb", "blaue Hüte", 1), "eval", (J("qb", "x", 0.1, 1.0, 1),)),
        QueryJudgements(
            Query("qc", "green socks", 2),
            "train",
            (
                J("qc", "d1", 0.3, 0.8, 1),
                J("qc", "d4", 0.91, 0.7, 2),
                J("qc", "d5", 0.05, 0.6, 3),
                J("qc", "d6", 0.7, 0.5, 4),
                J("qc", "d7", 0.45, 0.4, 5),
            ),
            {"d1": "text one", "d4": "text four", "d5": "text five", "d6": "text six", "d7": "text seven"},
        ),
        QueryJudgements(Query("qd", "hat", 1), "train", (J("qd", "d9", 0.2, 2.0, 1),), {"d9": "text nine"}),
    ]


def eval_pairs() -> list[Judgement]:
    return [j for i in items() if i.split == "eval" for j in i.judgements]


# ---------------------------------------------------------------------------------------------
# Grades
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("score", "expected"),
    [(0.0, 0), (0.4999, 0), (0.5, 1), (0.5001, 1), (0.8999, 1), (0.9, 2), (0.9001, 2), (1.0, 2), (-3.0, 0)],
)
def test_grade_at_and_around_thresholds(score: float, expected: int) -> None:
    assert grade(score, THRESHOLDS) == expected


def test_grade_single_threshold_and_nan() -> None:
    assert [grade(s, (0.7,)) for s in (0.69, 0.7, 0.71)] == [0, 1, 1]
    with pytest.raises(ValueError, match="NaN"):
        grade(math.nan, THRESHOLDS)


def test_grade_ranges_print_their_bounds_exactly() -> None:
    from transforms.datasets.formats import grade_ranges

    assert grade_ranges(THRESHOLDS) == {0: "score < 0.5", 1: "0.5 <= score < 0.9", 2: "score >= 0.9"}
    assert grade_ranges((0.5, 1.0))[2] == "score >= 1"
    # ":g" alone printed 0.9999999 as 1: a score of 0.99999995 has grade 2, which said "score >= 1".
    assert grade_ranges((0.5, 0.9999999)) == {
        0: "score < 0.5", 1: "0.5 <= score < 0.9999999", 2: "score >= 0.9999999",
    }
    assert grade(0.99999995, (0.5, 0.9999999)) == 2


def test_parse_thresholds() -> None:
    assert parse_thresholds("0.5,0.9") == (0.5, 0.9)
    assert parse_thresholds("0.3") == (0.3,)
    for bad in ("a,b", ""):
        with pytest.raises(ValueError, match="comma-separated numbers"):
            parse_thresholds(bad)
    for bad in ("0.9,0.5", "0.5,0.5", "0.5,nan"):  # numbers, refused by the config that takes them
        with pytest.raises(ValueError):
            LabelDatasetsConfig(thresholds=parse_thresholds(bad))


# ---------------------------------------------------------------------------------------------
# qrels, runs, queries
# ---------------------------------------------------------------------------------------------


def test_beir_qrels_lines() -> None:
    assert qrels_lines(reversed(eval_pairs()), THRESHOLDS) == [
        "query-id\tcorpus-id\tscore",
        "qa\td1\t2",
        "qa\td2\t0",
        "qa\td3\t1",
        "qb\tx\t0",
    ]


def test_trec_qrels_read_back_with_ir_measures() -> None:
    text = "\n".join(trec_qrels_lines(eval_pairs(), THRESHOLDS)) + "\n"
    assert list(ir_measures.read_trec_qrels(text)) == [
        Qrel("qa", "d1", 2, "0"),
        Qrel("qa", "d2", 0, "0"),
        Qrel("qa", "d3", 1, "0"),
        Qrel("qb", "x", 0, "0"),
    ]


def test_trec_runs_read_back_with_ir_measures() -> None:
    retrieval = trec_run_lines(eval_pairs(), "first_stage", "first_stage")
    assert retrieval == [
        "qa Q0 d2 1 0.9 first_stage",
        "qa Q0 d3 2 0.5 first_stage",
        "qa Q0 d1 3 0.1 first_stage",
        "qb Q0 x 1 1.0 first_stage",
    ]
    assert list(ir_measures.read_trec_run("\n".join(retrieval) + "\n")) == [
        ScoredDoc("qa", "d2", 0.9),
        ScoredDoc("qa", "d3", 0.5),
        ScoredDoc("qa", "d1", 0.1),
        ScoredDoc("qb", "x", 1.0),
    ]
    rerank = trec_run_lines(eval_pairs(), "teacher", "teacher")
    assert list(ir_measures.read_trec_run("\n".join(rerank) + "\n")) == [
        ScoredDoc("qa", "d1", 0.95),
        ScoredDoc("qa", "d3", 0.6),
        ScoredDoc("qa", "d2", 0.2),
        ScoredDoc("qb", "x", 0.1),
    ]


def test_teacher_run_breaks_ties_by_first_stage_rank_and_keeps_full_precision() -> None:
    pairs = [J("q", "b", 0.5, 0.3, 2), J("q", "a", 0.5, 0.2, 3), J("q", "c", 0.1234567890123, 0.9, 1)]
    assert trec_run_lines(pairs, "t", "teacher") == [
        "q Q0 b 1 0.5 t",
        "q Q0 a 2 0.5 t",
        "q Q0 c 3 0.1234567890123 t",
    ]
    with pytest.raises(ValueError, match="whitespace"):
        trec_run_lines(pairs, "my tag", "teacher")


def test_beir_queries_lines() -> None:
    lines = beir_queries_lines([i.query for i in reversed(items())])
    assert lines[:2] == ['{"_id": "qa", "text": "red shoes"}', '{"_id": "qb", "text": "blaue Hüte"}']
    assert [json.loads(line)["_id"] for line in lines] == ["qa", "qb", "qc", "qd"]


# ---------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------


def L(p: float) -> float:  # noqa: N802 - the log-odds the rows hold, as written by hand
    return math.log(p) - math.log1p(-p)


def test_log_odds_are_the_yes_minus_no_logit_and_stay_finite_at_fp32_s_ends() -> None:
    from transforms.datasets.distill import log_odds

    yes_minus_no = 2.5
    p = 1 / (1 + math.exp(-yes_minus_no))  # P(yes) = softmax([no, yes])[1]
    assert log_odds(p) == pytest.approx(yes_minus_no, abs=1e-12)
    assert log_odds(1.0) == pytest.approx(16.6355, abs=1e-4) and log_odds(0.0) == pytest.approx(-16.6355, abs=1e-4)


def test_distillation_rows_and_hard_negatives() -> None:
    rows = distillation_rows(items(), THRESHOLDS, num_hard_negatives=2)
    assert rows == [
        {
            "query_id": "qc",
            "query": "green socks",
            "count": 2,
            "doc_ids": ["d1", "d4", "d5", "d6", "d7"],
            "doc_texts": ["text one", "text four", "text five", "text six", "text seven"],
            "teacher_scores": [0.3, 0.91, 0.05, 0.7, 0.45],
            "grades": [0, 2, 0, 1, 0],
            "first_stage_scores": [0.8, 0.7, 0.6, 0.5, 0.4],
            "first_stage_ranks": [1, 2, 3, 4, 5],
            # Best teacher score first.
            "positive_ids": ["d4", "d6"],
            "positive_texts": ["text four", "text six"],
            "positive_scores": [0.91, 0.7],
            # Graded 0, best first-stage rank first, capped at 2: d1 (rank 1), d5 (rank 3); not d7 (rank 5).
            "negative_ids": ["d1", "d5"],
            "negative_texts": ["text one", "text five"],
            "negative_scores": [0.3, 0.05],
            "teacher_logits": [L(0.3), L(0.91), L(0.05), L(0.7), L(0.45)],
            "positive_logits": [L(0.91), L(0.7)],
            "negative_logits": [L(0.3), L(0.05)],
        },
        {
            "query_id": "qd",
            "query": "hat",
            "count": 1,
            "doc_ids": ["d9"],
            "doc_texts": ["text nine"],
            "teacher_scores": [0.2],
            "grades": [0],
            "first_stage_scores": [2.0],
            "first_stage_ranks": [1],
            "positive_ids": [],
            "positive_texts": [],
            "positive_scores": [],
            "negative_ids": ["d9"],
            "negative_texts": ["text nine"],
            "negative_scores": [0.2],
            "teacher_logits": [L(0.2)],
            "positive_logits": [],
            "negative_logits": [L(0.2)],
        },
    ]


def test_distillation_parquet_reads_back_with_pyarrow() -> None:
    rows = distillation_rows(items(), THRESHOLDS, num_hard_negatives=8)
    table = pq.read_table(io.BytesIO(distillation_parquet(rows)))
    assert table.schema == DISTILLATION_SCHEMA
    assert table.column_names == [
        "query_id",
        "query",
        "count",
        "doc_ids",
        "doc_texts",
        "teacher_scores",
        "grades",
        "first_stage_scores",
        "first_stage_ranks",
        "positive_ids",
        "positive_texts",
        "positive_scores",
        "negative_ids",
        "negative_texts",
        "negative_scores",
        "teacher_logits",
        "positive_logits",
        "negative_logits",
    ]
    assert table.to_pylist() == rows
    assert table.column("negative_ids").to_pylist() == [["d1", "d5", "d7"], ["d9"]]
    # sentence-transformers takes these names as the label column: none may appear.
    assert not {"label", "labels", "score", "scores"} & set(table.column_names)


def test_empty_distillation_parquet_keeps_the_schema() -> None:
    table = pq.read_table(io.BytesIO(distillation_parquet([])))
    assert (table.num_rows, table.schema) == (0, DISTILLATION_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def test_evaluate_first_stage_equals_hand_computed_values() -> None:
    qrels = {"qa": {"d1": 2, "d2": 0, "d3": 1}, "qb": {"x": 0}}
    run = {"qa": {"d2": 0.9, "d3": 0.5, "d1": 0.1}, "qb": {"x": 1.0}}
    # qa ranks d2 (0), d3 (1), d1 (2). DCG = 1/log2(3) + 2/log2(4); ideal = 2/log2(2) + 1/log2(3).
    # qb has no relevant document and is left out.
    ndcg = (1 / math.log2(3) + 1) / (2 + 1 / math.log2(3))
    assert evaluate_first_stage(qrels, run, k=2) == pytest.approx(
        {"nDCG@10": ndcg, "RR@10": 0.5, "R@2": 0.5}, abs=1e-12
    )
    # A judged query with relevant documents but missing from the run counts as 0.
    qrels["qe"] = {"y": 1}
    assert evaluate_first_stage(qrels, run, k=3) == pytest.approx(
        {"nDCG@10": ndcg / 2, "RR@10": 0.25, "R@3": 0.5}, abs=1e-12
    )
    assert evaluate_first_stage({"qb": {"x": 0}}, run, k=2) == {}


def test_evaluate_first_stage_breaks_score_ties_as_trec_eval_does() -> None:
    # trec_eval reads equal scores by doc id descending: qa's relevant a after b (2nd); qc's
    # relevant d00 after d10 .. d01 (11th, past the cutoff). RR@10 used to break ties the other
    # way (ir_measures' MS MARCO provider: 1.0 for both) while nDCG@10 and R@k did not.
    qrels = {"qa": {"a": 1}, "qc": {"d00": 1}}
    run = {"qa": {"a": 0.5, "b": 0.5}, "qc": {f"d{i:02d}": 1.0 for i in range(11)}}
    assert evaluate_first_stage(qrels, run, k=20) == pytest.approx(
        {"nDCG@10": 0.5 / math.log2(3), "RR@10": 0.25, "R@20": 1.0}, abs=1e-12
    )


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "test"}, "split must be"),
        ({"judgements": (J("other", "d", 0.5, 0.5, 1),)}, "judgement for query 'other'"),
        ({"judgements": (J("q", "d", 0.5, 0.5, 1), J("q", "d", 0.4, 0.4, 2))}, "judged twice"),
        ({"judgements": (J("q", "d x", 0.5, 0.5, 1),)}, "whitespace"),
        ({"judgements": (J("q", "d", math.nan, 0.5, 1),)}, "non-finite"),
        ({"doc_texts": {}}, "no text for doc 'd'"),
    ],
)
def test_query_judgements_validate(kwargs: dict, message: str) -> None:
    base = {"query": Query("q", "text"), "split": "train", "judgements": (J("q", "d", 0.5, 0.5, 1),)}
    base["doc_texts"] = {"d": "doc"}
    with pytest.raises(ValueError, match=message):
        QueryJudgements(**{**base, **kwargs})


def test_eval_queries_need_no_texts_and_config_validates() -> None:
    QueryJudgements(Query("q", "t"), "eval", (J("q", "d", 0.5, 0.5, 1),))
    with pytest.raises(ValueError, match="strictly increasing"):
        LabelDatasetsConfig(thresholds=(0.9, 0.5))
    for outside in [(1.5,), (-0.5, 0.2), (0.0, 0.5)]:
        with pytest.raises(ValueError, match=r"P\(yes\) cut points, each in \(0, 1\]"):
            LabelDatasetsConfig(thresholds=outside)
    assert LabelDatasetsConfig(thresholds=(0.2, 1.0)).thresholds == (0.2, 1.0)
    with pytest.raises(ValueError, match="JSON"):
        LabelDatasetsConfig(provenance={"x": object()})
    with pytest.raises(ValueError, match="whitespace"):
        LabelDatasetsConfig(rerank_tag="a b")


def test_build_label_files_refuses_repeated_query_ids() -> None:
    first = items()[0]
    with pytest.raises(ValueError, match="more than once"):
        build_label_files([first, first], LabelDatasetsConfig())


# ---------------------------------------------------------------------------------------------
# The whole writer
# ---------------------------------------------------------------------------------------------

EXPECTED_FILES = [
    "distillation/train.parquet",
    "manifest.json",
    "qrels/test.trec",
    "qrels/test.tsv",
    "queries.jsonl",
    "report.md",
    "run_stats.json",
    "runs/rerank.trec",
    "runs/retrieval.trec",
    "teacher_scores.png",
]

CONFIG = LabelDatasetsConfig(
    recall_k=2,
    num_hard_negatives=2,
    provenance={"reranker": "Qwen/Qwen3-Reranker-0.6B", "top_k": 3, "instruction": "Find shoes"},
    started_at=1_700_000_000.0,
)


def _run_writer(out_dir: Path, inputs: list[QueryJudgements]) -> None:
    with BeamTestPipeline() as p:
        counts = p | "Counts" >> beam.Create(
            [("dead_letters/parse_query", 2), ("rows_read", 10), ("rows_read", 5)]
        )
        written = (
            p
            | "Items" >> beam.Create(inputs)
            | WriteLabelDatasets(str(out_dir), CONFIG, pipeline_counts=counts)
        )
        assert_that(written, equal_to([str(out_dir / f) for f in EXPECTED_FILES]))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_label_datasets_is_byte_identical_across_runs(tmp_path: Path) -> None:
    _run_writer(tmp_path / "a", items())
    _run_writer(tmp_path / "b", list(reversed(items())))
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == EXPECTED_FILES
    a.pop("run_stats.json"), b.pop("run_stats.json")
    assert a == b


def test_write_label_datasets_contents(tmp_path: Path) -> None:
    _run_writer(tmp_path, items())
    files = _files(tmp_path)

    assert (
        files["queries.jsonl"].decode()
        == '{"_id": "qa", "text": "red shoes"}\n{"_id": "qb", "text": "blaue Hüte"}\n'
    )
    assert (
        files["qrels/test.tsv"].decode()
        == "query-id\tcorpus-id\tscore\nqa\td1\t2\nqa\td2\t0\nqa\td3\t1\nqb\tx\t0\n"
    )
    assert len(list(ir_measures.read_trec_qrels(str(tmp_path / "qrels/test.trec")))) == 4
    assert [d.doc_id for d in ir_measures.read_trec_run(str(tmp_path / "runs/rerank.trec"))] == [
        "d1",
        "d3",
        "d2",
        "x",
    ]
    table = pq.read_table(tmp_path / "distillation/train.parquet")
    assert table.column("query_id").to_pylist() == ["qc", "qd"]
    assert table.column("negative_ids").to_pylist() == [["d1", "d5"], ["d9"]]

    manifest = json.loads(files["manifest.json"])
    assert manifest["provenance"] == CONFIG.provenance
    assert manifest["labels"]["thresholds"] == [0.5, 0.9]
    assert manifest["pipeline_counts"] == {"dead_letters/parse_query": 2, "rows_read": 15}
    assert manifest["counts"] == {
        "queries": {"eval": 2, "train": 2},
        "judgements": {"eval": 4, "train": 6},
        "labels": {"eval": {"0": 2, "1": 1, "2": 1}, "train": {"0": 4, "1": 1, "2": 1}},
        "eval_queries_evaluated": 1,
        "train_queries_without_positive": 1,
        "train_queries_short_of_negatives": 1,
    }
    assert manifest["status"] == "ok"
    assert manifest["accounting"] == {
        "query_rows_read": 0, "queries_read": 2, "queries_labelled": 4, "queries_eval": 2, "queries_train": 2,
        "queries_rejected": 2, "queries_rejected_by_reason": {"parse_query": 2}, "queries_not_sampled": 0,
        "pairs_scored": 10, "candidates_rejected": 0, "run_lines_rejected": 0, "input_rows_rejected": 0,
    }  # fmt: skip
    ndcg = (1 / math.log2(3) + 1) / (2 + 1 / math.log2(3))
    assert manifest["first_stage_metrics"] == {"R@2": 0.5, "RR@10": 0.5, "nDCG@10": round(ndcg, 6)}
    listed = {k for k in EXPECTED_FILES if k not in ("manifest.json", "run_stats.json")}
    assert set(manifest["files"]) == listed
    for name in listed:
        assert manifest["files"][name] == {
            "bytes": len(files[name]),
            "sha256": hashlib.sha256(files[name]).hexdigest(),
        }

    report = files["report.md"].decode()
    assert "![Histogram of teacher scores](teacher_scores.png)" in report
    assert f"| nDCG@10 | {ndcg:.4f} |" in report
    assert "| 2 | score >= 0.9 | 1 | 1 | 2 |" in report
    with Image.open(tmp_path / "teacher_scores.png") as image:
        assert (image.format, image.size) == ("PNG", (600, 400))
        image.verify()

    stats = json.loads(files["run_stats.json"])
    assert stats["started_at"] == "2023-11-14T22:13:20+00:00"
    assert set(stats) == {"started_at", "finished_at", "duration_s"}


def test_write_label_datasets_with_no_queries_writes_only_the_manifest(tmp_path: Path) -> None:
    # Nothing labelled: no empty datasets that look like a result, a manifest that says why.
    with BeamTestPipeline() as p:
        counts = p | "Counts" >> beam.Create([("dead_letters/label/no candidates", 2), ("queries_distinct", 2)])
        _ = (
            p
            | beam.Create([], reshuffle=False).with_output_types(QueryJudgements)
            | WriteLabelDatasets(str(tmp_path), pipeline_counts=counts)
        )
    files = _files(tmp_path)
    assert sorted(files) == ["manifest.json"]
    manifest = json.loads(files["manifest.json"])
    assert (manifest["status"], manifest["files"]) == ("no query could be labelled", {})
    assert manifest["accounting"]["queries_read"] == manifest["accounting"]["queries_rejected"] == 2
    assert manifest["accounting"]["queries_rejected_by_reason"] == {"label: no candidates": 2}


def test_write_files_joins_nested_paths(tmp_path: Path) -> None:
    assert write_files(str(tmp_path), {"b/c.txt": b"x", "a.txt": b"y"}) == [
        str(tmp_path / "a.txt"),
        str(tmp_path / "b" / "c.txt"),
    ]
    assert (tmp_path / "b" / "c.txt").read_bytes() == b"x"


@pytest.mark.parametrize(
    ("reason", "category"),
    [
        ("duplicate query id 'a1' with a different text: 2 queries share it; kept row 3", "duplicate query id with a different text"),
        ("query_id 'has space' contains whitespace", "query_id contains whitespace"),
        ('query_id "it\'s" contains whitespace', "query_id contains whitespace"),
        ("count must be >= 1, got 0", "count must be >= 1"),
        ("no candidates (the log gives this query no id)", "no candidates"),
        ("non-finite score: 'nan' for document 'x'", "non-finite score"),
    ],
)
def test_reason_categories_drop_ids_and_values(reason: str, category: str) -> None:
    # the report and the counters count by category: one line per kind of rejection, not per id
    from transforms.datasets.report import reason_category

    assert reason_category(reason) == category


def test_stale_files_removed_are_only_dataset_files_the_earlier_manifest_lists(tmp_path) -> None:
    import json as json_

    from transforms.datasets.formats import FORMAT, QRELS_FILE
    from transforms.datasets.write import remove_stale_files

    out = tmp_path / "out"
    (out / "qrels").mkdir(parents=True)
    (out / "qrels" / "test.tsv").write_text("stale")
    (out / "notes.txt").write_text("the user's")
    (tmp_path / "outside.txt").write_text("not ours")
    listed = {name: {} for name in (QRELS_FILE, "./", "qrels", "../outside.txt", "notes.txt", "")}
    (out / "manifest.json").write_text(json_.dumps({"format": FORMAT, "files": listed}))
    assert remove_stale_files(str(out), keep=[]) == [str(out / "qrels" / "test.tsv")]
    # the folder the file left empty goes with it; --out itself stays
    assert sorted(p.name for p in out.rglob("*")) == ["manifest.json", "notes.txt"]
    assert (tmp_path / "outside.txt").exists()
    (out / "qrels").mkdir()
    (out / "qrels" / "test.tsv").write_text("stale")
    (out / "qrels" / "mine.tsv").write_text("the user's")
    assert remove_stale_files(str(out), keep=[]) == [str(out / "qrels" / "test.tsv")]
    assert (out / "qrels" / "mine.tsv").exists()  # a folder with other files stays


def test_a_write_that_fails_midway_leaves_no_manifest_claiming_its_files(tmp_path: Path) -> None:
    # A rerun whose write stops partway (a full disk, a store error) must not leave a manifest that says
    # "ok" and lists digests of files still holding the earlier run's bytes (or missing).
    _run_writer(tmp_path, items())
    (tmp_path / "runs" / "rerank.trec").unlink()
    (tmp_path / "runs" / "rerank.trec").mkdir()  # writing this file now fails
    fewer = [i for i in items() if i.query.query_id != "qb"]
    with pytest.raises(Exception, match="rerank.trec"):
        _run_writer(tmp_path, fewer)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["status"] == "incomplete: the write of these files did not finish; rerun the job"
    assert manifest["files"] == {name: {} for name in EXPECTED_FILES if name not in ("manifest.json", "run_stats.json")}
    # The next run that completes replaces it, and removes the files it does not write.
    (tmp_path / "runs" / "rerank.trec").rmdir()
    _run_writer(tmp_path, fewer)
    files = _files(tmp_path)
    manifest = json.loads(files["manifest.json"])
    assert manifest["status"] == "ok"
    for name, digest in manifest["files"].items():
        assert digest == {"bytes": len(files[name]), "sha256": hashlib.sha256(files[name]).hexdigest()}


def test_a_query_whose_candidates_all_have_unwritable_ids_is_one_dead_letter() -> None:
    from transforms.datasets.judgements import BuildQueryJudgements, RefuseUnwritableCandidates
    from transforms.types import DeadLetter, RerankPair

    pairs = [RerankPair("q", "red shoes", doc, "text", 0.5, rank) for rank, doc in enumerate(["a b", "ok", "x\ny"], 1)]
    with BeamTestPipeline() as p:
        checked = p | "Pairs" >> beam.Create(pairs) | RefuseUnwritableCandidates()
        assert_that(checked["pairs"] | beam.Map(lambda x: x.doc_id), equal_to(["ok"]), label="Kept")
        reasons = checked["dead_letter"] | beam.Map(lambda d: (d.stage, d.source, d.reason))
        assert_that(reasons, equal_to([
            ("candidates", "q", "doc id cannot be written to TREC qrels or run files: 'a b' contains whitespace"),
            ("candidates", "q", "doc id cannot be written to TREC qrels or run files: 'x\\ny' contains whitespace"),
        ]), label="Refused")  # fmt: skip

    letter = DeadLetter.of("candidates", "doc id cannot be written", "q", {"query_id": "q", "doc_id": "a b"})
    grouped = {"query": [Query("q", "red shoes")], "pairs": [], "judgements": [], "failed": [], "unknown": [],
               "unwritable": [letter, letter]}  # fmt: skip
    with BeamTestPipeline() as p:
        out = p | beam.Create([("q", grouped)]) | BuildQueryJudgements(0.2, "index")
        assert_that(out.items, equal_to([]), label="NoItems")
        assert_that(out["dead_letter"] | beam.Map(lambda d: (d.stage, d.reason)), equal_to([
            ("label", "all candidates have ids TREC files cannot hold: 2 candidate(s), see the candidates dead letters"),
        ]), label="OneLetter")  # fmt: skip


def test_an_id_with_a_control_character_is_refused() -> None:
    # trec_eval reads ids as C strings: "d\x001" would be judged as "d"; an escape code rewrites the terminal.
    for bad, problem in (("d\x001", "a control character (U+0000)"), ("d\x1b[2J", "a control character (U+001B)"),
                         ("d\x85", "whitespace")):  # NEL is whitespace to str.split  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(f"contains {problem}; TREC files cannot hold it")):
            QueryJudgements(Query("q", "t"), "eval", (J("q", bad, 0.5, 0.5, 1),))
    QueryJudgements(Query("q", "t"), "eval", (J("q", "dé-1_ü", 0.5, 0.5, 1),))  # other non-ASCII ids stand


def test_the_beir_qrels_read_back_as_beirs_loader_reads_them() -> None:
    # BEIR's GenericDataLoader reads qrels with csv.reader(delimiter="\t", quoting=QUOTE_MINIMAL): an id
    # that starts with a double quote was read without its quotes, or (unclosed) swallowed the lines after it.
    import csv

    for bad in ('"d1"', '"d1'):
        with pytest.raises(ValueError, match="starts with a double quote"):
            QueryJudgements(Query("q", "t"), "eval", (J("q", bad, 0.5, 0.5, 1),))
    with pytest.raises(ValueError, match="starts with a double quote"):
        QueryJudgements(Query('"q"', "t"), "eval", (J('"q"', "d", 0.5, 0.5, 1),))
    inner = QueryJudgements(Query("q", "t"), "eval", (J("q", 'd"1', 0.95, 0.5, 1), J("q", "d2", 0.1, 0.4, 2)))
    reader = csv.reader(io.StringIO("\n".join(qrels_lines(inner.judgements, THRESHOLDS))), delimiter="\t",
                        quoting=csv.QUOTE_MINIMAL)  # fmt: skip
    assert list(reader)[1:] == [["q", 'd"1', "2"], ["q", "d2", "0"]]

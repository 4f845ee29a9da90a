"""The label job end to end on CPU: MiniLM index of real text, a messy query log, the tiny
Qwen3 reranker; every output file parsed back and checked."""

from __future__ import annotations

import json
import logging
import math
import os

import ir_measures
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from pipelines import index, label
from pipelines.sample import QUERIES
from tests.qwen_reference import CardReference
from transforms.text.queries import derive_query_id, query_key

pytestmark = pytest.mark.slow
THRESHOLDS = (0.2, 0.35)  # the tiny random reranker's scores sit around 0.1-0.5
TOP_K = 5
LONG_QUERY = "why " * 700
EXPECTED_DEAD = [
    ("parse_query", "empty query"),
    ("parse_query", "null query (column 'query')"),
    ("parse_query", f"query longer than 2048 characters ({len(LONG_QUERY.strip())})"),
]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, sample_dir, minilm_path):
    tmp = tmp_path_factory.mktemp("label-index")
    qdrant = str(tmp / "qdrant")
    # texts cut to 1,500 characters: the candidates are chunks either way, and a third of the tokens to embed
    rows = [{**r, "text": r["text"][:1500]} for r in pq.read_table(sample_dir["corpus"]).to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows), tmp / "corpus.parquet")
    index.run(
        ["--input", str(tmp / "corpus.parquet"), "--collection", "docs", "--model", minilm_path, "--qdrant-path", qdrant,
         "--title-column", "title", "--chunk-tokens", "128", "--chunk-overlap", "16"],
        test_pipeline=TestPipeline(),
    )  # fmt: skip
    log = pq.read_table(sample_dir["query_log"]).to_pylist() + [{"query_id": None, "query": LONG_QUERY, "count": 1}]
    log_path = tmp / "log.parquet"
    pq.write_table(pa.Table.from_pylist(log), log_path)
    yield {"qdrant": qdrant, "log": str(log_path), "tmp": tmp}


def _label(indexed, minilm_path, reranker_dir, out, pipeline: TestPipeline | None = None) -> dict:
    return label.run(
        ["--queries", indexed["log"], "--out", str(out), "--reranker", str(reranker_dir), "--collection", "docs",
         "--model", minilm_path, "--qdrant-path", indexed["qdrant"], "--top-k", str(TOP_K),
         "--label-thresholds", ",".join(map(str, THRESHOLDS)), "--eval-fraction", "0.3", "--device", "cpu",
         "--precision", "fp32"],
        test_pipeline=pipeline or TestPipeline(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def labelled(indexed, minilm_path, qwen3_reranker_dir):
    out = indexed["tmp"] / "out"
    summary = _label(indexed, minilm_path, qwen3_reranker_dir, out)
    return {"out": out, "summary": summary, "log": indexed["log"]}


def _files(root) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            path = os.path.join(d, n)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_outputs_are_the_documented_files(labelled):
    assert sorted(_files(labelled["out"])) == sorted([
        "queries.jsonl", "qrels/test.tsv", "qrels/test.trec", "runs/retrieval.trec", "runs/rerank.trec",
        "distillation/train.parquet", "manifest.json", "report.md", "teacher_scores.png", "run_stats.json",
        "dead_letters.jsonl",
    ])  # fmt: skip


# How each rerun runs the DirectRunner: other bundles, thread interleavings and batch boundaries than
# the first run's (which ran in one thread, each bundle once).
RERUNS = {
    "same-options": [],
    "two-threads": ["--direct_running_mode=multi_threading", "--direct_num_workers=2"],
    "bundles-replayed": ["--direct_runner_bundle_repeat=1"],
    "two-threads-bundles-replayed": ["--direct_running_mode=multi_threading", "--direct_num_workers=2",
                                     "--direct_runner_bundle_repeat=1"],
}  # fmt: skip


@pytest.mark.parametrize("rerun", list(RERUNS))
def test_a_rerun_gives_byte_identical_files(labelled, indexed, minilm_path, qwen3_reranker_dir, rerun):
    # Query vectors and teacher scores must not depend on how the runner cut and scheduled the work.
    again = indexed["tmp"] / f"again-{rerun}"
    _label(indexed, minilm_path, qwen3_reranker_dir, again, TestPipeline(argv=RERUNS[rerun]))
    first, second = _files(labelled["out"]), _files(again)
    first.pop("run_stats.json")
    second.pop("run_stats.json")
    differing = sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))
    assert differing == []  # names, not a 6,000-line byte diff


def test_queries_are_deduplicated_and_split_without_overlap(labelled):
    out = labelled["out"]
    expected_ids = {derive_query_id(query_key(text)) for text, _ in QUERIES.values()}
    eval_q = [json.loads(x) for x in (out / "queries.jsonl").read_text().splitlines()]
    train = pq.read_table(out / "distillation" / "train.parquet").to_pylist()
    eval_ids, train_ids = {q["_id"] for q in eval_q}, {r["query_id"] for r in train}
    assert not eval_ids & train_ids  # evaluation never leaks into distillation
    assert eval_ids | train_ids == expected_ids  # 25 distinct queries; upper-cased duplicates merged
    assert 0 < len(eval_ids) < len(train_ids)
    # Duplicates keep their most frequent spelling (the log's upper-cased copies count 2).
    log = pq.read_table(labelled["log"]).to_pylist()
    counts: dict[tuple[str, str], int] = {}
    for row in log:
        if row["query"] and row["query"].strip() and len(row["query"]) < 2048:
            spelling = " ".join(row["query"].split())
            key = (derive_query_id(query_key(spelling)), spelling)
            counts[key] = counts.get(key, 0) + row["count"]
    best: dict[str, tuple[int, str]] = {}
    for (qid, spelling), n in counts.items():
        if qid not in best or (-n, spelling) < (-best[qid][0], best[qid][1]):
            best[qid] = (n, spelling)
    assert {q["_id"]: q["text"] for q in eval_q} == {qid: best[qid][1] for qid in eval_ids}
    assert {r["query_id"]: r["query"] for r in train} == {qid: best[qid][1] for qid in train_ids}


def test_runs_qrels_and_labels_agree(labelled):
    out = labelled["out"]
    retrieval = list(ir_measures.read_trec_run(str(out / "runs" / "retrieval.trec")))
    rerank = list(ir_measures.read_trec_run(str(out / "runs" / "rerank.trec")))
    qrels = list(ir_measures.read_trec_qrels(str(out / "qrels" / "test.trec")))
    tsv = (out / "qrels" / "test.tsv").read_text().splitlines()
    assert tsv[0] == "query-id\tcorpus-id\tscore"
    assert sorted(tuple(line.split("\t")) for line in tsv[1:]) == sorted(
        (q.query_id, q.doc_id, str(q.relevance)) for q in qrels
    )
    eval_ids = {json.loads(x)["_id"] for x in (out / "queries.jsonl").read_text().splitlines()}
    by_query: dict[str, list] = {}
    for r in retrieval:
        by_query.setdefault(r.query_id, []).append(r)
    assert set(by_query) == eval_ids
    for hits in by_query.values():
        assert len(hits) == TOP_K and len({h.doc_id for h in hits}) == TOP_K  # one entry per document
    teacher = {(r.query_id, r.doc_id): r.score for r in rerank}
    assert set(teacher) == {(r.query_id, r.doc_id) for r in retrieval}
    for q in qrels:  # graded from the teacher score: below 0.2 -> 0, [0.2, 0.35) -> 1, else 2
        score = teacher[(q.query_id, q.doc_id)]
        assert q.relevance == (0 if score < THRESHOLDS[0] else 1 if score < THRESHOLDS[1] else 2)
    lines = [line.split() for line in (out / "runs" / "rerank.trec").read_text().splitlines()]
    for qid in eval_ids:  # the rerank run's ranks follow descending teacher score: rank 1 is the best
        by_rank = sorted((int(rank), float(score)) for q, _, _, rank, score, _ in lines if q == qid)
        assert [rank for rank, _ in by_rank] == list(range(1, TOP_K + 1))
        scores = [score for _, score in by_rank]
        assert scores == sorted(scores, reverse=True)


def test_distillation_rows_are_consistent(labelled):
    rows = pq.read_table(labelled["out"] / "distillation" / "train.parquet").to_pylist()
    for r in rows:
        assert len(r["doc_ids"]) == len(r["teacher_scores"]) == len(r["doc_texts"]) == TOP_K
        scores = dict(zip(r["doc_ids"], r["teacher_scores"]))
        assert set(r["positive_ids"]) == {d for d, s in scores.items() if s >= THRESHOLDS[0]}
        assert set(r["negative_ids"]) <= {d for d, s in scores.items() if s < THRESHOLDS[0]}
        assert all(0.0 <= s <= 1.0 and math.isfinite(s) for s in r["teacher_scores"])
        assert all(text.strip() for text in r["doc_texts"])


def test_bad_rows_are_dead_letters_and_counted(labelled):
    out = labelled["out"]
    dead = [json.loads(x) for x in (out / "dead_letters.jsonl").read_text().splitlines()]
    assert sorted((d["stage"], d["reason"]) for d in dead) == EXPECTED_DEAD
    assert len(dead) == 3 and all(d["source"].endswith("log.parquet") for d in dead)
    assert labelled["summary"]["counters"]["dead_letters"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["provenance"]["top_k"] == TOP_K
    assert manifest["provenance"]["reranker"]["revision"].startswith("sha256v2:")
    assert manifest["provenance"]["reranker"]["precision"] == manifest["provenance"]["first_stage"]["precision"] == "fp32"
    reranker = manifest["provenance"]["reranker"]
    assert (reranker["kernels"], reranker["device"], reranker["share_prefix"]) == ("auto", "cpu", False)
    assert manifest["provenance"]["first_stage"]["kernels"] == "auto"
    computed = labelled["summary"]["precision_computed"]
    assert set(computed) == {"rerank", "query"} and set(computed["rerank"]) == set(computed["query"]) == {"fp32"}
    assert computed["rerank"]["fp32"] > computed["query"]["fp32"] > 0  # every pair's prompt, every query
    text = label.format_summary(labelled["summary"])
    assert f"  rerank precision   fp32 -> fp32 ({computed['rerank']['fp32']} tokens)\n" in text
    assert f"  query precision    fp32 -> fp32 ({computed['query']['fp32']} tokens)\n" in text
    # on CPU the query encoder's --packing auto runs padded passes, over the same tokens
    assert labelled["summary"]["packing_computed"] == {"query": {"padded": computed["query"]["fp32"]}}
    assert f"  query packing      auto -> padded ({computed['query']['fp32']} tokens)\n" in text
    # --kernels auto on a CPU: neither model ran Liger's kernels
    kernels = labelled["summary"]["kernels_computed"]
    assert kernels == {stage: {"none": computed[stage]["fp32"]} for stage in ("rerank", "query")}
    assert f"  rerank kernels     auto -> none ({computed['rerank']['fp32']} tokens)\n" in text
    # each step's own time: the models' from RunInference's batch latency (reranking every pair and embedding
    # every query cannot take no time), search and write from their counters
    steps, counters = labelled["summary"]["step_seconds"], labelled["summary"]["counters"]
    assert list(steps) == ["query"] + (["search"] if "search_ms" in counters else []) + ["rerank"] + (
        ["write"] if "write_ms" in counters else []), steps
    assert steps["query"] > 0 and steps["rerank"] > 0, steps
    assert f"  time in steps      query {steps['query']:.1f}s" in text
    # the count, as the index summary gives it (the line gave only the path)
    assert f"\n  dead letters       3 -> {out / 'dead_letters.jsonl'}\n" in text


def test_report_has_metrics_and_a_histogram(labelled):
    report = (labelled["out"] / "report.md").read_text()
    assert "nDCG@10" in report and "![Histogram of teacher scores](teacher_scores.png)" in report
    assert (labelled["out"] / "teacher_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("share", [[], ["--share-prefix"]], ids=["pairs", "shared-prefix"])
def test_given_candidates_get_the_reference_scores(tmp_path, sample_dir, qwen3_reranker_dir, share):
    # the documents cut to ~300 tokens: the card's reference takes every position's logits (152k each)
    rows = [{**r, "text": r["text"][:1200]} for r in pq.read_table(sample_dir["corpus"]).to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus.parquet")
    corpus_path = str(tmp_path / "corpus.parquet")
    corpus = {r["id"]: r["text"] for r in rows}
    run = [("qa", "json", 1, 0.9), ("qa", "csv", 2, 0.8), ("qa", "pickle", 3, 0.7), ("qb", "gzip", 1, 0.5),
           ("qb", "zlib", 2, 0.4), ("qb", "not-in-corpus", 3, 0.3), ("qz", "re", 1, 0.1)]  # fmt: skip
    (tmp_path / "run.trec").write_text("".join(f"{q} Q0 {d} {r} {s} bm25\n" for q, d, r, s in run))
    log = [{"query_id": "qa", "query": "encode objects as JSON", "count": 3},
           {"query_id": "qb", "query": "compress bytes", "count": 1}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(log), tmp_path / "log.parquet")
    out = tmp_path / "out"
    label.run(
        ["--queries", str(tmp_path / "log.parquet"), "--out", str(out), "--reranker", str(qwen3_reranker_dir),
         "--candidates", str(tmp_path / "run.trec"), "--corpus", corpus_path, "--eval-fraction", "1.0",
         "--query-id-column", "query_id", "--top-k", "3", "--device", "cpu", *share],
        test_pipeline=TestPipeline(),
    )  # fmt: skip
    got = {(r.query_id, r.doc_id): r.score for r in ir_measures.read_trec_run(str(out / "runs" / "rerank.trec"))}
    pairs = [("qa", "json"), ("qa", "csv"), ("qa", "pickle"), ("qb", "gzip"), ("qb", "zlib")]
    assert sorted(got) == sorted(pairs)
    texts = {q["query_id"]: q["query"] for q in log}
    ref = CardReference(str(qwen3_reranker_dir)).scores([(texts[q], corpus[d]) for q, d in pairs])
    for (q, d), want in zip(pairs, ref):
        assert abs(got[(q, d)] - want) <= 1e-4
    dead = [json.loads(x) for x in (out / "dead_letters.jsonl").read_text().splitlines()]
    assert [(d["stage"], d["reason"]) for d in dead] == [
        ("candidates", f"candidate not in the corpus: 'not-in-corpus' is not in {corpus_path}"),
        ("run", "run lists a query that is not in the log: query id 'qz' (1 line)"),
    ]


# -- every query accounted for -------------------------------------------------------------------
ACCOUNTING_LOG = [
    {"query_id": "qa", "query": "encode objects as JSON", "count": 3},
    {"query_id": "qb", "query": "compress bytes", "count": 1},
    {"query_id": None, "query": "a query the log gives no id", "count": 1},  # derived id: not in the run
    {"query_id": "qd", "query": "first text of qd", "count": 1},  # same id, other text: row 5 wins
    {"query_id": "qd", "query": "second text of qd", "count": 1},
    {"query_id": "qe", "query": "every candidate unknown", "count": 1},
    {"query_id": "qf", "query": "   ", "count": 1},  # empty
    {"query_id": "qg", "query": None, "count": 1},  # null
    {"query_id": "qa", "query": "ENCODE objects as json", "count": 2},  # merges with row 1
    {"query_id": "qh", "query": "the run has no line for me", "count": 1},
]
ACCOUNTING_RUN = [
    "qa Q0 json 1 0.9 bm25", "qa Q0 csv 2 0.8 bm25", "qa Q0 pickle 3 0.7 bm25", "qa Q0 shelve 4 0.6 bm25",
    "qb Q0 gzip 1 0.5 bm25", "qb Q0 zlib 2 0.4 bm25", "qb Q0 not-in-corpus 3 0.3 bm25",
    "qd Q0 json 1 0.9 bm25", "qe Q0 nowhere-1 1 0.9 bm25", "qe Q0 nowhere-2 2 0.8 bm25",
    "qz Q0 re 1 0.1 bm25", "qz Q0 os 2 0.1 bm25", "this line is not a run line",
]  # fmt: skip


def _label_run(tmp_path, sample_dir, reranker, log, run_lines, *extra) -> tuple[dict, object]:
    pq.write_table(pa.Table.from_pylist(log), tmp_path / "log.parquet")
    (tmp_path / "run.trec").write_text("".join(line + "\n" for line in run_lines))
    out = tmp_path / "out"
    summary = label.run(
        ["--queries", str(tmp_path / "log.parquet"), "--out", str(out), "--reranker", str(reranker),
         "--candidates", str(tmp_path / "run.trec"), "--corpus", sample_dir["corpus"], "--eval-fraction", "1.0",
         "--query-id-column", "query_id", "--top-k", "3", "--device", "cpu",
         "--summary-out", str(tmp_path / "summary.json"), *extra],
        test_pipeline=TestPipeline(),
    )  # fmt: skip
    return summary, out


def test_every_query_is_labelled_or_a_dead_letter(tmp_path, sample_dir, qwen3_reranker_dir):
    summary, out = _label_run(tmp_path, sample_dir, qwen3_reranker_dir, ACCOUNTING_LOG, ACCOUNTING_RUN)
    accounted = {k: summary[k] for k in (
        "query_rows_read", "queries_read", "queries_labelled", "queries_eval", "queries_train", "queries_rejected",
        "queries_not_sampled", "pairs_scored", "candidates_rejected", "run_lines_rejected")}  # fmt: skip
    assert accounted == {
        "query_rows_read": 10, "queries_read": 9, "queries_labelled": 3, "queries_eval": 3, "queries_train": 0,
        "queries_rejected": 6, "queries_not_sampled": 0, "pairs_scored": 6, "candidates_rejected": 3,
        "run_lines_rejected": 3,  # the malformed line and qz's 2 lines
    }  # fmt: skip
    assert summary["queries_read"] == summary["queries_labelled"] + summary["queries_rejected"]
    assert summary["queries_rejected_by_reason"] == {
        "dedup: duplicate query id with a different text": 1,
        "label: all candidates unknown": 1,
        "label: no candidates": 2,
        "parse_query: empty query": 1,
        "parse_query: null query": 1,
    }
    assert json.loads((tmp_path / "summary.json").read_text())["queries_labelled"] == 3
    log_path = str(tmp_path / "log.parquet")
    no_id = derive_query_id(query_key("a query the log gives no id"))
    dead = sorted((d["stage"], d["source"], d["reason"]) for d in map(json.loads, (out / "dead_letters.jsonl").read_text().splitlines()))
    corpus = sample_dir["corpus"]
    assert dead == sorted([
        ("candidates", "qb", f"candidate not in the corpus: 'not-in-corpus' is not in {corpus}"),
        ("candidates", "qe", f"candidate not in the corpus: 'nowhere-1' is not in {corpus}"),
        ("candidates", "qe", f"candidate not in the corpus: 'nowhere-2' is not in {corpus}"),
        ("dedup", f"row 4 of {log_path}", "duplicate query id 'qd' with a different text: 2 queries share it; "
         f"kept row 5 of {log_path} (the last in file-path and row order)"),
        ("label", "qe", "all candidates unknown: the run's 2 candidate(s) are not in the corpus"),
        ("label", "qh", "no candidates: the run file lists no line for query id 'qh'"),
        ("label", no_id, f"no candidates: the run file lists no line for query id {no_id!r} "
         "(the log gives this query no id, so its id was derived from the text)"),
        ("parse_query", f"row 7 of {log_path}", "empty query"),
        ("parse_query", f"row 8 of {log_path}", "null query (column 'query')"),
        ("run", str(tmp_path / "run.trec"), "expected 6 fields 'qid Q0 docid rank score tag', got 7"),
        ("run", str(tmp_path / "run.trec"), "run lists a query that is not in the log: query id 'qz' (2 lines)"),
    ])  # fmt: skip
    judged = {(r.query_id, r.doc_id) for r in ir_measures.read_trec_run(str(out / "runs" / "rerank.trec"))}
    assert judged == {("qa", "json"), ("qa", "csv"), ("qa", "pickle"), ("qb", "gzip"), ("qb", "zlib"), ("qd", "json")}
    queries = {json.loads(x)["_id"]: json.loads(x)["text"] for x in (out / "queries.jsonl").read_text().splitlines()}
    assert queries == {"qa": "encode objects as JSON", "qb": "compress bytes", "qd": "second text of qd"}
    report = (out / "report.md").read_text()
    assert "| rejected: label: no candidates | 2 |" in report and "| **read** | **9** |" in report


def test_a_run_that_labels_nothing_is_an_error_without_datasets(tmp_path, sample_dir, qwen3_reranker_dir):
    log = [{"query_id": "qe", "query": "every candidate unknown", "count": 1}]
    with pytest.raises(label.LabelFailed, match=r"^no query could be labelled: 1 queries read, 1 rejected"):
        _label_run(tmp_path, sample_dir, qwen3_reranker_dir, log, ["qe Q0 nowhere 1 0.9 bm25"])
    assert sorted(os.listdir(tmp_path / "out")) == ["dead_letters.jsonl", "manifest.json"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["status"], summary["error"]) == ("failed", "no query could be labelled")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "no query could be labelled"


def test_a_rerun_into_the_same_folder_leaves_no_file_of_the_earlier_run(tmp_path, sample_dir, qwen3_reranker_dir):
    _label_run(tmp_path, sample_dir, qwen3_reranker_dir, ACCOUNTING_LOG[:1], ACCOUNTING_RUN[:1])
    out = tmp_path / "out"
    assert (out / "qrels" / "test.tsv").exists() and (out / "run_stats.json").exists()
    (out / "notes.txt").write_text("the user's own file")
    with pytest.raises(label.LabelFailed):  # labels nothing: writes only its manifest
        _label_run(tmp_path, sample_dir, qwen3_reranker_dir, [{"query_id": "qe", "query": "q", "count": 1}],
                   ["qe Q0 nowhere 1 0.9 bm25"])  # fmt: skip
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))  # no empty qrels/, runs/ left either
    assert left == ["dead_letters.jsonl", "manifest.json", "notes.txt"]


def test_a_job_that_fails_still_writes_its_summary(tmp_path, sample_dir, qwen3_reranker_dir, monkeypatch):
    from transforms.datasets import write

    def disk_full(out_dir, files):
        raise OSError(28, "No space left on device writing to https://ops:s3cret@storage.example/b")

    monkeypatch.setattr(write, "write_files", disk_full)
    with pytest.raises(Exception, match="No space left on device"):
        _label_run(tmp_path, sample_dir, qwen3_reranker_dir, ACCOUNTING_LOG[:1], ACCOUNTING_RUN[:1])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["error"], summary
    assert "s3cret" not in summary["error"]  # the summary file is shared more widely than a terminal


def test_refused_corpus_rows_make_the_run_partial_in_the_summary_too(tmp_path, sample_dir, qwen3_reranker_dir):
    rows = pq.read_table(sample_dir["corpus"]).to_pylist()
    first = rows[0]
    bad = [{**first, "text": "a second row with the same id"}, {**first, "id": "blank", "text": "   "}]
    pq.write_table(pa.Table.from_pylist(rows + bad), tmp_path / "corpus.parquet")
    log = [{"query_id": "qa", "query": "encode objects as JSON", "count": 1}]
    summary, _ = _label_run(tmp_path, {**sample_dir, "corpus": str(tmp_path / "corpus.parquet")}, qwen3_reranker_dir,
                            log, [f"qa Q0 {first['id']} 1 0.9 bm25"])  # fmt: skip
    assert (summary["status"], summary["input_rows_rejected"]) == ("partial", 2)
    assert summary["partial"].startswith("2 input row(s) refused at read (unreadable row groups, or rows with a")
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "partial"


def test_an_empty_run_file_fails_before_the_job(tmp_path, sample_dir, qwen3_reranker_dir):
    with pytest.raises(ValueError, match=r"the run file is empty \(1 file\(s\), no line\); nothing to label$"):
        _label_run(tmp_path, sample_dir, qwen3_reranker_dir, ACCOUNTING_LOG, ["  "])
    assert not (tmp_path / "out").exists()


def test_settings_that_would_fail_after_scoring_fail_before_the_job(tmp_path, sample_dir, qwen3_reranker_dir):
    from pipelines.errors import PreflightError

    run = ACCOUNTING_RUN[:1]
    with pytest.raises(ValueError, match=r"^--max-length 40 leaves no room for a pair after the prompt's \d+ tokens$"):
        _label_run(tmp_path, sample_dir, qwen3_reranker_dir, ACCOUNTING_LOG[:1], run, "--max-length", "40")
    (tmp_path / "out").write_text("a file where the folder goes")
    with pytest.raises(PreflightError, match=r"is a file, not a folder; give a folder \(local or gs://\)$"):
        _label_run(tmp_path, sample_dir, qwen3_reranker_dir, ACCOUNTING_LOG[:1], run)
    assert not (tmp_path / "summary.json").exists()


def test_input_errors_name_their_flag(tmp_path, sample_dir, qwen3_reranker_dir):
    from pipelines.errors import PreflightError

    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(PreflightError, match=rf"^--corpus: no files match {missing!r}; check the path or glob"):
        _label_run(tmp_path, {**sample_dir, "corpus": missing}, qwen3_reranker_dir, ACCOUNTING_LOG[:1], ACCOUNTING_RUN)
    pq.write_table(pa.table({"qid": ["q1"], "text": ["t"]}), tmp_path / "other.parquet")
    with pytest.raises(PreflightError, match=r"^--corpus: 1 of 1 input file\(s\) cannot be read .*; fix or remove them$"):
        _label_run(tmp_path, {**sample_dir, "corpus": str(tmp_path / "other.parquet")}, qwen3_reranker_dir,
                   ACCOUNTING_LOG[:1], ACCOUNTING_RUN)  # fmt: skip


@pytest.mark.parametrize(
    "reranker, message",
    [
        ("no-such-org/no-such-reranker", r"^cannot load reranker 'no-such-org/no-such-reranker': .* \(offline or a wrong id\?"),
        ("MINILM", r"^reranker '.*' is not a causal language model \(architectures: BertModel\); --reranker needs"),
    ],
)
def test_a_reranker_that_cannot_serve_fails_before_the_job(tmp_path, sample_dir, minilm_path, reranker, message):
    from transforms.models.reranker import check_reranker

    with pytest.raises(ValueError, match=message):
        check_reranker(minilm_path if reranker == "MINILM" else reranker)


def test_the_cli_says_a_missing_reranker_in_one_line(tmp_path, sample_dir):
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "pipelines.cli", "label", "--queries", sample_dir["query_log"], "--out",
            str(tmp_path / "out"), "--candidates", sample_dir["queries"], "--corpus", sample_dir["corpus"],
            "--reranker", "Qwen/Qwen3-Reranker-0.6B"]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "corpus-etl label: error: cannot load reranker 'Qwen/Qwen3-Reranker-0.6B': not in the local cache and "
        "HF_HUB_OFFLINE is set (offline or a wrong id? pass a local directory with --reranker PATH, or download it "
        "first: huggingface-cli download Qwen/Qwen3-Reranker-0.6B)"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("top_k", "recall_k"), [(100, 20), (41, 20), (10, 5), (3, 1), (1, 1)])
def test_the_reports_recall_cutoff_stays_below_the_judged_depth(top_k, recall_k):
    # the teacher judges the first stage's top-k only, so Recall@top-k would be 1 whatever the ranking
    from pipelines.configs import label_config
    from pipelines.flags import label_parser

    args = label_parser().parse_args(["--queries", "q.parquet", "--out", "o", "--collection", "c", "--top-k", str(top_k)])
    assert label_config(args).datasets_config({}).recall_k == recall_k


# -- run lines: merged ids, score order, non-finite scores, duplicates ------------------------------
RUN_LOG = [
    {"query_id": "r1", "query": "encode python objects as JSON", "count": 1},
    {"query_id": "r4", "query": "regular expression matching", "count": 1},
    {"query_id": "r6", "query": "Priority Queue heap", "count": 1},
    {"query_id": "r7", "query": "priority queue heap", "count": 1},  # merged into r6: its run lines serve r6
    {"query_id": "r8", "query": "refused for its count", "count": 0},
    {"query_id": "r9", "query": "temporary files", "count": 1},
]
RUN_LINES = [
    "r1 Q0 json 1 0.9 x", "r1 Q0 nosuch 2 0.8 x", "r1 Q0 csv 3 0.7 x", "r1 Q0 csv 4 0.6 x",
    "r4 Q0 re 1 0.1 x", "r4 Q0 fnmatch 2 0.9 x", "r4 Q0 glob 3 0.5 x",
    "r7 Q0 heapq 1 0.9 x", "r7 Q0 queue 2 0.8 x",
    "r8 Q0 os 1 0.5 x", "r8 Q0 io 2 0.4 x",
    "r9 Q0 tempfile 1 nan x", "r9 Q0 shutil 2 0.3 x",
]  # fmt: skip


def test_every_run_line_serves_a_query_or_is_counted(tmp_path, sample_dir, qwen3_reranker_dir):
    summary, out = _label_run(tmp_path, sample_dir, qwen3_reranker_dir, RUN_LOG, RUN_LINES)
    accounted = {k: summary[k] for k in (
        "query_rows_read", "queries_read", "queries_labelled", "queries_rejected", "queries_not_sampled",
        "pairs_scored", "candidates_rejected", "run_lines_rejected")}  # fmt: skip
    assert accounted == {
        "query_rows_read": 6, "queries_read": 5, "queries_labelled": 4, "queries_rejected": 1,
        "queries_not_sampled": 0, "pairs_scored": 8, "candidates_rejected": 1,
        "run_lines_rejected": 4,  # csv's second line, the NaN line, r8's 2 lines
    }  # fmt: skip
    assert summary["queries_rejected_by_reason"] == {"parse_query: count must be >= 1": 1}
    dead = sorted((d["stage"], d["reason"]) for d in map(json.loads, (out / "dead_letters.jsonl").read_text().splitlines()))
    assert dead == sorted([
        ("candidates", f"candidate not in the corpus: 'nosuch' is not in {sample_dir['corpus']}"),
        ("parse_query", "count must be >= 1, got 0"),
        ("run", "duplicate document for the query: 'csv' is listed 2 times for query 'r1'; kept its line with "
         "score 0.7 (rank 3, query id 'r1')"),
        ("run", "non-finite score: 'nan' for document 'tempfile' of query id 'r9'"),
        ("run", "run lines of a query the log refused: query id 'r8' (2 lines) is only on log rows or queries "
         "that are dead letters"),
    ])  # fmt: skip
    # The first-stage run is in score order, ranks 1..n (the input's rank column said re, fnmatch, glob)
    assert (out / "runs" / "retrieval.trec").read_text().splitlines() == [
        "r1 Q0 json 1 0.9 first_stage", "r1 Q0 csv 2 0.7 first_stage",
        "r4 Q0 fnmatch 1 0.9 first_stage", "r4 Q0 glob 2 0.5 first_stage", "r4 Q0 re 3 0.1 first_stage",
        "r6 Q0 heapq 1 0.9 first_stage", "r6 Q0 queue 2 0.8 first_stage",
        "r9 Q0 shutil 1 0.3 first_stage",
    ]  # fmt: skip


@pytest.mark.parametrize(("given", "used"), [(None, "default"), ("", ""), ("Find the code", "Find the code")])
def test_the_manifest_records_the_instruction_the_reranker_scored_with(tmp_path, given, used):
    # --instruction '' scores with an empty instruction (the card's format, "<Instruct>: \n"): the
    # provenance said the default one, so the labels looked as if made with a prompt they were not.
    from pipelines.configs import LabelConfig
    from transforms.models.reranker import DEFAULT_INSTRUCTION, format_instruction

    used = DEFAULT_INSTRUCTION if used == "default" else used
    config = LabelConfig(queries="log.parquet", out=str(tmp_path / "out"), reranker=str(tmp_path),
                         candidates="run.trec", corpus="corpus.parquet", instruction=given)  # fmt: skip
    assert format_instruction(config.instruction, "q", "d") == f"<Instruct>: {used}\n<Query>: q\n<Document>: d"
    assert label.provenance_of(config, [], [])["reranker"]["instruction"] == used


def test_a_document_id_trec_files_cannot_hold_is_a_candidate_dead_letter(tmp_path, minilm_path, qwen3_reranker_dir):
    # The index takes any non-empty id; TREC qrels and runs are whitespace-separated. Such a candidate was
    # scored, then took its whole query down with it ("unwritable"): every query that retrieved it was lost,
    # and its scored pairs were counted nowhere. Now the candidate alone is refused, before scoring.
    docs = [{"id": "json", "text": "Encode Python objects as JSON text with json.dumps."},
            {"id": "csv", "text": "Read and write CSV files with the csv module."},
            {"id": "two words", "text": "JSON encoding of Python objects, with a space in the id."},
            {"id": "tab\tid", "text": "Writing comma separated values with csv.writer."}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(docs), tmp_path / "corpus.parquet")
    qdrant = str(tmp_path / "qdrant")
    index.run(["--input", str(tmp_path / "corpus.parquet"), "--collection", "docs", "--model", minilm_path,
               "--qdrant-path", qdrant, "--chunk-tokens", "128", "--chunk-overlap", "16"],
              test_pipeline=TestPipeline())  # fmt: skip
    log = [{"query_id": "qa", "query": "encode objects as JSON", "count": 1},
           {"query_id": "qb", "query": "write csv files", "count": 1}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(log), tmp_path / "log.parquet")
    out = tmp_path / "out"
    summary = label.run(
        ["--queries", str(tmp_path / "log.parquet"), "--out", str(out), "--reranker", str(qwen3_reranker_dir),
         "--collection", "docs", "--model", minilm_path, "--qdrant-path", qdrant, "--top-k", "4",
         "--query-id-column", "query_id", "--eval-fraction", "1.0", "--device", "cpu"],
        test_pipeline=TestPipeline(),
    )  # fmt: skip
    assert {k: summary[k] for k in ("queries_labelled", "queries_rejected", "pairs_scored", "candidates_rejected")} == {
        "queries_labelled": 2, "queries_rejected": 0, "pairs_scored": 4, "candidates_rejected": 4,
    }  # fmt: skip
    judged = {(r.query_id, r.doc_id) for r in ir_measures.read_trec_run(str(out / "runs" / "rerank.trec"))}
    assert judged == {("qa", "json"), ("qa", "csv"), ("qb", "json"), ("qb", "csv")}
    dead = sorted((d["stage"], d["source"], d["reason"], json.loads(d["record"])["doc_id"])
                  for d in map(json.loads, (out / "dead_letters.jsonl").read_text().splitlines()))  # fmt: skip
    assert dead == [
        ("candidates", q, f"doc id cannot be written to TREC qrels or run files: {doc!r} {why}", doc)
        for q in ("qa", "qb")
        for doc, why in (("tab\tid", "contains whitespace"), ("two words", "contains whitespace"))
    ]
    assert summary["counters"]["dead_letters"] == 4


def test_labelling_with_another_model_than_the_index_s_warns_and_says_so_in_the_manifest(
    indexed, minilm_path, qwen3_reranker_dir, tmp_path, caplog
):
    # Another folder holding a model of the same size (here MiniLM's files, through a link: another --model)
    other = tmp_path / "other-model"
    os.symlink(minilm_path, other)
    with caplog.at_level(logging.WARNING):
        _label(indexed, str(other), qwen3_reranker_dir, tmp_path / "out")
    line = (f"--model {other} is not {minilm_path}, the model collection 'docs' was built with: its scores compare "
            "query vectors of one model with document vectors of another")
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--model" in r.getMessage()] == [
        line]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["provenance"]["first_stage"]["warning"] == line

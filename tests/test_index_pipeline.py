"""The index job end to end on a real-text corpus with the real MiniLM model (DirectRunner)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from pipelines import evaluate, index, search
from transforms.edge_store import EdgeStore
from transforms.types import point_id

pytestmark = pytest.mark.slow


def _points(qdrant_path: str, collection: str) -> dict[str, tuple[dict, np.ndarray]]:
    return {p.id: (p.payload, np.asarray(p.vector)) for p in EdgeStore(qdrant_path).scroll(collection)}


def _index(argv: list[str]) -> dict:
    return index.run(argv, test_pipeline=TestPipeline())


@pytest.fixture(scope="module")
def whole_docs_index(tmp_path_factory, sample_dir, minilm_path):
    """The sample corpus indexed with chunking off (one point per document)."""
    tmp = tmp_path_factory.mktemp("whole")
    qdrant_path = str(tmp / "qdrant")
    summary = _index(
        [
            "--input", sample_dir["corpus"], "--collection", "docs", "--model", minilm_path,
            "--qdrant-path", qdrant_path, "--title-column", "title", "--metadata-columns", "n_members",
            "--chunk-tokens", "0", "--summary-out", str(tmp / "summary.json"), "--device", "cpu",
        ]
    )  # fmt: skip
    yield {"qdrant_path": qdrant_path, "summary": summary, "dir": tmp}


def test_vectors_equal_sentence_transformers_encode(whole_docs_index, sample_dir, minilm_path):
    from sentence_transformers import SentenceTransformer

    rows = pq.read_table(sample_dir["corpus"]).to_pylist()
    points = _points(whole_docs_index["qdrant_path"], "docs")
    assert len(points) == len(rows)
    expected = SentenceTransformer(minilm_path, device="cpu").encode(
        [f"{r['title']}\n{r['text']}" for r in rows], normalize_embeddings=True, batch_size=16
    )
    got = np.stack([points[point_id(r["id"], 0)][1] for r in rows])
    cosines = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosines.min() >= 0.9999


def test_summary_counts_and_payload(whole_docs_index, sample_dir):
    n = pq.read_metadata(sample_dir["corpus"]).num_rows
    summary = whole_docs_index["summary"]
    written = json.loads((whole_docs_index["dir"] / "summary.json").read_text())
    assert written == summary
    c = summary["counters"]
    assert (c["rows_read"], c["documents_read"], c["chunks"], c["points_written"]) == (n, n, n, n)
    assert summary["points_in_collection"] == n and summary["vector_size"] == 384
    assert c.get("dead_letters", 0) == 0
    payload, _ = _points(whole_docs_index["qdrant_path"], "docs")[point_id("json", 0)]
    assert payload["doc_id"] == "json" and payload["title"] == "json" and payload["chunk_index"] == 0
    assert isinstance(payload["n_members"], int) and payload["text"].startswith("JSON (JavaScript Object Notation)")


def test_search_and_evaluate_on_real_queries(whole_docs_index, sample_dir, minilm_path, capsys):
    qdrant = ["--qdrant-path", whole_docs_index["qdrant_path"], "--model", minilm_path, "--collection", "docs"]
    hits = search.run(qdrant + ["--top-k", "3", "how do I parse command line arguments"])
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["doc_id"] == "argparse"
    out = whole_docs_index["dir"] / "metrics.json"
    metrics = evaluate.run(qdrant + ["--queries", sample_dir["queries"], "--qrels", sample_dir["qrels"], "--out", str(out)])
    assert json.loads(out.read_text()) == metrics
    assert metrics["queries"] == 25
    # MiniLM on hand-written questions about stdlib modules: a real quality bar, not a smoke test.
    assert metrics["nDCG@10"] >= 0.7 and metrics["MRR@10"] >= 0.7 and metrics["Recall@100"] >= 0.95
    assert "nDCG@10" in capsys.readouterr().out


def test_reindexing_is_idempotent_with_bad_rows_dead_lettered(tmp_path, sample_dir, minilm_path, caplog):
    rows = pq.read_table(sample_dir["corpus"]).to_pylist()[:12]
    bad = [
        {"id": None, "title": "x", "text": "no id", "n_members": 0},
        {"id": "empty", "title": "x", "text": "", "n_members": 0},
        {"id": rows[0]["id"], "title": "dup", "text": "a second row with the same id", "n_members": 0},
    ]
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(rows + bad), corpus)
    qdrant_path = str(tmp_path / "qdrant")
    argv = [
        "--input", str(corpus), "--collection", "chunks", "--model", minilm_path, "--qdrant-path", qdrant_path,
        "--title-column", "title", "--chunk-tokens", "128", "--chunk-overlap", "16",
        "--dead-letter", str(tmp_path / "dead.jsonl"), "--progress-interval", "0", "--alias", "live",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="corpus_etl.progress"):
        first = _index(argv)
    assert any("[embed]" in m and "documents=" in m and "tokens=" in m for m in (r.getMessage() for r in caplog.records))
    before = _points(qdrant_path, "chunks")
    second = _index(argv)
    after = _points(qdrant_path, "chunks")

    assert first["counters"]["chunks"] == second["counters"]["chunks"] == len(before) == len(after)
    assert (first["alias"], second["alias"]) == ({"name": "live", "previous": None}, {"name": "live", "previous": "chunks"})
    assert {payload["doc_id"] for payload, _ in after.values()} == {r["id"] for r in rows}
    assert before.keys() == after.keys()
    for pid, (payload, vector) in before.items():
        assert after[pid][0] == payload
        np.testing.assert_allclose(after[pid][1], vector, atol=1e-6)
    dead = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert sorted(d["reason"] for d in dead) == sorted(
        [
            "null id (column 'id')",
            "empty text (column 'text')",
            f"duplicate id {rows[0]['id']!r}: 2 rows share it; kept the one from {corpus}",
        ]
    )
    assert all(d["source"] == str(corpus) and d["stage"] == "read" for d in dead)
    assert first["counters"]["dead_letters"] == 3


def test_cuda_without_a_gpu_is_an_error_not_a_fallback(tmp_path, sample_dir, minilm_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(Exception, match="CUDA is not available"):
        _index(
            [
                "--input", sample_dir["corpus"], "--collection", "c", "--model", minilm_path,
                "--qdrant-path", str(tmp_path / "q"), "--device", "cuda",
            ]
        )  # fmt: skip

"""The index job end to end on a real-text corpus with the real MiniLM model (DirectRunner)."""

from __future__ import annotations

import json
import logging
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline

from pipelines import evaluate, index, search
from pipelines.errors import PreflightError
from transforms.io.edge_store import EdgeStore
from transforms.io.parquet import DocumentColumns
from transforms.io.qdrant import QdrantConfig
from transforms.io.store import CollectionSpec, open_store
from transforms.models.devices import resolve_precision
from transforms.models.settings import EmbeddingSpec
from transforms.text.chunk import ChunkSettings
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


@pytest.fixture(scope="module")
def titled_st_vectors(sample_dir, minilm_path) -> np.ndarray:
    """sentence-transformers' vectors of the sample corpus's documents, title and text, in file order."""
    from sentence_transformers import SentenceTransformer

    rows = pq.read_table(sample_dir["corpus"]).to_pylist()
    return SentenceTransformer(minilm_path, device="cpu").encode(
        [f"{r['title']}\n{r['text']}" for r in rows], normalize_embeddings=True, batch_size=16
    )


def test_vectors_equal_sentence_transformers_encode(whole_docs_index, sample_dir, titled_st_vectors):
    rows = pq.read_table(sample_dir["corpus"]).to_pylist()
    points = _points(whole_docs_index["qdrant_path"], "docs")
    assert len(points) == len(rows)
    expected = titled_st_vectors
    got = np.stack([points[point_id(r["id"], 0)][1] for r in rows])
    cosines = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosines.min() >= 0.9999


PACKED_DOCS = 30


@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_packed_rows_give_the_vectors_of_sentence_transformers(tmp_path, sample_dir, minilm_path, backend,
                                                               titled_st_vectors):
    """``--packing on`` through the whole job (Beam batches -> encode_texts -> packed rows with varlen's
    CPU fallback, eager or compiled with a dynamic row length, the GPU's fastest path): every point as
    sentence-transformers encodes it, as with padded passes."""
    qdrant_path = str(tmp_path / "qdrant")
    # 30 of the sample's 84 documents (88 to 256 tokens, 7.2k of its 20.6k): rows of several lengths to pack
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pq.read_table(sample_dir["corpus"]).slice(0, PACKED_DOCS), corpus)
    summary = _index([
        "--input", str(corpus), "--collection", "docs", "--model", minilm_path, "--qdrant-path", qdrant_path,
        "--title-column", "title", "--chunk-tokens", "0", "--device", "cpu", "--precision", "fp32", "--packing", "on",
        "--backend", backend,
    ])  # fmt: skip
    rows = pq.read_table(corpus).to_pylist()
    assert summary["counters"]["points_written"] == len(rows) == PACKED_DOCS
    assert summary["packing_computed"] == {"packed": summary["counters"]["tokens"]}
    points = _points(qdrant_path, "docs")
    got = np.stack([points[point_id(r["id"], 0)][1] for r in rows])
    assert float((got * titled_st_vectors[:PACKED_DOCS]).sum(1).min()) >= 0.9999


def test_summary_counts_and_payload(whole_docs_index, sample_dir):
    n = pq.read_metadata(sample_dir["corpus"]).num_rows
    summary = whole_docs_index["summary"]
    written = json.loads((whole_docs_index["dir"] / "summary.json").read_text())
    assert written == summary
    c = summary["counters"]
    assert (c["rows_read"], c["documents_read"], c["chunks"], c["points_written"]) == (n, n, n, n)
    assert summary["points_in_collection"] == n and summary["vector_size"] == 384 and summary["precision"] == "auto"
    # what auto resolved to on the worker (this machine), with every embedded token counted under it
    resolved = resolve_precision("auto", torch.device("cpu"), cpu_mixed=True).name
    assert summary["precision_computed"] == {resolved: c["tokens"]} and c["tokens"] > 0
    assert f"precision        auto -> {resolved} ({c['tokens']} tokens)" in index.format_summary(summary)
    # --packing auto on a CPU: padded passes, every token
    assert summary["packing"] == "auto" and summary["packing_computed"] == {"padded": c["tokens"]}
    assert f"packing          auto -> padded ({c['tokens']} tokens)" in index.format_summary(summary)
    # --kernels auto on a CPU: Liger's kernels are for CUDA, so every token ran without them
    assert summary["kernels"] == "auto" and summary["kernels_computed"] == {"none": c["tokens"]}
    assert f"kernels          auto -> none ({c['tokens']} tokens)" in index.format_summary(summary)
    assert c.get("dead_letters", 0) == 0
    # each step's own time: chunking and writing from their counters, embedding from RunInference's own
    # batch latency (the model's forward passes cannot take no time)
    steps = summary["step_seconds"]
    assert list(steps) == ["chunk", "embed", "upsert"] and steps["embed"] > 0, steps
    assert {k: steps[k] for k in ("chunk", "upsert")} == {k: round(c[f"{k}_ms"] / 1000, 2) for k in ("chunk", "upsert")}
    assert "embed_ms" not in c  # RunInference times the model step; no second clock
    assert f"time in steps    chunk {steps['chunk']:.1f}s, embed {steps['embed']:.1f}s" in index.format_summary(summary)
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
    shallow = evaluate.run(qdrant + ["--queries", sample_dir["queries"], "--qrels", sample_dir["qrels"], "--top-k", "10"])
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[:3]] == ["nDCG@10", "MRR@10", "Recall@10"]  # the k it retrieved
    assert "Recall@10" in shallow and "Recall@100" not in shallow


def test_credentials_in_the_url_never_reach_output_logs_or_summary(tmp_path, sample_dir, minilm_path, monkeypatch,
                                                                   capsys, caplog):
    """A server URL with user info: every print, log line and the summary JSON show it redacted."""
    import transforms.io.qdrant
    from transforms.io.qdrant import close_client, shared_client

    local = QdrantConfig(path=str(tmp_path / "q"))  # qdrant-client's local mode stands in for the server
    monkeypatch.setattr(transforms.io.qdrant, "shared_client", lambda config: shared_client(local))
    rows = pq.read_table(sample_dir["corpus"]).to_pylist()[:3]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "docs.parquet")
    with caplog.at_level(logging.INFO):
        summary = _index(
            [
                "--input", str(tmp_path / "docs.parquet"), "--collection", "c", "--model", minilm_path,
                "--qdrant-url", "http://admin:s3cret@qdrant.internal:6333", "--chunk-tokens", "0",
                "--summary-out", str(tmp_path / "summary.json"),
            ]
        )  # fmt: skip
    close_client(local)
    assert summary["qdrant"] == "http://***@qdrant.internal:6333"
    out = capsys.readouterr()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "http://***@qdrant.internal:6333" in out.out and "http://***@qdrant.internal:6333" in logged
    for text in (out.out, out.err, logged, (tmp_path / "summary.json").read_text()):
        assert "s3cret" not in text and "admin" not in text


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
        "--max-rejected-fraction", "0.25",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="corpus_etl.progress"):
        first = _index(argv)
    messages = [r.getMessage() for r in caplog.records]
    assert any("[embed]" in m and "documents=" in m and "tokens=" in m for m in messages)
    for phase in ("[read]", "[chunk]", "[write]"):
        assert any(m.startswith(phase) for m in messages), phase
    before = _points(qdrant_path, "chunks")
    second = _index(argv)
    after = _points(qdrant_path, "chunks")

    assert first["counters"]["chunks"] == second["counters"]["chunks"] == len(before) == len(after)
    # The rerun embeds nothing: every chunk's fingerprint and payload match what is stored.
    assert (first["chunks_embedded"], second["chunks_embedded"], second["chunks_reused"]) == (len(before), 0, len(before))
    assert second["documents_unchanged"] == len(rows) and second["counters"].get("points_written", 0) == 0
    assert (first["alias"], second["alias"]) == ({"name": "live", "previous": None, "gate": None}, {"name": "live", "previous": "chunks", "gate": None})
    assert {payload["doc_id"] for payload, _ in after.values()} == {r["id"] for r in rows}
    assert before.keys() == after.keys()
    for pid, (payload, vector) in before.items():
        assert after[pid][0] == payload
        # The job's vectors are bitwise equal (test below); qdrant-client's local mode re-normalises
        # what it stores, which moves the last bit on overwrite.
        np.testing.assert_allclose(after[pid][1], vector, atol=1e-6)
    # The last row of a repeated id wins: the "dup" row (row 15) replaced the corpus's row 1.
    kept = [p for p, _ in after.values() if p["doc_id"] == rows[0]["id"]]
    assert [p["text"] for p in kept] == ["a second row with the same id"]
    dead = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert sorted((d["stage"], d["source"], d["reason"]) for d in dead) == sorted(
        [
            ("read", f"row 13 of {corpus}", "null id (column 'id')"),
            ("read", f"row 14 of {corpus}", "empty text (column 'text')"),
            ("read", f"row 1 of {corpus}", f"duplicate id {rows[0]['id']!r}: 2 rows share it; kept row 15 of {corpus} "
             "(the last in file-path and row order)"),
        ]
    )  # fmt: skip
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


def test_two_runs_embed_bitwise_equal_vectors(tmp_path, sample_dir, minilm_path):
    """The vectors the job produces, written as exact float reprs, are the same bytes twice."""
    import pyarrow.parquet as pq

    # 15 of the sample's documents (over 100 chunks of up to 96 tokens) in Beam batches of 1,024 tokens: many batches
    corpus = str(tmp_path / "corpus.parquet")
    pq.write_table(pq.read_table(sample_dir["corpus"]).slice(0, 15), corpus)
    config = index.IndexConfig(
        input=corpus, collection="bits", model=minilm_path, qdrant=QdrantConfig(path=str(tmp_path / "q")),
        columns=DocumentColumns(title="title"), chunking=ChunkSettings(96, 16), device="cpu", max_batch_tokens=1024,
    )  # fmt: skip
    store = open_store(config.qdrant)
    store.ensure_collection("bits", CollectionSpec(EmbeddingSpec.read(minilm_path).size))
    store.close()
    dumps = []
    for run in range(2):
        with TestPipeline() as p:
            out = index.build_pipeline(p, config)
            _ = (
                out["embedded"]
                | beam.Map(lambda e: f"{e.chunk.point_id} {' '.join(map(repr, e.vector))}")
                | beam.io.WriteToText(str(tmp_path / f"vectors{run}"), shard_name_template="")
            )
        dumps.append(sorted((tmp_path / f"vectors{run}").read_text().splitlines()))
    assert len(dumps[0]) > 100  # many chunks, many batches
    assert dumps[0] == dumps[1]


def _three_files(tmp_path, sample_dir) -> list:
    rows = pq.read_table(sample_dir["corpus"]).to_pylist()[:15]
    paths = []
    for i in range(3):
        path = tmp_path / f"part-{i}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[5 * i : 5 * i + 5]), path)
        paths.append(path)
    return paths


def test_a_corrupt_page_in_one_of_three_files_indexes_every_row_of_the_other_two(tmp_path, sample_dir, minilm_path):
    from tests.test_read import corrupt_a_data_page

    paths = _three_files(tmp_path, sample_dir)
    corrupt_a_data_page(paths[1])
    qdrant_path = str(tmp_path / "q")
    summary = _index(["--input", str(tmp_path / "part-*.parquet"), "--collection", "c", "--model", minilm_path,
                      "--qdrant-path", qdrant_path, "--chunk-tokens", "0", "--dead-letter", str(tmp_path / "dead.jsonl")])  # fmt: skip
    points = _points(qdrant_path, "c")
    expected = {r["id"] for p in (paths[0], paths[2]) for r in pq.read_table(p).to_pylist()}
    assert {payload["doc_id"] for payload, _ in points.values()} == expected and len(points) == 10
    assert (summary["status"], summary["partial"]) == (
        "partial", f"1 row group(s) could not be read; 1 dead letter(s) in {tmp_path / 'dead.jsonl'}"
    )
    dead = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert [(d["source"], d["reason"].split(":")[0]) for d in dead] == [(str(paths[1]), "unreadable row group 0 (rows from 1)")]


def test_bad_files_stop_the_job_before_anything_is_written_unless_skipped(tmp_path, sample_dir, minilm_path):
    paths = _three_files(tmp_path, sample_dir)
    paths[2].write_text("not parquet")
    qdrant_path = str(tmp_path / "q")
    argv = ["--input", str(tmp_path / "part-*.parquet"), "--collection", "c", "--model", minilm_path,
            "--qdrant-path", qdrant_path, "--chunk-tokens", "0", "--dead-letter", str(tmp_path / "dead.jsonl")]  # fmt: skip
    with pytest.raises(PreflightError, match=r"^--input: 1 of 3 input file\(s\) cannot be read \(.*part-2.parquet: not a readable"):
        _index(argv)
    assert not os.path.exists(qdrant_path)  # refused before the store was opened
    summary = _index([*argv, "--skip-bad-files"])
    assert (summary["status"], summary["files_skipped"], summary["points_in_collection"]) == ("partial", [str(paths[2])], 10)


def test_a_chunk_size_above_the_model_limit_is_refused_before_the_collection_exists(tmp_path, sample_dir, minilm_path):
    qdrant_path = str(tmp_path / "q")
    with pytest.raises(PreflightError, match=r"^--chunk-tokens 512 is more than the model's maximum input length 256; pass"):
        _index(["--input", sample_dir["corpus"], "--collection", "c", "--model", minilm_path, "--qdrant-path", qdrant_path])
    assert not os.path.exists(qdrant_path)

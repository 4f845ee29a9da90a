"""Scheduled reindexing on the embedded store: incremental runs, exact chunk sets, --delete-missing,
bad inputs and the guarded alias switch (issue: re-embed only what changed, never switch to a broken index)."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from pipelines import evaluate, index, search
from pipelines.errors import JobFailed, PreflightError
from tests.stores import copy_store
from transforms.io.edge_store import EdgeStore
from transforms.io.store import CollectionSpec, StorePoint
from transforms.models.settings import EmbeddingSpec
from transforms.types import point_id

pytestmark = pytest.mark.slow
ARGS = ["--title-column", "title", "--chunk-tokens", "96", "--chunk-overlap", "16", "--device", "cpu"]


def _index(tmp_path, minilm_path, corpus, collection, *extra) -> dict:
    return index.run(
        ["--input", str(corpus), "--collection", collection, "--model", minilm_path, "--qdrant-path",
         str(tmp_path / "q"), *ARGS, "--summary-out", str(tmp_path / f"{collection}.json"), *extra],
        test_pipeline=TestPipeline(),
    )  # fmt: skip


def _points(tmp_path, collection) -> dict[str, tuple[dict, np.ndarray]]:
    return {p.id: (p.payload, np.asarray(p.vector)) for p in EdgeStore(str(tmp_path / "q")).scroll(collection)}


def _write(path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory, minilm_path) -> str:
    """Another model of MiniLM's size: its folder with the weights perturbed (noise, 0.3 of each tensor's spread)
    and the last layer's output dimensions sign-flipped at random. Its own index is worse than MiniLM's
    (nDCG@10 0.90 against 0.95 on the sample) and its queries against MiniLM's vectors are near random (0.16)."""
    import os

    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("other-model")
    for name in os.listdir(minilm_path):  # tokenizer and sentence-transformers files as they are
        if name != "model.safetensors":
            os.symlink(os.path.join(minilm_path, name), folder / name)
    weights = load_file(os.path.join(minilm_path, "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    weights = {k: v + 0.3 * v.std() * torch.randn(v.shape, generator=generator)
               if v.is_floating_point() and v.numel() > 1 else v for k, v in weights.items()}  # fmt: skip
    signs = torch.where(torch.rand(384, generator=generator) < 0.5, -1.0, 1.0)
    for name in ("encoder.layer.5.output.LayerNorm.weight", "encoder.layer.5.output.LayerNorm.bias"):
        weights[name] = weights[name] * signs
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    return str(folder)


@pytest.fixture(scope="module")
def versions(sample_dir):
    """v1: 30 documents. v2: 5 changed, 5 shortened, 1 grown, 5 deleted, 1 emptied, 5 new, 13 as they were."""
    # texts cut to 1,500 characters (~4 chunks each; the full ones embedded ~2.5x the tokens for the same cases)
    rows = [{**r, "text": r["text"][:1500]} for r in pq.read_table(sample_dir["corpus"]).to_pylist()]
    v1 = rows[:30]
    v2 = []
    for i, r in enumerate(v1):
        if i < 5:  # changed
            v2.append({**r, "text": "Revised. " + r["text"]})
        elif i < 10:  # shortened
            v2.append({**r, "text": r["text"][: max(40, len(r["text"]) // 4)]})
        elif i == 10:  # grown
            v2.append({**r, "text": r["text"] + "\n" + rows[40]["text"]})
        elif i < 16:  # deleted
            continue
        elif i == 16:  # emptied: a dead letter now
            v2.append({**r, "text": "   "})
        else:
            v2.append(r)
    v2 += rows[30:35]  # new
    return v1, v2


def test_v1_then_v2_gives_a_fresh_index_of_v2_and_keeps_the_refused_document(tmp_path, minilm_path, versions):
    v1, v2 = versions
    first = _index(tmp_path, minilm_path, _write(tmp_path / "v1.parquet", v1), "docs")
    emptied = v1[16]["id"]
    kept = {pid: point for pid, point in _points(tmp_path, "docs").items() if point[0]["doc_id"] == emptied}
    second = _index(tmp_path, minilm_path, _write(tmp_path / "v2.parquet", v2), "docs", "--delete-missing")
    fresh = _index(tmp_path, minilm_path, tmp_path / "v2.parquet", "fresh")
    got, want = _points(tmp_path, "docs"), _points(tmp_path, "fresh")
    # The emptied document's row is a dead letter: bad input, not a deletion; its v1 points stay as they were.
    assert kept and {pid: p for pid, p in got.items() if p[0]["doc_id"] == emptied}.keys() == kept.keys()
    for pid, (payload, vector) in kept.items():
        assert got[pid][0] == payload
        np.testing.assert_array_equal(got[pid][1], vector)
    got = {pid: p for pid, p in got.items() if pid not in kept}
    assert sorted(got) == sorted(want) and len(got) == fresh["points_in_collection"]
    for pid, (payload, vector) in want.items():
        assert got[pid][0] == payload
        np.testing.assert_allclose(got[pid][1], vector, atol=1e-6)
    assert (second["deletion"]["documents_deleted"], second["deletion"]["documents_kept_refused"]) == (5, 1)
    deleted = (tmp_path / "deleted_documents.txt").read_text().split()
    assert deleted == sorted([r["id"] for r in v1[11:16]])
    assert second["documents_unchanged"] == 13
    # Only what changed is embedded: fewer chunks than a fresh run, and at least the changed documents' chunks.
    assert 0 < second["chunks_embedded"] < fresh["chunks_embedded"] == fresh["counters"]["chunks"]
    assert second["chunks_embedded"] + second["chunks_reused"] == second["counters"]["chunks"]
    assert first["status"] == "ok" and second["status"] == "partial"  # the emptied document is a dead letter
    assert json.loads((tmp_path / "docs.json").read_text())["status"] == "partial"


def test_seeded_gaps_and_leftovers_leave_no_stale_chunk(tmp_path, minilm_path, versions):
    v1, _ = versions
    corpus = _write(tmp_path / "v1.parquet", v1[:6])
    _index(tmp_path, minilm_path, corpus, "docs")
    before = _points(tmp_path, "docs")
    store = EdgeStore(str(tmp_path / "q"))
    doc = v1[0]["id"]
    n = sum(1 for p, _ in before.values() if p["doc_id"] == doc)
    # What a crashed run of a longer version leaves: chunks n+1, n+4 and n+9, with gaps between them.
    vector = next(iter(before.values()))[1].tolist()
    stale = [StorePoint(point_id(doc, i), vector, {"doc_id": doc, "chunk_index": i, "text": "stale"}) for i in (n + 1, n + 4, n + 9)]
    store.upsert("docs", stale)
    assert store.count("docs") == len(before) + 3
    again = _index(tmp_path, minilm_path, corpus, "docs")
    assert sorted(_points(tmp_path, "docs")) == sorted(before)
    assert again["documents_unchanged"] == 6 and again["chunks_embedded"] == 0


def test_force_re_embeds_everything_and_a_setting_change_re_embeds_automatically(tmp_path, minilm_path, versions):
    corpus = _write(tmp_path / "v1.parquet", versions[0][:4])
    first = _index(tmp_path, minilm_path, corpus, "docs")
    forced = _index(tmp_path, minilm_path, corpus, "docs", "--force")
    assert forced["chunks_embedded"] == first["chunks_embedded"] > 0 and forced["chunks_reused"] == 0
    other = index.run(
        ["--input", corpus, "--collection", "docs", "--model", minilm_path, "--qdrant-path", str(tmp_path / "q"),
         "--title-column", "title", "--chunk-tokens", "96", "--chunk-overlap", "16", "--device", "cpu",
         "--max-length", "200"],
        test_pipeline=TestPipeline(),
    )  # fmt: skip  (another maximum length: every fingerprint changes)
    assert other["chunks_embedded"] == first["chunks_embedded"] and other["chunks_reused"] == 0
    # collection.json describes what the collection now holds: the last run's settings, not the first's
    recorded = EdgeStore(str(tmp_path / "q")).meta("docs")
    assert (recorded.model, recorded.settings) == (minilm_path, {
        "model": minilm_path, "revision": EmbeddingSpec.read(minilm_path).revision, "dim": None, "max_length": 200,
        "chunk_tokens": 96, "chunk_overlap": 16,
    })  # fmt: skip


def test_a_metadata_change_rewrites_payloads_and_leaves_the_document_counted_as_changed(tmp_path, minilm_path,
                                                                                        versions):
    rows = versions[0][:4]
    meta = ["--metadata-columns", "n_members"]
    first = _index(tmp_path, minilm_path, _write(tmp_path / "v1.parquet", rows), "docs", *meta)
    changed = [{**rows[0], "n_members": rows[0]["n_members"] + 1}, *rows[1:]]
    second = _index(tmp_path, minilm_path, _write(tmp_path / "v2.parquet", changed), "docs", *meta)
    chunks_of_first = sum(1 for p, _ in _points(tmp_path, "docs").values() if p["doc_id"] == rows[0]["id"])
    assert (second["documents_unchanged"], second["payloads_updated"], second["chunks_embedded"]) == (
        3, chunks_of_first, 0)
    assert second["chunks_reused"] == first["chunks_embedded"]
    assert f"(embedded 0, reused {second['chunks_reused']}, payloads updated {chunks_of_first})" in (
        index.format_summary(second))
    assert {p["n_members"] for p, _ in _points(tmp_path, "docs").values() if p["doc_id"] == rows[0]["id"]} == {
        rows[0]["n_members"] + 1}


def test_all_bad_input_leaves_the_alias_where_it_was(tmp_path, minilm_path, versions):
    good = _write(tmp_path / "good.parquet", versions[0][:4])
    _index(tmp_path, minilm_path, good, "docs-1", "--alias", "docs")
    bad = _write(tmp_path / "bad.parquet", [{"id": None, "title": "t", "text": "x", "n_members": 0}] * 3)
    summary = _index(tmp_path, minilm_path, bad, "docs-2", "--alias", "docs")
    assert summary["status"] == "alias_refused" and summary["points_in_collection"] == 0
    assert summary["alias"]["refused"] == (
        "the collection holds no points; 3 of 3 rows rejected (100.0% > --max-rejected-fraction 1.0%)"
    )
    assert EdgeStore(str(tmp_path / "q")).aliases() == {"docs": "docs-1"}


def test_an_alias_as_collection_is_refused_before_any_point_is_written(tmp_path, minilm_path, versions):
    corpus = _write(tmp_path / "c.parquet", versions[0][:3])
    _index(tmp_path, minilm_path, corpus, "docs-1", "--alias", "docs")
    count = EdgeStore(str(tmp_path / "q")).count("docs-1")
    with pytest.raises(PreflightError, match=r"^--collection 'docs' is an alias \(of 'docs-1'\) at edge:.*; index into"):
        _index(tmp_path, minilm_path, _write(tmp_path / "d.parquet", versions[0][3:6]), "docs")
    assert EdgeStore(str(tmp_path / "q")).count("docs-1") == count


@pytest.fixture(scope="module")
def gate_corpus(tmp_path_factory, sample_dir) -> str:
    """The sample corpus with each text cut to its first 1,200 characters (a third of the tokens to embed: the
    gate's queries still find their documents by title and first paragraphs)."""
    rows = [{**r, "text": r["text"][:1200]} for r in pq.read_table(sample_dir["corpus"]).to_pylist()]
    return _write(tmp_path_factory.mktemp("gate-corpus") / "corpus.parquet", rows)


@pytest.fixture(scope="module")
def gate_corpus_short(tmp_path_factory, sample_dir) -> str:
    """The sample corpus cut to 400 characters a text, for gate tests whose outcome does not hang on how good the
    index is (same model on both sides, or an outcome checked either way)."""
    rows = [{**r, "text": r["text"][:400]} for r in pq.read_table(sample_dir["corpus"]).to_pylist()]
    return _write(tmp_path_factory.mktemp("gate-corpus-short") / "corpus.parquet", rows)


@pytest.fixture(scope="module")
def gated_good(tmp_path_factory, minilm_path, sample_dir, gate_corpus) -> tuple[str, dict]:
    """The sample corpus indexed as collection "good", alias "live" switched to it through the gate (no current
    target): its store folder and the run's summary. Tests start from a copy (``_from_good``)."""
    tmp = tmp_path_factory.mktemp("gated-good")
    gate = ["--gate-queries", sample_dir["queries"], "--gate-qrels", sample_dir["qrels"]]
    return str(tmp / "q"), _index(tmp, minilm_path, gate_corpus, "good", "--alias", "live", *gate)


def _from_good(tmp_path, gated_good) -> dict:
    copy_store(gated_good[0], str(tmp_path / "q"))
    return gated_good[1]


def test_the_quality_gate_refuses_a_worse_collection(tmp_path, minilm_path, sample_dir, gated_good, gate_corpus):
    gate = ["--gate-queries", sample_dir["queries"], "--gate-qrels", sample_dir["qrels"]]
    good = _from_good(tmp_path, gated_good)
    assert good["alias"]["gate"]["current"] is None and good["alias"]["gate"]["new"] >= 0.7
    # A worse index of the same corpus: titles only, the texts cut to their first 20 characters.
    rows = [{**r, "text": r["text"][:20]} for r in pq.read_table(gate_corpus).to_pylist()]
    worse = _index(tmp_path, minilm_path, _write(tmp_path / "worse.parquet", rows), "worse", "--alias", "live", *gate)
    assert worse["status"] == "alias_refused"
    assert worse["alias"]["refused"].startswith("nDCG@10 ") and " of worse is below " in worse["alias"]["refused"]
    assert worse["alias"]["gate"]["new"] < worse["alias"]["gate"]["current"] - 0.01
    assert EdgeStore(str(tmp_path / "q")).aliases() == {"live": "good"}


def test_the_gate_scores_the_current_target_with_the_model_it_was_built_with(tmp_path, minilm_path, other_model,
                                                                            sample_dir, gated_good, gate_corpus):
    """A worse model passed when the gate scored the old vectors with the new model's queries (near random)."""
    gate = ["--gate-queries", sample_dir["queries"], "--gate-qrels", sample_dir["qrels"]]
    good = _from_good(tmp_path, gated_good)
    other = index.run(
        ["--input", gate_corpus, "--collection", "other", "--model", other_model, "--qdrant-path",
         str(tmp_path / "q"), *ARGS, "--alias", "live", *gate], test_pipeline=TestPipeline(),
    )  # fmt: skip
    scores = other["alias"]["gate"]
    assert other["status"] == "alias_refused" and EdgeStore(str(tmp_path / "q")).aliases() == {"live": "good"}
    # the current target scored with MiniLM, exactly as when it was the new collection
    assert (scores["current"], scores["current_model"]) == (good["alias"]["gate"]["new"], minilm_path)
    assert other["alias"]["refused"] == (
        f"nDCG@10 {scores['new']:.4f} of other is below {scores['current']:.4f} of good minus --gate-tolerance 0.01 "
        f"(each scored with its own model: {other_model}, {minilm_path})"
    )


def test_a_new_dim_is_gated_against_the_current_target_at_its_own_dim(tmp_path, minilm_path, sample_dir, gated_good,
                                                                      gate_corpus):
    """--dim 128 against a 384-d target: each scored at its own size; the summary is written either way."""
    gate = ["--gate-queries", sample_dir["queries"], "--gate-qrels", sample_dir["qrels"]]
    good = _from_good(tmp_path, gated_good)
    small = _index(tmp_path, minilm_path, gate_corpus, "small", "--alias", "live", "--dim", "128", *gate)
    scores = small["alias"]["gate"]
    assert scores["current"] == good["alias"]["gate"]["new"] and small["vector_size"] == 128
    switched = scores["new"] >= scores["current"] - 0.01
    assert small["status"] == ("ok" if switched else "alias_refused")
    assert EdgeStore(str(tmp_path / "q")).aliases() == {"live": "small" if switched else "good"}
    assert json.loads((tmp_path / "small.json").read_text())["status"] == small["status"]


@pytest.mark.parametrize("recorded", ["none", "gone"])
def test_a_gate_on_a_target_whose_model_is_unknown_or_gone_refuses_the_switch(tmp_path, minilm_path, versions,
                                                                              sample_dir, recorded):
    store = EdgeStore(str(tmp_path / "q"))
    gone = str(tmp_path / "deleted-model")
    store.ensure_collection("old", CollectionSpec(384, model=None if recorded == "none" else gone))
    store.upsert("old", [StorePoint(point_id("d", 0), [1.0] + [0.0] * 383, {"doc_id": "d", "chunk_index": 0})])
    store.point_alias("live", "old")
    summary = _index(tmp_path, minilm_path, _write(tmp_path / "c.parquet", versions[0][:4]), "new", "--alias", "live",
                     "--gate-queries", sample_dir["queries"], "--gate-qrels", sample_dir["qrels"])  # fmt: skip
    cannot = "so the current target old's nDCG@10 cannot be measured as it was built"
    assert summary["status"] == "alias_refused" and summary["alias"]["gate"]["current"] is None
    if recorded == "none":
        assert summary["alias"]["refused"] == (
            "old (the alias's current target) records no model (made by another tool, or by a version that "
            f"recorded none), {cannot}; evaluate it (corpus-etl evaluate), then switch without the gate"
        )
    else:
        assert summary["alias"]["refused"].startswith(f"cannot load model {gone}, which old was built with (")
        assert summary["alias"]["refused"].endswith(f"), {cannot}")
    assert store.aliases() == {"live": "old"}


def test_a_gate_on_a_target_built_before_models_were_recorded_uses_the_model_its_points_name(
    tmp_path, minilm_path, versions, sample_dir
):
    # else the first gated night after an upgrade, and every night after it, would refuse the switch
    store = EdgeStore(str(tmp_path / "q"))
    store.ensure_collection("old", CollectionSpec(384))
    payload = {"doc_id": "d", "chunk_index": 0, "model": minilm_path}
    store.upsert("old", [StorePoint(point_id("d", 0), [1.0] + [0.0] * 383, payload)])
    store.point_alias("live", "old")
    summary = _index(tmp_path, minilm_path, _write(tmp_path / "c.parquet", versions[0][:4]), "new", "--alias", "live",
                     "--gate-queries", sample_dir["queries"], "--gate-qrels", sample_dir["qrels"])  # fmt: skip
    gate = summary["alias"]["gate"]
    assert (gate["current_model"], gate["current"]) == (minilm_path, 0.0)  # scored: one point, no relevant hit
    assert summary["status"] == "ok" and store.aliases() == {"live": "new"}


def test_a_built_job_checks_the_model_and_records_its_settings_where_it_starts(tmp_path):
    """``prepare_store``: what a worker runs first when the job was built elsewhere (a template, a dry run)."""
    import dataclasses

    from transforms.io.qdrant import QdrantConfig

    store = EdgeStore(str(tmp_path / "q"))
    store.ensure_collection("docs", CollectionSpec(2, model="a", settings={"chunk_tokens": 64}))
    config = index.IndexConfig(input="x.parquet", collection="docs", model="b", qdrant=QdrantConfig(path=str(tmp_path / "q")))
    # empty: it takes any model, and records this run's
    assert index.prepare_store(config, CollectionSpec(2, model="b", settings={"chunk_tokens": 96})) is False
    assert store.collection_spec("docs") == CollectionSpec(2, model="b", settings={"chunk_tokens": 96})
    store.upsert("docs", [StorePoint(point_id("d", 0), [1.0, 0.0], {"doc_id": "d", "model": "b"})])
    with pytest.raises(PreflightError, match=r"^collection 'docs' at edge:.* holds vectors of model b; this job embeds with c\."):
        index.prepare_store(dataclasses.replace(config, model="c"), CollectionSpec(2, model="c"))
    assert store.collection_spec("docs").model == "b"


class _SwitchFails(EdgeStore):
    """The embedded store, whose alias switch meets a store gone away after the job."""

    def point_alias(self, alias: str, collection: str) -> str | None:
        raise ConnectionError("connection reset by peer")


def _open_switch_fails(config, *, keep_open: bool = False) -> EdgeStore:
    return _SwitchFails(config.path, shards=config.shards, lock_wait_s=config.lock_wait_s, keep_open=keep_open)


def test_a_failure_after_the_job_writes_the_failed_summary(tmp_path, minilm_path, versions, monkeypatch):
    monkeypatch.setattr(index, "open_store", _open_switch_fails)
    with pytest.raises(JobFailed) as failed:
        _index(tmp_path, minilm_path, _write(tmp_path / "c.parquet", versions[0][:3]), "docs", "--alias", "live")
    assert str(failed.value).startswith("the job ran, then finishing it failed: ")
    summary = json.loads((tmp_path / "docs.json").read_text())
    assert (summary["status"], summary["error"], summary["collection"]) == ("failed", str(failed.value), "docs")


def test_a_failed_job_leaves_no_ids_folder(tmp_path, minilm_path, versions, monkeypatch):
    """--delete-missing's ids go to a new local folder per run, removed however the run ends."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    def lost(p, timeout_s):
        assert [f.name for f in temp.iterdir() if f.name.startswith("corpus-etl-docs-")], "no ids folder made"
        raise RuntimeError("a worker was lost")

    real = index.run_and_wait
    monkeypatch.setattr(index, "run_and_wait", lost)
    corpus = _write(tmp_path / "c.parquet", versions[0][:3])
    with pytest.raises(RuntimeError, match="a worker was lost"):
        _index(tmp_path, minilm_path, corpus, "docs", "--delete-missing")
    assert json.loads((tmp_path / "docs.json").read_text())["status"] == "failed"
    assert [f.name for f in temp.iterdir() if f.name.startswith("corpus-etl-docs-")] == []
    monkeypatch.setattr(index, "run_and_wait", real)  # and a run that reads them removes it too
    assert _index(tmp_path, minilm_path, corpus, "docs", "--delete-missing")["deletion"]["documents_deleted"] == 0
    assert [f.name for f in temp.iterdir() if f.name.startswith("corpus-etl-docs-")] == []


def test_another_model_into_a_collection_of_one_is_refused_before_the_job(tmp_path, minilm_path, other_model,
                                                                         versions, sample_dir, caplog):
    corpus = _write(tmp_path / "v1.parquet", versions[0][:4])
    _index(tmp_path, minilm_path, corpus, "inc")
    before = _points(tmp_path, "inc")
    where = f"edge:{tmp_path / 'q'}"
    with pytest.raises(PreflightError) as refused:
        index.run(["--input", corpus, "--collection", "inc", "--model", other_model, "--qdrant-path",
                   str(tmp_path / "q"), *ARGS], test_pipeline=TestPipeline())  # fmt: skip
    assert str(refused.value) == (
        f"collection 'inc' at {where} holds vectors of model {minilm_path}; this job embeds with {other_model}. "
        "Vectors of two models cannot be compared, so nothing was written: index into a new collection "
        "(--collection NEW) and switch readers to it with --alias"
    )
    after = _points(tmp_path, "inc")
    assert after.keys() == before.keys() and {p["model"] for p, _ in after.values()} == {minilm_path}
    assert EdgeStore(str(tmp_path / "q")).meta("inc").model == minilm_path
    # Evaluating with another model is allowed (it may be compatible on purpose), with one warning naming both.
    caplog.clear()
    evaluate.run(["--collection", "inc", "--model", other_model, "--qdrant-path", str(tmp_path / "q"),
                  "--queries", sample_dir["queries"], "--qrels", sample_dir["qrels"], "--device", "cpu"])  # fmt: skip
    warning = (f"--model {other_model} is not {minilm_path}, the model collection 'inc' was built with: its scores "
               "compare query vectors of one model with document vectors of another")  # fmt: skip
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [warning]
    caplog.clear()
    search.run(["--collection", "inc", "--model", other_model, "--qdrant-path", str(tmp_path / "q"), "--device", "cpu",
                "json"])  # fmt: skip
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [warning]


def test_the_server_path_reindexes_the_same_way(tmp_path, minilm_path, versions, monkeypatch):
    """--qdrant-url goes through ServerStore (qdrant-client); qdrant-client's local mode stands in for the server."""
    import transforms.io.qdrant
    from transforms.io.qdrant import QdrantConfig, close_client, shared_client

    local = QdrantConfig(path=str(tmp_path / "server"))
    monkeypatch.setattr(transforms.io.qdrant, "shared_client", lambda config: shared_client(local))
    v1, v2 = versions
    url = ["--qdrant-url", "http://127.0.0.1:6333"]

    def run(corpus, *extra):
        return index.run(["--input", corpus, "--collection", "docs", "--model", minilm_path, *url, *ARGS, *extra],
                         test_pipeline=TestPipeline())  # fmt: skip

    run(_write(tmp_path / "v1.parquet", v1[:20]))
    v2_small = [r for r in v2 if r["id"] in {x["id"] for x in v1[:20]}] + v2[-2:]
    second = run(_write(tmp_path / "v2.parquet", v2_small), "--delete-missing")
    client, _ = shared_client(local)
    from transforms.io.qdrant import ServerStore

    assert ServerStore(client=client).collection_spec("docs").settings["model"] == minilm_path  # recorded too
    stored = {}
    offset = None
    while True:
        page, offset = client.scroll("docs", limit=256, offset=offset, with_payload=True)
        stored.update({str(p.id): p.payload for p in page})
        if offset is None:
            break
    close_client(local)
    held = {r["id"] for r in v2_small}
    assert {p["doc_id"] for p in stored.values()} == held  # deleted documents are gone; the emptied one stays
    assert second["deletion"]["documents_deleted"] == 5 and second["documents_unchanged"] == 3
    for p in stored.values():  # exact chunk sets: every document's chunks are 0..n-1
        n = sum(1 for q in stored.values() if q["doc_id"] == p["doc_id"])
        assert 0 <= p["chunk_index"] < n


# -- --delete-missing deletes only what the input does not hold ------------------------------------------
def test_ids_with_line_breaks_are_not_taken_for_missing_documents(tmp_path, minilm_path):
    rows = [{"id": i, "title": "t", "text": f"document {n} about rivers"}
            for n, i in enumerate(["ok", "line\nbreak", "sep\u2028x", "cr\rx", "tab\tand \\ quote\""])]  # fmt: skip
    corpus = _write(tmp_path / "c.parquet", rows)
    first = _index(tmp_path, minilm_path, corpus, "docs")
    for _ in range(2):  # a second rerun neither re-embeds nor deletes them again
        again = _index(tmp_path, minilm_path, corpus, "docs", "--delete-missing")
        assert (again["deletion"]["documents_deleted"], again["chunks_embedded"]) == (0, 0)
        assert again["points_in_collection"] == first["points_in_collection"] == 5
    assert {p["doc_id"] for p, _ in _points(tmp_path, "docs").values()} == {r["id"] for r in rows}


def test_rows_refused_as_bad_input_keep_their_documents(tmp_path, minilm_path, versions):
    rows = versions[0][:10]
    _index(tmp_path, minilm_path, _write(tmp_path / "v1.parquet", rows), "docs")
    before = _points(tmp_path, "docs")
    # The same export with its text column now a number: every row is refused (non-string text).
    table = pa.table({"id": [r["id"] for r in rows], "title": [r["title"] for r in rows],
                      "text": pa.array([len(r["text"]) for r in rows], pa.int64())})  # fmt: skip
    pq.write_table(table, tmp_path / "v2.parquet")
    summary = _index(tmp_path, minilm_path, tmp_path / "v2.parquet", "docs", "--delete-missing")
    assert summary["deletion"] == {"documents_deleted": 0, "points_deleted": 0, "documents_kept_refused": 10,
                                   "list": None}  # fmt: skip
    assert summary["status"] == "partial" and summary["counters"]["dead_letters"] == 10
    assert sorted(_points(tmp_path, "docs")) == sorted(before)
    assert "  deleted          0 documents, 0 points  (kept 10 whose rows were refused)" in index.format_summary(summary)


def test_a_refused_row_without_an_id_stops_deletion(tmp_path, minilm_path, versions):
    rows = versions[0][:3]
    _index(tmp_path, minilm_path, _write(tmp_path / "v1.parquet", rows), "docs")
    before = _points(tmp_path, "docs")
    # rows[2] lost its id: it may be any stored document, so none is deleted
    summary = _index(tmp_path, minilm_path, _write(tmp_path / "v2.parquet", [*rows[:2], {**rows[2], "id": None}]),
                     "docs", "--delete-missing")  # fmt: skip
    assert summary["deletion"] == {
        "skipped": "cannot tell every document the input holds (1 refused row(s) have a null or unreadable id): "
                   "nothing deleted", "documents_deleted": 0, "points_deleted": 0,
    }  # fmt: skip
    assert sorted(_points(tmp_path, "docs")) == sorted(before)


def test_ids_the_driver_cannot_read_back_delete_nothing(tmp_path, minilm_path, versions, monkeypatch):
    # Workers on other machines (Flink, a remote worker pool) with no --temp_location write the ids into their own
    # local folder; the driver read none, took every stored document for missing and deleted the collection.
    rows = versions[0][:3]
    _index(tmp_path, minilm_path, _write(tmp_path / "v1.parquet", rows), "docs")
    before = _points(tmp_path, "docs")
    write = index._write_doc_ids
    elsewhere = tmp_path / "worker-machine"
    elsewhere.mkdir()
    monkeypatch.setattr(index, "_write_doc_ids", lambda ids, prefix, kind, label: write(
        ids, str(elsewhere / os.path.basename(prefix)), kind, label))  # fmt: skip
    summary = _index(tmp_path, minilm_path, _write(tmp_path / "v2.parquet", rows[:2]), "docs", "--delete-missing")
    assert summary["deletion"]["documents_deleted"] == 0
    assert "the ids of the documents read did not all reach this driver (none read back from" in summary["deletion"]["skipped"]
    assert sorted(_points(tmp_path, "docs")) == sorted(before)


def test_an_input_of_zero_rows_deletes_nothing_and_the_run_is_partial(tmp_path, minilm_path, versions):
    # An upstream export that wrote only empty files emptied the whole collection, status ok.
    rows = versions[0][:3]
    _index(tmp_path, minilm_path, _write(tmp_path / "v1.parquet", rows), "docs")
    before = _points(tmp_path, "docs")
    empty = pa.Table.from_pylist(rows).slice(0, 0)
    pq.write_table(empty, tmp_path / "empty.parquet")
    summary = _index(tmp_path, minilm_path, str(tmp_path / "empty.parquet"), "docs", "--delete-missing")
    assert summary["deletion"] == {
        "skipped": "cannot tell every document the input holds (the input holds no document: to empty the "
                   "collection, delete it): nothing deleted", "documents_deleted": 0, "points_deleted": 0,
    }  # fmt: skip
    assert (summary["status"], summary["partial"]) == ("partial", "--delete-missing deleted nothing (see deletion.skipped)")
    assert sorted(_points(tmp_path, "docs")) == sorted(before)


def test_a_run_into_an_existing_empty_collection_records_its_model_before_it_writes(tmp_path, minilm_path, versions,
                                                                                    monkeypatch):
    # Else: created by a run of model b that wrote nothing, then a run of this model interrupted after writing
    # would leave b recorded, and the rerun with this model would be refused while b's would mix the two.
    store = EdgeStore(str(tmp_path / "q"))
    store.ensure_collection("docs", CollectionSpec(384, model="b"))

    def interrupted(*args, **kwargs):
        raise RuntimeError("interrupted after the points were written")

    monkeypatch.setattr(index, "_finish", interrupted)
    with pytest.raises(Exception, match="interrupted after the points were written"):
        _index(tmp_path, minilm_path, _write(tmp_path / "c.parquet", versions[0][:4]), "docs")
    assert store.collection_spec("docs").model == minilm_path and _points(tmp_path, "docs")


def test_a_model_given_as_a_relative_folder_is_recorded_absolute(tmp_path, minilm_path, versions, monkeypatch):
    # (configs.model_location.) Recorded as typed, "models/m" would not match the same folder from another working
    # directory: the next run would be refused as another model, and the gate could not load the target's model.
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "models" / "m").symlink_to(minilm_path)
    corpus = _write(tmp_path / "c.parquet", versions[0][:2])
    store = str(tmp_path / "q")
    monkeypatch.chdir(work)
    index.run(["--input", corpus, "--collection", "docs", "--model", "models/m", "--qdrant-path", store, *ARGS],
              test_pipeline=TestPipeline())  # fmt: skip
    assert EdgeStore(store).collection_spec("docs").model == str(work / "models" / "m")
    monkeypatch.chdir(tmp_path)
    summary = index.run(["--input", corpus, "--collection", "docs", "--model", str(work / "models" / "m"),
                         "--qdrant-path", store, *ARGS], test_pipeline=TestPipeline())  # fmt: skip
    assert summary["status"] == "ok"


@pytest.mark.parametrize("same_model", [True, False])
def test_the_gate_embeds_its_queries_with_the_query_instruction(monkeypatch, same_model):
    """--query-instruction reaches the gate's query encoders (both collections'); it was parsed and dropped,
    so an index job gated Qwen3 queries with the model's default instruction whatever the flag said."""
    from pipelines.configs import index_config
    from pipelines.flags import index_parser

    task = "Given a question, retrieve passages that answer it"
    gate = ["--alias", "live", "--gate-queries", "q.jsonl", "--gate-qrels", "qrels.tsv"]
    args = index_parser().parse_known_args(["--input", "x", "--collection", "c", "--query-instruction", task, *gate])[0]
    config = index_config(args)
    assert config.query_instruction == task
    loaded = []

    def query_encoder(model, **kwargs):
        loaded.append((model, kwargs.get("query_instruction")))
        return object()

    monkeypatch.setattr(evaluate, "query_encoder", query_encoder)
    monkeypatch.setattr(evaluate, "evaluate_collection", lambda *a, **k: {"nDCG@10": 0.5})

    class Store:
        def collection_spec(self, name):
            return CollectionSpec(8, model=config.model if same_model else "other/model", settings={"dim": 4})

    out = index._gate(config, Store(), "old", ({"q1": "what"}, {"q1": {"d1": 1}}))
    assert out["current"] == 0.5 and out["refused"] is None
    assert loaded == [(config.model, task), (config.model if same_model else "other/model", task)]


def test_a_query_instruction_without_a_gate_is_refused():
    from pipelines.configs import index_config
    from pipelines.flags import index_parser

    args = index_parser().parse_known_args(["--input", "x", "--collection", "c", "--query-instruction", "t"])[0]
    with pytest.raises(ValueError, match=r"^--query-instruction applies to the gate's queries"):
        index_config(args)


def test_a_model_retrained_in_place_re_embeds_every_chunk(tmp_path, minilm_path, versions):
    from tests.test_model_revision import model_copy, retrain_in_place

    model = model_copy(minilm_path, tmp_path / "model")
    corpus = _write(tmp_path / "v1.parquet", versions[0][:4])
    first = _index(tmp_path, model, corpus, "docs")
    before = _points(tmp_path, "docs")
    retrain_in_place(model)  # same names and shapes, new values: what fine-tuning into the same folder does
    again = _index(tmp_path, model, corpus, "docs")
    assert (again["chunks_embedded"], again["chunks_reused"]) == (first["chunks_embedded"], 0)
    after = _points(tmp_path, "docs")
    assert sorted(after) == sorted(before) and all(not np.allclose(after[i][1], before[i][1]) for i in before)


def _as_an_earlier_version(monkeypatch) -> None:
    """Revisions in the form versions before 2026-11-27 recorded them, in the driver that reads the model."""
    from transforms.models import settings

    monkeypatch.setattr(settings, "model_revision", settings.legacy_model_revision)


def test_a_collection_of_an_earlier_version_is_taken_over_without_embedding_again(tmp_path, minilm_path, versions,
                                                                                   monkeypatch):
    from tests.test_model_revision import model_copy

    model = model_copy(minilm_path, tmp_path / "model")
    corpus = _write(tmp_path / "v1.parquet", versions[0][:4])
    with monkeypatch.context() as m:
        _as_an_earlier_version(m)
        first = _index(tmp_path, model, corpus, "docs")
    store = EdgeStore(str(tmp_path / "q"))
    assert store.meta("docs").settings["revision"].startswith("sha256:")
    before = _points(tmp_path, "docs")
    taken = _index(tmp_path, model, corpus, "docs")
    n = first["chunks_embedded"]
    assert (taken["chunks_embedded"], taken["chunks_reused"], taken["payloads_updated"]) == (0, n, n)
    after = _points(tmp_path, "docs")
    assert all(np.array_equal(after[i][1], before[i][1]) for i in before)  # the stored vectors, kept
    assert all(after[i][0]["fingerprint"] != before[i][0]["fingerprint"] for i in before)
    settings = EdgeStore(str(tmp_path / "q")).meta("docs").settings
    assert settings["revision"] == EmbeddingSpec.read(model).revision and index.MIGRATING not in settings
    third = _index(tmp_path, model, corpus, "docs")
    assert (third["documents_unchanged"], third["chunks_reused"], third["payloads_updated"]) == (4, n, 0)


def test_an_earlier_version_s_collection_is_embedded_again_when_the_model_files_changed(tmp_path, minilm_path,
                                                                                        versions, monkeypatch):
    from tests.test_model_revision import model_copy

    model = model_copy(minilm_path, tmp_path / "model")
    corpus = _write(tmp_path / "v1.parquet", versions[0][:4])
    with monkeypatch.context() as m:
        _as_an_earlier_version(m)
        first = _index(tmp_path, model, corpus, "docs")
    with open(os.path.join(model, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(model, "tokenizer_config.json"), "w") as f:
        json.dump({**cfg, "model_max_length": 256}, f)  # what the earlier revision saw: no longer what it recorded
    again = _index(tmp_path, model, corpus, "docs")
    assert (again["chunks_embedded"], again["chunks_reused"]) == (first["chunks_embedded"], 0)


def test_a_take_over_that_did_not_finish_goes_on_in_the_next_run(tmp_path, minilm_path):
    # A run taking over records the revision it took over from at its start; a failed run leaves it there (the
    # record at the end, which drops it, is not reached), and the rerun takes over the points still left.
    import types

    from transforms.io.incremental import settings_digest
    from transforms.models.settings import legacy_model_revision

    store = EdgeStore(str(tmp_path / "q"))
    was = legacy_model_revision(minilm_path)
    settings = {"model": minilm_path, "revision": EmbeddingSpec.read(minilm_path).revision, "dim": None,
                "max_length": None, "chunk_tokens": 96, "chunk_overlap": 16}  # fmt: skip
    store.ensure_collection("docs", CollectionSpec(384, model=minilm_path, settings={**settings, index.MIGRATING: was}))
    config = types.SimpleNamespace(collection="docs", model=minilm_path)
    assert index.legacy_digest(store, config, settings) == (was, settings_digest({**settings, "revision": was}))
    store.record_collection("docs", CollectionSpec(384, model=minilm_path, settings=settings))  # the run finished
    assert index.legacy_digest(store, config, settings) is None
    store.record_collection("docs", CollectionSpec(384, model=minilm_path, settings={**settings, "revision": was}))
    assert index.legacy_digest(store, config, settings)[0] == was  # an earlier version's own record
    assert index.legacy_digest(store, types.SimpleNamespace(collection="new", model=minilm_path), settings) is None


def test_the_gate_scores_a_current_target_an_earlier_version_built(tmp_path, minilm_path, sample_dir,
                                                                    gate_corpus_short, monkeypatch):
    # Its revision is in the earlier form: compared in that form, the model is unchanged and the target is scored.
    gate = ["--gate-queries", sample_dir["queries"], "--gate-qrels", sample_dir["qrels"]]
    with monkeypatch.context() as m:
        _as_an_earlier_version(m)
        old = _index(tmp_path, minilm_path, gate_corpus_short, "old", "--alias", "live", *gate)
    new = _index(tmp_path, minilm_path, gate_corpus_short, "new", "--alias", "live", *gate)
    assert new["status"] == "ok" and new["alias"]["gate"]["refused"] is None
    assert new["alias"]["gate"]["current"] == old["alias"]["gate"]["new"]
    assert EdgeStore(str(tmp_path / "q")).aliases() == {"live": "new"}

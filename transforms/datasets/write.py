"""All label-dataset files together, and the Beam transform that writes them."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.datasets.distill import distillation_parquet, distillation_rows
from transforms.datasets.formats import (
    DISTILLATION_FILE,
    FORMAT,
    HISTOGRAM_FILE,
    MANIFEST_FILE,
    QRELS_FILE,
    QUERIES_FILE,
    REPORT_FILE,
    RERANK_RUN_FILE,
    RETRIEVAL_RUN_FILE,
    RUN_STATS_FILE,
    SPLITS,
    TREC_QRELS_FILE,
    LabelDatasetsConfig,
    QueryJudgements,
    beir_queries_lines,
    grade_ranges,
    qrels_dict,
    qrels_lines,
    run_dict,
    trec_qrels_lines,
    trec_run_lines,
)
from transforms.datasets.metrics import evaluate_first_stage, label_distribution
from transforms.datasets.report import NO_QUERY_LABELLED, accounting, build_report, file_digests, manifest_json

# ---------------------------------------------------------------------------------------------
# Everything together
# ---------------------------------------------------------------------------------------------


def _text(lines: Sequence[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


def build_label_files(
    items: Iterable[QueryJudgements],
    config: LabelDatasetsConfig,
    pipeline_counts: Mapping[str, int] | None = None,
) -> dict[str, bytes]:
    """Every deterministic output file, ``{relative path: bytes}`` (all but run_stats.json).

    ``pipeline_counts`` (e.g. rows read, dead letters per stage) go to the manifest as given.
    """
    items = sorted(items, key=lambda i: i.query.query_id)
    acct = accounting(pipeline_counts or {}, items)
    if not items:  # no datasets to write: the manifest alone says why (the driver fails the job)
        manifest = {"format": FORMAT, "status": NO_QUERY_LABELLED, "provenance": dict(config.provenance),
                    "accounting": acct, "files": {}}
        return {MANIFEST_FILE: manifest_json(manifest)}
    ids = [i.query.query_id for i in items]
    if len(set(ids)) != len(ids):
        dupes = sorted({q for q in ids if ids.count(q) > 1})[:5]
        raise ValueError(f"query ids appear more than once: {dupes}")
    thresholds = config.thresholds
    eval_items = [i for i in items if i.split == "eval"]
    eval_pairs = [j for i in eval_items for j in i.judgements]
    rows = distillation_rows(items, thresholds, config.num_hard_negatives)

    files = {
        QUERIES_FILE: _text(beir_queries_lines(i.query for i in eval_items)),
        QRELS_FILE: _text(qrels_lines(eval_pairs, thresholds)),
        TREC_QRELS_FILE: _text(trec_qrels_lines(eval_pairs, thresholds)),
        RETRIEVAL_RUN_FILE: _text(trec_run_lines(eval_pairs, config.retrieval_tag, "first_stage")),
        RERANK_RUN_FILE: _text(trec_run_lines(eval_pairs, config.rerank_tag, "teacher")),
        DISTILLATION_FILE: distillation_parquet(rows),
    }
    qrels = qrels_dict(eval_pairs, thresholds)
    metrics = evaluate_first_stage(qrels, run_dict(eval_pairs, "first_stage"), config.recall_k)
    counts = {
        "accounting": acct,
        "queries": {s: sum(1 for i in items if i.split == s) for s in SPLITS},
        "judgements": {s: sum(len(i.judgements) for i in items if i.split == s) for s in SPLITS},
        "labels": {
            s: {str(g): n for g, n in dist.items()}
            for s, dist in label_distribution(items, thresholds).items()
        },
        "eval_queries_evaluated": sum(1 for docs in qrels.values() if any(g >= 1 for g in docs.values())),
        "train_queries_without_positive": sum(1 for r in rows if not r["positive_ids"]),
        "train_queries_short_of_negatives": sum(
            1 for r in rows if len(r["negative_ids"]) < config.num_hard_negatives
        ),
    }
    files.update(
        build_report(
            items, thresholds=thresholds, metrics=metrics, counts=counts, provenance=config.provenance
        )
    )
    manifest = {
        "format": FORMAT,
        "status": "ok",
        "provenance": dict(config.provenance),
        "labels": {
            "thresholds": list(thresholds),
            "grades": {str(g): rng for g, rng in grade_ranges(thresholds).items()},
        },
        "splits": {
            "eval": [QUERIES_FILE, QRELS_FILE, TREC_QRELS_FILE, RETRIEVAL_RUN_FILE, RERANK_RUN_FILE],
            "train": [DISTILLATION_FILE],
        },
        "hard_negatives": {
            "per_query": config.num_hard_negatives,
            "rule": "judged documents graded 0, best first-stage rank first",
        },
        "run_tags": {"retrieval": config.retrieval_tag, "rerank": config.rerank_tag},
        "first_stage_metrics": {name: round(v, 6) for name, v in metrics.items()},
        "accounting": acct,
        "counts": {k: v for k, v in counts.items() if k != "accounting"},
        "pipeline_counts": {k: int(v) for k, v in sorted((pipeline_counts or {}).items())},
        "files": file_digests(files),
    }
    files[MANIFEST_FILE] = manifest_json(manifest)
    return files


def write_files(out_dir: str, files: Mapping[str, bytes]) -> list[str]:
    """Write ``{relative path: bytes}`` under ``out_dir`` (local or gs://); the full paths, sorted."""
    written = []
    for rel, data in sorted(files.items()):
        path = FileSystems.join(out_dir, *rel.split("/"))
        with FileSystems.create(path) as f:
            f.write(data)
        written.append(path)
    return written


# The status of the manifest that stands in --out while a run writes its files (``write_manifest_last``).
WRITING = "incomplete: the write of these files did not finish; rerun the job"


def write_manifest_last(out_dir: str, files: Mapping[str, bytes]) -> list[str]:
    """Write ``files`` (``build_label_files``) under ``out_dir``, manifest.json last; the full paths, sorted.

    While the other files are written, the folder's manifest is a stand-in with status ``WRITING`` that
    lists their names without digests: a write that stops partway (a full disk, a store error) leaves no
    manifest that says "ok" over files still holding an earlier run's bytes, and the next run still
    knows which files it may remove (``remove_stale_files``).
    """
    data = {rel: b for rel, b in files.items() if rel != MANIFEST_FILE}
    if data:
        pending = {"format": FORMAT, "status": WRITING, "files": {rel: {} for rel in sorted(data)}}
        write_files(out_dir, {MANIFEST_FILE: manifest_json(pending)})
    paths = write_files(out_dir, data)
    return sorted(paths + write_files(out_dir, {MANIFEST_FILE: files[MANIFEST_FILE]}))


# Every file a label run may write under --out except the manifest (which every run rewrites).
DATASET_FILES = (QUERIES_FILE, QRELS_FILE, TREC_QRELS_FILE, RETRIEVAL_RUN_FILE, RERANK_RUN_FILE, DISTILLATION_FILE,
                 REPORT_FILE, HISTOGRAM_FILE, RUN_STATS_FILE)  # fmt: skip


def remove_stale_files(out_dir: str, keep: Iterable[str]) -> list[str]:
    """Delete the files an earlier run's manifest in ``out_dir`` lists that this run does not write; the paths.

    A rerun into the same folder overwrites the files it writes; without this, a run that writes fewer (one that
    labels nothing writes only its manifest) would leave the earlier run's datasets beside a manifest that does
    not list them. Only the dataset files a label run writes (``DATASET_FILES``) that a corpus-etl manifest
    lists are touched (and run_stats.json), locally only plain files, never folders or other files;
    a missing or unreadable manifest removes nothing. Idempotent, so a retried write bundle is safe.
    """
    manifest_path = FileSystems.join(out_dir, MANIFEST_FILE)
    try:
        if not FileSystems.exists(manifest_path):
            return []
        with FileSystems.open(manifest_path) as f:
            earlier = json.loads(f.read())
        listed = set(earlier["files"]) if earlier.get("format") == FORMAT else set()
    except (OSError, ValueError, KeyError, TypeError):
        return []
    # Only the file names a label run writes, whatever a (possibly edited) manifest lists: never a folder
    # ("./", "qrels"), a path outside --out, or a user's file.
    ours = set(DATASET_FILES)
    removed = []
    for rel in sorted(((listed & ours) | {RUN_STATS_FILE}) - set(keep)):
        path = FileSystems.join(out_dir, *rel.split("/"))
        if "://" not in out_dir and (os.path.islink(path) or not os.path.isfile(path)):
            continue  # locally, a plain file only: a symlinked one may point outside --out
        if FileSystems.exists(path):
            FileSystems.delete([path])
            removed.append(path)
            if "://" not in out_dir:  # a local folder (qrels/) this left empty goes too, as `rm` of the set would
                with contextlib.suppress(OSError):  # not empty, or gone: keep it
                    parent = os.path.dirname(path)
                    if os.path.realpath(parent) != os.path.realpath(out_dir):
                        os.rmdir(parent)
    return removed


def run_stats_json(started_at: float | None, finished_at: float) -> bytes:
    """run_stats.json: wall-clock start, finish and duration (UTC) — deliberately apart from the manifest."""

    def iso(t: float) -> str:
        return datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc).isoformat()

    stats: dict[str, Any] = {"finished_at": iso(finished_at)}
    if started_at is not None:
        stats.update(started_at=iso(started_at), duration_s=round(finished_at - started_at, 3))
    return manifest_json(stats)


# ---------------------------------------------------------------------------------------------
# Beam
# ---------------------------------------------------------------------------------------------


def _drop_unused_texts(item: QueryJudgements) -> QueryJudgements:
    # Eval queries' texts are not written anywhere; dropping them keeps the gathered list small.
    return dataclasses.replace(item, doc_texts={}) if item.split == "eval" else item


class _WriteLabelDatasetsFn(beam.DoFn):
    def __init__(self, out_dir: str, config: LabelDatasetsConfig) -> None:
        self.out_dir = out_dir
        self.config = config

    def process(self, items: list[QueryJudgements], counts: Iterable[tuple[str, int]] = ()):
        started = time.perf_counter()
        summed: dict[str, int] = {}
        for name, n in counts:
            summed[name] = summed.get(name, 0) + int(n)
        files = build_label_files(items, self.config, summed)
        remove_stale_files(self.out_dir, [*files, *([RUN_STATS_FILE] if items else [])])
        paths = write_manifest_last(self.out_dir, files)
        if items:  # written last and alone: the only file whose bytes change between identical runs
            paths += write_files(
                self.out_dir, {RUN_STATS_FILE: run_stats_json(self.config.started_at, time.time())}
            )
        Metrics.counter("corpus_etl", "write_ms").inc(int((time.perf_counter() - started) * 1000))
        yield from paths


class WriteLabelDatasets(beam.PTransform):
    """``QueryJudgements`` → every label-dataset file under ``out_dir``; emits the written paths.

    All queries are gathered on one worker (``ToList``) and sorted by id, which is what
    makes the files byte-identical across runs. Label sets are small next to the corpus:
    what is held is about the size of the distillation Parquet uncompressed (train queries
    × candidates × document length) — e.g. 10k queries × 100 candidates × 1 KB ≈ 1 GB —
    so keep ``--max-queries``/``--top-k`` to that scale. Eval queries' document texts are
    dropped before the gather.

    ``pipeline_counts``: an optional PCollection of ``(name, count)`` (e.g. dead letters per
    stage), summed per name into the manifest's ``pipeline_counts``.
    """

    def __init__(
        self,
        out_dir: str,
        config: LabelDatasetsConfig = LabelDatasetsConfig(),
        pipeline_counts: beam.PCollection | None = None,
    ) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.config = config
        self.pipeline_counts = pipeline_counts

    def expand(self, results):
        gathered = (
            results | "DropUnusedTexts" >> beam.Map(_drop_unused_texts) | "Gather" >> beam.combiners.ToList()
        )
        write = _WriteLabelDatasetsFn(self.out_dir, self.config)
        if self.pipeline_counts is None:
            return gathered | "Write" >> beam.ParDo(write)
        return gathered | "Write" >> beam.ParDo(write, counts=beam.pvalue.AsList(self.pipeline_counts))

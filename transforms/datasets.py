"""Teacher judgements → evaluation set, distillation set, report and manifest.

Which query goes where (the side is decided upstream by ``queries.assign_split``):

* **eval** queries → the BEIR-style evaluation set: ``queries.jsonl``, ``qrels/test.tsv``
  (and the same labels as TREC qrels in ``qrels/test.trec``), ``runs/retrieval.trec``
  (first-stage order) and ``runs/rerank.trec`` (teacher order). The report's first-stage
  metrics are computed on exactly these files' contents.
* **train** queries → ``distillation/train.parquet``, one row per query.

Layout under ``out_dir``::

    queries.jsonl               {"_id": ..., "text": ...} per eval query, sorted by _id
    qrels/test.tsv              BEIR qrels: header "query-id\\tcorpus-id\\tscore", every judged
                                pair with its grade (0 included: judged non-relevant)
    qrels/test.trec             the same labels as "qid 0 docid grade" (trec_eval, ir_measures)
    runs/retrieval.trec         "qid Q0 docid rank score tag", first-stage order and scores
    runs/rerank.trec            same, teacher order, teacher scores
    distillation/train.parquet  see DISTILLATION_SCHEMA
    report.md                   metrics, label distribution, histogram (teacher_scores.png)
    teacher_scores.png
    manifest.json               provenance, labels, counts, metrics, sha256 of every file above
    run_stats.json              wall-clock times: the one non-deterministic file

Everything except ``run_stats.json`` is byte-identical for the same inputs: rows sorted,
JSON with sorted keys, floats as Python's shortest round-trip ``repr`` (lossless, so no
ties appear that the teacher did not produce), no timestamps, PNG without software
metadata.

Grades: ``grade(score, thresholds)`` is the number of thresholds at or below the score;
with ``(0.5, 0.9)``: below 0.5 → 0, [0.5, 0.9) → 1, 0.9 and above → 2.

Hard negatives (distillation): judged documents graded 0 by the teacher, the best
first-stage ranks first: the ones the first stage confuses for relevant.

Using the distillation Parquet with sentence-transformers ``MarginMSELoss`` or
``DistillKLDivLoss`` (inputs ``(query, positive, negative_1..n)``, label
``[teacher(q, pos), teacher(q, neg_1), ...]``)::

    ds = load_dataset("parquet", data_files="OUT/distillation/train.parquet", split="train")
    n = 4
    ds = ds.filter(lambda r: len(r["positive_ids"]) > 0 and len(r["negative_ids"]) >= n)
    ds = ds.map(lambda r: {
        "positive": r["positive_texts"][0],
        **{f"negative_{i + 1}": r["negative_texts"][i] for i in range(n)},
        "label": [r["positive_scores"][0], *r["negative_scores"][:n]],
    })
    ds = ds.select_columns(["query", "positive", *[f"negative_{i + 1}" for i in range(n)], "label"])

For listwise distillation use ``doc_texts``/``teacher_scores`` (all judged documents).
No column is named label/labels/score/scores, so sentence-transformers never mistakes one
for the label before that ``select_columns``.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import hashlib
import io
import itertools
import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import apache_beam as beam
import ir_measures
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from transforms.types import DeadLetter, Judgement, Query

SPLITS = ("eval", "train")

QUERIES_FILE = "queries.jsonl"
QRELS_FILE = "qrels/test.tsv"
TREC_QRELS_FILE = "qrels/test.trec"
RETRIEVAL_RUN_FILE = "runs/retrieval.trec"
RERANK_RUN_FILE = "runs/rerank.trec"
DISTILLATION_FILE = "distillation/train.parquet"
REPORT_FILE = "report.md"
HISTOGRAM_FILE = "teacher_scores.png"
MANIFEST_FILE = "manifest.json"
RUN_STATS_FILE = "run_stats.json"

FORMAT = "corpus-etl/label-datasets/1"

_STRINGS = pa.list_(pa.string())
_FLOATS = pa.list_(pa.float64())
_INTS = pa.list_(pa.int32())

DISTILLATION_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("query", pa.string()),
        ("count", pa.int64()),  # summed log frequency, for weighting
        # Every judged document, in first-stage order; the lists are aligned.
        ("doc_ids", _STRINGS),
        ("doc_texts", _STRINGS),
        ("teacher_scores", _FLOATS),
        ("grades", _INTS),
        ("first_stage_scores", _FLOATS),
        ("first_stage_ranks", _INTS),
        # Grade >= 1, best teacher score first.
        ("positive_ids", _STRINGS),
        ("positive_texts", _STRINGS),
        ("positive_scores", _FLOATS),
        # Hard negatives: grade 0, best first-stage rank first, at most num_hard_negatives.
        ("negative_ids", _STRINGS),
        ("negative_texts", _STRINGS),
        ("negative_scores", _FLOATS),
    ]
)


# ---------------------------------------------------------------------------------------------
# Records and config
# ---------------------------------------------------------------------------------------------


def _trec_safe(kind: str, value: str) -> None:
    # TREC files are whitespace-separated: an empty id or one with a space would shift columns.
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{kind} {value!r} is empty or contains whitespace; TREC files cannot hold it")


@dataclasses.dataclass(frozen=True)
class QueryJudgements:
    """One query with its split and the teacher's judgement of each first-stage candidate.

    ``doc_texts`` must hold the text of every judged document of a **train** query (they
    go into the distillation Parquet); eval queries need none. Raises ``ValueError`` on
    inconsistent input (foreign query ids, repeated documents, non-finite scores, ids
    that TREC files cannot hold), so a caller can dead-letter the query where it is built.
    """

    query: Query
    split: str
    judgements: tuple[Judgement, ...]
    doc_texts: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        _trec_safe("query id", self.query.query_id)
        seen: set[str] = set()
        for j in self.judgements:
            if j.query_id != self.query.query_id:
                raise ValueError(
                    f"judgement for query {j.query_id!r} given with query {self.query.query_id!r}"
                )
            _trec_safe("doc id", j.doc_id)
            if j.doc_id in seen:
                raise ValueError(f"doc {j.doc_id!r} judged twice for query {j.query_id!r}")
            seen.add(j.doc_id)
            if not (math.isfinite(j.teacher_score) and math.isfinite(j.first_stage_score)):
                raise ValueError(f"non-finite score for ({j.query_id!r}, {j.doc_id!r})")
            if self.split == "train" and j.doc_id not in self.doc_texts:
                raise ValueError(f"no text for doc {j.doc_id!r} of train query {j.query_id!r}")


@dataclasses.dataclass(frozen=True)
class LabelDatasetsConfig:
    """How the label datasets are written.

    ``provenance`` is copied into manifest.json as given: models and revisions, instruction,
    top_k, collection or candidates file, input files, sampling, seed, eval_fraction. It
    must be JSON-serialisable and deterministic (no times: those go in ``started_at``,
    epoch seconds, which only reaches run_stats.json).
    """

    thresholds: tuple[float, ...] = (0.5, 0.9)
    num_hard_negatives: int = 8
    # Recall cutoff of the report. Recall at the full candidate depth is 1 by construction
    # (the teacher judged only first-stage candidates), so keep it below --top-k.
    recall_k: int = 20
    retrieval_tag: str = "first_stage"
    rerank_tag: str = "teacher"
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    started_at: float | None = None

    def __post_init__(self) -> None:
        validate_thresholds(self.thresholds)
        if self.num_hard_negatives < 0:
            raise ValueError(f"num_hard_negatives must be >= 0, got {self.num_hard_negatives}")
        if self.recall_k < 1:
            raise ValueError(f"recall_k must be >= 1, got {self.recall_k}")
        _trec_safe("run tag", self.retrieval_tag)
        _trec_safe("run tag", self.rerank_tag)
        try:
            json.dumps(self.provenance, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"provenance must be JSON-serialisable: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Grades, qrels, runs, queries
# ---------------------------------------------------------------------------------------------


def validate_thresholds(thresholds: Sequence[float]) -> None:
    if not thresholds:
        raise ValueError("at least one label threshold is needed")
    if any(not math.isfinite(t) for t in thresholds):
        raise ValueError(f"label thresholds must be finite, got {tuple(thresholds)}")
    if any(b <= a for a, b in itertools.pairwise(thresholds)):
        raise ValueError(f"label thresholds must be strictly increasing, got {tuple(thresholds)}")


def parse_thresholds(spec: str) -> tuple[float, ...]:
    """``"0.5,0.9"`` → ``(0.5, 0.9)``, validated."""
    try:
        thresholds = tuple(float(p) for p in spec.split(","))
    except ValueError:
        raise ValueError(f"--label-thresholds must be comma-separated numbers, got {spec!r}") from None
    validate_thresholds(thresholds)
    return thresholds


def grade(score: float, thresholds: Sequence[float]) -> int:
    """Graded label: the number of thresholds ``<= score`` (a score on a threshold is above it)."""
    if math.isnan(score):
        raise ValueError("cannot grade a NaN teacher score")
    return bisect.bisect_right(thresholds, score)


def grade_ranges(thresholds: Sequence[float]) -> dict[int, str]:
    """Human-readable teacher-score range of each grade."""
    bounds = [None, *thresholds, None]
    out = {}
    for g in range(len(thresholds) + 1):
        lo, hi = bounds[g], bounds[g + 1]
        if lo is None:
            out[g] = f"score < {hi:g}"
        elif hi is None:
            out[g] = f"score >= {lo:g}"
        else:
            out[g] = f"{lo:g} <= score < {hi:g}"
    return out


def _fmt(x: float) -> str:
    return repr(float(x))


def _sorted_pairs(judgements: Iterable[Judgement]) -> list[Judgement]:
    return sorted(judgements, key=lambda j: (j.query_id, j.doc_id))


def qrels_lines(judgements: Iterable[Judgement], thresholds: Sequence[float]) -> list[str]:
    """BEIR ``qrels/*.tsv``: header, then ``query-id\\tcorpus-id\\tgrade`` sorted by (query, doc)."""
    rows = [
        f"{j.query_id}\t{j.doc_id}\t{grade(j.teacher_score, thresholds)}" for j in _sorted_pairs(judgements)
    ]
    return ["query-id\tcorpus-id\tscore", *rows]


def trec_qrels_lines(judgements: Iterable[Judgement], thresholds: Sequence[float]) -> list[str]:
    """TREC qrels ``qid 0 docid grade``, sorted by (query, doc)."""
    return [
        f"{j.query_id} 0 {j.doc_id} {grade(j.teacher_score, thresholds)}" for j in _sorted_pairs(judgements)
    ]


RunOrder = Literal["first_stage", "teacher"]


def _ranked(judgements: Iterable[Judgement], order: RunOrder) -> dict[str, list[Judgement]]:
    by_query: dict[str, list[Judgement]] = {}
    for j in judgements:
        by_query.setdefault(j.query_id, []).append(j)
    if order not in ("first_stage", "teacher"):
        raise ValueError(f"order must be 'first_stage' or 'teacher', got {order!r}")

    def key(j: Judgement) -> tuple:
        if order == "first_stage":
            return (j.first_stage_rank, j.doc_id)
        return (-j.teacher_score, j.first_stage_rank, j.doc_id)

    return {qid: sorted(js, key=key) for qid, js in sorted(by_query.items())}


def trec_run_lines(judgements: Iterable[Judgement], tag: str, order: RunOrder) -> list[str]:
    """TREC run ``qid Q0 docid rank score tag``, queries sorted by id.

    ``order="first_stage"``: by first-stage rank, first-stage scores; ``"teacher"``: by
    teacher score (ties: first-stage rank), teacher scores. Ranks are renumbered 1..n.
    Evaluators (trec_eval, ir_measures) re-sort by score and break ties by doc id, so
    equal scores may be evaluated in a different order than the rank column says.
    """
    _trec_safe("run tag", tag)
    lines = []
    for qid, ranked in _ranked(judgements, order).items():
        for rank, j in enumerate(ranked, start=1):
            score = j.first_stage_score if order == "first_stage" else j.teacher_score
            lines.append(f"{qid} Q0 {j.doc_id} {rank} {_fmt(score)} {tag}")
    return lines


def beir_queries_lines(queries: Iterable[Query]) -> list[str]:
    """BEIR ``queries.jsonl``: ``{"_id", "text"}`` per query, sorted by id."""
    return [
        json.dumps({"_id": q.query_id, "text": q.text}, ensure_ascii=False, sort_keys=True)
        for q in sorted(queries, key=lambda q: q.query_id)
    ]


def qrels_dict(judgements: Iterable[Judgement], thresholds: Sequence[float]) -> dict[str, dict[str, int]]:
    """``{query_id: {doc_id: grade}}``, the in-memory form ir_measures takes."""
    out: dict[str, dict[str, int]] = {}
    for j in judgements:
        out.setdefault(j.query_id, {})[j.doc_id] = grade(j.teacher_score, thresholds)
    return out


def run_dict(judgements: Iterable[Judgement], order: RunOrder) -> dict[str, dict[str, float]]:
    """``{query_id: {doc_id: score}}`` with the scores ``trec_run_lines`` writes for ``order``."""
    out: dict[str, dict[str, float]] = {}
    for j in judgements:
        score = j.first_stage_score if order == "first_stage" else j.teacher_score
        out.setdefault(j.query_id, {})[j.doc_id] = float(score)
    return out


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def evaluate_first_stage(
    qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]], k: int
) -> dict[str, float]:
    """Mean nDCG@10, RR@10 and R@k of ``run`` against graded ``qrels``, with ir_measures.

    Only queries with at least one document graded >= 1 are evaluated: trec_eval scores a
    query without relevant documents 0 on every measure, which would measure the teacher's
    strictness, not the first stage. Gains are the grades (nDCG), relevance is grade >= 1
    (RR, R). Keys are the measure names (``"nDCG@10"``, ``"RR@10"``, ``f"R@{k}"``); empty
    when no query qualifies.
    """
    judged = {qid: dict(docs) for qid, docs in qrels.items() if any(g >= 1 for g in docs.values())}
    if not judged:
        return {}
    scored = {qid: dict(run[qid]) for qid in sorted(judged) if qid in run}
    measures = [ir_measures.nDCG @ 10, ir_measures.RR @ 10, ir_measures.R @ k]
    # A judged query missing from the run counts as 0 (trec_eval -c), not as absent.
    per_query = {str(m): {qid: 0.0 for qid in judged} for m in measures}
    for metric in ir_measures.iter_calc(measures, judged, scored):
        per_query[str(metric.measure)][metric.query_id] = float(metric.value)
    return {name: math.fsum(values.values()) / len(values) for name, values in sorted(per_query.items())}


def label_distribution(
    items: Iterable[QueryJudgements], thresholds: Sequence[float]
) -> dict[str, dict[int, int]]:
    """``{split: {grade: pairs}}`` with every split and grade present (zeros included)."""
    dist = {s: {g: 0 for g in range(len(thresholds) + 1)} for s in SPLITS}
    for item in items:
        for j in item.judgements:
            dist[item.split][grade(j.teacher_score, thresholds)] += 1
    return dist


# ---------------------------------------------------------------------------------------------
# Distillation rows
# ---------------------------------------------------------------------------------------------


def distillation_row(
    item: QueryJudgements, thresholds: Sequence[float], num_hard_negatives: int
) -> dict[str, Any]:
    """One ``DISTILLATION_SCHEMA`` row for a query (its split is not checked)."""
    docs = sorted(item.judgements, key=lambda j: (j.first_stage_rank, j.doc_id))
    grades = [grade(j.teacher_score, thresholds) for j in docs]
    positives = sorted(
        (j for j, g in zip(docs, grades, strict=True) if g >= 1),
        key=lambda j: (-j.teacher_score, j.first_stage_rank, j.doc_id),
    )
    negatives = [j for j, g in zip(docs, grades, strict=True) if g == 0][:num_hard_negatives]
    texts = item.doc_texts
    return {
        "query_id": item.query.query_id,
        "query": item.query.text,
        "count": item.query.count,
        "doc_ids": [j.doc_id for j in docs],
        "doc_texts": [texts[j.doc_id] for j in docs],
        "teacher_scores": [float(j.teacher_score) for j in docs],
        "grades": grades,
        "first_stage_scores": [float(j.first_stage_score) for j in docs],
        "first_stage_ranks": [j.first_stage_rank for j in docs],
        "positive_ids": [j.doc_id for j in positives],
        "positive_texts": [texts[j.doc_id] for j in positives],
        "positive_scores": [float(j.teacher_score) for j in positives],
        "negative_ids": [j.doc_id for j in negatives],
        "negative_texts": [texts[j.doc_id] for j in negatives],
        "negative_scores": [float(j.teacher_score) for j in negatives],
    }


def distillation_rows(
    items: Iterable[QueryJudgements], thresholds: Sequence[float], num_hard_negatives: int
) -> list[dict[str, Any]]:
    """``DISTILLATION_SCHEMA`` rows for the **train** items, sorted by query id."""
    train = sorted((i for i in items if i.split == "train"), key=lambda i: i.query.query_id)
    return [distillation_row(i, thresholds, num_hard_negatives) for i in train]


def distillation_parquet(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Rows as Parquet bytes with ``DISTILLATION_SCHEMA`` (the schema is kept when empty)."""
    table = pa.Table.from_pylist(list(rows), schema=DISTILLATION_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Report and manifest
# ---------------------------------------------------------------------------------------------


def teacher_histogram_png(
    scores: Mapping[str, Sequence[float]], thresholds: Sequence[float], bins: int = 20
) -> bytes:
    """Stacked histogram of teacher scores per split, thresholds dashed; PNG bytes.

    Figure + Agg canvas, not pyplot: no global state or backend choice inside a worker.
    The PNG carries no software/version metadata, so it is byte-identical across reruns.
    """
    splits = [s for s in SPLITS if s in scores]
    values = [float(v) for s in splits for v in scores[s]]
    lo = min([0.0, *values])
    hi = max([1.0, *values])
    edges = np.linspace(lo, hi, bins + 1)
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if values:
        ax.hist([list(scores[s]) for s in splits], bins=edges, stacked=True, label=splits)
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no judgements", ha="center", va="center", transform=ax.transAxes)
    for t in thresholds:
        ax.axvline(t, color="black", linestyle="--", linewidth=1)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("teacher score")
    ax.set_ylabel("judged (query, document) pairs")
    ax.set_title("Teacher scores (dashed: label thresholds)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render_report(
    *,
    metrics: Mapping[str, float],
    counts: Mapping[str, Any],
    distribution: Mapping[str, Mapping[int, int]],
    thresholds: Sequence[float],
    provenance: Mapping[str, Any],
    histogram_file: str = HISTOGRAM_FILE,
) -> str:
    """report.md: provenance, counts, first-stage metrics, label distribution, histogram link."""
    lines = ["# Label datasets report", ""]
    if provenance:
        lines += ["## Run", ""]
        lines += [
            f"- **{k}**: `{json.dumps(provenance[k], sort_keys=True, ensure_ascii=False)}`"
            for k in sorted(provenance)
        ]
        lines.append("")
    queries, pairs = counts["queries"], counts["judgements"]
    acct = counts.get("accounting")
    if acct:
        lines += ["## Where every query went", ""]
        rows = [["labelled: eval", acct["queries_eval"]], ["labelled: train", acct["queries_train"]]]
        rows += [[f"rejected: {reason}", n] for reason, n in acct["queries_rejected_by_reason"].items()]
        rows += [["not sampled (--max-queries / --sample)", acct["queries_not_sampled"]]]
        rows += [["**read**", f"**{acct['queries_read']}**"]]
        lines += _table(["outcome", "queries"], rows)
        lines += [
            "",
            f"Pairs scored: {acct['pairs_scored']}; candidates rejected: {acct['candidates_rejected']}; "
            f"run-file lines rejected: {acct['run_lines_rejected']}; log rows read: {acct['query_rows_read']}. "
            "Every rejection is a line of `dead_letters.jsonl` with its reason.",
            "",
        ]
    lines += ["## Counts", ""]
    lines += _table(
        ["split", "queries", "judged pairs", "goes to"],
        [
            ["eval", queries["eval"], pairs["eval"], f"`{QUERIES_FILE}`, `{QRELS_FILE}`, `runs/`"],
            ["train", queries["train"], pairs["train"], f"`{DISTILLATION_FILE}`"],
        ],
    )
    lines += [
        "",
        (
            f"Train queries without a positive: {counts['train_queries_without_positive']}; "
            f"with fewer hard negatives than asked: {counts['train_queries_short_of_negatives']}."
        ),
        "",
        "## First-stage quality against teacher labels (eval split)",
        "",
    ]
    if metrics:
        lines += [
            (
                f"Computed with ir_measures on `{RETRIEVAL_RUN_FILE}` against `{TREC_QRELS_FILE}`, over the "
                f"{counts['eval_queries_evaluated']} eval queries with at least one document graded >= 1 "
                f"(of {queries['eval']}). Recall at the full candidate depth is 1 by construction: the "
                "teacher judged only first-stage candidates."
            ),
            "",
        ]
        lines += _table(
            ["measure", "value"], [[name, f"{value:.4f}"] for name, value in sorted(metrics.items())]
        )
    else:
        lines.append("No eval query has a document graded >= 1; nothing to evaluate.")
    lines += ["", "## Label distribution", ""]
    lines += _table(
        ["grade", "teacher score", "eval", "train", "all"],
        [
            [
                g,
                rng,
                distribution["eval"][g],
                distribution["train"][g],
                distribution["eval"][g] + distribution["train"][g],
            ]
            for g, rng in grade_ranges(thresholds).items()
        ],
    )
    lines += ["", "## Teacher scores", "", f"![Histogram of teacher scores]({histogram_file})", ""]
    return "\n".join(lines)


def build_report(
    items: Sequence[QueryJudgements],
    *,
    thresholds: Sequence[float],
    metrics: Mapping[str, float],
    counts: Mapping[str, Any],
    provenance: Mapping[str, Any],
) -> dict[str, bytes]:
    """``{"report.md": ..., "teacher_scores.png": ...}`` for ``items``."""
    scores = {s: [j.teacher_score for i in items if i.split == s for j in i.judgements] for s in SPLITS}
    markdown = render_report(
        metrics=metrics,
        counts=counts,
        distribution=label_distribution(items, thresholds),
        thresholds=thresholds,
        provenance=provenance,
    )
    return {REPORT_FILE: markdown.encode("utf-8"), HISTOGRAM_FILE: teacher_histogram_png(scores, thresholds)}


def manifest_json(manifest: Mapping[str, Any]) -> bytes:
    """Canonical JSON: sorted keys, two-space indent, UTF-8, trailing newline."""
    return (
        json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    ).encode("utf-8")


def file_digests(files: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
    return {
        path: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for path, data in sorted(files.items())
    }


# ---------------------------------------------------------------------------------------------
# Accounting: where every query went
# ---------------------------------------------------------------------------------------------

# Dead-letter stages whose records are whole queries (each one is a rejected query).
QUERY_STAGES = ("parse_query", "dedup", "embed", "label")
NO_QUERY_LABELLED = "no query could be labelled"


def reason_category(reason: str) -> str:
    """A dead letter's reason without its particulars (ids, values): what the report counts by."""
    return re.split(r":| \(|, got", reason, maxsplit=1)[0].strip()


def dead_letter_count(letter: DeadLetter) -> tuple[str, int]:
    return f"dead_letters/{letter.stage}/{reason_category(letter.reason)}", 1


def accounting(pipeline_counts: Mapping[str, int], items: Sequence[QueryJudgements]) -> dict[str, Any]:
    """Where every query and candidate went, from the pipeline's counts and the labelled items.

    ``queries_read`` (rows refused when parsing, plus distinct queries after merging rows with
    the same text) == ``queries_labelled`` + ``queries_rejected`` + ``queries_not_sampled``.
    """

    # "dead_letters/<stage>/<reason category>" -> (stage, category)
    letters = {
        tuple((k.split("/", 2) + [""])[1:3]): n for k, n in pipeline_counts.items() if k.startswith("dead_letters/")
    }

    def stage_total(stage: str) -> int:
        return sum(n for (s, _), n in letters.items() if s == stage)

    distinct = pipeline_counts.get("queries_distinct", 0)
    unparsed, duplicates = stage_total("parse_query"), stage_total("dedup")
    by_reason = {f"{s}: {c}".rstrip(": "): n for (s, c), n in sorted(letters.items()) if s in QUERY_STAGES}
    return {
        "query_rows_read": pipeline_counts.get("query_rows_read", 0),
        "queries_read": unparsed + duplicates + distinct,
        "queries_labelled": len(items),
        "queries_eval": sum(1 for i in items if i.split == "eval"),
        "queries_train": sum(1 for i in items if i.split == "train"),
        "queries_rejected": sum(stage_total(s) for s in QUERY_STAGES),
        "queries_rejected_by_reason": by_reason,
        "queries_not_sampled": distinct - pipeline_counts.get("queries_sampled", distinct),
        "pairs_scored": sum(len(i.judgements) for i in items),
        "candidates_rejected": stage_total("candidates") + stage_total("rerank"),
        "run_lines_rejected": stage_total("run"),
        "input_rows_rejected": stage_total("read"),
    }


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
        paths = write_files(self.out_dir, build_label_files(items, self.config, summed))
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

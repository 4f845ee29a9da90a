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
                                (written last; until then status "incomplete: ...", no digests)
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
import itertools
import json
import math
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from transforms.types import Judgement, Query

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

# ---------------------------------------------------------------------------------------------
# Records and config
# ---------------------------------------------------------------------------------------------


def trec_id_problem(value: str) -> str | None:
    """Why the qrels and run files cannot hold ``value`` as an id, or None.

    An empty id, or one with any character ``str.split`` splits on (space, tab, newline, and the other
    Unicode whitespace that Python readers such as ir_measures split on), would shift the TREC columns.
    An id that starts with a double quote would be read as a quoted field by readers of the BEIR TSV
    (BEIR's own loader: ``csv.reader``, ``QUOTE_MINIMAL``; pandas): ``"d1"`` reads as ``d1``, and an
    unclosed quote swallows the lines after it. A quote further in is read as written. A control
    character (NUL, escape, DEL...) ends the id early for C readers such as trec_eval (NUL ends a string)
    or changes what a terminal shows of it.
    """
    if not value:
        return "is empty"
    if any(c.isspace() for c in value):
        return "contains whitespace"
    if (control := next((c for c in value if unicodedata.category(c) == "Cc"), None)) is not None:
        return f"contains a control character (U+{ord(control):04X})"
    if value.startswith('"'):
        return "starts with a double quote (TSV readers take it as quoting)"
    return None


def _trec_safe(kind: str, value: str) -> None:
    if (problem := trec_id_problem(value)) is not None:
        raise ValueError(f"{kind} {value!r} {problem}; TREC files cannot hold it")


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
    # They cut the teacher's P("yes"): at or below 0 grade 0 could never be given; above 1 a grade never is.
    if any(not 0 < t <= 1 for t in thresholds):
        raise ValueError(f"label thresholds are P(yes) cut points, each in (0, 1], got {tuple(thresholds)}")


def parse_thresholds(spec: str) -> tuple[float, ...]:
    """``"0.5,0.9"`` → ``(0.5, 0.9)``; ``LabelDatasetsConfig`` validates the values."""
    try:
        return tuple(float(p) for p in spec.split(","))
    except ValueError:
        raise ValueError(f"--label-thresholds must be comma-separated numbers, got {spec!r}") from None


def grade(score: float, thresholds: Sequence[float]) -> int:
    """Graded label: the number of thresholds ``<= score`` (a score on a threshold is above it)."""
    if math.isnan(score):
        raise ValueError("cannot grade a NaN teacher score")
    return bisect.bisect_right(thresholds, score)


def grade_ranges(thresholds: Sequence[float]) -> dict[int, str]:
    """Human-readable teacher-score range of each grade, its bounds exact (``0.9``, ``1``,
    ``0.9999999``: ``:g`` alone would print 0.9999999 as 1, a range no score reaches)."""

    def show(x: float) -> str:
        short = f"{x:g}"
        return short if float(short) == x else repr(float(x))

    bounds = [None, *thresholds, None]
    out = {}
    for g in range(len(thresholds) + 1):
        lo, hi = bounds[g], bounds[g + 1]
        if lo is None:
            out[g] = f"score < {show(hi)}"
        elif hi is None:
            out[g] = f"score >= {show(lo)}"
        else:
            out[g] = f"{show(lo)} <= score < {show(hi)}"
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

"""The distillation set: one Parquet row per train query (see ``formats`` for its use)."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from transforms.datasets.formats import QueryJudgements, grade

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
        # log(p / (1 - p)) of the scores above (the reranker's yes-minus-no logit): the targets a softmax loss
        # needs (DistillKLDivLoss, MarginMSE); P(yes) in [0, 1] softmaxes to nearly flat targets.
        ("teacher_logits", _FLOATS),
        ("positive_logits", _FLOATS),
        ("negative_logits", _FLOATS),
    ]
)

# P(yes) is computed in fp32: within 2**-24 of 1 it is 1.0, so log-odds are clipped where fp32 can tell them apart.
_P_EPS = 2.0**-24


def log_odds(p: float) -> float:
    """``log(p / (1 - p))``, ``p`` clipped to ``[2**-24, 1 - 2**-24]`` (so within +-16.64)."""
    p = min(max(p, _P_EPS), 1.0 - _P_EPS)
    return math.log(p) - math.log1p(-p)


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
        "teacher_logits": [log_odds(j.teacher_score) for j in docs],
        "positive_logits": [log_odds(j.teacher_score) for j in positives],
        "negative_logits": [log_odds(j.teacher_score) for j in negatives],
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

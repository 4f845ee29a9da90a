"""First-stage metrics and label distribution of the evaluation set."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import ir_measures

from transforms.datasets.formats import SPLITS, QueryJudgements, grade

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

"""First-stage metrics and label distribution of the evaluation set."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import ir_measures

from transforms.datasets.formats import SPLITS, QueryJudgements, grade

# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def trec_eval_top(docs: Mapping[str, float], k: int) -> dict[str, float]:
    """A query's first ``k`` documents in trec_eval's order: score descending, equal scores by
    doc id descending (trec_eval compares doc ids with ``strcmp``, largest first)."""
    return dict(sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k])


def iter_calc(
    measures: Sequence[Any], qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]]
) -> Iterator[Any]:
    """``ir_measures.iter_calc``, every measure reading the run in trec_eval's order.

    trec_eval's ``recip_rank`` has no cutoff, so ir_measures hands ``RR@k`` to its MS MARCO
    provider, which breaks score ties by doc id *ascending*, while nDCG@k and R@k (trec_eval)
    break them descending: one run read in two orders. Here ``RR@k`` is trec_eval's
    ``recip_rank`` on each query's first ``k`` documents in trec_eval's order
    (``trec_eval_top``), reported under the ``RR@k`` measure.
    """
    cut = [m for m in measures if m.NAME == "RR" and m.params.get("cutoff") is not None]
    rest = [m for m in measures if m not in cut]
    if rest:
        yield from ir_measures.iter_calc(rest, qrels, run)
    for measure in cut:
        k = measure.params["cutoff"]
        top = {qid: trec_eval_top(docs, k) for qid, docs in run.items()}
        uncut = ir_measures.RR(**{name: v for name, v in measure.params.items() if name != "cutoff"})
        for metric in ir_measures.iter_calc([uncut], qrels, top):
            yield metric._replace(measure=measure)


def evaluate_first_stage(
    qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]], k: int
) -> dict[str, float]:
    """Mean nDCG@10, RR@10 and R@k of ``run`` against graded ``qrels``, with ir_measures.

    Every measure reads the run in trec_eval's order (``iter_calc``: score descending, equal
    scores by doc id descending). Only queries with at least one document graded >= 1 are
    evaluated: trec_eval scores a query without relevant documents 0 on every measure, which
    would measure the teacher's strictness, not the first stage. Gains are the grades (nDCG), relevance is grade >= 1
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
    for metric in iter_calc(measures, judged, scored):
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

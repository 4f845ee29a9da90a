"""The report (markdown + histogram), the manifest and the accounting of every query."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from transforms.datasets.formats import (
    DISTILLATION_FILE,
    HISTOGRAM_FILE,
    QRELS_FILE,
    QUERIES_FILE,
    REPORT_FILE,
    RETRIEVAL_RUN_FILE,
    SPLITS,
    TREC_QRELS_FILE,
    QueryJudgements,
    grade_ranges,
)
from transforms.datasets.metrics import label_distribution
from transforms.types import DeadLetter

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
    """A dead letter's reason without its particulars (ids, values): what the report counts by.

    What follows a colon, a parenthesis or ", got" goes, and so do quoted values inside the rest:
    ``duplicate query id 'a1' with a different text`` counts as ``duplicate query id with a different
    text``, so a log with many colliding ids gives one line, not one per id.
    """
    head = re.split(r":| \(|, got", reason, maxsplit=1)[0]
    return re.sub(r"\s*(?:'[^']*'|\"[^\"]*\")", "", head).strip()


def dead_letter_count(letter: DeadLetter) -> tuple[str, int]:
    """``("dead_letters/<stage>/<reason category>", n)``: n is 1, but a run-file letter stands for
    the ``lines`` its record names (one letter per query id or document), so run lines count as lines."""
    n = 1
    if letter.stage == "run":
        record = json.loads(letter.record)
        n = record.get("lines", 1) if isinstance(record, dict) else 1
    return f"dead_letters/{letter.stage}/{reason_category(letter.reason)}", n


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

"""`corpus-etl evaluate`: retrieval quality of a collection on BEIR-style queries and qrels.

Chunk hits are aggregated to documents (max score per ``doc_id``) before scoring.
Metrics are computed by ir_measures with trec_eval's conventions: nDCG@10, MRR@10 (RR@10) and
Recall@k, k = ``--top-k`` (the depth retrieved: a recall deeper than the run would only repeat
Recall@k). nDCG's gain is the grade (trec_eval's ``ndcg_cut``, not 2^grade - 1); a document is
relevant at grade >= 1; equal scores go by doc id descending, for every metric
(``transforms.datasets.metrics.iter_calc``); the mean is over every judged query, one whose
judgements are all 0 counting as 0 on each metric (as in trec_eval).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from ir_measures import RR, R, nDCG

from pipelines.common import setup_logging, write_json
from pipelines.errors import PreflightError, UsageError, first_line
from pipelines.flags import evaluate_parser
from pipelines.search import check_top_k, searcher_from_args
from transforms.datasets.metrics import iter_calc
from transforms.io.parquet import row_position
from transforms.io.store import VectorStore, model_held, same_model

if TYPE_CHECKING:
    from transforms.models.encoder import TextEncoder

T = TypeVar("T")
_LOG = logging.getLogger(__name__)


def measures(top_k: int = 100) -> dict[str, Any]:
    """The metrics reported for a run retrieved ``top_k`` deep: nDCG@10, MRR@10, Recall@top_k."""
    return {"nDCG@10": nDCG @ 10, "MRR@10": RR @ 10, f"Recall@{top_k}": R @ top_k}


MEASURES = measures(100)


# BEIR's qrels header; a first line that is not a judgement must be this one.
QRELS_HEADER = ("query-id", "corpus-id", "score")
# Parquet queries: the id and text columns, BEIR's names and the query log's.
QUERY_ID_COLUMNS, QUERY_TEXT_COLUMNS = ("query_id", "_id"), ("query", "text")
_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
               list: "an array", dict: "an object"}  # fmt: skip


class BadInput(ValueError):
    """A queries or qrels file the command cannot use; the message starts with where: ``FILE:LINE`` or
    ``row N of FILE``."""


def _read_text(path: str) -> str:
    with FileSystems.open(path) as f:
        return f.read().decode("utf-8")


def _read_rows(path: str) -> tuple[list[str], list[dict[str, Any]]]:
    with FileSystems.open(path) as f:
        table = pq.read_table(f)
    return table.column_names, table.to_pylist()


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _query_columns(path: str, names: list[str]) -> tuple[str, str]:
    """The (id, text) columns of a Parquet queries file: the first of each kind's names that it has."""
    id_col = next((c for c in QUERY_ID_COLUMNS if c in names), None)
    text_col = next((c for c in QUERY_TEXT_COLUMNS if c in names), None)
    if id_col is None or text_col is None:
        missing = [" or ".join(kind) for col, kind in ((id_col, QUERY_ID_COLUMNS), (text_col, QUERY_TEXT_COLUMNS))
                   if col is None]  # fmt: skip
        raise BadInput(f"{path}: missing column(s) {', '.join(missing)}; the file has: {', '.join(names) or 'none'}")
    return id_col, text_col


def read_queries(path: str) -> dict[str, str]:
    """BEIR ``queries.jsonl`` (``_id``, ``text``) or Parquet (``query_id``/``_id``, ``query``/``text``).

    Every query needs an id (a string or an integer) and a text (a string): anything else is a
    ``BadInput`` naming the line (JSONL) or row (Parquet), never a query silently read as "None".
    """
    if path.endswith(".parquet"):
        names, rows = _read_rows(path)
        id_col, text_col = _query_columns(path, names)
        queries = {}
        for i, row in enumerate(rows):
            qid, text = row[id_col], row[text_col]
            if qid is None or text is None:
                what = f"query id (column {id_col!r})" if qid is None else f"query (column {text_col!r})"
                raise BadInput(f"{row_position(path, i)}: null {what}")
            if not isinstance(qid, (str, int)) or isinstance(qid, bool):
                raise BadInput(f"{row_position(path, i)}: query id (column {id_col!r}) is a {type(qid).__name__}, "
                               "not a string or an integer")  # fmt: skip
            if not isinstance(text, str):
                raise BadInput(f"{row_position(path, i)}: query (column {text_col!r}) is a {type(text).__name__}, "
                               "not a string")  # fmt: skip
            queries[str(qid)] = text
        return queries
    queries = {}
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:  # its own "line 1" is the line's, not the file's
            raise BadInput(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict) or "_id" not in obj or "text" not in obj:
            raise BadInput(f"{path}:{n}: a BEIR query needs '_id' and 'text'")
        qid, text = obj["_id"], obj["text"]
        if not isinstance(qid, (str, int)) or isinstance(qid, bool):
            raise BadInput(f"{path}:{n}: '_id' must be a string or an integer, got {_json_type(qid)}")
        if not isinstance(text, str):
            raise BadInput(f"{path}:{n}: 'text' must be a string, got {_json_type(text)}")
        queries[str(qid)] = text
    return queries


def relevance(value: Any) -> int | None:
    """A qrels score as an integer grade: an int, or an integral float (``1.0``) as written by tools that
    store every number as a float; ``None`` for anything else (``1.5``, ``high``, null)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def read_qrels(path: str) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV (optional header ``query-id corpus-id score``), TREC qrels (``qid iter docid rel``),
    or Parquet (columns ``query-id``, ``corpus-id``, ``score``).

    Scores are integer grades; an integral float (``1.0``) is read as its integer, any other
    value is a ``BadInput`` naming the line or row. A first line whose score is not a number is
    a header, and must be BEIR's. A (query, document) pair given twice with different grades is
    a ``BadInput`` naming both places (which one counts would be a guess); a repeat with the same
    grade is harmless and read once.
    """
    qrels: dict[str, dict[str, int]] = {}
    seen_at: dict[tuple[str, str], str] = {}

    def add(qid: str, did: str, grade: int, where: str) -> None:
        earlier = qrels.setdefault(qid, {}).get(did)
        if earlier is not None and earlier != grade:
            raise BadInput(f"{where}: query {qid!r} document {did!r} graded {grade}, but {earlier} at "
                           f"{seen_at[qid, did]}; give each pair one grade")  # fmt: skip
        qrels[qid][did] = grade
        seen_at.setdefault((qid, did), where)

    if path.endswith(".parquet"):
        names, rows = _read_rows(path)
        missing = [c for c in QRELS_HEADER if c not in names]
        if missing:
            raise BadInput(
                f"{path}: missing column(s) {', '.join(missing)}; qrels need {', '.join(QRELS_HEADER)}; the file has: "
                f"{', '.join(names) or 'none'}"
            )
        for i, r in enumerate(rows):
            qid, did, grade = r["query-id"], r["corpus-id"], relevance(r["score"])
            if qid is None or did is None:
                raise BadInput(f"{row_position(path, i)}: null {'query-id' if qid is None else 'corpus-id'}")
            if grade is None:
                raise BadInput(f"{row_position(path, i)}: score {r['score']!r} is not an integer grade")
            add(str(qid), str(did), grade, row_position(path, i))
        return qrels
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) == 3:
            qid, did, score = parts
        elif len(parts) == 4:  # TREC: qid iter docid rel
            qid, _, did, score = parts
        else:
            raise BadInput(f"{path}:{n}: expected 'query-id corpus-id score' (or TREC's 4 columns), got {line!r}")
        grade = relevance(score)
        if n == 1 and grade is None and _is_header(score):
            if tuple(p.lower() for p in parts) != QRELS_HEADER:
                raise BadInput(f"{path}:1: header {' '.join(parts)!r} is not BEIR's; expected "
                               f"{' '.join(QRELS_HEADER)!r}, or no header")  # fmt: skip
            continue
        if grade is None:
            raise BadInput(f"{path}:{n}: score {score!r} is not an integer grade")
        add(qid, did, grade, f"{path}:{n}")
    return qrels


def _is_header(score: str) -> bool:
    """A first line's last field that is a word, not a number (``score``; ``1.5`` is a bad grade)."""
    try:
        float(score)
    except ValueError:
        return True
    return False


def evaluate(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]], top_k: int = 100) -> dict[str, float]:
    wanted = measures(top_k)
    per_query: dict[Any, list[float]] = {m: [] for m in wanted.values()}
    for metric in iter_calc(list(wanted.values()), qrels, run):
        per_query[metric.measure].append(float(metric.value))
    return {name: round(math.fsum(per_query[m]) / len(per_query[m]) if per_query[m] else 0.0, 6)
            for name, m in wanted.items()}  # fmt: skip


def read_judged(queries_path: str, qrels_path: str, flags: tuple[str, str] = ("--queries", "--qrels")) -> tuple[
    dict[str, str], dict[str, dict[str, int]]
]:
    """The queries that have judgements, by id (sorted), and their qrels. A file that cannot be read, or no
    query with judgements, is a one-line error naming the flag (exit status 2)."""
    queries = _read(read_queries, flags[0], queries_path)
    qrels = _read(read_qrels, flags[1], qrels_path)
    judged = {q: t for q, t in sorted(queries.items()) if q in qrels}
    if not judged:
        raise PreflightError(f"no query in {queries_path} has judgements in {qrels_path}; check that their query "
                             "ids match")  # fmt: skip
    return judged, {q: qrels[q] for q in judged}


def query_encoder(
    model: str, *, dim: int | None = None, max_length: int | None = None, device: str = "auto", precision: str = "auto",
    query_instruction: str | None = None,
) -> TextEncoder:
    """The loaded query encoder of ``model`` with the settings that shape its query vectors (``dim``, ``max_length``,
    ``query_instruction``: ``Instruct: {task}\\nQuery:`` instead of the model's own query prompt)."""
    from transforms.models.encoder import TextEncoder
    from transforms.models.settings import EmbeddingSpec

    # the config files first: a model that cannot be found fails after one round of hub retries
    spec = EmbeddingSpec.read(model, dim=dim, max_length=max_length)
    return TextEncoder(spec, device=device, precision=precision, query_instruction=query_instruction).load()


def evaluate_collection(
    qdrant: Any, collection: str, encoder: TextEncoder, judged: dict[str, str], qrels: dict[str, dict[str, int]],
    *, top_k: int = 100,
) -> dict[str, float]:
    """The metrics of ``collection`` (or an alias) on the ``judged`` queries (``read_judged``), their vectors from
    ``encoder``: what ``evaluate`` prints, as a function (the index job's quality gate scores two collections,
    each with the model it was built with)."""
    from pipelines.search import Searcher

    searcher = Searcher(qdrant, collection, encoder)
    try:
        hits = searcher.search(list(judged.values()), top_k)
    finally:
        searcher.close()
    run_ = {qid: {h["doc_id"]: h["score"] for h in hs} for qid, hs in zip(judged, hits)}
    return evaluate(run_, qrels, top_k)


def warn_other_model(store: VectorStore, collection: str, model: str) -> str | None:
    """One warning line when ``model`` is not the model whose vectors ``collection`` holds (``model_held``);
    the line, or None. Not an error: a compatible model may be evaluated on purpose."""
    held = model_held(store, collection)
    if held is None or same_model(held, model):
        return None
    line = (f"--model {model} is not {held}, the model collection {collection!r} was built with: its scores compare "
            "query vectors of one model with document vectors of another")  # fmt: skip
    _LOG.warning("%s", line)
    return line


build_arg_parser = evaluate_parser  # kept here for callers of the old name


def _read(reader: Callable[[str], T], flag: str, path: str) -> T:
    """``reader(path)``, its failures as one line naming the flag, the file and, for bad contents, the
    line or row (``UsageError``: exit status 2)."""
    try:
        return reader(path)
    except OSError as exc:  # Beam's BeamIOError is one too
        reason = exc.strerror or first_line(exc)
        raise PreflightError(f"{flag} {path}: cannot read it ({reason}); check the path") from exc
    except BadInput as exc:
        raise UsageError(f"{flag}: {exc}") from exc
    except ValueError as exc:  # not UTF-8, not Parquet (pyarrow's ArrowInvalid)
        raise UsageError(f"{flag} {path}: cannot read it ({first_line(exc)})") from exc


def run(argv: list[str] | None = None) -> dict[str, Any]:
    return run_args(build_arg_parser().parse_args(argv))


def run_args(args: argparse.Namespace, beam_args: list[str] | None = None) -> dict[str, Any]:
    """The evaluation for parsed flags (``corpus-etl evaluate`` parses them in ``pipelines.flags``)."""
    setup_logging(args.verbose)
    check_top_k(args.top_k)
    judged, qrels = read_judged(args.queries, args.qrels)
    searcher = searcher_from_args(args)
    try:
        warn_other_model(searcher.store, args.collection, args.model)
        hits = searcher.search(list(judged.values()), args.top_k)
    finally:
        searcher.close()
    run_ = {qid: {h["doc_id"]: h["score"] for h in hs} for qid, hs in zip(judged, hits)}
    metrics = evaluate(run_, qrels, args.top_k)
    result = {"collection": args.collection, "model": args.model, "queries": len(judged), "top_k": args.top_k, **metrics}
    for name, value in metrics.items():
        print(f"{name:<11} {value:.4f}")
    print(f"({len(judged)} queries, top {args.top_k})")
    if args.out:
        write_json(args.out, result)
    return result

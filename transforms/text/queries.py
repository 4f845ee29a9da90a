"""Query logs → clean, de-duplicated, optionally sampled ``Query`` records, and their split.

Three forms of a query text, each with one job:

* ``normalize_query`` — the display form written to the datasets: invisible format characters
  (BOM, zero-width space, word joiner, soft hyphen, direction marks) removed, Unicode NFKC,
  control characters dropped, whitespace runs collapsed to one space, stripped. Case is kept.
* ``query_key`` — the de-duplication key: the display form case-folded. Two log rows
  with the same key are the same query; their counts are summed.
* ``near_duplicate_key`` — the split key: the *set* of word tokens of the key after
  accent stripping and a light English plural fold (see ``near_duplicate_key``). Queries
  that share it ("Running shoes", "shoe running", "running shoes!") always fall on the
  same side of the train/eval split, so evaluation never leaks into distillation.

Query ids come from the log when a query-id column is given, else ``derive_query_id``
(``"q"`` + 16 hex chars of the SHA-1 of the key), so the same text gets the same id in
every run and on every worker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.datasets.formats import trec_id_problem
from transforms.io.parquet import Row, jsonable, row_position
from transforms.types import DEAD, DeadLetter, Query

STAGE = "parse_query"
MAX_QUERY_CHARS = 2048

# Tiers by cumulative share of traffic: a query is "head" while the queries ranked above it
# carry < 50% of all counts, "torso" below 80%, "tail" after that.
TIER_NAMES = ("head", "torso", "tail")
TIER_BOUNDARIES = (0.5, 0.8)

_WORD = re.compile(r"\w+")
_POSSESSIVE = re.compile(r"['\u2019]s\b")
_APOSTROPHE = re.compile(r"['\u2019]")
# Invisible characters that change no query's meaning, only its bytes: a BOM left by an export,
# zero-width spaces and word joiners, soft hyphens, direction marks. Kept, they made "\ufeffshoes"
# a query apart from "shoes" (counts not summed, the split decided apart: "run\u00adning shoes"
# tokenises as "run ning"), and a query of only "\u200b" was not empty. ZWJ/ZWNJ are kept: they
# shape Indic and Persian text and emoji.
_INVISIBLE = re.compile("[\u00ad\u061c\u180e\u200b\u200e\u200f\u2060\ufeff]")


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def normalize_query(text: str) -> str:
    """Display form: invisible format characters (``_INVISIBLE``) dropped, NFKC, control
    characters removed, whitespace collapsed, stripped."""
    # Dropped before NFKC, so that a mark they separated from its letter is composed with it.
    text = unicodedata.normalize("NFKC", _INVISIBLE.sub("", text))
    # Control characters (NUL, escape codes) become spaces; \t \n \r are whitespace already.
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    return " ".join(text.split())


def query_key(text: str) -> str:
    """De-duplication key: the display form, case-folded (NFKC again, as casefold can denormalise)."""
    return unicodedata.normalize("NFKC", normalize_query(text).casefold())


def derive_query_id(key: str) -> str:
    """Deterministic id of a query key: ``"q"`` + the first 16 hex chars of its SHA-1."""
    return "q" + hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


def _fold_plural(token: str) -> str:
    # Conservative English plural folding, for tokens of four letters or more:
    # boxes→box, churches→church, classes→class, batteries/battery→battery,
    # movies/movie→movy, shoes→shoe; "bus", "this", "glass" are left alone.
    if len(token) <= 3 or not token.isalpha():
        return token
    for suffix in ("sses", "xes", "ches", "shes"):
        if token.endswith(suffix):
            return token[:-2]
    if token.endswith("s") and not token.endswith(("ss", "us", "is")):
        token = token[:-1]
    if len(token) > 3 and token.endswith("ie"):
        token = token[:-2] + "y"
    return token


def near_duplicate_key(text: str) -> str:
    """Key shared by near-duplicate queries: the sorted set of their folded word tokens.

    From ``query_key(text)``: accents stripped (NFKD, combining marks dropped), possessive
    ``'s`` and then apostrophes removed, word tokens (``\\w+``) taken, each plural-folded
    (``_fold_plural``), de-duplicated and sorted. So word order, punctuation, repeated
    words, accents and simple plurals do not matter. A query with no word token keeps its
    ``query_key``. This is deliberately light: missing a pair (e.g. "mouse"/"mice") can
    split it; merging unrelated queries ("dog bites man"/"man bites dog") only keeps them
    together, which is harmless.
    """
    key = query_key(text)
    plain = "".join(c for c in unicodedata.normalize("NFKD", key) if not unicodedata.combining(c))
    plain = _APOSTROPHE.sub("", _POSSESSIVE.sub("", plain))
    tokens = {_fold_plural(t) for t in _WORD.findall(plain)}
    return " ".join(sorted(tokens)) if tokens else key


def _unit_hash(*parts: str) -> float:
    """A stable number in [0, 1) from strings (SHA-256, so the same on every machine)."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()
    return int(digest[:15], 16) / 16**15


def assign_split(text: str, eval_fraction: float) -> str:
    """``"eval"`` or ``"train"`` from a hash of ``near_duplicate_key(text)``.

    A query's side depends only on its own text, so it does not move when the log grows,
    when sampling changes, or between reruns; near-duplicates share a side.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be within [0, 1], got {eval_fraction!r}")
    return "eval" if _unit_hash("split", near_duplicate_key(text)) < eval_fraction else "train"


def frequency_order(queries: Iterable[Query]) -> list[Query]:
    """Queries by count, highest first; ties by query id, so the order is total."""
    return sorted(queries, key=lambda q: (-q.count, q.query_id))


def frequency_tiers(queries: Iterable[Query]) -> tuple[list[Query], list[Query], list[Query]]:
    """Split queries into (head, torso, tail) by cumulative count share (``TIER_BOUNDARIES``).

    Queries are ranked by ``frequency_order``; a query is in the head when the queries
    ranked above it account for less than 50% of the total count, in the torso when less
    than 80%, else in the tail. The most frequent query is always in the head.
    """
    ordered = frequency_order(queries)
    total = sum(q.count for q in ordered)
    tiers: tuple[list[Query], list[Query], list[Query]] = ([], [], [])
    above = 0
    for q in ordered:
        share = above / total
        tier = 0 if share < TIER_BOUNDARIES[0] else 1 if share < TIER_BOUNDARIES[1] else 2
        tiers[tier].append(q)
        above += q.count
    return tiers


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integers proportional to ``weights`` summing to ``total`` (ties go to the earlier index).

    In exact arithmetic on each weight's decimal form (``0.45`` is 9/20, not the float nearest
    it): in floats, rounding noise decided ties and near-ties, so ``45:55`` and ``0.45:0.55``
    drew different quotas, and a tie could go to the later index.
    """
    exact_weights = [Fraction(repr(float(w))) for w in weights]
    weight_sum = sum(exact_weights)
    exact = [total * w / weight_sum for w in exact_weights]
    parts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def _allocate(n: int, weights: Sequence[float], capacities: Sequence[int]) -> list[int]:
    """Quotas per tier: proportional to weights, capped by capacity, the shortfall re-spread
    over the other tiers with a positive weight (a zero weight means "none from this tier")."""
    quotas = [0] * len(weights)
    active = [i for i, w in enumerate(weights) if w > 0 and capacities[i] > 0]
    while active and sum(quotas) < n:
        shares = _largest_remainder(n - sum(quotas), [weights[i] for i in active])
        for i, share in zip(active, shares, strict=True):
            quotas[i] += min(share, capacities[i] - quotas[i])
        active = [i for i in active if quotas[i] < capacities[i]]
    return quotas


def stratified_sample(
    queries: Sequence[Query], proportions: tuple[float, float, float], n: int, seed: int
) -> list[Query]:
    """``n`` queries drawn from the head/torso/tail tiers (``frequency_tiers``) in ``proportions``.

    Proportions are relative weights (``(2, 1, 1)`` = ``(0.5, 0.25, 0.25)``); quotas are
    rounded by largest remainder. A tier with fewer queries than its quota gives the rest
    to the other tiers with a positive weight; a tier with weight 0 is never drawn from,
    so fewer than ``n`` may come back. Within a tier the draw is uniform: queries ordered
    by SHA-256 of ``(seed, query_id)``, the first ones taken. The same seed gives the same
    sample on any machine, and a query's chance does not depend on the others' ids.
    Returned sorted by query id.
    """
    if len(proportions) != 3 or any(p < 0 or not math.isfinite(p) for p in proportions):
        raise ValueError(f"proportions must be three finite numbers >= 0, got {proportions!r}")
    if sum(proportions) <= 0:
        raise ValueError(f"proportions must not all be 0, got {proportions!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    tiers = frequency_tiers(queries)
    quotas = _allocate(n, proportions, [len(t) for t in tiers])
    chosen: list[Query] = []
    for tier, quota in zip(tiers, quotas, strict=True):
        drawn = sorted(tier, key=lambda q: (_unit_hash("sample", str(seed), q.query_id), q.query_id))
        chosen.extend(drawn[:quota])
    return sorted(chosen, key=lambda q: q.query_id)


def parse_sample_spec(spec: str) -> tuple[float, float, float]:
    """``"head:torso:tail"`` (e.g. ``"50:30:20"`` or ``"0.6:0.3:0.1"``) → three weights."""
    parts = spec.split(":")
    if len(parts) != 3:
        raise ValueError(f"--sample must be head:torso:tail, got {spec!r}")
    try:
        weights = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--sample must be three numbers head:torso:tail, got {spec!r}") from None
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--sample weights must be >= 0 and not all 0, got {spec!r}")
    return weights  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Row parsing
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QueryColumns:
    """Where a log row keeps its query. ``query_id``/``count`` may be absent from the files:
    a row without the column (or with null) gets a derived id / a count of 1."""

    query: str = "query"
    query_id: str | None = "query_id"
    count: str | None = "count"
    max_query_chars: int = MAX_QUERY_CHARS

    def __post_init__(self) -> None:
        if not self.query:
            raise ValueError("the query column name must not be empty")
        named = [c for c in (self.query, self.query_id, self.count) if c]
        if len(set(named)) != len(named):
            raise ValueError(f"query, query-id and count columns must differ, got {named}")
        if self.max_query_chars < 1:
            raise ValueError(f"max_query_chars must be >= 1, got {self.max_query_chars}")

    @property
    def all(self) -> list[str]:
        return [c for c in (self.query, self.query_id, self.count) if c]


def _given_id(value: Any) -> str | None:
    """A query id as given in the log; None when absent; ValueError when unusable."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral, float)):
        raise TypeError(f"query_id is a {type(value).__name__}, not a string or integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"query_id is a non-integral float: {value!r}")
        value = int(value)
    text = str(value).strip()
    if not text:
        return None
    if (problem := trec_id_problem(text)) is not None:
        # The qrels and run files could not hold it (whitespace shifts TREC columns, a leading quote is TSV quoting).
        raise ValueError(f"query_id {text!r} {problem}")
    return text


def _given_count(value: Any) -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float)):
        raise TypeError(f"count is a {type(value).__name__}, not an integer")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"count is a non-integral float: {value!r}")
    count = int(value)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return count


def parse_query_row(
    source: str, row: Mapping[str, Any], columns: QueryColumns, row_number: int = -1
) -> Query | DeadLetter:
    """One log row as a ``Query`` (display-normalised text), or a ``DeadLetter`` with the reason.

    Refused: missing or null query, non-string query, empty after normalisation, longer than
    ``max_query_chars`` characters after normalisation, unusable query id or count.
    """

    def reject(reason: str) -> DeadLetter:
        where = row_position(source, row_number) if row_number >= 0 else source
        return DeadLetter.of(STAGE, reason, where, {k: jsonable(v) for k, v in row.items()})

    if columns.query not in row:
        return reject(f"missing query column {columns.query!r}")
    raw = row[columns.query]
    if raw is None:
        return reject(f"null query (column {columns.query!r})")
    if isinstance(raw, bytes):  # a binary column (writers that leave out Parquet's UTF8 annotation): UTF-8 text
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return reject(f"query is not UTF-8 (column {columns.query!r}: {exc.reason} at byte {exc.start})")
    if not isinstance(raw, str):
        return reject(f"non-string query (column {columns.query!r} holds {type(raw).__name__})")
    text = normalize_query(raw)
    if not text:
        return reject("empty query")
    if len(text) > columns.max_query_chars:
        return reject(f"query longer than {columns.max_query_chars} characters ({len(text)})")
    try:
        given = _given_id(row.get(columns.query_id)) if columns.query_id else None
        count = _given_count(row.get(columns.count)) if columns.count else 1
    except (TypeError, ValueError) as exc:
        return reject(str(exc))
    return Query(
        query_id=given or derive_query_id(query_key(text)), text=text, count=count, source=source, row=row_number
    )


def refused_row_ids(letter: DeadLetter, columns: QueryColumns) -> list[str]:
    """The query id a log row refused by ``parse_query_row`` carries (its record is the row):
    the id given in the log when usable, else the id derived from a non-empty text; none
    when it has neither. A run line under it belongs to a query the log refused."""
    row = json.loads(letter.record)
    if not isinstance(row, dict):
        return []
    try:
        given = _given_id(row.get(columns.query_id)) if columns.query_id else None
    except (TypeError, ValueError):
        given = None
    if given:
        return [given]
    raw = row.get(columns.query)
    text = normalize_query(raw) if isinstance(raw, str) else ""
    return [derive_query_id(query_key(text))] if text else []


class _ParseQueryRowsFn(beam.DoFn):
    def __init__(self, columns: QueryColumns) -> None:
        self.columns = columns
        self.read = Metrics.counter("corpus_etl", "query_rows_read")
        self.rejected = Metrics.counter("corpus_etl", "query_rows_rejected")

    def process(self, element: Row):
        source, row_number, row = element
        self.read.inc()
        result = parse_query_row(source, row, self.columns, row_number)
        if isinstance(result, DeadLetter):
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(DEAD, result)
        else:
            yield result


class ParseQueryRows(beam.PTransform):
    """``(source_file, row_number, row)`` → ``{"queries": Query, "dead_letter": DeadLetter}``.

    One ``Query`` per good row (not yet de-duplicated); see ``parse_query_row`` for what
    is refused.
    """

    def __init__(self, columns: QueryColumns = QueryColumns()) -> None:
        super().__init__()
        self.columns = columns

    def expand(self, rows):
        parsed = rows | "Parse" >> beam.ParDo(_ParseQueryRowsFn(self.columns)).with_outputs(
            DEAD, main="queries"
        )
        return {"queries": parsed.queries, DEAD: parsed[DEAD]}


# ---------------------------------------------------------------------------------------------
# De-duplication
# ---------------------------------------------------------------------------------------------

# Accumulator: ({display text: summed count}, smallest id given in the log or None,
# position (source, row) of the last row merged, every row's id).
_Acc = tuple[dict[str, int], str | None, tuple[str, int], set[str]]
_NO_POSITION = ("", -1)


def _add(acc: _Acc, query: Query) -> _Acc:
    texts, given, position, ids = acc
    text = normalize_query(query.text)
    texts[text] = texts.get(text, 0) + query.count
    # An id equal to the derived one carries no information; the smallest real one wins.
    if query.query_id != derive_query_id(query_key(query.text)):
        given = query.query_id if given is None else min(given, query.query_id)
    # Every row's id is kept (derived ones too): a run file may list the query under any of them.
    ids.update(query.ids)
    return texts, given, max(position, (query.source, query.row)), ids


def _merge(accs: Iterable[_Acc]) -> _Acc:
    texts: dict[str, int] = {}
    given: str | None = None
    position = _NO_POSITION
    ids: set[str] = set()
    for acc_texts, acc_given, acc_position, acc_ids in accs:
        for text, count in acc_texts.items():
            texts[text] = texts.get(text, 0) + count
        if acc_given is not None:
            given = acc_given if given is None else min(given, acc_given)
        position = max(position, acc_position)
        ids |= acc_ids
    return texts, given, position, ids


def _extract(acc: _Acc) -> Query:
    texts, given, (source, row), ids = acc
    # Representative text: the most frequent spelling, ties to the smallest string.
    text = min(texts, key=lambda t: (-texts[t], t))
    return Query(
        query_id=given or derive_query_id(query_key(text)), text=text, count=sum(texts.values()), source=source, row=row,
        merged_ids=tuple(sorted(ids)),
    )


def merge_duplicates(queries: Iterable[Query]) -> Query:
    """One query from rows sharing a ``query_key``: counts summed, the most frequent spelling
    as text (ties: smallest), the smallest id given in the log, else the derived id;
    ``merged_ids`` holds every row's id (given or derived), the kept one among them."""
    acc: _Acc = ({}, None, _NO_POSITION, set())
    for q in queries:
        acc = _add(acc, q)
    if not acc[0]:
        raise ValueError("merge_duplicates needs at least one query")
    return _extract(acc)


def resolve_id_collisions(queries: Iterable[Query]) -> tuple[Query, list[DeadLetter]]:
    """Distinct queries (different texts) given the same id in the log: one is kept.

    **The last row in (file path, row number) order wins**, the rule of the index job's
    duplicate document ids; the others become dead letters naming the kept row. Keeping
    both would merge their judgements under one id in qrels and runs, and a run file that
    ranks the id could only mean one of them.
    """
    ordered = sorted(queries, key=lambda q: (q.source, q.row, q.text))
    kept = ordered[-1]
    where = row_position(kept.source, kept.row) if kept.row >= 0 else kept.source or "an unknown row"
    letters = [
        DeadLetter.of(
            "dedup",
            f"duplicate query id {kept.query_id!r} with a different text: {len(ordered)} queries share it; "
            f"kept {where} (the last in file-path and row order)",
            row_position(q.source, q.row) if q.row >= 0 else q.source,
            {"query_id": q.query_id, "query": q.text, "count": q.count},
        )
        for q in ordered[:-1]
    ]
    return kept, letters


class _MergeDuplicatesFn(beam.CombineFn):
    def create_accumulator(self) -> _Acc:
        return {}, None, _NO_POSITION, set()

    def add_input(self, acc: _Acc, query: Query) -> _Acc:
        return _add(acc, query)

    def merge_accumulators(self, accs: Iterable[_Acc]) -> _Acc:
        return _merge(accs)

    def extract_output(self, acc: _Acc) -> Query:
        return _extract(acc)


class _ResolveIdCollisionsFn(beam.DoFn):
    def __init__(self) -> None:
        self.collisions = Metrics.counter("corpus_etl", "query_id_collisions")

    def process(self, element: tuple[str, Iterable[Query]]):
        _, queries = element
        kept, letters = resolve_id_collisions(queries)
        self.collisions.inc(len(letters))
        for letter in letters:
            yield beam.pvalue.TaggedOutput(DEAD, letter)
        yield kept


class DedupQueries(beam.PTransform):
    """``Query`` rows → ``{"queries": one Query per query_key, "dead_letter": ...}``.

    Rows with the same ``query_key`` merge (counts summed; see ``merge_duplicates``). A second
    grouping by id catches logs that give one id to different texts: one is kept
    (``resolve_id_collisions``), the others are dead letters.
    """

    def expand(self, queries):
        resolved = (
            queries
            | "KeyByQueryKey" >> beam.WithKeys(lambda q: query_key(q.text))
            | "MergeDuplicates" >> beam.CombinePerKey(_MergeDuplicatesFn())
            | "DropKey" >> beam.Values()
            | "KeyById" >> beam.WithKeys(lambda q: q.query_id)
            | "GroupById" >> beam.GroupByKey()
            | "ResolveIdCollisions" >> beam.ParDo(_ResolveIdCollisionsFn()).with_outputs(DEAD, main="queries")
        )
        return {"queries": resolved.queries, DEAD: resolved[DEAD]}


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """``--max-queries`` and ``--sample``: with proportions, a stratified sample of
    ``max_queries``; with ``max_queries`` alone, the most frequent ones; neither: all."""

    max_queries: int | None = None
    proportions: tuple[float, float, float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"--max-queries must be >= 1, got {self.max_queries}")
        if self.proportions is not None:
            if self.max_queries is None:
                raise ValueError("--sample needs --max-queries (the sample size)")
            if len(self.proportions) != 3 or any(p < 0 or not math.isfinite(p) for p in self.proportions):
                raise ValueError(f"proportions must be three numbers >= 0, got {self.proportions!r}")
            if sum(self.proportions) <= 0:
                raise ValueError(f"proportions must not all be 0, got {self.proportions!r}")

    @property
    def active(self) -> bool:
        return self.max_queries is not None


def select_queries(queries: Sequence[Query], config: SampleConfig) -> list[Query]:
    """What ``SampleQueries`` keeps, sorted by query id."""
    if config.proportions is not None and config.max_queries is not None:
        return stratified_sample(queries, config.proportions, config.max_queries, config.seed)
    kept = frequency_order(queries)[: config.max_queries] if config.max_queries else list(queries)
    return sorted(kept, key=lambda q: q.query_id)


class SampleQueries(beam.PTransform):
    """De-duplicated ``Query`` → the ones ``select_queries`` keeps.

    Tiers need every count, so the queries are gathered on one worker (a log of a few
    million distinct queries is a few hundred MB). Without ``max_queries`` it passes the
    input through untouched and gathers nothing.
    """

    def __init__(self, config: SampleConfig = SampleConfig()) -> None:
        super().__init__()
        self.config = config

    def expand(self, queries):
        if not self.config.active:
            return queries
        config = self.config
        return (
            queries
            | "Gather" >> beam.combiners.ToList()
            | "Select" >> beam.FlatMap(lambda qs: select_queries(qs, config))
        )

"""Query normalisation, de-duplication, ids, split and sampling (pure functions and Beam transforms)."""

from __future__ import annotations

import json

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.text.queries import (
    DedupQueries,
    ParseQueryRows,
    QueryColumns,
    SampleConfig,
    SampleQueries,
    assign_split,
    derive_query_id,
    frequency_tiers,
    merge_duplicates,
    near_duplicate_key,
    normalize_query,
    parse_query_row,
    parse_sample_spec,
    query_key,
    resolve_id_collisions,
    select_queries,
    stratified_sample,
)
from transforms.types import DEAD, DeadLetter, Query

COLUMNS = QueryColumns()

# ---------------------------------------------------------------------------------------------
# Normalisation and ids
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "display", "key"),
    [
        ("  Hello\t\tWORLD \n", "Hello WORLD", "hello world"),
        ("ｆｕｌｌ\u3000ｗｉｄｔｈ", "full width", "full width"),  # NFKC: full-width forms and space
        ("cafe\u0301", "caf\u00e9", "caf\u00e9"),  # NFKC composes the accent
        ("a\x00b\x1bc", "a b c", "a b c"),  # control characters become spaces
        ("Straße", "Straße", "strasse"),  # casefold, not lower()
        ("ﬁle", "file", "file"),  # ligature
        # Invisible format characters go: a BOM, zero-width space, soft hyphen, word joiner, LRM.
        ("\ufeffRunning\u200b shoes", "Running shoes", "running shoes"),
        ("run\u00adning\u2060 \u200eshoes", "running shoes", "running shoes"),
        ("e\u200b\u0301", "\u00e9", "\u00e9"),  # dropped before NFKC composes the accent
    ],
)
def test_normalize_and_key(raw: str, display: str, key: str) -> None:
    assert normalize_query(raw) == display
    assert query_key(raw) == key


def test_derive_query_id_is_deterministic_and_follows_the_key() -> None:
    # sha1("hello world") = 2aae6c35c94fcfb415dbe95f408b9ce91ee846ed
    assert derive_query_id("hello world") == "q2aae6c35c94fcfb4"
    assert derive_query_id(query_key("  Hello   WORLD")) == "q2aae6c35c94fcfb4"
    assert derive_query_id("hello worlds") != "q2aae6c35c94fcfb4"


@pytest.mark.parametrize(
    ("variants", "key"),
    [
        (["Running shoes", "shoe running", "running shoes!", "RUNNING  SHOES running"], "running shoe"),
        (["Men's shoes", "mens shoe", "men’s shoes"], "men shoe"),
        (["batteries AA", "aa battery"], "aa battery"),
        (["movies 2024", "2024 movie"], "2024 movy"),
        (["Café crème", "cafe creme"], "cafe creme"),
        (["tax boxes", "box taxes"], "box tax"),
    ],
)
def test_near_duplicate_key_groups_variants(variants: list[str], key: str) -> None:
    assert [near_duplicate_key(v) for v in variants] == [key] * len(variants)


def test_near_duplicate_key_keeps_different_queries_apart() -> None:
    assert near_duplicate_key("running shoes") != near_duplicate_key("running socks")
    assert near_duplicate_key("glass") == "glass"  # "ss" is not a plural
    assert near_duplicate_key("bus") == "bus"  # too short to fold
    assert near_duplicate_key("?!") == "?!"  # no word token: falls back to the key


# ---------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------


def test_near_duplicates_fall_on_the_same_side() -> None:
    groups = [
        ["Running shoes", "shoe running", "running shoes!"],
        ["Men's shoes", "mens shoe"],
        ["batteries AA", "aa battery", "AA Batteries"],
        ["Café crème", "cafe creme"],
    ]
    for fraction in (0.1, 0.3, 0.5, 0.7, 0.9):
        for group in groups:
            sides = {assign_split(q, fraction) for q in group}
            assert len(sides) == 1, (group, fraction, sides)


def test_invisible_characters_neither_split_a_query_nor_move_it() -> None:
    # A soft hyphen made "run ning" two tokens: the same visible query could land on both sides.
    assert near_duplicate_key("run\u00adning shoes") == near_duplicate_key("running shoes")
    derived = derive_query_id("running shoes")
    rows = [parse_query_row("log.parquet", {"query": q}, COLUMNS) for q in ("\ufeffrunning shoes", "running shoes")]
    assert merge_duplicates(rows) == Query(derived, "running shoes", 2)


def test_split_fraction_is_roughly_honoured_and_stable() -> None:
    queries = [f"synthetic query number {i}" for i in range(1000)]
    sides = [assign_split(q, 0.2) for q in queries]
    assert abs(sides.count("eval") / 1000 - 0.2) < 0.05
    assert sides == [assign_split(q, 0.2) for q in queries]
    # Growing the fraction only moves queries from train to eval, never back.
    wider = [assign_split(q, 0.4) for q in queries]
    assert all(w == "eval" for s, w in zip(sides, wider, strict=True) if s == "eval")
    assert sum(w == "eval" for w in wider) > sides.count("eval")


def test_split_edges_and_validation() -> None:
    assert {assign_split(f"q {i}", 0.0) for i in range(50)} == {"train"}
    assert {assign_split(f"q {i}", 1.0) for i in range(50)} == {"eval"}
    with pytest.raises(ValueError, match="eval_fraction"):
        assign_split("x", 1.5)


# ---------------------------------------------------------------------------------------------
# Row parsing
# ---------------------------------------------------------------------------------------------


def test_parse_row_normalises_and_takes_given_id_and_count() -> None:
    assert parse_query_row(
        "f.parquet", {"query": "  Foo\tBar ", "query_id": 17, "count": 3.0}, COLUMNS
    ) == Query("17", "Foo Bar", 3)
    assert parse_query_row(
        "f.parquet", {"query": "foo bar", "query_id": " a-1 ", "count": None}, COLUMNS
    ) == Query("a-1", "foo bar", 1)


def test_parse_row_derives_id_when_none_is_given() -> None:
    expected = Query(derive_query_id("hello world"), "Hello World", 1)
    assert parse_query_row("f", {"query": "Hello World"}, COLUMNS) == expected
    assert parse_query_row("f", {"query": "Hello World", "query_id": None}, COLUMNS) == expected
    assert parse_query_row("f", {"query": "Hello World", "query_id": "  "}, COLUMNS) == expected
    no_columns = QueryColumns(query_id=None, count=None)
    assert parse_query_row("f", {"query": "Hello World", "query_id": "x", "count": 9}, no_columns) == expected


def test_parse_row_reads_a_binary_query_column_as_utf8_text() -> None:
    # Writers that leave out Parquet's UTF8 annotation (older Hive, Impala, Spark) store text as binary.
    assert parse_query_row("f", {"query": "caf\u00e9".encode()}, COLUMNS) == parse_query_row("f", {"query": "caf\u00e9"}, COLUMNS)
    assert parse_query_row("f", {"query": b"bad \xff"}, COLUMNS).reason == (
        "query is not UTF-8 (column 'query': invalid start byte at byte 4)"
    )


def test_parse_row_respects_column_names() -> None:
    columns = QueryColumns(query="q", query_id="qid", count="n", max_query_chars=5)
    assert parse_query_row("f", {"q": "abc", "qid": "7", "n": 2}, columns) == Query("7", "abc", 2)
    assert parse_query_row("f", {"q": "abcdef"}, columns).reason == "query longer than 5 characters (6)"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"query": "   \t "}, "empty query"),
        ({"query": "\x00"}, "empty query"),
        ({"query": "\u200b\ufeff"}, "empty query"),
        ({"query": None}, "null query (column 'query')"),
        ({"query": 42}, "non-string query (column 'query' holds int)"),
        ({"text": "hi"}, "missing query column 'query'"),
        ({"query": "x" * 2049}, "query longer than 2048 characters (2049)"),
        ({"query": "hi", "count": 0}, "count must be >= 1, got 0"),
        ({"query": "hi", "count": 2.5}, "count is a non-integral float: 2.5"),
        ({"query": "hi", "count": "3"}, "count is a str, not an integer"),
        ({"query": "hi", "query_id": "a b"}, "query_id 'a b' contains whitespace"),
        ({"query": "hi", "query_id": '"q1"'},
         "query_id '\"q1\"' starts with a double quote (TSV readers take it as quoting)"),
        ({"query": "hi", "query_id": True}, "query_id is a bool, not a string or integer"),
        ({"query": "hi", "query_id": "q\x001"}, "query_id 'q\\x001' contains a control character (U+0000)"),
        ({"query": "hi", "query_id": "q\x7f"}, "query_id 'q\\x7f' contains a control character (U+007F)"),
    ],
)
def test_parse_row_dead_letters_with_reason(row: dict, reason: str) -> None:
    letter = parse_query_row("logs/part-0.parquet", row, COLUMNS)
    assert isinstance(letter, DeadLetter)
    assert (letter.stage, letter.reason, letter.source) == ("parse_query", reason, "logs/part-0.parquet")
    assert json.loads(letter.record) == row


def test_parse_row_accepts_exactly_max_chars_after_normalisation() -> None:
    text = "x" * 2048
    assert parse_query_row("f", {"query": f"  {text}  "}, COLUMNS) == Query(derive_query_id(text), text, 1)


def test_query_columns_validate() -> None:
    with pytest.raises(ValueError, match="must differ"):
        QueryColumns(query="q", query_id="q")
    with pytest.raises(ValueError, match="max_query_chars"):
        QueryColumns(max_query_chars=0)


def test_parse_query_rows_transform_splits_good_and_bad_rows() -> None:
    rows = [
        ("a.parquet", 0, {"query": "Hello  world", "query_id": None, "count": 2}),
        ("a.parquet", 1, {"query": "", "query_id": "x", "count": 1}),
        ("b.parquet", 0, {"query": "second", "query_id": "q-2", "count": None}),
    ]
    with BeamTestPipeline() as p:
        out = p | beam.Create(rows) | ParseQueryRows(COLUMNS)
        assert_that(
            out["queries"],
            equal_to([Query(derive_query_id("hello world"), "Hello world", 2), Query("q-2", "second", 1)]),
            label="queries",
        )
        assert_that(
            out[DEAD] | beam.Map(lambda d: (d.stage, d.reason, d.source)),
            equal_to([("parse_query", "empty query", "row 2 of a.parquet")]),
            label="dead",
        )


# ---------------------------------------------------------------------------------------------
# De-duplication
# ---------------------------------------------------------------------------------------------


def test_merge_duplicates_sums_counts_and_picks_deterministically() -> None:
    derived = derive_query_id("new york")
    rows = [
        Query(derived, "new york", 2),
        Query(derived, "New York", 3),
        Query("id-9", "NEW YORK", 1),
        Query("id-10", "new york", 1),
    ]
    # Most frequent spelling ("New York": 3 vs "new york": 3 → tie → smallest string), smallest given id.
    expected = Query("id-10", "New York", 7)
    assert merge_duplicates(rows) == expected
    assert merge_duplicates(list(reversed(rows))) == expected


def test_merge_duplicates_without_given_ids_uses_the_derived_one() -> None:
    derived = derive_query_id("new york")
    assert merge_duplicates([Query(derived, "new york", 1), Query(derived, "New  York", 4)]) == Query(
        derived, "New York", 5
    )


def test_a_merged_query_keeps_the_ids_of_every_row() -> None:
    # A run file may list the query under any of them (the label job's --candidates).
    derived = derive_query_id("new york")
    rows = [Query(derived, "new york", 2), Query("id-9", "NEW YORK", 1), Query("id-10", "new york", 1)]
    merged = merge_duplicates(rows)
    assert (merged.query_id, merged.merged_ids) == ("id-10", ("id-10", "id-9", derived))
    assert merged.ids == merged.merged_ids and Query("q", "text").ids == ("q",)
    with BeamTestPipeline() as p:
        out = p | beam.Create([*rows, Query("r6", "Priority Queue heap"), Query("r7", "priority queue heap")])
        merged_ids = (out | DedupQueries())["queries"] | "Ids" >> beam.Map(lambda q: (q.query_id, q.merged_ids))
        assert_that(
            merged_ids,
            equal_to([("id-10", ("id-10", "id-9", derived)), ("r6", ("r6", "r7"))]),
        )


def test_one_id_given_to_different_texts_keeps_the_last_row() -> None:
    rows = [Query("7", "red shoes", 1, "b.parquet", 0), Query("7", "blue shoes", 2, "a.parquet", 9),
            Query("7", "green shoes", 1, "a.parquet", 3)]  # fmt: skip
    for order in (rows, rows[::-1]):
        kept, letters = resolve_id_collisions(order)
        assert kept == Query("7", "red shoes", 1)
        assert [(d.stage, d.source, d.reason) for d in letters] == [
            ("dedup", f"row {n} of a.parquet", "duplicate query id '7' with a different text: 3 queries share it; "
             "kept row 1 of b.parquet (the last in file-path and row order)")
            for n in (4, 10)
        ]  # fmt: skip


def test_dedup_queries_transform() -> None:
    derived = derive_query_id("new york")
    rows = [
        Query(derived, "new york", 2, "a", 0),
        Query(derived, "New York", 3, "a", 1),
        Query("id-9", "NEW YORK", 1, "a", 2),
        Query("7", "red shoes", 1, "a", 3),
        Query("7", "blue shoes", 2, "a", 4),
        Query(derive_query_id("pizza"), "pizza", 1, "a", 5),
        Query(derive_query_id("pizza"), "pizza", 1, "a", 6),
    ]
    with BeamTestPipeline() as p:
        out = p | beam.Create(rows) | DedupQueries()
        assert_that(
            out["queries"],
            equal_to([Query("id-9", "New York", 6), Query("7", "blue shoes", 2), Query(derive_query_id("pizza"), "pizza", 2)]),
            label="queries",
        )
        assert_that(
            out[DEAD] | beam.Map(lambda d: (d.source, json.loads(d.record)["query"])),
            equal_to([("row 4 of a", "red shoes")]),
            label="dead",
        )


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def _log(n: int) -> list[Query]:
    # Zipf-like counts: a few heavy queries, a long tail.
    return [Query(f"id{i:03d}", f"query {i}", max(1, 1000 // (i + 1))) for i in range(n)]


def test_frequency_tiers_by_cumulative_share() -> None:
    queries = [
        Query("a", "a", 50),
        Query("b", "b", 20),
        Query("c", "c", 10),
        Query("d", "d", 10),
        Query("e", "e", 10),
    ]
    # Shares of the queries above: a 0%, b 50%, c 70%, d 80%, e 90%.
    head, torso, tail = frequency_tiers(reversed(queries))
    assert [[q.query_id for q in t] for t in (head, torso, tail)] == [["a"], ["b", "c"], ["d", "e"]]


def test_frequency_tiers_break_count_ties_by_id() -> None:
    queries = [Query(q, q, 1) for q in "edcba"]
    # Shares above: a 0%, b 20%, c 40%, d 60%, e 80%.
    assert [[q.query_id for q in t] for t in frequency_tiers(queries)] == [["a", "b", "c"], ["d"], ["e"]]


def test_stratified_sample_quotas_and_determinism() -> None:
    queries = _log(100)
    tiers = frequency_tiers(queries)
    assert [len(t) for t in tiers] == [7, 28, 65]
    sample = stratified_sample(queries, (0.5, 0.3, 0.2), 10, seed=0)
    tier_of = {q.query_id: i for i, t in enumerate(tiers) for q in t}
    assert [sum(tier_of[q.query_id] == i for q in sample) for i in range(3)] == [5, 3, 2]
    assert sample == sorted(sample, key=lambda q: q.query_id)
    assert stratified_sample(list(reversed(queries)), (0.5, 0.3, 0.2), 10, seed=0) == sample
    assert stratified_sample(queries, (0.5, 0.3, 0.2), 10, seed=1) != sample
    assert stratified_sample(queries, (5, 3, 2), 10, seed=0) == sample  # weights are relative


@pytest.mark.parametrize(
    ("spec", "n", "quotas"),
    [
        ("5:15:80", 8, [1, 1, 6]),  # remainders .4, .2, .4: the tie goes to the earlier tier
        ("0.05:0.15:0.8", 8, [1, 1, 6]),
        ("0:45:55", 50, [0, 23, 27]),  # 22.5 / 27.5: tie, earlier tier
        ("0:0.45:0.55", 50, [0, 23, 27]),
        ("0:0.7:0.3", 45, [0, 32, 13]),
    ],
)
def test_sample_quotas_are_exact_whatever_the_form_of_the_weights(spec: str, n: int, quotas: list[int]) -> None:
    from transforms.text.queries import _allocate

    assert _allocate(n, parse_sample_spec(spec), [n] * 3) == quotas


def test_stratified_sample_redistributes_a_short_tier_and_skips_zero_weights() -> None:
    queries = _log(100)  # head has 7 queries
    sample = stratified_sample(queries, (0.8, 0.2, 0.0), 20, seed=3)
    head, torso, tail = (set(q.query_id for q in t) for t in frequency_tiers(queries))
    ids = {q.query_id for q in sample}
    # Head quota 16 capped at 7; the 9 left go to the torso; the tail (weight 0) gives none.
    assert (len(ids & head), len(ids & torso), len(ids & tail)) == (7, 13, 0)
    only_head = stratified_sample(queries, (1, 0, 0), 20, seed=3)
    assert {q.query_id for q in only_head} == head


def test_stratified_sample_edges() -> None:
    assert stratified_sample([], (1, 1, 1), 5, seed=0) == []
    queries = _log(5)
    assert stratified_sample(queries, (1, 1, 1), 50, seed=0) == sorted(queries, key=lambda q: q.query_id)
    with pytest.raises(ValueError, match="all be 0"):
        stratified_sample(queries, (0, 0, 0), 2, seed=0)


def test_select_queries_modes() -> None:
    queries = _log(20)
    assert select_queries(queries, SampleConfig()) == queries
    assert [q.query_id for q in select_queries(queries, SampleConfig(max_queries=3))] == [
        "id000",
        "id001",
        "id002",
    ]
    config = SampleConfig(max_queries=6, proportions=(1, 1, 1), seed=5)
    assert select_queries(queries, config) == stratified_sample(queries, (1, 1, 1), 6, 5)


def test_sample_config_and_spec_validate() -> None:
    assert parse_sample_spec("50:30:20") == (50.0, 30.0, 20.0)
    assert parse_sample_spec("0.6:0.4:0") == (0.6, 0.4, 0.0)
    for bad in ("50:50", "a:b:c", "0:0:0", "-1:1:1"):
        with pytest.raises(ValueError):
            parse_sample_spec(bad)
    with pytest.raises(ValueError, match="needs --max-queries"):
        SampleConfig(proportions=(1, 1, 1))
    with pytest.raises(ValueError, match="^--max-queries must be >= 1, got 0$"):
        SampleConfig(max_queries=0)


def test_sample_queries_transform() -> None:
    queries = _log(40)
    config = SampleConfig(max_queries=8, proportions=(0.5, 0.3, 0.2), seed=11)
    with BeamTestPipeline() as p:
        source = p | beam.Create(queries)
        assert_that(
            source | "Sample" >> SampleQueries(config), equal_to(select_queries(queries, config)), label="s"
        )
        assert_that(source | "All" >> SampleQueries(SampleConfig()), equal_to(queries), label="all")

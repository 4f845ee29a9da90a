"""Reading Parquet: every good row once, every bad row a dead letter with its reason and file."""

from __future__ import annotations

import decimal
import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.io.parquet import (
    REJECTED_IDS,
    BadFilesError,
    DocumentColumns,
    ReadDocuments,
    ReadParquetRows,
    check_files,
    input_matches,
    pick_duplicate,
    validate_columns,
)
from transforms.types import DEAD, Document


@pytest.fixture()
def messy_inputs(tmp_path):
    good = tmp_path / "a.parquet"
    pq.write_table(
        pa.table(
            {
                "id": ["d1", "d2", None, "d4", "d5", "d1"],
                "text": ["alpha", "beta", "gamma", None, "   ", "alpha again"],
                "lang": ["en", "de", "en", "en", "fr", "en"],
            }
        ),
        good,
    )
    # Same id as a.parquet's d2, and a file whose text column is not a string.
    pq.write_table(pa.table({"id": ["d2"], "text": ["beta"], "lang": ["de"]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"id": [7], "text": [42], "lang": ["xx"]}), tmp_path / "c.parquet")
    return tmp_path


def test_good_rows_once_and_bad_rows_with_reasons(messy_inputs):
    a, b, c = (str(messy_inputs / f"{n}.parquet") for n in "abc")
    cols = DocumentColumns(id="id", text="text", metadata=("lang",))
    # The documented rule for repeated ids: the last row in (file path, row number) order wins.
    kept_d1, dropped_d1 = "alpha again", "alpha"
    with TestPipeline() as p:
        out = p | ReadDocuments(str(messy_inputs / "*.parquet"), cols)
        assert_that(
            out[DEAD] | "dropped" >> beam.Filter(lambda d: "duplicate id 'd1'" in d.reason)
            | beam.Map(lambda d: json.loads(d.record)["text"]),
            equal_to([dropped_d1]),
            label="dropped duplicate",
        )
        assert_that(
            out["documents"],
            equal_to([Document("d1", kept_d1, None, {"lang": "en"}, a, row=5),
                      Document("d2", "beta", None, {"lang": "de"}, b, row=0)]),
            label="documents",
        )
        assert_that(
            out[DEAD] | beam.Map(lambda d: (d.stage, d.source, d.reason)),
            equal_to(
                [
                    ("read", f"row 3 of {a}", "null id (column 'id')"),
                    ("read", f"row 4 of {a}", "null text (column 'text')"),
                    ("read", f"row 5 of {a}", "empty text (column 'text')"),
                    ("read", f"row 1 of {c}", "non-string text (column 'text' holds int)"),
                    ("read", f"row 1 of {a}",
                     f"duplicate id 'd1': 2 rows share it; kept row 6 of {a} (the last in file-path and row order)"),
                    # d2 in a.parquet and b.parquet: the later file (by path) wins
                    ("read", f"row 2 of {a}",
                     f"duplicate id 'd2': 2 rows share it; kept row 1 of {b} (the last in file-path and row order)"),
                ]
            ),
            label="dead letters",
        )


def test_dead_letters_keep_the_row(messy_inputs):
    with TestPipeline() as p:
        out = p | ReadDocuments(str(messy_inputs / "c.parquet"), DocumentColumns())
        assert_that(out[DEAD] | beam.Map(lambda d: json.loads(d.record)), equal_to([{"id": 7, "text": 42}]))


def test_duplicate_choice_does_not_depend_on_arrival_order():
    # The last row in (file path, row number) order wins: f2's row 9, whatever the text.
    docs = [Document("x", t, source=s, row=r) for t, s, r in [("zzz", "f2", 9), ("a", "f2", 3), ("c", "f1", 40)]]
    kept_forward, _ = pick_duplicate("x", docs)
    kept_backward, letters = pick_duplicate("x", list(reversed(docs)))
    assert kept_forward == kept_backward == docs[0]
    assert sorted(json.loads(d.record)["text"] for d in letters) == ["a", "c"]
    assert sorted(d.source for d in letters) == ["row 4 of f2", "row 41 of f1"]


def test_missing_columns_fail_before_the_job_naming_every_file_and_column(messy_inputs):
    with pytest.raises(ValueError) as err:
        validate_columns(str(messy_inputs / "*.parquet"), ["id", "body"])
    a, b, c = (messy_inputs / f"{n}.parquet" for n in "abc")
    assert str(err.value) == (
        f"3 of 3 input file(s) cannot be read ({a}: missing column(s) body; the file has: id, text, lang; "
        f"{b}: missing column(s) body; the file has: id, text, lang; {c}: missing column(s) body; the file has: "
        "id, text, lang); fix or remove them"  # the label job's inputs: no --skip-bad-files there
    )
    with pytest.raises(ValueError, match=r"; fix or remove them, or pass --skip-bad-files to index the others$"):
        check_files(str(messy_inputs / "*.parquet"), ["id", "body"])


def test_bad_files_are_named_or_skipped_as_dead_letters(messy_inputs):
    (messy_inputs / "d.parquet").write_text("not parquet at all")
    pq.write_table(pa.table({"id": ["z"], "body": ["no text column"]}), messy_inputs / "e.parquet")
    with pytest.raises(BadFilesError, match=r"^2 of 5 input file\(s\) cannot be read \(.*d.parquet: not a readable "
                       r"Parquet file: .*e.parquet: missing column\(s\) text; the file has: id, body\)"):
        check_files(str(messy_inputs / "*.parquet"), ["id", "text"])
    good, letters = check_files(str(messy_inputs / "*.parquet"), ["id", "text"], skip_bad=True)
    assert good == [str(messy_inputs / f"{n}.parquet") for n in "abc"]
    assert [(d.stage, d.source, d.reason.split(":")[0]) for d in letters] == [
        ("read", str(messy_inputs / "d.parquet"), "file skipped"), ("read", str(messy_inputs / "e.parquet"), "file skipped")
    ]


def corrupt_a_data_page(path) -> None:
    """Overwrite the first page header after the magic bytes: the footer stays valid, reading fails."""
    data = bytearray(path.read_bytes())
    data[4:40] = b"\xff" * 36
    path.write_bytes(bytes(data))


def test_a_corrupt_row_group_is_a_dead_letter_and_the_other_files_are_read(tmp_path):
    for name in "abc":
        pq.write_table(pa.table({"id": [f"{name}{i}" for i in range(5)], "text": ["t"] * 5}), tmp_path / f"{name}.parquet")
    corrupt_a_data_page(tmp_path / "b.parquet")
    assert check_files(str(tmp_path / "*.parquet"), ["id", "text"])[0]  # the footer still reads
    with TestPipeline() as p:
        out = p | ReadDocuments(str(tmp_path / "*.parquet"), DocumentColumns())
        assert_that(out["documents"] | beam.Map(lambda d: d.doc_id),
                    equal_to([f"{n}{i}" for n in "ac" for i in range(5)]), label="docs")  # fmt: skip
        assert_that(
            out[DEAD] | beam.Map(lambda d: (d.source, d.reason.split(":")[0])),
            equal_to([(str(tmp_path / "b.parquet"), "unreadable row group 0 (rows from 1)")]),
            label="dead",
        )


def test_no_matching_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no files match"):
        validate_columns(str(tmp_path / "nothing*.parquet"), ["id"])


def test_dead_letters_are_written_sorted_as_jsonl_or_parquet(tmp_path):
    from transforms.io.dead_letters import write_dead_letters
    from transforms.types import DeadLetter

    letters = [DeadLetter.of("read", "null id", "b.parquet", {"x": 1}), DeadLetter.of("chunk", "too long", "a.parquet", {})]
    assert write_dead_letters(str(tmp_path / "d.jsonl"), letters) == 2
    lines = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert lines == [
        {"stage": "chunk", "reason": "too long", "source": "a.parquet", "record": "{}"},
        {"stage": "read", "reason": "null id", "source": "b.parquet", "record": '{"x": 1}'},
    ]
    write_dead_letters(str(tmp_path / "d.parquet"), letters[::-1])
    assert pq.read_table(tmp_path / "d.parquet").to_pylist() == lines


# -- values that have no exact Python form ----------------------------------------------------------
def _undecodable_text() -> pa.Array:
    return pa.array([b"good one", b"bad \xff\xfe", b"good three"], pa.binary()).view(pa.string())


UNDECODABLE = ("cannot convert column 'text' (string): UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff "
               "in position 4: invalid start byte")  # fmt: skip


def test_an_undecodable_string_costs_its_row_only_and_names_it(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": _undecodable_text()}), path)
    with TestPipeline() as p:
        out = p | ReadDocuments(str(path), DocumentColumns())
        assert_that(out["documents"] | beam.Map(lambda d: (d.doc_id, d.text)),
                    equal_to([("a", "good one"), ("c", "good three")]), label="docs")  # fmt: skip
        assert_that(out[DEAD] | beam.Map(lambda d: (d.stage, d.source, d.reason)),
                    equal_to([("read", f"row 2 of {path}", UNDECODABLE)]), label="dead")  # fmt: skip
        # the refused row's document is still in the input (--delete-missing keeps it)
        assert_that(out[REJECTED_IDS], equal_to(["b"]), label="rejected ids")


def test_a_row_reader_without_a_parser_makes_the_row_a_dead_letter(tmp_path):
    # ReadParquetRows on its own (the label job's query log): the bad row is refused by the reader.
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"query": _undecodable_text()}), path)
    with TestPipeline() as p:
        out = p | ReadParquetRows(str(path), ["query"])
        assert_that(out["rows"] | beam.Map(lambda r: (r[1], r[2])),
                    equal_to([(0, {"query": "good one"}), (2, {"query": "good three"})]), label="rows")  # fmt: skip
        assert_that(out[DEAD] | beam.Map(lambda d: (d.source, d.reason)),
                    equal_to([(f"row 2 of {path}", UNDECODABLE.replace("'text'", "'query'"))]), label="dead")  # fmt: skip


def test_nanosecond_timestamps_are_exact_iso_strings_like_microsecond_ones(tmp_path):
    ns = [1, 1_000, -1, 1_700_000_000_123_456_789, None]
    table = pa.table({
        "id": ["a", "b", "c", "d", "e"], "text": ["t"] * 5,
        "ts": pa.array(ns, pa.timestamp("ns")),
        "tz": pa.array(ns, pa.timestamp("ns", "Europe/Paris")),
        "us": pa.array([0, 1, 0, 0, 0], pa.timestamp("us", "Europe/Paris")),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "a.parquet")
    with TestPipeline() as p:
        out = p | ReadDocuments(str(tmp_path / "a.parquet"), DocumentColumns(metadata=("ts", "tz", "us")))
        assert_that(
            out["documents"] | beam.Map(lambda d: (d.doc_id, d.metadata)),
            equal_to([
                ("a", {"ts": "1970-01-01T00:00:00.000000001", "tz": "1970-01-01T01:00:00.000000001+01:00",
                       "us": "1970-01-01T01:00:00+01:00"}),
                # whole microseconds: what a microsecond column gives (the "us" column of row b)
                ("b", {"ts": "1970-01-01T00:00:00.000001", "tz": "1970-01-01T01:00:00.000001+01:00",
                       "us": "1970-01-01T01:00:00.000001+01:00"}),
                ("c", {"ts": "1969-12-31T23:59:59.999999999", "tz": "1970-01-01T00:59:59.999999999+01:00",
                       "us": "1970-01-01T01:00:00+01:00"}),
                ("d", {"ts": "2023-11-14T22:13:20.123456789", "tz": "2023-11-14T23:13:20.123456789+01:00",
                       "us": "1970-01-01T01:00:00+01:00"}),
                ("e", {"ts": None, "tz": None, "us": "1970-01-01T01:00:00+01:00"}),
            ]),
        )  # fmt: skip
        assert_that(out[DEAD], equal_to([]), label="no dead letters")


# -- ids are exact: distinct values, distinct ids ---------------------------------------------------
def test_decimal_and_byte_ids_are_exact_and_never_collide(tmp_path):
    big = [decimal.Decimal("12345678901234567890"), decimal.Decimal("12345678901234567891")]
    pq.write_table(pa.table({"id": pa.array(big, pa.decimal128(38, 0)), "text": ["x", "y"]}), tmp_path / "a.parquet")
    # decimal(38, 9) as a BigQuery NUMERIC export writes it: 7 was '7.0' and stays so (no re-embedding)
    pq.write_table(pa.table({"id": pa.array([decimal.Decimal("7")], pa.decimal128(38, 9)), "text": ["z"]}),
                   tmp_path / "b.parquet")  # fmt: skip
    pq.write_table(pa.table({"id": pa.array([b"a\xff", b"a\xfe", b"ok"], pa.binary()), "text": ["p", "q", "r"]}),
                   tmp_path / "c.parquet")  # fmt: skip
    c = tmp_path / "c.parquet"
    with TestPipeline() as p:
        out = p | ReadDocuments(str(tmp_path / "*.parquet"), DocumentColumns())
        assert_that(out["documents"] | beam.Map(lambda d: (d.doc_id, d.text)),
                    equal_to([("12345678901234567890", "x"), ("12345678901234567891", "y"), ("7.0", "z"),
                              ("ok", "r")]), label="docs")  # fmt: skip
        assert_that(
            out[DEAD] | beam.Map(lambda d: (d.source, d.reason)),
            equal_to([(f"row 1 of {c}", "id is not UTF-8 text (column 'id': b'a\\xff': invalid start byte)"),
                      (f"row 2 of {c}", "id is not UTF-8 text (column 'id': b'a\\xfe': invalid start byte)")]),
            label="dead",
        )  # fmt: skip


def test_decimal_metadata_stays_one_type_a_float(tmp_path):
    # a payload column of one type: Qdrant's range filters and float indexes skip string values
    values = [decimal.Decimal("12345678901234567890.50"), decimal.Decimal("0.10"), decimal.Decimal("7")]
    table = pa.table({"id": ["a", "b", "c"], "text": ["t"] * 3, "price": pa.array(values, pa.decimal128(38, 2))})
    pq.write_table(table, tmp_path / "a.parquet")
    with TestPipeline() as p:
        out = p | ReadDocuments(str(tmp_path / "a.parquet"), DocumentColumns(metadata=("price",)))
        assert_that(out["documents"] | beam.Map(lambda d: (d.doc_id, d.metadata["price"])),
                    equal_to([("a", 1.2345678901234567e19), ("b", 0.1), ("c", 7.0)]))  # fmt: skip


def test_outputs_matched_by_the_input_glob(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert input_matches("x/self.parquet", "./x/self.parquet")
    assert input_matches("x/*.parquet", str(tmp_path / "x" / "dead.parquet"))
    assert input_matches("x/", "x/summary.json")  # a folder: everything in it, as FileSystems.match reads it
    assert not input_matches("x/*.parquet", "x/runs/dead.parquet")  # "*" stays in its folder
    assert input_matches("x/**.parquet", "x/runs/dead.parquet")
    assert input_matches("gs://b/docs/*.parquet", "gs://b/docs/dead.parquet")
    assert not input_matches("gs://b/docs/*.parquet", "gs://b/runs/dead.parquet")
    (tmp_path / "x").mkdir()
    (tmp_path / "docs.parquet").write_bytes(b"")
    (tmp_path / "x" / "link.parquet").symlink_to(tmp_path / "docs.parquet")
    assert input_matches("x/link.parquet", "docs.parquet", files=["x/link.parquet"])  # the same file by a link


def test_a_binary_text_column_is_read_as_utf8_text(tmp_path):
    # Writers that leave out Parquet's UTF8 annotation (older Hive, Impala, Spark) store text as binary.
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": pa.array([b"caf\xc3\xa9 au lait", b"bad \xff"], pa.binary())}),
                   path)  # fmt: skip
    with TestPipeline() as p:
        out = p | ReadDocuments(str(path), DocumentColumns())
        assert_that(out["documents"] | beam.Map(lambda d: (d.doc_id, d.text)),
                    equal_to([("a", "café au lait")]), label="docs")  # fmt: skip
        assert_that(out[DEAD] | beam.Map(lambda d: (d.source, d.reason)),
                    equal_to([(f"row 2 of {path}", "text is not UTF-8 (column 'text': invalid start byte at byte 4)")]),
                    label="dead")  # fmt: skip
        assert_that(out[REJECTED_IDS], equal_to(["b"]), label="rejected ids")


def test_a_column_that_appears_twice_in_a_file_is_a_bad_file(tmp_path):
    # Which of the two is the text cannot be told; reading took the last one, silently.
    names = ["id", "text", "text"]
    pq.write_table(pa.Table.from_arrays([pa.array(["x"]), pa.array(["one"]), pa.array(["two"])], names=names),
                   tmp_path / "a.parquet")  # fmt: skip
    with pytest.raises(BadFilesError, match=r"a.parquet: column\(s\) text \(2 times\) appear more than once\)"):
        check_files(str(tmp_path / "*.parquet"), ["id", "text", "text"])
    assert check_files(str(tmp_path / "*.parquet"), ["id"]) == ([str(tmp_path / "a.parquet")], [])


def test_a_folder_given_as_input_is_named_with_the_glob_to_give(tmp_path):
    # Spark writes "docs.parquet" as a folder of part files.
    folder = tmp_path / "docs.parquet"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["a"], "text": ["alpha"]}), folder / "part-0.parquet")
    with pytest.raises(BadFilesError, match=r"docs.parquet: a folder, not a Parquet file; give a glob of its files, "
                       r"e.g. '.*docs.parquet/\*.parquet'"):  # fmt: skip
        check_files(str(folder), ["id", "text"])
    assert check_files(str(folder / "*.parquet"), ["id", "text"])[0] == [str(folder / "part-0.parquet")]


def test_int96_timestamps_beyond_nanoseconds_keep_their_date(tmp_path):
    # Spark's default timestamp type (also Hive, Impala). Read as nanoseconds, 9999-12-31 (a common "valid
    # until" sentinel) and 0001-01-01 wrapped around silently to dates in 1816 and 1754; values nanoseconds
    # hold are read as before, exactly (nanoseconds included, before 1970 too).
    import datetime

    path = tmp_path / "a.parquet"
    ns = pa.array([1_577_836_800_123_456_789, -1, None], pa.timestamp("ns"))
    far = pa.array([datetime.datetime(9999, 12, 31, 23, 59, 59), datetime.datetime(1, 1, 1, 0, 0, 0, 5), None])
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": ["x", "y", "z"], "ns": ns}), path,
                   use_deprecated_int96_timestamps=True)  # fmt: skip
    far_path = tmp_path / "far.parquet"
    pq.write_table(pa.table({"id": ["d", "e", "f"], "text": ["x", "y", "z"], "ns": far}), far_path,
                   use_deprecated_int96_timestamps=True)  # fmt: skip
    assert pq.ParquetFile(far_path).schema.column(2).physical_type == "INT96"
    cols = DocumentColumns(metadata=("ns",))
    with TestPipeline() as p:
        out = p | ReadDocuments([str(path), str(far_path)], cols)
        assert_that(out["documents"] | beam.Map(lambda d: (d.doc_id, d.metadata["ns"])), equal_to([
            ("a", "2020-01-01T00:00:00.123456789"), ("b", "1969-12-31T23:59:59.999999999"), ("c", None),
            ("d", "9999-12-31T23:59:59"), ("e", "0001-01-01T00:00:00.000005"), ("f", None),
        ]))  # fmt: skip

"""Reading documents from Parquet (local paths or ``gs://``).

Files are read by row group, so memory follows the row-group size, not the file size,
and row groups are spread over workers (a reshuffle after listing them). Every row
carries its file and row number: dead letters point at the row, and the duplicate-id
rule ("the last row in file-path and row order wins") can be stated and tested. Beam's
``ReadAllFromParquetBatched`` splits files the same way but gives no row numbers, and a
corrupt page there fails the whole job; here it is a dead letter naming the file and row
group, and every other row group is still read. Values are converted column by column, and
a value with no Python form (invalid UTF-8 in a string column, ...) costs its row only, as
a dead letter naming the file, row and column. Columns are checked against every
matched file's footer before the pipeline starts, so a typo in ``--text-column`` fails in
seconds with the file and column named, not an hour into a Dataflow job.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.types import DEAD, DeadLetter, Document, content_hash


def match_files(pattern: str) -> list[str]:
    """Paths matching a glob (local or gs://), sorted; a clear error when none match.

    An empty object whose name ends in ``/`` is an object store's folder marker (``gs://b/docs/``, made by
    the Cloud Console's "Create folder", gcsfuse, Hadoop's connector), which ``gs://b/docs/*`` matches:
    not an input file, so it is left out, not refused as an unreadable one.
    """
    try:
        results = FileSystems.match([pattern])
    except Exception as exc:  # Beam wraps every filesystem error in BeamIOError
        raise FileNotFoundError(f"cannot list {pattern!r}: {exc}") from exc
    paths = sorted(
        m.path for r in results for m in r.metadata_list if not (m.path.endswith("/") and m.size_in_bytes == 0)
    )
    if not paths:
        raise FileNotFoundError(f"no files match {pattern!r}")
    return paths


def file_problem(path: str, required: Sequence[str]) -> str | None:
    """Why ``path`` cannot be read for ``required`` columns (footer only), or None when it can."""
    if not FileSystems.get_scheme(path) and os.path.isdir(path):  # e.g. Spark's output folder "docs.parquet"
        return f"a folder, not a Parquet file; give a glob of its files, e.g. {os.path.join(path, '*.parquet')!r}"
    try:
        with FileSystems.open(path) as f:
            schema = pq.ParquetFile(f).schema_arrow
    except Exception as exc:
        return f"not a readable Parquet file: {type(exc).__name__}: {exc}"
    missing = [c for c in required if c not in schema.names]
    if missing:
        return f"missing column(s) {', '.join(missing)}; the file has: {', '.join(schema.names)}"
    repeated = [c for c in dict.fromkeys(required) if schema.names.count(c) > 1]
    if repeated:  # which one is meant cannot be told (a reader would silently take one of them)
        return "column(s) " + ", ".join(f"{c} ({schema.names.count(c)} times)" for c in repeated) + " appear more than once"
    return None


def _comparable(path: str) -> str:
    """A path as matching sees it: local paths absolute and normalised (``./x`` and ``x`` are one
    file), remote ones (``gs://``) as written."""
    return path if FileSystems.get_scheme(path) else os.path.abspath(path)


def input_matches(pattern: str, path: str, files: Sequence[str] = ()) -> bool:
    """Whether the input ``pattern`` matches ``path`` (or would once it exists), with Beam's glob
    rules (``*`` within a folder, ``**`` across folders), or ``path`` is one of the matched
    ``files`` (local files compared after symlinks are resolved). For outputs that must not
    become input: a later run would read them as documents."""
    if pattern.endswith(("/", "\\")):
        pattern += "*"  # as FileSystems.match reads it
    if re.match(FileSystem.translate_pattern(_comparable(pattern)), _comparable(path)):
        return True
    if FileSystems.get_scheme(path):
        return path in files
    real = os.path.realpath(path)
    return any(not FileSystems.get_scheme(f) and os.path.realpath(f) == real for f in files)


class BadFilesError(ValueError):
    """Input files that cannot be read: every one is named, nothing was written."""


def check_files(
    pattern: str, required: Sequence[str], *, skip_bad: bool = False, skippable: bool = True
) -> tuple[list[str], list[DeadLetter]]:
    """The readable files of ``pattern`` and, with ``skip_bad``, a file-level dead letter per bad one.

    Reads only the Parquet footers. Without ``skip_bad`` any bad file is a ``BadFilesError``
    naming every bad file (not only the first) with its reason, before the job starts; the
    message suggests ``--skip-bad-files`` when ``skippable`` (the index job has that flag).
    """
    files = match_files(pattern)
    problems = [(path, why) for path in files if (why := file_problem(path, required)) is not None]
    if problems and not skip_bad:
        listed = "; ".join(f"{path}: {why}" for path, why in problems)
        raise BadFilesError(
            f"{len(problems)} of {len(files)} input file(s) cannot be read ({listed}); fix or remove them"
            + (", or pass --skip-bad-files to index the others" if skippable else "")
        )
    bad = {path for path, _ in problems}
    good = [f for f in files if f not in bad]
    if not good:
        raise BadFilesError(f"no readable input file among the {len(files)} matching {pattern!r}")
    letters = [DeadLetter.of("read", f"file skipped: {why}", path, {"file": path}) for path, why in problems]
    return good, letters


def validate_columns(pattern: str, required: Sequence[str]) -> list[str]:
    """Check that every file matching ``pattern`` has ``required`` columns; return the files.

    Reads only the Parquet footers. Raises ``ValueError`` naming every bad file and why.
    """
    return check_files(pattern, required, skippable=False)[0]


# (source file, 0-based row number in the file, {column: value})
Row = tuple[str, int, dict[str, Any]]


def row_position(source: str, row_number: int) -> str:
    """How a row is named in messages: ``row 7 of gs://b/docs-2.parquet`` (1-based, as people count)."""
    return f"row {row_number + 1} of {source}"


def _row_groups(path: str) -> Iterable[tuple[str, int, int]]:
    """``(path, row group, number of its first row)`` for every row group of a file (footer only)."""
    with FileSystems.open(path) as f:
        meta = pq.ParquetFile(f).metadata
    first = 0
    for rg in range(meta.num_row_groups):
        yield path, rg, first
        first += meta.row_group(rg).num_rows


@dataclasses.dataclass(frozen=True)
class Unconvertible:
    """A Parquet value with no Python form (invalid UTF-8 in a string column, a nanosecond time of
    day ...), in place of the value: the row is refused, naming the column; the rest of its row
    group is read."""

    type: str  # the column's Arrow type
    error: str

    def __str__(self) -> str:
        return f"<unconvertible {self.type}: {self.error}>"


def unconvertible_reason(row: dict[str, Any], columns: Iterable[str] | None = None) -> str | None:
    """Why ``row`` (of ``columns``, default all) cannot be used: each value that could not be converted, or None."""
    names = row if columns is None else columns
    bad = [(c, v) for c in names if isinstance(v := row.get(c), Unconvertible)]
    return "; ".join(f"cannot convert column {c!r} ({v.type}): {v.error}" for c, v in bad) or None


def _ns_timestamps(array: pa.Array) -> list[str | None]:
    """Nanosecond timestamps as exact ISO 8601 strings: what ``jsonable`` makes of a microsecond
    timestamp (same time zone), with three more digits when there are nanoseconds, as
    ``pandas.Timestamp.isoformat`` writes them (pyarrow returns those where pandas is installed)."""
    ints = array.cast(pa.int64()).to_pylist()
    micros = pa.array([None if v is None else v // 1000 for v in ints], pa.timestamp("us", array.type.tz))
    out: list[str | None] = []
    for v, dt in zip(ints, micros.to_pylist()):
        if v is None or v % 1000 == 0:
            out.append(None if v is None else dt.isoformat())
        else:
            iso = dt.isoformat(timespec="microseconds")  # YYYY-MM-DDTHH:MM:SS.ffffff (26 characters), then the zone
            out.append(f"{iso[:26]}{v % 1000:03d}{iso[26:]}")
    return out


def column_values(array: pa.Array) -> list[Any]:
    """The Python values of one column; a value that cannot be converted is an ``Unconvertible``.

    Nanosecond timestamps are exact ISO strings (``_ns_timestamps``); Python's datetime stops at
    microseconds. Conversion is tried for the whole column, then value by value when it fails,
    so only the bad values are lost.
    """
    try:
        if pa.types.is_timestamp(array.type) and array.type.unit == "ns":
            return _ns_timestamps(array)
        return array.to_pylist()
    except Exception:
        pass
    values: list[Any] = []
    for i in range(len(array)):
        try:
            values.append(array[i].as_py())
        except Exception as exc:
            values.append(Unconvertible(str(array.type), f"{type(exc).__name__}: {exc}"))
    return values


def _int96_columns(parquet: pq.ParquetFile, names: Sequence[str]) -> list[str]:
    """The top-level columns of ``names`` stored as INT96 timestamps (Spark's default, Hive, Impala)."""
    schema = parquet.schema
    return [c.path for c in (schema.column(i) for i in range(len(schema)))
            if c.physical_type == "INT96" and c.path in names]  # fmt: skip


def _int96_beyond_ns(ns: pa.Array, us: pa.Array) -> dict[int, Any]:
    """The values of an INT96 column that its nanosecond reading (``ns``) got wrong, by position, from its
    microsecond reading (``us``) of the same rows. Nanoseconds hold only the years 1677-2262; an INT96 beyond
    them (``9999-12-31``, a common "valid until" sentinel) wraps around silently to another date."""
    exact = ns.cast(pa.int64()).to_pylist()
    micros = us.cast(pa.int64()).to_pylist()
    wrong = [i for i, (n, u) in enumerate(zip(exact, micros)) if n is not None and u is not None and n // 1000 != u]
    return {i: column_values(us.slice(i, 1))[0] for i in wrong}


class _ReadRowGroup(beam.DoFn):
    def __init__(self, columns: list[str], keep_unconvertible: bool = False) -> None:
        self.columns = columns
        self.keep_unconvertible = keep_unconvertible
        self.unreadable = Metrics.counter("corpus_etl", "row_groups_unreadable")

    def process(self, element: tuple[str, int, int]):
        path, rg, first = element
        try:
            with FileSystems.open(path) as f:
                parquet = pq.ParquetFile(f)
                table = parquet.read_row_group(rg, columns=self.columns)
                int96 = _int96_columns(parquet, table.column_names)
                if int96:  # read as nanoseconds, exact; their microsecond reading corrects values beyond them
                    f.seek(0)
                    micros = pq.ParquetFile(f, coerce_int96_timestamp_unit="us").read_row_group(rg, columns=int96)
        except Exception as exc:  # a corrupt page: this row group is lost, the others are not
            self.unreadable.inc()
            reason = f"unreadable row group {rg} (rows from {first + 1}): {type(exc).__name__}: {exc}"
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter.of("read", reason, path, {"row_group": rg}))
            return
        n = first
        for batch in table.to_batches(max_chunksize=1024):
            names = batch.schema.names
            columns = [column_values(batch.column(i)) for i in range(batch.num_columns)]
            for name in int96:
                values = columns[names.index(name)]
                us = micros.column(name).slice(n - first, batch.num_rows).combine_chunks()
                for i, value in _int96_beyond_ns(batch.column(names.index(name)), us).items():
                    values[i] = value
            for i in range(batch.num_rows):
                row = {name: values[i] for name, values in zip(names, columns)}
                reason = None if self.keep_unconvertible else unconvertible_reason(row)
                if reason:
                    record = {k: jsonable(v) for k, v in row.items()}
                    yield beam.pvalue.TaggedOutput(DEAD, DeadLetter.of("read", reason, row_position(path, n), record))
                else:
                    yield path, n, row
                n += 1


class ReadParquetRows(beam.PTransform):
    """A pattern, or a list of files → ``{"rows": (source_file, row_number, row_dict), "dead_letter": ...}``;
    applied to a PCollection of file paths instead of the pipeline, it reads those.

    A pattern is matched when the job runs; a list (files already checked by the driver) is
    read as given. One element per row group is reshuffled across workers, and each row
    group is read with the given columns. A row group that cannot be read becomes one dead
    letter (file, row group, error); the job goes on. A row with a value that cannot be
    converted (``column_values``) becomes a dead letter naming the row and column; with
    ``keep_unconvertible`` it comes out with an ``Unconvertible`` in place of the value, for a
    parser that wants to say more about the row (``ReadDocuments``: its id).
    """

    def __init__(self, pattern: str | Sequence[str], columns: Sequence[str], *, keep_unconvertible: bool = False) -> None:
        super().__init__()
        self.pattern = pattern
        self.columns = list(dict.fromkeys(columns))
        self.keep_unconvertible = keep_unconvertible

    def expand(self, pbegin):
        if isinstance(pbegin, beam.pvalue.PCollection):  # applied to files checked in the job (transforms.io.preflight)
            files = pbegin
        elif isinstance(self.pattern, str):
            files = pbegin | "Pattern" >> beam.Create([self.pattern]) | "MatchFiles" >> beam.FlatMap(match_files)
        else:
            files = pbegin | "Files" >> beam.Create(list(self.pattern))
        read = (
            files
            | "ListRowGroups" >> beam.FlatMap(_row_groups)
            | "SpreadRowGroups" >> beam.Reshuffle()
            | "ReadRowGroups"
            >> beam.ParDo(_ReadRowGroup(self.columns, self.keep_unconvertible)).with_outputs(DEAD, main="rows")
        )
        return {"rows": read.rows, DEAD: read[DEAD]}


def exact_decimal(value: decimal.Decimal) -> float | str:
    """A decimal as the float whose shortest form (``repr``, its JSON) is the decimal's value, else
    as its exact digits (``'12345678901234567890'``: no exponent, no trailing zeros).

    Equal values give equal results whatever the column's scale, and distinct values distinct
    ones (every result names its value exactly). Values a float holds exactly keep the form
    their ids have always had (``7`` of a ``decimal(38,9)`` column is ``7.0``, its id ``'7.0'``),
    so no stored document changes id; only values a float used to round (two ids could become
    one) are written as digits. For ids only: payloads keep floats (``jsonable``).
    """
    f = float(value)
    if math.isfinite(f) and decimal.Decimal(repr(f)) == value:
        return f
    digits = format(value, "f")  # exact: formatting without a precision does not round
    return digits.rstrip("0").rstrip(".") if "." in digits else digits


def jsonable(value: Any) -> Any:
    """A Parquet value as something JSON (and so a Qdrant payload) can hold.

    Decimals: floats, so a column's payload values keep one type (Qdrant's range filters and float
    indexes skip strings); bytes: decoded as UTF-8, undecodable bytes replaced. A payload is for
    reading and filtering; ids never go through these lossy steps, see ``document_id``.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


@dataclasses.dataclass(frozen=True)
class DocumentColumns:
    id: str = "id"
    text: str = "text"
    title: str | None = None
    metadata: tuple[str, ...] = ()

    @property
    def all(self) -> list[str]:
        cols = [self.id, self.text] + ([self.title] if self.title else []) + list(self.metadata)
        return list(dict.fromkeys(cols))


class IdError(ValueError):
    """Why a row's id is not a document id. ``unknown``: the row may hold a document of the
    collection under an id that cannot be read (null, undecodable), so which one it is cannot
    be told; otherwise the value could never have been a document id (empty, 1.5)."""

    def __init__(self, reason: str, *, unknown: bool) -> None:
        super().__init__(reason)
        self.unknown = unknown


def document_id(raw: Any, column: str = "id") -> str:
    """The document id of an id column's value, exactly: distinct values give distinct ids.

    Strings as they are; integers and integral floats as their digits (``7``, ``7.0`` → ``'7'``);
    decimals by ``exact_decimal``; bytes decoded as UTF-8 (never with replacements: ``b'a\\xff'``
    and ``b'a\\xfe'`` are refused, not both made ``'a\\ufffd'``); dates and times in ISO 8601.
    Raises ``IdError`` for null, empty, non-integral float and undecodable ids.
    """
    if raw is None:
        raise IdError(f"null id (column {column!r})", unknown=True)
    if isinstance(raw, Unconvertible):
        raise IdError(unconvertible_reason({column: raw}) or "", unknown=True)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise IdError(f"id is not UTF-8 text (column {column!r}: {raw!r}: {exc.reason})", unknown=True) from exc
    if isinstance(raw, float) and not raw.is_integer():
        raise IdError(f"id is a non-integral float: {raw!r}", unknown=False)
    if isinstance(raw, decimal.Decimal):
        doc_id = str(exact_decimal(raw))
    else:
        doc_id = str(int(raw)) if isinstance(raw, float) else str(jsonable(raw))
    if not doc_id.strip():
        raise IdError(f"empty id (column {column!r})", unknown=False)
    return doc_id


def row_to_document(
    source: str, row: dict[str, Any], columns: DocumentColumns, row_number: int = -1
) -> Document | DeadLetter:
    """One Parquet row as a ``Document``, or a ``DeadLetter`` saying what is wrong with it."""
    text = row.get(columns.text)

    def reject(reason: str) -> DeadLetter:
        where = row_position(source, row_number) if row_number >= 0 else source
        return DeadLetter.of("read", reason, where, {k: jsonable(v) for k, v in row.items()})

    try:
        doc_id = document_id(row.get(columns.id), columns.id)
    except IdError as exc:
        return reject(str(exc))
    unconvertible = unconvertible_reason(row, columns.all)
    if unconvertible:
        return reject(unconvertible)
    if text is None:
        return reject(f"null text (column {columns.text!r})")
    if isinstance(text, bytes):  # a binary column (writers that leave out Parquet's UTF8 annotation): UTF-8 text
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            return reject(f"text is not UTF-8 (column {columns.text!r}: {exc.reason} at byte {exc.start})")
    if not isinstance(text, str):
        return reject(f"non-string text (column {columns.text!r} holds {type(text).__name__})")
    if not text.strip():
        return reject(f"empty text (column {columns.text!r})")
    title = row.get(columns.title) if columns.title else None
    if title is not None and not isinstance(title, str):
        title = str(jsonable(title))
    metadata = {c: jsonable(row.get(c)) for c in columns.metadata}
    return Document(doc_id=doc_id, text=text, title=title or None, metadata=metadata, source=source, row=row_number)


# ReadDocuments' output of the ids of the rows it refused (``--delete-missing`` keeps their documents)
REJECTED_IDS = "rejected_ids"


class _ParseDocuments(beam.DoFn):
    def __init__(self, columns: DocumentColumns) -> None:
        self.columns = columns
        self.read = Metrics.counter("corpus_etl", "rows_read")
        self.rejected = Metrics.counter("corpus_etl", "rows_rejected")
        self.unknown_id = Metrics.counter("corpus_etl", "rows_unknown_id")

    def process(self, element: Row):
        source, row_number, row = element
        self.read.inc()
        result = row_to_document(source, row, self.columns, row_number)
        if isinstance(result, DeadLetter):
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(DEAD, result)
            try:  # the document is still in the input, refused: say which, or (None) that it cannot be told
                yield beam.pvalue.TaggedOutput(REJECTED_IDS, document_id(row.get(self.columns.id), self.columns.id))
            except IdError as exc:
                if exc.unknown:
                    self.unknown_id.inc()
                    yield beam.pvalue.TaggedOutput(REJECTED_IDS, None)
        else:
            yield result


def pick_duplicate(doc_id: str, docs: Iterable[Document]) -> tuple[Document, list[DeadLetter]]:
    """Keep one document per id: **the last row in (file path, row number) order wins**.

    A rule a user can predict, and the one of an append-only export: a later file (e.g.
    ``docs-2026-11-25.parquet`` after ``docs-2026-11-24.parquet``), or a later row of the
    same file, supersedes an earlier one. Arrival order plays no part, so reruns agree.
    Every other row with the same id becomes a dead letter naming the row that was kept.
    """
    ordered = sorted(docs, key=lambda d: (d.source, d.row, content_hash(d.text), d.title or ""))
    kept, rest = ordered[-1], ordered[:-1]
    letters = [
        DeadLetter.of(
            "read",
            f"duplicate id {doc_id!r}: {len(ordered)} rows share it; kept {row_position(kept.source, kept.row)} "
            "(the last in file-path and row order)",
            row_position(d.source, d.row),
            {"id": d.doc_id, "text": d.text, "title": d.title, **d.metadata},
        )
        for d in rest
    ]
    return kept, letters


class _DropDuplicateIds(beam.DoFn):
    def __init__(self) -> None:
        self.duplicates = Metrics.counter("corpus_etl", "duplicate_ids_rejected")
        self.documents = Metrics.counter("corpus_etl", "documents_read")

    def process(self, element: tuple[str, Iterable[Document]]):
        doc_id, docs = element
        kept, letters = pick_duplicate(doc_id, docs)
        self.documents.inc()
        for letter in letters:
            self.duplicates.inc()
            yield beam.pvalue.TaggedOutput(DEAD, letter)
        yield kept


class ReadDocuments(beam.PTransform):
    """Parquet rows → ``{"documents": Document, "dead_letter": DeadLetter, "rejected_ids": str | None}``.

    Bad rows (null or empty text or id, non-string text, a value that cannot be converted)
    and rows whose id repeats are dead-lettered with the reason; every other row comes out
    exactly once. ``rejected_ids``: the document id of each refused row (``document_id``),
    so that a refused document is not taken for one the input no longer holds, and None for a
    refused row whose id is null or unreadable (``IdError.unknown``: it may hold any document;
    also counted as ``rows_unknown_id``). An id that could never name a document (empty, 1.5)
    gives nothing.
    """

    def __init__(self, pattern: str | Sequence[str], columns: DocumentColumns) -> None:
        super().__init__()
        self.pattern = pattern
        self.columns = columns

    def expand(self, pbegin):
        rows = pbegin | "ReadParquet" >> ReadParquetRows(self.pattern, self.columns.all, keep_unconvertible=True)
        parsed = rows["rows"] | "Parse" >> beam.ParDo(_ParseDocuments(self.columns)).with_outputs(
            DEAD, REJECTED_IDS, main="docs"
        )
        unique = (
            parsed.docs
            | "KeyById" >> beam.WithKeys(lambda d: d.doc_id)
            | "GroupById" >> beam.GroupByKey()
            | "DropDuplicateIds" >> beam.ParDo(_DropDuplicateIds()).with_outputs(DEAD, main="docs")
        )
        dead = (rows[DEAD], parsed[DEAD], unique[DEAD]) | "FlattenDead" >> beam.Flatten()
        return {"documents": unique.docs, DEAD: dead, REJECTED_IDS: parsed[REJECTED_IDS]}

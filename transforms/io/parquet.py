"""Reading documents from Parquet (local paths or ``gs://``).

Files are read by row group, so memory follows the row-group size, not the file size,
and row groups are spread over workers (a reshuffle after listing them). Every row
carries its file and row number: dead letters point at the row, and the duplicate-id
rule ("the last row in file-path and row order wins") can be stated and tested. Beam's
``ReadAllFromParquetBatched`` splits files the same way but gives no row numbers, and a
corrupt page there fails the whole job; here it is a dead letter naming the file and row
group, and every other row group is still read. Columns are checked against every
matched file's footer before the pipeline starts, so a typo in ``--text-column`` fails in
seconds with the file and column named, not an hour into a Dataflow job.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import math
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.types import DEAD, DeadLetter, Document, content_hash


def match_files(pattern: str) -> list[str]:
    """Paths matching a glob (local or gs://), sorted; a clear error when none match."""
    try:
        results = FileSystems.match([pattern])
    except Exception as exc:  # Beam wraps every filesystem error in BeamIOError
        raise FileNotFoundError(f"cannot list {pattern!r}: {exc}") from exc
    paths = sorted(m.path for r in results for m in r.metadata_list)
    if not paths:
        raise FileNotFoundError(f"no files match {pattern!r}")
    return paths


def file_problem(path: str, required: Sequence[str]) -> str | None:
    """Why ``path`` cannot be read for ``required`` columns (footer only), or None when it can."""
    try:
        with FileSystems.open(path) as f:
            schema = pq.ParquetFile(f).schema_arrow
    except Exception as exc:
        return f"not a readable Parquet file: {type(exc).__name__}: {exc}"
    missing = [c for c in required if c not in schema.names]
    if missing:
        return f"missing column(s) {', '.join(missing)}; the file has: {', '.join(schema.names)}"
    return None


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


class _ReadRowGroup(beam.DoFn):
    def __init__(self, columns: list[str]) -> None:
        self.columns = columns
        self.unreadable = Metrics.counter("corpus_etl", "row_groups_unreadable")

    def process(self, element: tuple[str, int, int]):
        path, rg, first = element
        try:
            with FileSystems.open(path) as f:
                table = pq.ParquetFile(f).read_row_group(rg, columns=self.columns)
        except Exception as exc:  # a corrupt page: this row group is lost, the others are not
            self.unreadable.inc()
            reason = f"unreadable row group {rg} (rows from {first + 1}): {type(exc).__name__}: {exc}"
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter.of("read", reason, path, {"row_group": rg}))
            return
        n = first
        for batch in table.to_batches(max_chunksize=1024):
            for row in batch.to_pylist():
                yield path, n, row
                n += 1


class ReadParquetRows(beam.PTransform):
    """A pattern, or a list of files → ``{"rows": (source_file, row_number, row_dict), "dead_letter": ...}``;
    applied to a PCollection of file paths instead of the pipeline, it reads those.

    A pattern is matched when the job runs; a list (files already checked by the driver) is
    read as given. One element per row group is reshuffled across workers, and each row
    group is read with the given columns. A row group that cannot be read becomes one dead
    letter (file, row group, error); the job goes on.
    """

    def __init__(self, pattern: str | Sequence[str], columns: Sequence[str]) -> None:
        super().__init__()
        self.pattern = pattern
        self.columns = list(dict.fromkeys(columns))

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
            | "ReadRowGroups" >> beam.ParDo(_ReadRowGroup(self.columns)).with_outputs(DEAD, main="rows")
        )
        return {"rows": read.rows, DEAD: read[DEAD]}


def jsonable(value: Any) -> Any:
    """A Parquet value as something JSON (and so a Qdrant payload) can hold."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
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


def row_to_document(
    source: str, row: dict[str, Any], columns: DocumentColumns, row_number: int = -1
) -> Document | DeadLetter:
    """One Parquet row as a ``Document``, or a ``DeadLetter`` saying what is wrong with it."""
    raw_id = row.get(columns.id)
    text = row.get(columns.text)

    def reject(reason: str) -> DeadLetter:
        where = row_position(source, row_number) if row_number >= 0 else source
        return DeadLetter.of("read", reason, where, {k: jsonable(v) for k, v in row.items()})

    if raw_id is None:
        return reject(f"null id (column {columns.id!r})")
    if isinstance(raw_id, float) and not raw_id.is_integer():
        return reject(f"id is a non-integral float: {raw_id!r}")
    doc_id = str(int(raw_id)) if isinstance(raw_id, float) else str(jsonable(raw_id))
    if not doc_id.strip():
        return reject(f"empty id (column {columns.id!r})")
    if text is None:
        return reject(f"null text (column {columns.text!r})")
    if not isinstance(text, str):
        return reject(f"non-string text (column {columns.text!r} holds {type(text).__name__})")
    if not text.strip():
        return reject(f"empty text (column {columns.text!r})")
    title = row.get(columns.title) if columns.title else None
    if title is not None and not isinstance(title, str):
        title = str(jsonable(title))
    metadata = {c: jsonable(row.get(c)) for c in columns.metadata}
    return Document(doc_id=doc_id, text=text, title=title or None, metadata=metadata, source=source, row=row_number)


class _ParseDocuments(beam.DoFn):
    def __init__(self, columns: DocumentColumns) -> None:
        self.columns = columns
        self.read = Metrics.counter("corpus_etl", "rows_read")
        self.rejected = Metrics.counter("corpus_etl", "rows_rejected")

    def process(self, element: Row):
        source, row_number, row = element
        self.read.inc()
        result = row_to_document(source, row, self.columns, row_number)
        if isinstance(result, DeadLetter):
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(DEAD, result)
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
    """Parquet rows → ``Document`` (main output) and ``DeadLetter`` (tag ``dead_letter``).

    Bad rows (null or empty text or id, non-string text) and rows whose id repeats
    are dead-lettered with the reason; every other row comes out exactly once.
    """

    def __init__(self, pattern: str | Sequence[str], columns: DocumentColumns) -> None:
        super().__init__()
        self.pattern = pattern
        self.columns = columns

    def expand(self, pbegin):
        rows = pbegin | "ReadParquet" >> ReadParquetRows(self.pattern, self.columns.all)
        parsed = rows["rows"] | "Parse" >> beam.ParDo(_ParseDocuments(self.columns)).with_outputs(DEAD, main="docs")
        unique = (
            parsed.docs
            | "KeyById" >> beam.WithKeys(lambda d: d.doc_id)
            | "GroupById" >> beam.GroupByKey()
            | "DropDuplicateIds" >> beam.ParDo(_DropDuplicateIds()).with_outputs(DEAD, main="docs")
        )
        dead = (rows[DEAD], parsed[DEAD], unique[DEAD]) | "FlattenDead" >> beam.Flatten()
        return {"documents": unique.docs, DEAD: dead}

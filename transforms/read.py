"""Reading documents from Parquet (local paths or ``gs://``) through Beam's own Parquet reader.

Files are read by row group (``ReadAllFromParquetBatched``), so memory follows the
row-group size, not the file size. Columns are checked against every matched file's
footer before the pipeline starts, so a typo in ``--text-column`` fails in seconds with
the file and column named, not an hour into a Dataflow job.
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
from apache_beam.io.parquetio import ReadAllFromParquetBatched
from apache_beam.metrics import Metrics

from transforms.types import DeadLetter, Document, content_hash

DEAD = "dead_letter"


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


def validate_columns(pattern: str, required: Sequence[str]) -> list[str]:
    """Check that every file matching ``pattern`` has ``required`` columns; return the files.

    Reads only the Parquet footers. Raises ``ValueError`` naming the file and the columns.
    """
    files = match_files(pattern)
    for path in files:
        try:
            with FileSystems.open(path) as f:
                schema = pq.ParquetFile(f).schema_arrow
        except Exception as exc:
            raise ValueError(f"{path}: not a readable Parquet file: {exc}") from exc
        missing = [c for c in required if c not in schema.names]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)}; the file has: {', '.join(schema.names)}"
            )
    return files


class ReadParquetRows(beam.PTransform):
    """``pattern`` → ``(source_file, row_dict)`` for the given columns, read by row group."""

    def __init__(self, pattern: str, columns: Sequence[str]) -> None:
        super().__init__()
        self.pattern = pattern
        self.columns = list(dict.fromkeys(columns))

    def expand(self, pbegin):
        return (
            pbegin
            | "Pattern" >> beam.Create([self.pattern])
            | "ReadRowGroups" >> ReadAllFromParquetBatched(columns=self.columns, with_filename=True)
            | "ToRows" >> beam.FlatMap(_table_rows)
        )


def _table_rows(element: tuple[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    source, table = element
    for batch in table.to_batches(max_chunksize=1024):
        for row in batch.to_pylist():
            yield source, row


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


def row_to_document(source: str, row: dict[str, Any], columns: DocumentColumns) -> Document | DeadLetter:
    """One Parquet row as a ``Document``, or a ``DeadLetter`` saying what is wrong with it."""
    raw_id = row.get(columns.id)
    text = row.get(columns.text)

    def reject(reason: str) -> DeadLetter:
        return DeadLetter.of("read", reason, source, {k: jsonable(v) for k, v in row.items()})

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
    return Document(doc_id=doc_id, text=text, title=title or None, metadata=metadata, source=source)


class _ParseDocuments(beam.DoFn):
    def __init__(self, columns: DocumentColumns) -> None:
        self.columns = columns
        self.read = Metrics.counter("corpus_etl", "rows_read")
        self.rejected = Metrics.counter("corpus_etl", "rows_rejected")

    def process(self, element: tuple[str, dict[str, Any]]):
        source, row = element
        self.read.inc()
        result = row_to_document(source, row, self.columns)
        if isinstance(result, DeadLetter):
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(DEAD, result)
        else:
            yield result


def pick_duplicate(doc_id: str, docs: Iterable[Document]) -> tuple[Document, list[DeadLetter]]:
    """Keep one document per id, chosen by content (not arrival order), so reruns agree.

    The kept one is the smallest by (source file, text hash); every other row with the
    same id becomes a dead letter naming where the kept one came from.
    """
    ordered = sorted(docs, key=lambda d: (d.source, content_hash(d.text), d.title or ""))
    kept, rest = ordered[0], ordered[1:]
    letters = [
        DeadLetter.of(
            "read",
            f"duplicate id {doc_id!r}: {len(ordered)} rows share it; kept the one from {kept.source}",
            d.source,
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

    def __init__(self, pattern: str, columns: DocumentColumns) -> None:
        super().__init__()
        self.pattern = pattern
        self.columns = columns

    def expand(self, pbegin):
        parsed = (
            pbegin
            | "ReadParquet" >> ReadParquetRows(self.pattern, self.columns.all)
            | "Parse" >> beam.ParDo(_ParseDocuments(self.columns)).with_outputs(DEAD, main="docs")
        )
        unique = (
            parsed.docs
            | "KeyById" >> beam.WithKeys(lambda d: d.doc_id)
            | "GroupById" >> beam.GroupByKey()
            | "DropDuplicateIds" >> beam.ParDo(_DropDuplicateIds()).with_outputs(DEAD, main="docs")
        )
        dead = (parsed[DEAD], unique[DEAD]) | "FlattenDead" >> beam.Flatten()
        return {"documents": unique.docs, DEAD: dead}

"""The records that flow between stages of both pipelines.

Every stage takes and returns these dataclasses, so one document can be followed
from a Parquet row to a Qdrant point, and one query from a log row to a label,
by reading one module per stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from typing import Any


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none (error lines, dead letters:
    qdrant-client's ``UnexpectedResponse`` and Arrow's errors go on with raw bodies and context)."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__

# The tag of every step's dead-letter output (``with_outputs(DEAD, main=...)``).
DEAD = "dead_letter"

# Fixed namespace for point ids: uuid5(NAMESPACE, "doc_id:chunk_index") is the same
# on every worker, every retry and every rerun, so writes are idempotent overwrites.
POINT_ID_NAMESPACE = uuid.UUID("6f0b3c1e-8f53-5a2b-9a57-2d4a6b0c7e11")


def point_id(doc_id: str, chunk_index: int) -> str:
    """Deterministic Qdrant point id of one chunk."""
    return str(uuid.uuid5(POINT_ID_NAMESPACE, f"{doc_id}:{chunk_index}"))


def content_hash(text: str) -> str:
    """Short stable hash of a text (sha256, 16 hex chars)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def title_prefix(title: str | None) -> str:
    return f"{title}\n" if title else ""


def titled_text(title: str | None, text: str) -> str:
    """What a model reads of a document: the title, when there is one, on the first line."""
    return title_prefix(title) + text


@dataclasses.dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    title: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""
    row: int = -1  # 0-based row number in ``source``; -1 when not read from a file


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A window of a document's tokens.

    ``text`` is the exact slice ``document.text[char_start:char_end]``;
    ``embed_text`` is what the model sees (the title, when given, prefixed).
    """

    doc_id: str
    chunk_index: int
    text: str
    char_start: int
    char_end: int
    n_tokens: int
    embed_text: str
    title: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    truncated: bool = False
    n_chunks: int = 1  # chunks of the whole document: a rerun deletes stale higher indexes

    @property
    def point_id(self) -> str:
        return point_id(self.doc_id, self.chunk_index)

    @property
    def content_hash(self) -> str:
        return content_hash(self.embed_text)


@dataclasses.dataclass(frozen=True)
class EmbeddedChunk:
    chunk: Chunk
    vector: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Query:
    query_id: str
    text: str
    count: int = 1
    # Where the query was read (the last of its rows, after de-duplication): names the kept
    # row when an id repeats. Not part of equality: the same query read elsewhere is equal.
    source: str = dataclasses.field(default="", compare=False)
    row: int = dataclasses.field(default=-1, compare=False)
    # Every query id of the log rows merged into this query (its own among them), sorted: a run
    # file may rank the query under any of them. Empty when the query was not de-duplicated.
    merged_ids: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    @property
    def ids(self) -> tuple[str, ...]:
        """The ids this query answers to: ``merged_ids``, or its own id alone."""
        return self.merged_ids or (self.query_id,)


@dataclasses.dataclass(frozen=True)
class Candidate:
    doc_id: str
    score: float
    rank: int  # 1-based first-stage rank


@dataclasses.dataclass(frozen=True)
class Candidates:
    query: Query
    candidates: tuple[Candidate, ...]


@dataclasses.dataclass(frozen=True)
class RerankPair:
    """One (query, document) pair to score, with what is needed to put it back."""

    query_id: str
    query: str
    doc_id: str
    doc_text: str
    first_stage_score: float
    first_stage_rank: int


@dataclasses.dataclass(frozen=True)
class QueryPairs:
    """All first-stage pairs of one query, by rank: the unit the reranker batches, so that
    the query's prompt is run once for its candidates."""

    query_id: str
    pairs: tuple[RerankPair, ...]


@dataclasses.dataclass(frozen=True)
class Judgement:
    query_id: str
    doc_id: str
    teacher_score: float
    first_stage_score: float
    first_stage_rank: int


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A record a stage refused, with the reason; written out and counted, never dropped."""

    stage: str
    reason: str
    source: str
    record: str  # JSON of the offending record (or its repr when not JSON-able)

    @staticmethod
    def of(stage: str, reason: str, source: str, record: Any) -> DeadLetter:
        try:
            payload = json.dumps(record, sort_keys=True, default=str)
        except (TypeError, ValueError):
            payload = repr(record)
        return DeadLetter(stage=stage, reason=reason, source=source, record=payload)

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

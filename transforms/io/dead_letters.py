"""Writing dead letters: every refused record, with its stage, reason and source, in one file.

JSONL by default; Parquet when the path ends in ``.parquet``. One file (no shards) so a
person can open it; dead letters are expected to be few, and each is counted under
``corpus_etl/dead_letters``.
"""

from __future__ import annotations

import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.types import DeadLetter

SCHEMA = pa.schema([("stage", pa.string()), ("reason", pa.string()), ("source", pa.string()), ("record", pa.string())])


def _count(letter: DeadLetter, counter=Metrics.counter("corpus_etl", "dead_letters")) -> DeadLetter:
    counter.inc()
    return letter


def _sort_key(letter: DeadLetter) -> tuple[str, str, str, str]:
    return (letter.stage, letter.source, letter.reason, letter.record)


def write_dead_letters(path: str, letters: list[DeadLetter]) -> int:
    """Write ``letters`` sorted, so the file is byte-identical across reruns; returns the count."""
    ordered = sorted(letters, key=_sort_key)
    with FileSystems.create(path) as f:
        if path.endswith(".parquet"):
            table = pa.Table.from_pylist([d.to_dict() for d in ordered], schema=SCHEMA)
            pq.write_table(table, f)
        else:
            for d in ordered:
                f.write((json.dumps(d.to_dict(), sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))
    return len(ordered)


class WriteDeadLetters(beam.PTransform):
    """Count dead letters and write them, sorted (stage, source, reason, record), to one file at ``path``.

    Gathered into one list: dead letters are expected to be few (a job whose dead letters
    do not fit one worker's memory has a problem no file layout will fix). The file is
    written even when empty, so "no dead letters" is visible too.
    """

    def __init__(self, path: str | None) -> None:
        super().__init__()
        self.path = path

    def expand(self, pcoll):
        counted = pcoll | "Count" >> beam.Map(_count)
        if not self.path:
            return counted
        path = self.path
        return (
            counted
            | "Gather" >> beam.combiners.ToList()
            | "Write" >> beam.Map(lambda letters: write_dead_letters(path, letters))
        )

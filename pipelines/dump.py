"""`corpus-etl dump`: every point of a collection (or alias) as one Parquet file, sorted by id.

Columns: ``id`` (string), every payload field (a row without the field holds null; a
field named ``id`` or ``vector`` becomes ``payload_id`` / ``payload_vector``; sorted by name),
and ``vector`` (fixed-size list of float32, of the collection's configured size). The same
collection gives the same file on either store, and whichever way it was built (in-process or
on worker processes), so two dumps compare row by row. ``--out`` is local or ``gs://``.

An empty collection (an interrupted run, a run whose every document was a dead letter) gives
a file of 0 rows: ``id`` and ``vector``. A payload field whose values no one Arrow type holds
(a metadata column that is an int in one input file and a string in another, a map stored as
``[["k", 1]]``) is written losslessly as JSON text, each non-null value ``json.dumps``-ed
(``7`` and ``"seven"`` stay apart), its Parquet field marked ``corpus_etl.encoding: json``,
with a warning naming the field. Ints and floats mixed are one type: float64.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from transforms.types import first_line

ROW_GROUP = 16_384
# Parquet field metadata on a payload column written as JSON text (values of several types).
ENCODING_KEY, JSON_ENCODING = b"corpus_etl.encoding", b"json"

_LOG = logging.getLogger(__name__)


def build_arg_parser() -> argparse.ArgumentParser:
    """The parser (``pipelines.flags.dump_parser``, where ``corpus-etl dump --help`` is answered without imports)."""
    from pipelines.flags import dump_parser

    return dump_parser()


def points_table(points: list[Any], dim: int) -> Any:
    """Store points → the dump's Arrow table (sorted by id); ``dim``: the collection's vector size.
    See the module docstring for the columns."""
    import numpy as np
    import pyarrow as pa

    points = sorted(points, key=lambda p: p.id)
    names = {f"payload_{k}" if k in ("id", "vector") else k: k for p in points for k in p.payload}
    fields = [pa.field("id", pa.string())]
    columns = [pa.array([p.id for p in points], pa.string())]
    for name in sorted(names):
        field, column = _payload_column(name, names[name], [p.payload.get(names[name]) for p in points])
        fields.append(field)
        columns.append(column)
    flat = np.asarray([p.vector for p in points], dtype=np.float32).reshape(-1) if points else np.zeros(0, np.float32)
    fields.append(pa.field("vector", pa.list_(pa.float32(), dim)))
    columns.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def _payload_column(name: str, key: str, values: list[Any]) -> tuple[Any, Any]:
    """(field, array) of the payload field ``key`` as column ``name``: Arrow's own type when one holds
    every value, else JSON text."""
    import pyarrow as pa

    try:
        column = pa.array(values)
        return pa.field(name, column.type), column
    except (pa.ArrowException, OverflowError) as exc:  # mixed types; an int beyond int64
        reason = first_line(exc)
    _LOG.warning(
        "payload field %r has values no one Parquet type holds (%s: %s); column %r is written as JSON text",
        key, "/".join(sorted({type(v).__name__ for v in values if v is not None})), reason, name,
    )  # fmt: skip
    text = [None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True) for v in values]
    return pa.field(name, pa.string(), metadata={ENCODING_KEY: JSON_ENCODING}), pa.array(text, pa.string())


def dump(store: Any, collection: str, out: str) -> int:
    """Write the collection to ``out``; returns the number of points written."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    # The size the collection (or alias) was created with, from its configuration: an empty one has one too.
    dim = store.collection_spec(collection).size
    table = points_table(list(store.scroll(collection, with_vectors=True, page=1024)), dim)
    with FileSystems.create(out) as f:
        pq.write_table(table, f, row_group_size=ROW_GROUP)
    return table.num_rows


def run(argv: list[str] | None = None) -> dict[str, Any]:
    return run_args(build_arg_parser().parse_args(argv))


def run_args(args: argparse.Namespace, beam_args: list[str] | None = None) -> dict[str, Any]:
    """The dump for parsed flags (``corpus-etl dump`` parses them in ``pipelines.flags``)."""
    from pipelines.common import check_output_locations, setup_logging
    from pipelines.configs import qdrant_config
    from pipelines.security import redact_url
    from transforms.io.store import open_store

    setup_logging(args.verbose)
    config = qdrant_config(args)
    check_output_locations({"--out": args.out})
    store = open_store(config)
    try:
        if not store.collection_exists(args.collection):
            raise ValueError(f"collection {args.collection!r} does not exist at {redact_url(config.where)}")
        n = dump(store, args.collection, args.out)
    finally:
        store.close()
    print(f"dump: {n} points of {args.collection} at {redact_url(config.where)} -> {args.out}", flush=True)
    return {"collection": args.collection, "points": n, "out": args.out}

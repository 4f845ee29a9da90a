"""`corpus-etl dump`: every point of a collection (or alias) as one Parquet file, sorted by id.

Columns: ``id`` (string), every payload field (a row without the field holds null; a
field named ``id`` or ``vector`` becomes ``payload_id`` / ``payload_vector``; sorted by name),
and ``vector`` (fixed-size list of float32). The same collection gives the same file on
either store, and whichever way it was built (in-process or on worker processes), so two
dumps compare row by row. ``--out`` is local or ``gs://``.
"""

from __future__ import annotations

import argparse
from typing import Any

ROW_GROUP = 16_384


def build_arg_parser() -> argparse.ArgumentParser:
    from pipelines.flags import HelpFormatter, add_qdrant_arguments

    parser = argparse.ArgumentParser(prog="corpus-etl dump", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--collection", required=True, help="collection or alias")
    parser.add_argument("--out", required=True, help="FILE.parquet, local or gs://")
    add_qdrant_arguments(parser)
    return parser


def points_table(points: list[Any]) -> Any:
    """Store points → the dump's Arrow table (sorted by id); see the module docstring for the columns."""
    import numpy as np
    import pyarrow as pa

    points = sorted(points, key=lambda p: p.id)
    names = {f"payload_{k}" if k in ("id", "vector") else k: k for p in points for k in p.payload}
    columns: dict[str, Any] = {"id": pa.array([p.id for p in points], pa.string())}
    for name in sorted(names):
        columns[name] = pa.array([p.payload.get(names[name]) for p in points])
    dim = len(points[0].vector) if points else 0
    flat = np.asarray([p.vector for p in points], dtype=np.float32).reshape(-1) if points else np.zeros(0, np.float32)
    columns["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
    return pa.table(columns)


def dump(store: Any, collection: str, out: str) -> int:
    """Write the collection to ``out``; returns the number of points written."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    table = points_table(list(store.scroll(collection, with_vectors=True, page=1024)))
    with FileSystems.create(out) as f:
        pq.write_table(table, f, row_group_size=ROW_GROUP)
    return table.num_rows


def run(argv: list[str] | None = None) -> dict[str, Any]:
    from pipelines.common import setup_logging
    from pipelines.configs import qdrant_config
    from transforms.io.store import open_store

    args = build_arg_parser().parse_args(argv)
    setup_logging()
    config = qdrant_config(args)
    store = open_store(config)
    try:
        if not store.collection_exists(args.collection):
            raise ValueError(f"collection {args.collection!r} does not exist at {config.where}")
        n = dump(store, args.collection, args.out)
    finally:
        store.close()
    print(f"dump: {n} points of {args.collection} at {config.where} -> {args.out}", flush=True)
    return {"collection": args.collection, "points": n, "out": args.out}

"""`corpus-etl copy`: an embedded collection (``--qdrant-path``) into a Qdrant server collection.

    corpus-etl copy --collection docs-2026-11-24 --qdrant-path ./qdrant_data \\
        --to-url http://qdrant:6333 [--to-collection NAME] [--alias docs]

The points are scrolled from every shard and upserted with their own ids through the
writer's batching (``copy_points``: batches bounded by count and bytes, transient errors
retried), so a copy that fails half-way is finished by running it again. The target
collection is created when missing (size from the source, cosine, payload indexes).

Refused before anything is written (exit 2): the source collection itself as the target, an
existing target of another size or holding vectors of another model, a
``--to-collection`` that is an alias on the target (its points would go into the collection
the alias serves), an ``--alias`` that is a collection there or equals ``--to-collection``, and
a source shard another process holds (the source's shards are opened first and held until
the copy ends). A failure once writing has started (exit 1) leaves part of the points in the
target: rerun the copy. After every point is in, ``--alias`` is switched on the target in one
request (blue/green). ``--to-path`` puts another embedded store in place of the server.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from pipelines.errors import JobFailed, PreflightError, first_line, translate
from pipelines.names import check_names
from pipelines.security import check_api_key_transport, redact_url


def build_arg_parser() -> argparse.ArgumentParser:
    """The parser (``pipelines.flags.copy_parser``, where ``corpus-etl copy --help`` is answered without imports)."""
    from pipelines.flags import copy_parser

    return copy_parser()


def check_target_names(target: Any, to_collection: str, alias: str | None) -> None:
    """The names on the target, refused (``PreflightError``) before anything is written: the index job's rules
    (``pipelines.names``) under copy's flag names (copy's ``--collection`` is the source, which may be an alias)."""
    check_names(target, to_collection, alias, redact_url(target.where), flag="--to-collection", verb="copy",
                done="the copy is done")  # fmt: skip


def check_target_model(source: Any, collection: str, model: str | None, target: Any, to_collection: str) -> None:
    """An existing target recording (or, recording none, holding points of) another model than the source's is
    refused before anything is written, as the index job refuses it: a search would rank one model's vectors
    against the other's. ``model``: what the source records (else the model its points name)."""
    from transforms.io.store import model_held, same_model

    if not target.collection_exists(to_collection):
        return
    # The recorded model first: reading it opens no shard (a locked target then shows where the copy writes)
    held = target.collection_spec(to_collection).model or model_held(target, to_collection)
    theirs = model or model_held(source, collection)
    if held and theirs and not same_model(held, theirs):
        raise PreflightError(
            f"--to-collection {to_collection!r} at {redact_url(target.where)} holds vectors of model {held}; "
            f"--collection {collection!r} holds vectors of {theirs}. Vectors of two models cannot be compared, so "
            "nothing was written: copy into a new --to-collection"
        )


def copy_collection(
    source: Any, collection: str, target: Any, to_collection: str, *, alias: str | None = None,
    batch_points: int = 256, target_url: str | None = None,
) -> dict[str, Any]:
    """Copy every point of ``collection`` (an alias is resolved) from ``source`` into ``target``.

    Everything that can be checked is checked before the target is touched (names, the
    source's shards, the target's size): those failures raise and nothing is written. A
    failure after that is a ``JobFailed`` (exit 1) saying a rerun finishes the copy.
    ``target_url`` only names the server in messages.
    """
    from transforms.io.qdrant import copy_points
    from transforms.io.store import CollectionSpec

    meta = source.meta(collection)
    if target.where == source.where and source.resolve(collection) == to_collection:
        # Every point would overwrite itself: a rerun of nothing, reported as a copy.
        raise PreflightError(
            f"--to-collection {to_collection!r} at {redact_url(target.where)} is the collection --collection {collection!r} "
            "names: a copy onto itself; give another --to-collection, --to-path or --to-url"
        )
    check_target_names(target, to_collection, alias)
    check_target_model(source, collection, meta.model, target, to_collection)
    source.count(collection)  # opens every source shard (held when the source keeps them open): a lock shows now
    created = target.ensure_collection(to_collection, CollectionSpec(meta.size, model=meta.model, settings=meta.settings))
    started = time.perf_counter()
    try:
        stats = copy_points(source.scroll(collection, with_vectors=True, page=512), target, to_collection,
                            batch_points=batch_points)  # fmt: skip
        count = target.count(to_collection)
        if count < stats["points"]:
            raise RuntimeError(f"target {to_collection!r} holds {count} points after {stats['points']} were copied")
        previous = target.point_alias(alias, to_collection) if alias else None
    except Exception as exc:
        error = translate(exc, qdrant_url=target_url)
        reason = str(error) if error is not None else f"{type(exc).__name__}: {first_line(exc)}"
        raise JobFailed(
            f"the copy failed after it started writing {to_collection!r}: {reason} (rerun the copy to finish it: "
            "points keep their ids)"
        ) from exc
    return {
        "source": f"{source.where}/{collection}", "target": f"{redact_url(target.where)}/{to_collection}", "created": created,
        **stats, "points_in_target": count, "seconds": round(time.perf_counter() - started, 2),
        "alias": {"name": alias, "previous": previous} if alias else None,
    }  # fmt: skip


def run(argv: list[str] | None = None) -> dict[str, Any]:
    return run_args(build_arg_parser().parse_args(argv))


def run_args(args: argparse.Namespace, beam_args: list[str] | None = None) -> dict[str, Any]:
    """The copy for parsed flags (``corpus-etl copy`` parses them in ``pipelines.flags``)."""
    # The server's API key goes only over https or to loopback, as for every other command: refused
    # (status 2) before anything is imported or opened.
    check_api_key_transport(args.to_url, args.qdrant_api_key_env, args.allow_insecure_api_key)
    from pipelines.common import setup_logging
    from transforms.io.edge_store import EdgeStore
    from transforms.io.qdrant import QdrantConfig
    from transforms.io.store import open_store

    setup_logging(args.verbose)
    # keep_open: the source's shards stay held from the pre-flight count to the end of the copy.
    source = EdgeStore(args.qdrant_path, lock_wait_s=args.store_lock_wait, keep_open=True)
    if args.to_url:
        target_config = QdrantConfig(
            path=None, url=args.to_url, api_key_env=args.qdrant_api_key_env, prefer_grpc=args.qdrant_grpc,
            timeout_s=args.qdrant_timeout,
        )  # fmt: skip
    else:
        target_config = QdrantConfig(path=args.to_path, lock_wait_s=args.store_lock_wait)
    target = open_store(target_config)
    try:
        report = copy_collection(
            source, args.collection, target, args.to_collection or source.resolve(args.collection),
            alias=args.alias, batch_points=args.batch_points, target_url=args.to_url,
        )  # fmt: skip
    except Exception as exc:  # a pre-flight failure: named with the server's (redacted) URL, which cli does not know
        error = translate(exc, qdrant_url=args.to_url)
        if error is None or error is exc:
            raise
        raise error from exc
    finally:
        target.close()
        source.close()
    print(
        f"copy: {report['points']} points {report['source']} -> {report['target']} in {report['batches']} batches "
        f"({report['retries']} retries, {report['seconds']}s); target holds {report['points_in_target']}"
        + (f"; alias {args.alias} -> {report['target']} (was {report['alias']['previous']})" if args.alias else ""),
        flush=True,
    )
    return report

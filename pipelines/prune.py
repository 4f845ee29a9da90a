"""`corpus-etl prune-collections`: keep an alias's N most recent dated collections, delete the older ones.

    corpus-etl prune-collections --alias docs --keep 3 --qdrant-url https://qdrant:6333 [--dry-run]

**Naming.** A nightly blue/green reindex writes ``<alias>-<date>[<suffix>]`` and switches
``<alias>`` to it when the run passes its guards (README, "A schedule"):

- ``<date>`` is ``YYYYMMDD`` or ``YYYY-MM-DD`` (``date +%Y%m%d``, ``date +%F``), a real date; a mix
  (``docs-2026-1122``, ``docs-202611-22``) is another name, never deleted;
- ``<suffix>`` is empty, or starts with ``-``, ``_``, ``.`` or ``T`` (``docs-20261124-rerun``,
  ``docs-2026-11-24T0300``): several collections of one day are ordered by it.

Collections are ordered by (date, suffix); the ``--keep N`` most recent stay (N >= 1, so the
collection a running job is building, the newest, is never touched), and so does the
alias's current target whatever its date (after a refused switch it is older than the
newest), and every collection any alias points at. Everything else with that prefix and a
date is deleted, oldest first. A collection of another name (``docs-v2``, ``docs-old``) is
never touched, only listed. ``--dry-run`` prints the same plan and deletes nothing.

Works on the embedded store (``--qdrant-path``) and a server (``--qdrant-url``) alike,
through ``transforms.io.store.VectorStore``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pipelines.errors import JobFailed, PreflightError, UsageError, first_line, translate
from pipelines.flags import prune_parser
from pipelines.security import redact_url

# YYYYMMDD or YYYY-MM-DD: the second separator is the first one again (a backreference), so
# YYYY-MMDD and YYYYMM-DD are not dated names and never deleted.
_DATED = re.compile(r"^(?P<y>\d{4})(?P<sep>-?)(?P<m>\d{2})(?P=sep)(?P<d>\d{2})(?P<suffix>([-_.T][A-Za-z0-9._-]*)?)$")


def collection_date(name: str, alias: str) -> tuple[datetime.date, str] | None:
    """``(date, suffix)`` of ``<alias>-<date>[<suffix>]``, or None for any other name."""
    if not name.startswith(alias + "-"):
        return None
    match = _DATED.match(name[len(alias) + 1 :])
    if not match:
        return None
    try:
        return datetime.date(int(match["y"]), int(match["m"]), int(match["d"])), match["suffix"]
    except ValueError:  # 20261340: digits, not a date
        return None


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    alias: str
    target: str | None  # the alias's collection, if the alias exists
    keep: tuple[str, ...]  # most recent first: the --keep newest, then protected older ones
    delete: tuple[str, ...]  # oldest first
    protected: tuple[str, ...]  # kept although older than the --keep newest: alias targets
    other: tuple[str, ...]  # the alias's prefix without a date: never touched

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def plan_prune(collections: Iterable[str], aliases: Mapping[str, str], alias: str, keep: int) -> PrunePlan:
    """What ``prune-collections`` keeps and deletes; pure, so it is tested without a store."""
    collections = list(collections)
    if keep < 1:
        raise UsageError(f"--keep must be at least 1 (the newest collection may be one a job is building), got {keep}")
    if alias not in aliases and alias in collections:
        raise PreflightError(f"--alias {alias!r} is a collection, not an alias; give the alias the nightly runs switch")
    dated = sorted(
        ((when, name) for name in collections if (when := collection_date(name, alias)) is not None), reverse=True
    )
    other = sorted(n for n in collections if n.startswith(alias + "-") and collection_date(n, alias) is None)
    targets = set(aliases.values())
    newest = [name for _, name in dated[:keep]]
    older = [name for _, name in dated[keep:]]
    protected = [name for name in older if name in targets]
    delete = [name for name in reversed(older) if name not in targets]
    return PrunePlan(alias, aliases.get(alias), tuple(newest + protected), tuple(delete), tuple(protected), tuple(other))


def prune(store: Any, alias: str, keep: int, *, dry_run: bool = False) -> dict[str, Any]:
    """Plan on ``store``'s collections and aliases, then delete (unless ``dry_run``); the report."""
    plan = plan_prune(store.collections(), store.aliases(), alias, keep)
    deleted: list[str] = []
    if not dry_run:
        for name in plan.delete:
            if name in store.aliases().values():  # switched to it since the plan: keep it
                continue
            try:
                store.delete_collection(name)
            except Exception as exc:
                done = f"; deleted before it: {', '.join(deleted)}" if deleted else "; nothing was deleted"
                # One line: qdrant-client's errors go on with the raw answer (translate keeps Qdrant's message).
                error = translate(exc, qdrant_url=store.where)
                reason = str(error) if error is not None else f"{type(exc).__name__}: {first_line(exc)}"
                raise JobFailed(f"deleting collection {name!r} failed: {reason}{done}") from exc
            deleted.append(name)
    return {**plan.as_dict(), "keep_count": keep, "dry_run": dry_run, "deleted": deleted,
            "where": redact_url(store.where)}


def format_report(report: Mapping[str, Any]) -> str:
    alias, target = report["alias"], report["target"]
    dated = len(report["keep"]) + len(report["delete"])
    head = (f"prune-collections: {alias} -> {target or '(no such alias yet)'} at {report['where']}: "
            f"{dated} dated collection(s), keep the {report['keep_count']} most recent")  # fmt: skip
    verb = "would delete" if report["dry_run"] else "deleted"
    width = len(verb)  # one column of names: as wide as the longest word this report uses
    lines = [head]
    for name in report["keep"]:
        why = " (alias target)" if name == target else " (an alias points at it)" if name in report["protected"] else ""
        lines.append(f"  {'keep':<{width}} {name}{why}")
    lines += [f"  {verb if report['dry_run'] or name in report['deleted'] else 'kept':<{width}} {name}"
              for name in report["delete"]]  # fmt: skip
    lines += [f"  {'ignore':<{width}} {name} (not {alias}-YYYYMMDD[-suffix])" for name in report["other"]]
    if report["dry_run"]:
        lines.append("  dry run: nothing deleted")
    return "\n".join(lines)


def run_args(args: argparse.Namespace, beam_args: list[str] | None = None) -> dict[str, Any]:
    from pipelines.common import setup_logging
    from pipelines.configs import qdrant_config
    from transforms.io.store import open_store

    setup_logging(args.verbose)
    try:
        config = qdrant_config(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    store = open_store(config)
    try:
        report = prune(store, args.alias, args.keep, dry_run=args.dry_run)
    finally:
        store.close()
    print(format_report(report), flush=True)
    return report


def run(argv: list[str] | None = None) -> dict[str, Any]:
    return run_args(prune_parser().parse_args(argv))

"""The name checks of a write that may switch an alias, shared by ``index`` and ``copy``. Standard library only."""

from __future__ import annotations

from typing import Any

from pipelines.errors import PreflightError


def check_names(store: Any, collection: str, alias: str | None, where: str, *, flag: str, verb: str, done: str) -> None:
    """Refused (``PreflightError``) before any write: ``collection`` (given by ``flag``) that is an alias (writing
    through it would mix these points into the collection it serves), an ``alias`` that is a collection, or the
    two equal. ``verb``/``done`` word the advice: "index into a new collection ... when the run succeeds"."""
    if alias and alias == collection:
        raise PreflightError(f"--alias {alias!r} is also {flag}; the alias must have another name")
    aliases = store.aliases()
    if collection in aliases:
        raise PreflightError(
            f"{flag} {collection!r} is an alias (of {aliases[collection]!r}) at {where}; {verb} into a new collection "
            f"and pass --alias {collection} to switch it when {done}"
        )
    if alias and alias not in aliases and store.collection_exists(alias):
        raise PreflightError(f"--alias {alias!r} is the name of a collection at {where}, not an alias; choose another --alias")

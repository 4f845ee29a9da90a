"""`corpus-etl prune-collections`: the plan (pure), the command on the embedded store, the server path."""

from __future__ import annotations

import datetime

import pytest

from pipelines.cli import main
from pipelines.errors import PreflightError, UsageError
from pipelines.prune import collection_date, plan_prune, prune
from transforms.io.edge_store import EdgeStore
from transforms.io.store import CollectionSpec, StorePoint
from transforms.types import point_id


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("docs-20261124", (datetime.date(2026, 11, 24), "")),
        ("docs-2026-11-24", (datetime.date(2026, 11, 24), "")),
        ("docs-20261124-rerun", (datetime.date(2026, 11, 24), "-rerun")),
        ("docs-2026-11-24T0300", (datetime.date(2026, 11, 24), "T0300")),
        ("docs-20261340", None),  # not a date
        ("docs-old", None),
        ("docs-v2-20261124", None),  # another alias's prefix
        ("docs20261124", None),
        ("other-20261124", None),
        ("docs-202611245", None),
        ("docs-2026-1122", None),  # mixed separators: not one of the two forms
        ("docs-202611-22", None),
        ("docs-2026-1122-rerun", None),
    ],
)
def test_collection_date(name, expected):
    assert collection_date(name, "docs") == expected


def test_plan_keeps_the_newest_and_every_alias_target():
    names = ["docs-20261120", "docs-2026-11-21", "docs-20261122", "docs-20261123", "docs-20261123-rerun",
             "docs-20261124", "docs-old", "other-20261101", "docs-v2-20261101"]  # fmt: skip
    # The last two switches were refused: the alias still points at the 22nd; another alias pins the 20th.
    plan = plan_prune(names, {"docs": "docs-20261122", "pinned": "docs-20261120"}, "docs", keep=2)
    assert plan.keep == ("docs-20261124", "docs-20261123-rerun", "docs-20261122", "docs-20261120")
    assert plan.protected == ("docs-20261122", "docs-20261120")
    assert plan.delete == ("docs-2026-11-21", "docs-20261123")  # oldest first
    assert plan.other == ("docs-old", "docs-v2-20261101")
    assert plan.target == "docs-20261122"
    assert plan_prune(names, {}, "docs", keep=10).delete == ()


def test_plan_refusals():
    with pytest.raises(UsageError, match="--keep must be at least 1"):
        plan_prune(["docs-20261124"], {}, "docs", keep=0)
    with pytest.raises(PreflightError, match="--alias 'docs' is a collection, not an alias"):
        plan_prune(["docs", "docs-20261124"], {}, "docs", keep=1)


def _store_with(path, names, aliases, kind: str = "edge"):
    if kind == "edge":
        store = EdgeStore(str(path), shards=1)
    else:  # the server path: qdrant-client's local mode stands in for the server
        from qdrant_client import QdrantClient

        from transforms.io.qdrant import ServerStore

        store = ServerStore(client=QdrantClient(":memory:"))
    for name in names:
        store.ensure_collection(name, CollectionSpec(2))
        store.upsert(name, [StorePoint(point_id("d", 0), [1.0, 0.0], {"doc_id": "d", "chunk_index": 0})])
    for alias, target in aliases.items():
        store.point_alias(alias, target)
    return store


NAMES = ["docs-20261120", "docs-20261121", "docs-20261122", "docs-20261123", "docs-20261124", "docs-old",
         "other-20261101"]  # fmt: skip


def test_prune_command_on_the_embedded_store(tmp_path, capsys):
    store = _store_with(tmp_path / "q", NAMES, {"docs": "docs-20261121"})
    argv = ["prune-collections", "--alias", "docs", "--keep", "2", "--qdrant-path", str(tmp_path / "q")]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"prune-collections: docs -> docs-20261121 at edge:{tmp_path / 'q'}: 5 dated collection(s), keep the 2 most "
        "recent",
        "  keep         docs-20261124",
        "  keep         docs-20261123",
        "  keep         docs-20261121 (alias target)",
        "  would delete docs-20261120",
        "  would delete docs-20261122",
        "  ignore       docs-old (not docs-YYYYMMDD[-suffix])",
        "  dry run: nothing deleted",
    ]  # one column of names
    assert store.collections() == sorted(NAMES)

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "  keep    docs-20261121 (alias target)" in out and "  deleted docs-20261120" in out
    assert "  ignore  docs-old (not docs-YYYYMMDD[-suffix])" in out
    assert store.collections() == ["docs-20261121", "docs-20261123", "docs-20261124", "docs-old", "other-20261101"]
    assert store.count("docs") == 1  # the alias still answers
    assert not [n for n in (tmp_path / "q").iterdir() if n.name.startswith(".deleting-")]

    assert main(argv) == 0  # nothing more to delete: the same state
    assert store.collections() == ["docs-20261121", "docs-20261123", "docs-20261124", "docs-old", "other-20261101"]


def test_names_with_mixed_date_separators_are_never_deleted(tmp_path, capsys):
    names = ["docs-20261120", "docs-2026-1122", "docs-202611-23", "docs-20261124", "docs-20261125"]
    store = _store_with(tmp_path / "q", names, {"docs": "docs-20261125"})
    argv = ["prune-collections", "--alias", "docs", "--keep", "2", "--qdrant-path", str(tmp_path / "q")]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if "would delete" in line] == ["  would delete docs-20261120"]
    assert "  ignore       docs-2026-1122 (not docs-YYYYMMDD[-suffix])" in out
    assert main(argv) == 0
    assert store.collections() == ["docs-2026-1122", "docs-202611-23", "docs-20261124", "docs-20261125"]


def test_prune_command_errors_in_one_line(tmp_path, capsys):
    _store_with(tmp_path / "q", ["docs", "docs-20261124"], {})
    base = ["prune-collections", "--qdrant-path", str(tmp_path / "q")]
    assert main([*base, "--alias", "docs", "--keep", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["corpus-etl prune-collections: error: --keep must be at least 1 (the newest collection may be one "
                   "a job is building), got 0"]  # fmt: skip
    assert main([*base, "--alias", "docs", "--keep", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "corpus-etl prune-collections: error: --alias 'docs' is a collection, not an alias; give the alias the "
        "nightly runs switch"
    ]
    with pytest.raises(SystemExit) as exc:  # --keep missing: argparse's usage error, as every command
        main(["prune-collections", "--alias", "docs"])
    assert exc.value.code == 2


@pytest.mark.parametrize("kind", ["edge", "server"])
def test_delete_collection_refuses_targets_and_aliases_on_both_stores(tmp_path, kind):
    """A server would delete an alias's collection and the alias with it: both stores refuse instead."""
    store = _store_with(tmp_path, ["a-20261124", "a-20261125"], {"a": "a-20261124"}, kind)
    with pytest.raises(ValueError, match=r"^collection 'a-20261124' is the target of alias\(es\) a$"):
        store.delete_collection("a-20261124")
    with pytest.raises(ValueError, match="^'a' is an alias, not a collection$"):
        store.delete_collection("a")
    with pytest.raises(ValueError, match="^collection 'b' does not exist$"):
        store.delete_collection("b")
    assert store.collections() == ["a-20261124", "a-20261125"] and store.aliases() == {"a": "a-20261124"}
    store.delete_collection("a-20261125")
    assert store.collections() == ["a-20261124"] and not store.collection_exists("a-20261125")


def test_prune_on_the_server_path():
    """--qdrant-url goes through ServerStore; qdrant-client's local mode stands in for the server."""
    from qdrant_client import QdrantClient

    from transforms.io.qdrant import ServerStore

    store = ServerStore(client=QdrantClient(":memory:"))
    for name in NAMES:
        store.ensure_collection(name, CollectionSpec(2))
    store.point_alias("docs", "docs-20261121")
    report = prune(store, "docs", 2)
    assert report["deleted"] == ["docs-20261120", "docs-20261122"]
    assert store.collections() == ["docs-20261121", "docs-20261123", "docs-20261124", "docs-old", "other-20261101"]
    assert store.aliases() == {"docs": "docs-20261121"}


def test_help_imports_no_torch_beam_or_qdrant():
    from tests.test_cli import _probe

    assert _probe("prune-collections", "--help") == {"status": 0, "heavy": []}

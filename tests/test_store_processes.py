"""The embedded store across processes: locks, and kill -9 of a writer.

Every subprocess runs in its own session and is killed with its whole process group when
a test ends or times out (``tests/processes.py``). The jobs on 2 worker processes (with an
in-process job writing the same folder meanwhile), killed at three moments, and with a
worker killed, are in ``tests/test_runners.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.processes import ROOT, started, wait_for_line
from transforms.io.edge_store import EdgeStore, open_shard
from transforms.io.store import CollectionSpec, StoreInUseError, StorePoint
from transforms.types import point_id


def _points(n: int, dim: int, seed: int) -> list[StorePoint]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [
        StorePoint(point_id(f"d{i // 3}", i % 3), vectors[i].tolist(), {"doc_id": f"d{i // 3}", "chunk_index": i % 3})
        for i in range(n)
    ]


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from tests.test_store_processes import _points
    from transforms.io.edge_store import EdgeStore
    store = EdgeStore({path!r})
    points = _points({n}, {dim}, 0)
    for start in range(0, len(points), 500):
        store.upsert("c", points[start:start + 500])
        print("wrote", start + 500, flush=True)
        {hold}
    """
)


def test_a_writer_killed_mid_write_leaves_readable_shards_and_a_rerun_is_exact(tmp_path):
    # Killed after 4 of its 20 batches, with 16 (~2 s on one core here) to go: it is mid-write
    path, n, dim = str(tmp_path / "q"), 10_000, 64
    EdgeStore(path, shards=4).ensure_collection("c", CollectionSpec(dim))
    code = WRITER.format(root=ROOT, path=path, n=n, dim=dim, hold="")
    with started([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        wait_for_line(proc, "wrote 2000")
        os.killpg(proc.pid, signal.SIGKILL)  # mid-write: it is upserting the next batches
        proc.wait()
    store = EdgeStore(path)
    partial = store.count("c")
    assert 2000 <= partial < n  # every returned upsert survived the kill; every shard opens
    store.upsert("c", _points(n, dim, 0))  # the rerun
    assert store.count("c") == n
    expected = {p.id: p for p in _points(n, dim, 0)}
    got = {p.id: p for p in store.scroll("c")}
    assert got.keys() == expected.keys()
    worst = max(float(np.abs(np.subtract(got[i].vector, expected[i].vector)).max()) for i in expected)
    assert worst <= 1e-6
    assert got[point_id("d7", 1)].payload == {"doc_id": "d7", "chunk_index": 1}


def test_a_shard_held_by_another_process_is_reported_as_store_in_use(tmp_path):
    path = str(tmp_path / "q")
    EdgeStore(path, shards=1).ensure_collection("c", CollectionSpec(8))
    hold = textwrap.dedent(
        f"""
        from qdrant_edge import EdgeShard
        shard = EdgeShard.load({os.path.join(path, 'c', 'shard-000')!r})
        print("holding", flush=True)
        import time; time.sleep(60)
        """
    )
    with started([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True) as proc:
        wait_for_line(proc, "holding")
        with pytest.raises(StoreInUseError, match="store in use by another process: .*shard-000 stayed locked"):
            EdgeStore(path, lock_wait_s=0.3).count("c")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert EdgeStore(path, lock_wait_s=5).count("c") == 0  # the lock died with its process


def test_open_shard_waits_for_a_lock_that_is_released(tmp_path):
    path = str(tmp_path / "q")
    EdgeStore(path, shards=1).ensure_collection("c", CollectionSpec(8))
    hold = textwrap.dedent(
        f"""
        from qdrant_edge import EdgeShard
        shard = EdgeShard.load({os.path.join(path, 'c', 'shard-000')!r})
        print("holding", flush=True)
        import sys; sys.stdin.readline()
        shard.close()
        print("released", flush=True)
        import time; time.sleep(60)
        """
    )
    with started([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        wait_for_line(proc, "holding")
        sleeps: list[float] = []

        def release_on_first_wait(seconds: float) -> None:
            if not sleeps:
                proc.stdin.write("go\n")
                proc.stdin.flush()
                wait_for_line(proc, "released")
            sleeps.append(seconds)

        shard = open_shard(os.path.join(path, "c", "shard-000"), lock_wait_s=30, sleep=release_on_first_wait)
        shard.close()
        assert len(sleeps) == 1

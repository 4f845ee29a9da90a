"""Deterministic batch composition: the same elements give the same batches, whatever their
order, bundling or worker (``transforms.inference.batching.BatchDeterministically``)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.inference.batching import BatchDeterministically, cut_group, length_bucket, merge_buckets, stable_shard

# (key, weight): weights 3..40, so several length buckets
ELEMENTS = [(f"e{i:02d}", 3 + (i * 7) % 38) for i in range(40)]


def _weight(e: tuple[str, int]) -> int:
    return e[1]


def _key(e: tuple[str, int]) -> str:
    return e[0]


def test_cut_group_sorts_by_weight_then_key_and_cuts_at_the_budget():
    elements = [("b", 5), ("a", 5), ("c", 2), ("d", 9), ("e", 30)]
    expected = [[("c", 2), ("a", 5), ("b", 5)], [("d", 9)], [("e", 30)]]  # 12 | 9 (+30 > 20) | 30 alone
    for _ in range(5):
        random.shuffle(elements)
        assert cut_group(elements, _weight, _key, max_batch_weight=20, max_batch_size=10) == expected
    assert cut_group(elements, _weight, _key, max_batch_weight=100, max_batch_size=2) == [
        [("c", 2), ("a", 5)], [("b", 5), ("d", 9)], [("e", 30)],
    ]  # fmt: skip


def test_cut_group_cuts_a_group_into_batches_of_even_weight():
    """Not into full batches and a remainder: 50 tokens under a budget of 40 were 40 + 10, one idle core on CPU."""
    elements = [(f"k{i}", 5) for i in range(10)]
    assert [len(b) for b in cut_group(elements, _weight, _key, max_batch_weight=40, max_batch_size=100)] == [5, 5]
    assert [len(b) for b in cut_group(elements, _weight, _key, max_batch_weight=20, max_batch_size=100)] == [3, 4, 3]
    assert [len(b) for b in cut_group(elements, _weight, _key, max_batch_weight=50, max_batch_size=100)] == [10]
    assert cut_group([("a", 0), ("b", 0)], _weight, _key, max_batch_weight=50, max_batch_size=100) == [
        [("a", 0), ("b", 0)]
    ]


def test_merge_buckets_joins_light_neighbours_into_runs_of_a_batch():
    # bucket: weight. 3 + 4 + 10 reach 15; 20 is a run alone; 2 + 1 (the last run, light) join the one before
    weights = {8: 3, 9: 4, 12: 10, 16: 20, 17: 2, 20: 1}
    assert merge_buckets(weights, min_weight=15) == {
        8: (8, 17), 9: (8, 17), 12: (8, 17), 16: (16, 23), 17: (16, 23), 20: (16, 23),
    }  # fmt: skip
    # every bucket heavy: one run each, as before merging (large inputs keep one length bucket per group)
    assert merge_buckets({1: 50, 2: 60}, min_weight=15) == {1: (1, 50), 2: (2, 60)}
    assert merge_buckets({5: 3}, min_weight=15) == {5: (5, 3)}
    assert merge_buckets({}, min_weight=15) == {}


def test_buckets_and_shards_are_stable_across_processes():
    assert [length_bucket(w) for w in (1, 2, 3, 4, 16, 19, 20, 512)] == [0, 4, 6, 8, 16, 16, 17, 36]
    # Workers are separate processes, and Python salts str hashes per process: a shard must not use hash().
    code = "from transforms.inference.batching import stable_shard; print([stable_shard(f'doc-{i}:0', 7) for i in range(20)])"
    here = [stable_shard(f"doc-{i}:0", 7) for i in range(20)]
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == str(here)
    assert len(set(here)) > 3


def _expected_batches(group_weight: int, max_batch_weight: int) -> list[tuple]:
    """What the transform must give, computed by hand from its documented rule."""
    totals: dict[int, int] = {}
    for e in ELEMENTS:
        totals[length_bucket(e[1])] = totals.get(length_bucket(e[1]), 0) + e[1]
    runs = merge_buckets(totals, max_batch_weight)
    groups: dict[tuple[int, int], list] = {}
    for e in ELEMENTS:
        run, weight = runs[length_bucket(e[1])]
        n = max(1, -(-weight // group_weight))
        groups.setdefault((run, stable_shard(e[0], n)), []).append(e)
    return [tuple(batch) for g in groups.values() for batch in cut_group(g, _weight, _key, max_batch_weight, 4096)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batches_depend_only_on_the_input_set(seed):
    shuffled = ELEMENTS[:]
    random.Random(seed).shuffle(shuffled)
    expected = _expected_batches(group_weight=60, max_batch_weight=45)
    assert len(expected) > 8  # several groups, several batches: the check means something
    with TestPipeline() as p:
        batches = (
            p
            | beam.Create(shuffled)  # reshuffled into bundles by the runner
            | BatchDeterministically(weight_fn=_weight, key_fn=_key, max_batch_weight=45, group_weight=60)
            | beam.Map(tuple)
        )
        assert_that(batches, equal_to(expected))

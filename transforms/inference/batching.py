"""RunInference with batches sized by tokens, composed deterministically, and dead letters
instead of lost batches.

Why batches are composed here and not by ``BatchElements``/``SortAndBatchElements``: those
batch within a bundle, and bundles differ between runs, runners and retries. A padded
forward pass is not batch-invariant in floating point (the padded length and the matmul
shapes change the order of the sums), so an element's vector or score would change in the
last bits with its neighbours: reruns of the label job gave different bytes. Here a batch
is a function of the whole input set, never of bundles or workers:

1. each element gets a length bucket (4 per doubling of its token weight) and the total
   weight of every bucket is counted (one small combine, a side input); adjacent buckets
   lighter than one batch are joined, in length order, into runs of at least one batch's
   weight (``merge_buckets``), so that a small or short input is not cut into a batch per
   bucket, each ending in a part-filled batch;
2. within its run an element goes to one of ``ceil(run weight / group_weight)`` groups by
   a SHA-1 of its key (its own id, stable across processes);
3. a ``GroupByKey`` gathers each group, which is sorted by (weight, key) and cut into the
   fewest batches of at most ``max_batch_weight``, of even weight (``cut_group``).

So the same inputs give the same batches, hence bitwise the same results, whatever the
bundling; and since groups hold one run of lengths of the whole input, sorted, batches pad
less than batches sorted within one bundle. The price is one shuffle of the elements, and
inference starts once the step before it has finished (a batch pipeline's usual barrier).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, RunInference

from transforms.types import DEAD, DeadLetter


def _split(element: Any):
    # A handler answers a group element (e.g. ``QueryPairs``) with a list: one result per member.
    for item in element if isinstance(element, list) else (element,):
        if isinstance(item, DeadLetter):
            yield beam.pvalue.TaggedOutput(DEAD, item)
        else:
            yield item


def describe_exception(exc: Any) -> str:
    """``Type: message`` of what RunInference's exception handling reports.

    Beam hands over ``(type, repr(exception), traceback lines)`` rather than the exception
    (so it pickles); the traceback stays in the worker log.
    """
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, tuple) and len(exc) >= 2:
        kind = getattr(exc[0], "__name__", str(exc[0]))
        text = str(exc[1])
        prefix = f"{kind}("
        if text.startswith(prefix) and text.endswith(")"):
            inner = text[len(prefix) : -1]
            text = inner[1:-1] if len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"" else inner
        return f"{kind}: {text}"
    return str(exc)


def _itself(element: Any) -> Iterable[Any]:
    return (element,)


class _FailedBatch(beam.DoFn):
    def __init__(
        self,
        stage: str,
        describe: Callable[[Any], tuple[str, Any]],
        members: Callable[[Any], Iterable[Any]],
    ) -> None:
        self.stage = stage
        self.describe = describe
        self.members = members

    def process(self, failure: tuple[Sequence[Any], Any]):
        batch, exc = failure
        reason = f"inference failed for its batch: {describe_exception(exc)}"
        for element in batch:
            for member in self.members(element):
                source, record = self.describe(member)
                yield DeadLetter.of(self.stage, reason, source, record)


def length_bucket(weight: int) -> int:
    """Bucket of a token weight: 4 buckets per doubling, so weights in one differ by < 19%."""
    return int(4 * math.log2(max(weight, 1)))


def stable_shard(key: str, n: int) -> int:
    """``key``'s shard among ``n``: SHA-1 based, the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % n


def merge_buckets(bucket_weights: dict[int, int], min_weight: int) -> dict[int, tuple[int, int]]:
    """Bucket -> (run, run weight): buckets in ascending order, each joined to the run before it
    while that run weighs less than ``min_weight``; a last run lighter than that joins the one
    before it. A run is named by its first bucket. Buckets of ``min_weight`` or more after a
    full run stay runs of their own, so a large input keeps one length bucket per group."""
    runs: list[list[int]] = []
    weights: list[int] = []
    for bucket in sorted(bucket_weights):
        if runs and weights[-1] < min_weight:
            runs[-1].append(bucket)
            weights[-1] += bucket_weights[bucket]
        else:
            runs.append([bucket])
            weights.append(bucket_weights[bucket])
    if len(runs) > 1 and weights[-1] < min_weight:
        last, weight = runs.pop(), weights.pop()
        runs[-1].extend(last)
        weights[-1] += weight
    return {bucket: (run[0], weight) for run, weight in zip(runs, weights) for bucket in run}


class _AssignGroup(beam.DoFn):
    def __init__(self, weight_fn: Callable[[Any], int], key_fn: Callable[[Any], str], group_weight: int) -> None:
        self.weight_fn, self.key_fn, self.group_weight = weight_fn, key_fn, group_weight

    def process(self, element: Any, runs: dict[int, tuple[int, int]]):
        run, weight = runs[length_bucket(self.weight_fn(element))]
        n_groups = max(1, math.ceil(weight / self.group_weight))
        yield (run, stable_shard(self.key_fn(element), n_groups)), element


def cut_group(
    elements: Iterable[Any],
    weight_fn: Callable[[Any], int],
    key_fn: Callable[[Any], str],
    max_batch_weight: int,
    max_batch_size: int,
) -> list[list[Any]]:
    """Batches of a group: sorted by (weight, key), cut at ``max_batch_weight`` summed weight
    or ``max_batch_size`` elements; an element heavier than the limit is a batch of its own.
    A group of n batches' weight is cut into n of about 1/n of its weight each (an element goes
    to the batch where its middle falls), not into n - 1 full batches and a remainder: a batch is
    split into forward passes run one per core on CPU, and a remainder of one pass leaves the
    other cores idle. The result depends only on the set of elements, never on their arrival order."""
    ordered = sorted(elements, key=lambda e: (weight_fn(e), key_fn(e)))
    weights = [weight_fn(e) for e in ordered]
    group_weight = sum(weights)
    target = group_weight / max(1, math.ceil(group_weight / max_batch_weight)) or 1.0  # 1.0: weightless elements
    batches: list[list[Any]] = []
    batch: list[Any] = []
    total = done = part = 0
    for element, weight in zip(ordered, weights):
        k = int((done + weight / 2) // target)
        if batch and (k != part or total + weight > max_batch_weight or len(batch) >= max_batch_size):
            batches.append(batch)
            batch, total = [], 0
        part = k
        done += weight
        batch.append(element)
        total += weight
    if batch:
        batches.append(batch)
    return batches


class BatchDeterministically(beam.PTransform):
    """Elements → lists of elements (batches) that depend only on the input set (module doc).

    ``key_fn`` must give each element a unique, stable id (e.g. ``doc_id:chunk_index``):
    it places the element in a group and breaks ties in the sort.
    """

    def __init__(
        self,
        *,
        weight_fn: Callable[[Any], int],
        key_fn: Callable[[Any], str],
        max_batch_weight: int,
        max_batch_size: int = 4096,
        group_weight: int | None = None,
    ) -> None:
        super().__init__()
        if max_batch_weight < 1 or max_batch_size < 1:
            raise ValueError("max_batch_weight and max_batch_size must be positive")
        self.weight_fn, self.key_fn = weight_fn, key_fn
        self.max_batch_weight, self.max_batch_size = max_batch_weight, max_batch_size
        # A group is a few batches: enough to fill them, small enough to sort in memory,
        # and many groups on a large input, so workers share the inference step.
        self.group_weight = group_weight or 8 * max_batch_weight

    def expand(self, pcoll):
        weight_fn, key_fn = self.weight_fn, self.key_fn
        runs = (
            pcoll
            | "BucketWeights" >> beam.Map(lambda e: (length_bucket(weight_fn(e)), weight_fn(e)))
            | "SumPerBucket" >> beam.CombinePerKey(sum)
            | "AllBuckets" >> beam.combiners.ToDict()
            | "MergeSmallBuckets" >> beam.Map(merge_buckets, self.max_batch_weight)
        )
        return (
            pcoll
            | "AssignGroup" >> beam.ParDo(
                _AssignGroup(weight_fn, key_fn, self.group_weight), beam.pvalue.AsSingleton(runs)
            )
            | "GroupByLength" >> beam.GroupByKey()
            | "CutBatches" >> beam.FlatMap(
                lambda kv: cut_group(kv[1], weight_fn, key_fn, self.max_batch_weight, self.max_batch_size)
            )
        )


class RunInferenceByTokens(beam.PTransform):
    """Elements → handler results (main) and ``DeadLetter`` (tag ``dead_letter``).

    Batches hold at most ``max_batch_weight`` by ``element_size_fn`` (tokens; by default the
    handler's ``max_batch_weight`` and ``element_weight``) and are composed
    by ``BatchDeterministically`` (``key_fn``: each element's unique id), so results are
    bitwise the same on every run of the same inputs. The handler may yield ``DeadLetter`` s for single elements (e.g. out
    of memory alone); a batch that raises becomes one dead letter per element
    (``describe(element) -> (source, record)``), with the exception as the reason, and the
    job goes on. For group elements (``members(element)`` lists what a group holds), the
    handler answers each group with a list of results, flattened here, and a failed batch
    gives one dead letter per member.
    """

    def __init__(
        self,
        handler: ModelHandler,
        *,
        stage: str,
        key_fn: Callable[[Any], str],
        describe: Callable[[Any], tuple[str, Any]],
        max_batch_weight: int | None = None,
        element_size_fn: Callable[[Any], int] | None = None,
        max_batch_size: int = 4096,
        inference_args: dict[str, Any] | None = None,
        members: Callable[[Any], Iterable[Any]] = _itself,
    ) -> None:
        super().__init__()
        self.handler = handler
        self.stage = stage
        # By default the handler's own token budget and weights (``TokenBatchedHandler``).
        self.max_batch_weight = max_batch_weight or handler.max_batch_weight
        self.element_size_fn = element_size_fn or handler.element_weight
        self.key_fn = key_fn
        self.describe = describe
        self.max_batch_size = max_batch_size
        self.inference_args = inference_args
        self.members = members

    def expand(self, pcoll):
        results, errors = (
            pcoll
            | "BatchByTokens" >> BatchDeterministically(
                weight_fn=self.element_size_fn,
                key_fn=self.key_fn,
                max_batch_weight=self.max_batch_weight,
                max_batch_size=self.max_batch_size,
            )
            | "RunInference" >> RunInference(
                self.handler.with_no_batching(), inference_args=self.inference_args
            ).with_exception_handling()
        )
        split = results | "SplitDeadLetters" >> beam.FlatMap(_split).with_outputs(DEAD, main="results")
        failed = errors.failed_inferences | "FailedBatches" >> beam.ParDo(_FailedBatch(self.stage, self.describe, self.members))
        dead = (split[DEAD], failed) | "FlattenDead" >> beam.Flatten()
        return {"results": split.results, DEAD: dead}

"""RunInference with batches sized by tokens, and dead letters instead of lost batches.

Beam 2.77's ``ModelHandler(max_batch_weight=...)`` forwards the weight to
``BatchElements``, which does not accept it (TypeError at pipeline construction). Beam's
``SortAndBatchElements`` does take a weight, and sorts each bundle by size first, so
texts of similar length share a batch: less padding than any count-based batching.
RunInference then runs the handler on those batches as they are (``with_no_batching``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, RunInference
from apache_beam.transforms.util import SortAndBatchElements

from transforms.types import DeadLetter

DEAD = "dead_letter"


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


class RunInferenceByTokens(beam.PTransform):
    """Elements → handler results (main) and ``DeadLetter`` (tag ``dead_letter``).

    Batches hold at most ``max_batch_weight`` by ``element_size_fn`` (tokens), sorted by
    size within a bundle. The handler may yield ``DeadLetter`` s for single elements (e.g. out
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
        max_batch_weight: int,
        element_size_fn: Callable[[Any], int],
        describe: Callable[[Any], tuple[str, Any]],
        max_batch_size: int = 4096,
        inference_args: dict[str, Any] | None = None,
        members: Callable[[Any], Iterable[Any]] = _itself,
    ) -> None:
        super().__init__()
        self.handler = handler
        self.stage = stage
        self.max_batch_weight = max_batch_weight
        self.element_size_fn = element_size_fn
        self.describe = describe
        self.max_batch_size = max_batch_size
        self.inference_args = inference_args
        self.members = members

    def expand(self, pcoll):
        results, errors = (
            pcoll
            | "SortAndBatchByTokens" >> SortAndBatchElements(
                min_batch_size=1,
                max_batch_size=self.max_batch_size,
                max_batch_weight=self.max_batch_weight,
                element_size_fn=self.element_size_fn,
            )
            | "RunInference" >> RunInference(
                self.handler.with_no_batching(), inference_args=self.inference_args
            ).with_exception_handling()
        )
        split = results | "SplitDeadLetters" >> beam.FlatMap(_split).with_outputs(DEAD, main="results")
        failed = errors.failed_inferences | "FailedBatches" >> beam.ParDo(_FailedBatch(self.stage, self.describe, self.members))
        dead = (split[DEAD], failed) | "FlattenDead" >> beam.Flatten()
        return {"results": split.results, DEAD: dead}

"""Reranking in Beam: ``RunInference`` over the Qwen3 scorer, pairs grouped by query.

``RerankModelHandler`` loads one ``Qwen3Reranker`` per worker process; ``RerankByQuery`` keys
pairs by query so a query's candidates go through the scorer together (shared prompt head).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam

from transforms.inference.batching import RunInferenceByTokens
from transforms.inference.handlers import TokenBatchedHandler, count_compute
from transforms.models.devices import TokenBudgets
from transforms.models.reranker import Qwen3Reranker
from transforms.progress import reporter
from transforms.types import DeadLetter, Judgement, QueryPairs, RerankPair


@dataclasses.dataclass(frozen=True)
class PairTokenEstimate:
    """Cheap token count of a ``RerankPair`` for Beam's batch weights (no tokenizer).

    Characters / ``chars_per_token`` plus the fixed prompt (~70 Qwen3 tokens with the default
    instruction), capped at ``max_length``; a ``QueryPairs`` weighs the sum of its pairs. English runs at ~4 characters per token; 3 errs on
    the side of smaller batches.
    """

    chars_per_token: float = 3.0
    prompt_tokens: int = 80
    max_length: int = 8192

    def __call__(self, pair: RerankPair | QueryPairs) -> int:
        if isinstance(pair, QueryPairs):
            return sum(self(p) for p in pair.pairs)
        chars = len(pair.query) + len(pair.doc_text)
        return min(self.prompt_tokens + math.ceil(chars / self.chars_per_token), self.max_length)


class RerankModelHandler(TokenBatchedHandler):
    """``RunInference`` handler: ``RerankPair`` → ``Judgement`` (teacher score = P(yes)), or
    ``QueryPairs`` → a list of them, one per pair (``RerankByQuery`` uses this, so that a
    query's candidates can share their prompt head in the scorer: ``share_prefix=True``).

    Beam batches are sized by estimated tokens (``PairTokenEstimate``: from characters, no
    tokenizer on the batching path); inside, pairs are tokenised, sorted and cut again by the
    forward pass's padded-token budget. A pair that runs out of memory even alone comes back as
    a ``DeadLetter(stage="rerank")``; the rest of its batch is scored.
    ``inference_args={"instruction": ...}`` overrides the instruction for a call.
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str | None = None,
        max_length: int = 8192,
        instruction: str | None = None,
        budgets: TokenBudgets | None = None,
        chars_per_token: float = 3.0,
        attn_implementation: str | None = None,
        progress_interval_s: float = 30.0,
        large_model: bool = False,
        share_prefix: bool = False,
        cpu_threads: int | None = None,
        precision: str = "auto",
        kernels: str = "none",
    ) -> None:
        super().__init__(
            Qwen3Reranker,
            dict(model=model, device=device, dtype=dtype, max_length=max_length, instruction=instruction,
                 attn_implementation=attn_implementation, share_prefix=share_prefix, precision=precision,
                 kernels=kernels),
            budgets=budgets or TokenBudgets.from_flag(None, max_length),
            # Capped at max_length, so one pair never outweighs a batch alone.
            element_weight=PairTokenEstimate(chars_per_token=chars_per_token, max_length=max_length),
            progress_interval_s=progress_interval_s,
            large_model=large_model,
            cpu_threads=cpu_threads,
        )
        self.share_prefix = share_prefix

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        unknown = set(inference_args or {}) - {"instruction"}
        if unknown:
            raise ValueError(
                f"RerankModelHandler takes only 'instruction' as inference_args, not {sorted(unknown)}"
            )

    def run_inference(
        self,
        batch: Sequence[RerankPair | QueryPairs],
        model: Qwen3Reranker,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[Judgement | DeadLetter | list[Judgement | DeadLetter]]:
        if not batch:  # BatchElements emits an empty batch when one element outweighs its target
            return []
        instruction = (inference_args or {}).get("instruction")
        members = [x.pairs if isinstance(x, QueryPairs) else (x,) for x in batch]
        pairs = [p for group in members for p in group]
        # Method calls only: ``model`` may be the proxy of a model shared across processes (large_model).
        scores, failures, tokens = model.score_batch([(p.query, p.doc_text) for p in pairs], instruction)
        reasons = dict(failures)
        reporter("rerank", self._progress_interval_s).add(pairs=len(pairs), tokens=tokens)
        count_compute("rerank", model.compute_info(), tokens, layout=False)
        flat = [_judge(pair, score, reasons.get(i)) for i, (pair, score) in enumerate(zip(pairs, scores))]
        results: list[Judgement | DeadLetter | list[Judgement | DeadLetter]] = []
        start = 0
        for element, group in zip(batch, members):
            answer = flat[start : start + len(group)]
            start += len(group)
            results.append(answer if isinstance(element, QueryPairs) else answer[0])
        return results

    def get_num_bytes(self, batch: Sequence[RerankPair | QueryPairs]) -> int:
        pairs = (p for x in batch for p in (x.pairs if isinstance(x, QueryPairs) else (x,)))
        return sum(len(p.query) + len(p.doc_text) for p in pairs)


NON_FINITE = "the reranker gave a NaN score (its yes/no logits overflowed: try --precision fp32 or bf16)"


def _judge(pair: RerankPair, score: float | None, reason: str | None) -> Judgement | DeadLetter:
    if score is not None and not math.isfinite(score):
        score, reason = None, NON_FINITE  # NaN compares below every threshold: it would be graded 0, silently
    if score is None:
        return DeadLetter.of("rerank", reason or "not scored", f"{pair.query_id}/{pair.doc_id}", dataclasses.asdict(pair))
    return Judgement(
        query_id=pair.query_id,
        doc_id=pair.doc_id,
        teacher_score=float(score),
        first_stage_score=pair.first_stage_score,
        first_stage_rank=pair.first_stage_rank,
    )


def pair_key(element: RerankPair | QueryPairs) -> str:
    """A pair's (or a query group's) unique id, which places it in a batch."""
    if isinstance(element, QueryPairs):
        return element.query_id
    return f"{element.query_id}\t{element.doc_id}"


def pair_source(pair: RerankPair) -> tuple[str, Any]:
    """Dead-letter source and record of a pair whose batch failed."""
    return f"{pair.query_id}/{pair.doc_id}", {"query_id": pair.query_id, "doc_id": pair.doc_id}


def _query_pairs(query_id: str, pairs: Iterable[RerankPair]) -> QueryPairs:
    # Sorted, so a group (and its dead letters, if any) is the same whatever the shuffle order.
    return QueryPairs(query_id, tuple(sorted(pairs, key=lambda p: (p.first_stage_rank, p.doc_id))))


class Rerank(beam.PTransform):
    """``RerankPair`` → ``Judgement`` (``results``) and ``DeadLetter`` (``dead_letter``).

    Pairs go to the scorer in token-sized batches composed the same on every run; with a
    handler built with ``share_prefix=True`` they are grouped by query first (``RerankByQuery``)
    so that a query's prompt head is run once per forward pass.
    """

    def __init__(self, handler: RerankModelHandler) -> None:
        super().__init__()
        self.handler = handler

    def expand(self, pairs):
        if self.handler.share_prefix:  # a query's pairs must reach the scorer together to share its head
            return pairs | "ByQuery" >> RerankByQuery(self.handler)
        return pairs | "ByTokens" >> RunInferenceByTokens(
            self.handler,
            stage="rerank",
            key_fn=pair_key,
            describe=pair_source,
        )


class RerankByQuery(beam.PTransform):
    """``RerankPair`` → ``Judgement`` (``results``) and ``DeadLetter`` (``dead_letter``).

    Pairs are grouped by query first (one shuffle of the pair texts), so each query's
    candidates reach one scorer call together and, with a handler built with
    ``share_prefix=True``, its prompt head is run once per forward pass instead of once per pair. Batches are sized by estimated tokens
    (the handler's ``budgets.batch``); a query heavier than that is a batch of its own, which the scorer
    still cuts into forward passes by its token budget. A pair that fails alone, or every pair
    of a batch that raises, becomes a dead letter: no pair is dropped silently.
    """

    def __init__(self, handler: RerankModelHandler) -> None:
        super().__init__()
        self.handler = handler

    def expand(self, pairs):
        return (
            pairs
            | "KeyByQuery" >> beam.WithKeys(lambda p: p.query_id)
            | "GroupByQuery" >> beam.GroupByKey()
            | "ToQueryPairs" >> beam.MapTuple(_query_pairs)
            | "Score" >> RunInferenceByTokens(
                self.handler,
                stage="rerank",
                key_fn=pair_key,
                describe=pair_source,
                members=lambda group: group.pairs,
            )
        )

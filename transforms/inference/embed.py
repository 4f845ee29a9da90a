"""Embedding in Beam: ``RunInference`` over the torch encoder, batched by tokens.

``EmbeddingModelHandler`` loads one ``TextEncoder`` per worker process (``Shared``), and
``Embed`` puts ``BatchDeterministically`` in front of it so batches are the same on every run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np

from transforms.hooks import pause_point
from transforms.inference.batching import RunInferenceByTokens
from transforms.inference.handlers import TokenBatchedHandler, count_compute
from transforms.models.devices import TokenBudgets
from transforms.models.encoder import TextEncoder
from transforms.models.settings import EmbeddingSpec
from transforms.progress import reporter
from transforms.types import DEAD, Chunk, DeadLetter, EmbeddedChunk, Query

NON_FINITE = "the model gave a vector holding NaN or inf (an overflow: try --precision fp32 or bf16)"


def _chunk_weight(chunk: Chunk) -> int:
    return max(chunk.n_tokens, 1)


def _query_weight(query: Query) -> int:
    return len(query.text) // 3 + 16


class EmbeddingModelHandler(TokenBatchedHandler):
    """``RunInference`` handler: ``Chunk`` → ``EmbeddedChunk`` (or ``Query`` → ``(Query, vector)``).

    ``model`` is the job's ``EmbeddingSpec`` (or an id or directory, read on the worker with
    ``dim`` and ``max_length``). Batches arrive sorted and sized by tokens (``Embed`` puts
    ``BatchDeterministically`` in front) and are cut again inside by the padded-token budget
    of one forward pass. An element that runs out of memory even alone comes back as a
    ``DeadLetter``; the rest of its batch is embedded.
    """

    def __init__(
        self,
        model: EmbeddingSpec | str,
        *,
        device: str = "auto",
        dim: int | None = None,
        max_length: int | None = None,
        query_instruction: str | None = None,
        budgets: TokenBudgets = TokenBudgets(),
        kind: str = "document",
        progress_interval_s: float = 30.0,
        large_model: bool = False,
        backend: str = "eager",
        packing: bool | None = None,
        cpu_workers: int | None = None,
        cpu_threads: int | None = None,
        precision: str = "auto",
        kernels: str = "none",
    ) -> None:
        if kind not in ("document", "query"):
            raise ValueError(f"kind must be 'document' or 'query', not {kind!r}")
        super().__init__(
            TextEncoder,
            dict(model=model, device=device, dim=dim, max_length=max_length, query_instruction=query_instruction,
                 backend=backend, packing=packing, cpu_workers=cpu_workers, precision=precision, kernels=kernels),
            budgets=budgets,
            element_weight=_chunk_weight if kind == "document" else _query_weight,
            progress_interval_s=progress_interval_s,
            large_model=large_model,
            cpu_threads=cpu_threads,
        )
        self._kind = kind

    def run_inference(
        self, batch: Sequence[Any], model: TextEncoder, inference_args: dict[str, Any] | None = None
    ) -> list[Any]:
        # A list, not a generator: RunInference counts a failed batch (failed_batches_counter) only when this
        # call raises; a generator's body runs, and raises, later, when Beam lists its results.
        return list(self._results(batch, model))

    def _results(self, batch: Sequence[Any], model: TextEncoder) -> Iterable[Any]:
        if not batch:  # BatchElements emits an empty batch when one element outweighs its target
            return
        pause_point("embed")
        is_query = self._kind == "query"
        texts = [e.text if is_query else e.embed_text for e in batch]
        # One method call: ``model`` may be the proxy of a model shared across processes (large_model).
        # Chunks bring their token counts, so passes can be cut before tokenising (TextEncoder.embed_batch).
        lengths = None if is_query else [c.n_tokens for c in batch]
        vectors, failures, n_tokens = model.embed_batch(texts, lengths, is_query=is_query)
        reasons = dict(failures)
        if is_query:
            counts = {"queries": len(batch), "tokens": n_tokens}
        else:  # a document's first chunk stands for the document
            counts = {"documents": sum(c.chunk_index == 0 for c in batch), "chunks": len(batch), "tokens": n_tokens}
        reporter("embed", self._progress_interval_s).add(**counts)
        count_compute("query" if is_query else "embed", model.compute_info(), n_tokens)
        for i, (element, vector) in enumerate(zip(batch, vectors)):
            if vector is not None and not np.isfinite(vector).all():
                # fp16 activations can overflow on one input: the store would refuse the point (or keep one no
                # search ranks), failing its whole batch; a dead letter keeps the others and says what to try
                vector, reasons[i] = None, NON_FINITE
            if vector is None:
                yield DeadLetter.of("embed", reasons[i], *_source_and_record(element))  # as a failed batch's
            elif is_query:
                yield (element, vector)
            else:  # tolist: Python floats in one C call, not a float() per component
                yield EmbeddedChunk(chunk=element, vector=tuple(vector.tolist()))

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return sum(len(getattr(e, "embed_text", getattr(e, "text", ""))) for e in batch)


def _describe(element: Any) -> dict[str, Any]:
    if isinstance(element, Chunk):
        return {"doc_id": element.doc_id, "chunk_index": element.chunk_index, "n_tokens": element.n_tokens}
    if isinstance(element, Query):
        return {"query_id": element.query_id, "text": element.text}
    return {"element": repr(element)[:500]}



class Embed(beam.PTransform):
    """Elements → embedded elements (main) and ``DeadLetter`` (tag ``dead_letter``).

    Token-sized, length-sorted batches through ``RunInference`` (``RunInferenceByTokens``);
    a batch that raises becomes dead letters, one per element, and the job goes on.
    """

    def __init__(self, handler: EmbeddingModelHandler) -> None:
        super().__init__()
        self.handler = handler

    def expand(self, pcoll):
        out = pcoll | "EmbedByTokens" >> RunInferenceByTokens(
            self.handler,
            stage="embed",
            key_fn=element_key,
            describe=_source_and_record,
        )
        return {"embedded": out["results"], DEAD: out[DEAD]}


def element_key(element: Chunk | Query) -> str:
    """A chunk's or query's unique id, which places it in a batch (``BatchDeterministically``)."""
    if isinstance(element, Chunk):
        return f"{element.doc_id}:{element.chunk_index}"
    return element.query_id


def _source_and_record(element: Any) -> tuple[str, Any]:
    return getattr(element, "doc_id", "") or getattr(element, "query_id", ""), _describe(element)

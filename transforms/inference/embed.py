"""Embedding in Beam: ``RunInference`` over the torch encoder, batched by tokens.

``EmbeddingModelHandler`` loads one ``TextEncoder`` per worker process (``Shared``), and
``Embed`` puts ``BatchDeterministically`` in front of it so batches are the same on every run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler

from transforms.inference.batching import RunInferenceByTokens
from transforms.models.encoder import TextEncoder
from transforms.progress import reporter
from transforms.types import DEAD, Chunk, DeadLetter, EmbeddedChunk, Query

_LOG = logging.getLogger(__name__)

def _chunk_weight(chunk: Chunk) -> int:
    return max(chunk.n_tokens, 1)


def _query_weight(query: Query) -> int:
    return len(query.text) // 3 + 16


class EmbeddingModelHandler(ModelHandler[Any, Any, TextEncoder]):
    """``RunInference`` handler: ``Chunk`` → ``EmbeddedChunk`` (or ``Query`` → ``(Query, vector)``).

    The model is loaded once per worker process and shared by its threads and bundles
    (RunInference keeps it in a ``Shared`` handle). Batches arrive sorted and sized by tokens
    (``Embed`` puts ``BatchDeterministically`` in front) and are cut again inside by the
    padded-token budget of one forward pass. An element that runs out of memory even alone comes back as a
    ``DeadLetter``; the rest of its batch is embedded.
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dim: int | None = None,
        max_length: int | None = None,
        query_instruction: str | None = None,
        max_batch_tokens: int | None = None,
        kind: str = "document",
        progress_interval_s: float = 30.0,
        large_model: bool = False,
    ) -> None:
        if kind not in ("document", "query"):
            raise ValueError(f"kind must be 'document' or 'query', not {kind!r}")
        self.max_batch_weight = max(4 * (max_batch_tokens or 8192), 16384)
        self.element_weight = _chunk_weight if kind == "document" else _query_weight
        # With element_size_fn, BatchElements' batch sizes are in tokens, so even a plain
        # RunInference(handler) batches by tokens. ``Embed`` does better: it composes batches
        # from length buckets of the whole input, the same on every run (inference.py), and
        # runs the handler with_no_batching. Beam 2.77's
        # BatchElements rejects the max_batch_weight that ModelHandler would forward.
        super().__init__(
            min_batch_size=1,
            max_batch_size=self.max_batch_weight,
            element_size_fn=self.element_weight,
            large_model=large_model,
        )
        self._encoder_args = dict(
            model=model,
            device=device,
            dim=dim,
            max_length=max_length,
            query_instruction=query_instruction,
            token_budget=max_batch_tokens,
        )
        self._kind = kind
        self._progress_interval_s = progress_interval_s

    def load_model(self) -> TextEncoder:
        args = dict(self._encoder_args)
        encoder = TextEncoder(args.pop("model"), **args).load()
        _LOG.info(
            "loaded %s on %s (dim %d, max_length %d, token budget %d)",
            encoder.model_id, encoder.device, encoder.dimension, encoder.max_length, encoder.token_budget,
        )
        return encoder

    def run_inference(
        self, batch: Sequence[Any], model: TextEncoder, inference_args: dict[str, Any] | None = None
    ) -> Iterable[Any]:
        if not batch:  # BatchElements emits an empty batch when one element outweighs its target
            return
        is_query = self._kind == "query"
        texts = [e.text if is_query else e.embed_text for e in batch]
        ids = model.tokenize(texts, is_query=is_query)
        vectors, failures = model.encode_ids(ids)
        reasons = dict(failures)
        n_tokens = sum(len(x) for x in ids)
        if is_query:
            counts = {"queries": len(batch), "tokens": n_tokens}
        else:  # a document's first chunk stands for the document
            counts = {"documents": sum(c.chunk_index == 0 for c in batch), "chunks": len(batch), "tokens": n_tokens}
        reporter("embed", self._progress_interval_s).add(**counts)
        for i, (element, vector) in enumerate(zip(batch, vectors)):
            if vector is None:
                yield DeadLetter.of("embed", reasons[i], getattr(element, "doc_id", ""), _describe(element))
            elif is_query:
                yield (element, vector)
            else:
                yield EmbeddedChunk(chunk=element, vector=tuple(float(x) for x in vector))

    def get_metrics_namespace(self) -> str:
        return "corpus_etl"

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
            max_batch_weight=self.handler.max_batch_weight,
            element_size_fn=self.handler.element_weight,
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

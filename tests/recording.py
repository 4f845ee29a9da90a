"""A handler mixin that records what batching did: Beam batch weights and forward-pass shapes.

DirectRunner runs in this process, so module-level lists see every call. Shapes are taken at
the input embedding, which every forward pass goes through (padded, packed or prefix-shared).
"""

from __future__ import annotations

from typing import Any

BATCH_WEIGHTS: list[int] = []
PASSES: list[tuple[int, int]] = []


def reset() -> None:
    BATCH_WEIGHTS.clear()
    PASSES.clear()


def _record_pass(module: Any, args: tuple[Any, ...]) -> None:
    PASSES.append(tuple(args[0].shape))


class Recording:
    """Put first in the bases of a ``TokenBatchedHandler`` subclass."""

    def load_model(self):
        model = super().load_model()
        model.model.get_input_embeddings().register_forward_pre_hook(_record_pass)
        return model

    def run_inference(self, batch, model, inference_args=None):
        BATCH_WEIGHTS.append(sum(self.element_weight(e) for e in batch))
        return super().run_inference(batch, model, inference_args)


def assert_within_budgets(batch_tokens: int, forward_tokens: int) -> None:
    """Every Beam batch within ``batch_tokens`` and every forward pass within ``forward_tokens``
    padded tokens, except where one element alone is over (it then runs alone)."""
    assert BATCH_WEIGHTS and PASSES
    for weight in BATCH_WEIGHTS:
        assert weight <= batch_tokens, BATCH_WEIGHTS
    for rows, length in PASSES:
        assert rows == 1 or rows * length <= forward_tokens, PASSES

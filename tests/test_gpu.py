"""Token-budget batching and out-of-memory recovery (a fake forward pass that runs out of memory)."""

from __future__ import annotations

import pytest
import torch

from transforms.models.devices import budget_batches, resolve_device, run_in_token_budget


def test_batches_are_length_sorted_and_fit_the_padded_budget():
    lengths = [5, 1, 9, 3, 3, 8, 2]
    batches = budget_batches(lengths, token_budget=12)
    assert batches == [[1, 6, 3, 4], [0], [5], [2]]  # (1,2,3,3) pads to 12; 5; 8; 9
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert budget_batches([50], token_budget=10) == [[0]]  # too long for the budget: alone, not dropped


def test_out_of_memory_splits_retries_and_reports_single_failures():
    calls: list[int] = []

    def forward(batch: list[list[int]]) -> list[int]:
        calls.append(len(batch))
        if sum(len(x) for x in batch) > 6 or any(len(x) > 5 for x in batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [len(x) for x in batch]

    ids = [[0] * n for n in (2, 2, 2, 2, 7, 1)]
    out, failures = run_in_token_budget(ids, token_budget=100, forward=forward)
    assert out == [2, 2, 2, 2, None, 1]  # input order kept; the 7-token input failed alone
    assert failures == [(4, "out of memory on a single element: CUDA out of memory. Tried to allocate 2.00 GiB")]
    assert calls[0] == 6  # the whole batch first, then halves


def test_other_errors_are_not_swallowed():
    def forward(batch):
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        run_in_token_budget([[1], [2]], 10, forward)


def test_cuda_without_a_gpu_is_an_error():
    assert resolve_device("cpu").type == "cpu"
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


def test_the_driver_checks_the_device_only_for_local_runners():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.common import check_local_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        check_local_device(PipelineOptions([]), "cuda")
    # A Dataflow driver rarely has the workers' GPU: the workers check when they load the model.
    check_local_device(PipelineOptions(["--runner", "DataflowRunner"]), "cuda")

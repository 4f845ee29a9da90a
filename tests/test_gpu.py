"""Devices: token-budget batching, out-of-memory recovery (a fake forward pass that runs out of memory), and
which GPU of a machine each copy of a model goes on (a GPU count given: no GPU needed)."""

from __future__ import annotations

import os

import pytest
import torch

from transforms.models.devices import budget_batches, even_passes, resolve_device, run_in_token_budget


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


def test_a_cpu_allocation_failure_splits_the_batch_as_cuda_out_of_memory_does():
    """torch's CPU allocator refuses a tensor with a RuntimeError of its own wording: the batch is split too."""

    def forward(batch: list[list[int]]) -> list[int]:
        if len(batch) > 2:
            torch.empty(10**15, dtype=torch.uint8)  # a petabyte: refused by the allocator, on any machine
        return [len(x) for x in batch]

    out, failures = run_in_token_budget([[0] * n for n in (1, 2, 3, 4, 5)], token_budget=100, forward=forward)
    assert (out, failures) == ([1, 2, 3, 4, 5], [])


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


# -- placing copies on the GPUs of a machine (``place_on_gpu``), with a GPU count given: no GPU needed --------------
def _claim_in_child(folder, key: str, gpus: int) -> str:
    """One claim from a process of its own, which then ends."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from transforms.models.devices import place_on_gpu; "
        "print(place_on_gpu(torch.device('cuda'), sys.argv[1], gpus=int(sys.argv[2]), folder=sys.argv[3]))"
    )
    done = subprocess.run([sys.executable, "-c", code, key, str(gpus), str(folder)], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_copies_of_a_model_take_the_gpus_in_turn_and_each_model_counts_alone(tmp_path):
    from transforms.models.devices import GPU_CLAIMS_FILE, place_on_gpu

    def place(key: str) -> str:
        return str(place_on_gpu(torch.device("cuda"), key, gpus=3, folder=str(tmp_path)))

    assert [place("embedder") for _ in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert [place("reranker") for _ in range(2)] == ["cuda:0", "cuda:1"]  # the label job's second model
    assert place("embedder") == "cuda:1"  # after 0: the fewest copies, 1 and 2 tied, taken in turn
    (tmp_path / GPU_CLAIMS_FILE.format(uid=os.getuid())).write_text('{"embedder": {"turn": 1, "pi')  # unreadable
    assert place("embedder") == "cuda:0"  # forgotten, not fatal


def test_an_unwritable_temp_folder_spreads_copies_by_process_id(tmp_path, caplog):
    from transforms.models.devices import place_on_gpu

    missing = tmp_path / "gone"  # the claims file cannot be created there
    assert str(place_on_gpu(torch.device("cuda"), "m", gpus=2, folder=str(missing))) == f"cuda:{os.getpid() % 2}"
    assert "could not count the copies on this machine's GPUs" in caplog.text


def test_a_gpu_whose_copies_ended_is_taken_first(tmp_path):
    """The claims of processes that ended do not count: a restarted worker does not pile onto one GPU."""
    from transforms.models.devices import place_on_gpu

    here = str(place_on_gpu(torch.device("cuda"), "m", gpus=2, folder=str(tmp_path)))
    assert (here, _claim_in_child(tmp_path, "m", 2)) == ("cuda:0", "cuda:1")
    # the child has ended: GPU 1 holds no live copy, GPU 0 this process's (turns alone would give 0)
    assert str(place_on_gpu(torch.device("cuda"), "m", gpus=2, folder=str(tmp_path))) == "cuda:1"


def test_processes_placing_at_once_get_different_gpus(tmp_path):
    """The claims file is read and written under an exclusive lock: four processes at once, two on each GPU."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:  # each thread waits on its own child process
        placed = list(pool.map(lambda _: _claim_in_child(tmp_path, "m", 2), range(4)))
    assert sorted(placed) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]


def test_one_gpu_a_named_gpu_and_the_cpu_need_no_claim(tmp_path):
    from transforms.models.devices import place_on_gpu

    assert str(place_on_gpu(torch.device("cuda"), "m", gpus=1, folder=str(tmp_path))) == "cuda:0"
    assert str(place_on_gpu(torch.device("cuda", 1), "m", gpus=4, folder=str(tmp_path))) == "cuda:1"
    assert str(place_on_gpu(torch.device("cpu"), "m", gpus=4, folder=str(tmp_path))) == "cpu"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("device", "shared", "copies"),
    [("auto", True, 2), ("cuda", True, 2), ("cuda:1", True, 1), ("cpu", True, 1), ("auto", False, 1)],
)
def test_a_shared_model_has_one_copy_per_gpu_of_the_worker(minilm_path, monkeypatch, device, shared, copies):
    """``--share-model machine`` on a worker with 2 GPUs: Beam loads ``model_copies()`` copies, one per GPU
    (``place_on_gpu``), and sends batches to them in turn; ``cuda:N`` names one GPU, so one copy."""
    from transforms.inference.embed import EmbeddingModelHandler

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    handler = EmbeddingModelHandler(minilm_path, device=device, large_model=shared)
    assert handler.model_copies() == copies


def test_even_passes_round_the_pass_count_up_to_the_multiple_with_even_weights():
    # 104 texts of 256 tokens under 2048: 13 full passes, one core idle in the last round of two; 16 of 6-7 texts.
    passes = even_passes([256] * 104, 2048, 4)
    assert [len(p) for p in passes] == [6, 7] * 8
    assert [i for p in passes for i in p] == list(range(104))
    # 3 greedy passes of 3 texts -> 4: a text goes where its middle falls in steps of 27 / 4 tokens.
    assert budget_batches([3] * 9, 9) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert even_passes([3] * 9, 9, 2) == [[0, 1], [2, 3], [4, 5, 6], [7, 8]]
    assert even_passes([6, 3, 3, 3, 3, 3, 3, 3, 3], 12, 2) == [[1, 2], [3, 4, 5], [6, 7], [8, 0]]  # sorted by length


def test_even_passes_keep_the_greedy_ones_when_already_even_too_light_or_over_the_budget():
    assert even_passes([4, 4, 4, 4], 4, 4) == [[0], [1], [2], [3]]  # already four
    assert even_passes([10] * 5, 2048, 4) == [[0, 1, 2, 3, 4]]  # 50 tokens: passes under 2048 / 8 each
    # Even weights would put 1, 1 and 5 in one pass: 3 x 5 = 15 padded tokens, over 12.
    assert even_passes([1, 1, 5, 6, 6, 6], 12, 4) == budget_batches([1, 1, 5, 6, 6, 6], 12) == [[0, 1], [2, 3], [4, 5]]

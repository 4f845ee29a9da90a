"""Session-scoped Qwen3 model directories built offline (see ``tests/qwen_offline.py``).

``tests/conftest.py`` star-imports this module, so any test can ask for
``qwen3_tokenizer_dir``, ``qwen3_embedding_dir`` or ``qwen3_reranker_dir``. Each is built
once per test session (a few seconds: tokenizer conversion, a tiny random model).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.qwen_offline import build_qwen3_embedding, build_qwen3_reranker, build_qwen3_tokenizer

__all__ = ["qwen3_tokenizer_dir", "qwen3_embedding_dir", "qwen3_reranker_dir"]


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Qwen3 tokenizer alone (right padding, no post-processor, as the base Qwen3 repos)."""
    out = tmp_path_factory.mktemp("qwen3-tokenizer")
    build_qwen3_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def qwen3_embedding_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Laid out like Qwen/Qwen3-Embedding-0.6B; tiny random ``Qwen3Model`` (hidden 64, 2 layers)."""
    return build_qwen3_embedding(tmp_path_factory.mktemp("qwen3-embedding"), seed=0)


@pytest.fixture(scope="session")
def qwen3_reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Laid out like Qwen/Qwen3-Reranker-0.6B; tiny random ``Qwen3ForCausalLM`` (tied embeddings)."""
    return build_qwen3_reranker(tmp_path_factory.mktemp("qwen3-reranker"), seed=0)

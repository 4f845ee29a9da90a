"""The layout's import rules: the models package is torch without Beam; chunking is Beam without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _imported(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(m for m in ('apache_beam', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "module", ["transforms.models.encoder", "transforms.models.reranker", "transforms.models.fast"]
)
def test_models_import_no_beam(module):
    assert _imported(module) == {"torch"}


def test_chunking_and_model_settings_import_no_torch():
    assert "torch" not in _imported("transforms.text.chunk")
    assert _imported("transforms.models.settings") == set()

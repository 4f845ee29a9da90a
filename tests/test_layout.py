"""The layout's import rules: the models package is torch without Beam; chunking is Beam without torch."""

from __future__ import annotations

import json
import subprocess
import sys

MODELS = ["transforms.models.encoder", "transforms.models.reranker", "transforms.models.fast"]


def _imported_after_each(modules: list[str]) -> dict[str, list[str]]:
    """Which of Beam and torch are imported after importing each of ``modules`` in turn, in one fresh interpreter.

    Cumulative, so exact for absence: what is not there after a module was not imported by it nor by those before.
    """
    code = (
        "import importlib, json, sys\n"
        "seen = {}\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    seen[name] = [m for m in ('apache_beam', 'torch') if m in sys.modules]\n"
        "print(json.dumps(seen))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def test_models_import_no_beam():
    assert _imported_after_each(MODELS) == {module: ["torch"] for module in MODELS}


def test_chunking_and_model_settings_import_no_torch():
    assert _imported_after_each(["transforms.models.settings", "transforms.text.chunk"]) == {
        "transforms.models.settings": [],
        "transforms.text.chunk": ["apache_beam"],
    }

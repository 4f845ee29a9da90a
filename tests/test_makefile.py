"""The Makefile as a user on a fresh clone meets it: every target `make help` lists runs or says why not."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAKEFILE = (REPO / "Makefile").read_text()


def _rules() -> dict[str, tuple[list[str], list[str]]]:
    """target -> (prerequisites, recipe lines), for the Makefile's plain `target: prereqs ## help` rules."""
    rules: dict[str, tuple[list[str], list[str]]] = {}
    current = None
    for line in MAKEFILE.replace("\\\n", " ").splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+):(?!=)\s*([^#]*)", line)
        if match:
            current = match[1]
            rules[current] = ([p for p in match[2].split() if p != "|"], [])
        elif line.startswith("\t") and current:
            rules[current][1].append(line.strip())
        elif line.strip() and not line.startswith("\t"):
            current = None
    return rules


def _needs(rules: dict[str, tuple[list[str], list[str]]], target: str) -> set[str]:
    seen: set[str] = set()
    todo = [target]
    while todo:
        for prereq in rules.get(todo.pop(), ([], []))[0]:
            if prereq not in seen:
                seen.add(prereq)
                todo.append(prereq)
    return seen


def test_every_target_that_runs_the_venv_installs_it_first():
    """On a fresh clone `make bench-tokenizer` said `.venv/bin/python: No such file or directory`."""
    rules = _rules()
    listed = re.findall(r"^([A-Za-z0-9_-]+):[^\n]*## ", MAKEFILE, re.M)
    missing = [t for t in listed if t != "install" and any("$(BIN)/" in line for line in rules[t][1])
               and "install" not in _needs(rules, t)]  # fmt: skip
    assert missing == []


def test_lint_covers_every_folder_of_python_sources():
    ruff = next(line for line in _rules()["lint"][1] if "ruff check" in line).split()
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    folders = {Path(p).parts[0] for p in tracked.split() if len(Path(p).parts) > 1}
    assert folders - set(ruff) == set()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("gpu_python", ["torch-less-python-that-does-not-exist", "{venv}"])
def test_bench_gpu_without_cuda_says_why(gpu_python):
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: bench-gpu would run the benchmarks")
    gpu_python = gpu_python.format(venv=sys.executable)
    result = subprocess.run(["make", "-s", "bench-gpu", f"GPU_PYTHON={gpu_python}"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.splitlines()[0] == (
        f"bench-gpu: needs a CUDA GPU and GPU_PYTHON (now '{gpu_python}') with a CUDA build of torch; "
        "on CPU use the other bench-* targets"
    )

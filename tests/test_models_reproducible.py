"""Forward passes on CPU give the same bits whatever the thread count (``transforms.models``: MKL's strict
conditional numerical reproducibility), so the label job's lossless scores do not change with the runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process: MKL reads MKL_CBWR at its first call, so the pytest process (whatever ran before) says nothing.
SCRIPT = """
import json, sys
import numpy as np
import torch
import transforms.models  # before any model computes
from pipelines.sample import QUERIES
from transforms.models.encoder import TextEncoder

# the queries and their ids ("q01"): on a 2-core Cascade Lake the ids' short inputs took MKL's thread-dependent path
texts = [text for text, _ in QUERIES.values()] + list(QUERIES)
out = {}
for threads in (2, 1):
    torch.set_num_threads(threads)
    out[threads] = TextEncoder(sys.argv[1], device="cpu").load().encode(texts, is_query=True)
import os
print(json.dumps({"mkl_cbwr": os.environ.get("MKL_CBWR"), "equal": bool(np.array_equal(out[1], out[2])),
                  "max_diff": float(np.abs(out[1] - out[2]).max())}))
"""


def _run(minilm_path: str, env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, minilm_path], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_query_vectors_are_bitwise_the_same_at_one_thread_and_at_two(minilm_path):
    # the suite's OMP_NUM_THREADS (tests/conftest.py) out too: the script sets the thread counts itself
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    got = _run(minilm_path, env)
    assert got == {"mkl_cbwr": "AUTO,STRICT", "equal": True, "max_diff": 0.0}


def test_a_mkl_cbwr_the_user_set_is_kept():
    env = {**os.environ, "MKL_CBWR": "COMPATIBLE"}  # another mode (SSE2 code), reproducible at one thread count only
    proc = subprocess.run([sys.executable, "-c", "import os, transforms.models; print(os.environ['MKL_CBWR'])"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (proc.returncode, proc.stdout.strip()) == (0, "COMPATIBLE"), proc.stderr[-3000:]

"""Model loading and forward passes (encoder, reranker) and what they run on.

Importing this package asks Intel MKL for results that do not depend on the number of threads
(``MKL_CBWR=AUTO,STRICT``, unless the environment already sets ``MKL_CBWR``). PyTorch's CPU
matrix products run in MKL, which on Intel CPUs splits a product's sums differently with the
thread count: on a 2-core Cascade Lake, MiniLM's query vectors at one thread and at two
differed by up to 1.9e-7 (a throwaway script), so the label job's files (which keep scores losslessly) changed with
the runner and its worker processes' threads. In strict mode they are bitwise equal
(``tests/test_models_reproducible.py``). MKL reads the setting once, at its first call in a
process, so it must be set before any model computes: every model of this project is loaded
through this package, and the worker processes import it before they load one.
"""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

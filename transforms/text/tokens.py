"""Tokenising long lists of texts fast, for the chunker and the encoder (no torch here: the chunking step loads none).

``tokenize_ids`` cuts a list into slices on a small thread pool where the tokenizers library's own Rust pool
is off (``TOKENIZERS_PARALLELISM`` false, as tests and forking setups set it); with that pool on, one call
is as fast (bench/tokenizer.py, BENCHMARKS.md "Tokeniser throughput on CPU").
"""

from __future__ import annotations

import os
import threading
from typing import Any

_TOKENIZE_SLICE = 256
_TOKENIZE_POOL: dict[int, Any] = {}  # by process id: a forked child inherits the dict but not the threads
_TOKENIZE_LOCK = threading.Lock()  # not the encoder's _POOL_LOCK: its workers hold that one while they tokenise


def tokenize_ids(
    tokenizer: Any, texts: list[str], *, slices: bool | None = None, field: str = "input_ids", **kwargs: Any
) -> list[Any]:
    """``tokenizer(texts, **kwargs)[field]``, in slices of 256 texts on up to 8 threads where the
    tokenizer's own Rust pool is off (``slices=None``: ``TOKENIZERS_PARALLELISM`` set to a false value,
    as tests and forking setups do). The Rust code releases the GIL, so the slices run in parallel; with
    the pool on they gain nothing over one call, so the pool does it (bench/tokenizer.py, BENCHMARKS.md).
    The ids are the same either way."""

    def run(part: list[str]) -> list[Any]:
        return tokenizer(part, **kwargs)[field]

    if slices is None:
        slices = not rust_pool_on()
    if not slices or len(texts) <= _TOKENIZE_SLICE or _tokenize_threads() < 2:
        return run(texts)
    parts = [texts[i : i + _TOKENIZE_SLICE] for i in range(0, len(texts), _TOKENIZE_SLICE)]
    return [ids for part in _tokenize_pool().map(run, parts) for ids in part]


def rust_pool_on() -> bool:
    """Whether ``TOKENIZERS_PARALLELISM`` leaves the tokenizers library's own thread pool on (its rule:
    unset or any value but a false one; the library may still turn it off in a forked child)."""
    value = os.environ.get("TOKENIZERS_PARALLELISM")
    return value is None or value.lower() not in ("", "0", "false", "f", "off", "no", "n")


def _tokenize_threads() -> int:
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _tokenize_pool() -> Any:
    """One small thread pool per process for tokenising long lists (created on first use)."""
    pid = os.getpid()
    with _TOKENIZE_LOCK:
        if pid not in _TOKENIZE_POOL:
            from concurrent.futures import ThreadPoolExecutor

            _TOKENIZE_POOL[pid] = ThreadPoolExecutor(_tokenize_threads(), thread_name_prefix="tokenize")
        return _TOKENIZE_POOL[pid]

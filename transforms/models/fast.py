"""Fast paths for the encoder's padded forward pass (``TextEncoder(backend=...)``, ``--backend``).

* ``eager``: the transformers model as loaded (the reference every other path is tested against).
* ``compile``: ``torch.compile`` (inductor) of the same model, fed sequence lengths rounded up to a
  few buckets (``length_buckets``: 2 per doubling of the length, multiples of 8) so it compiles a
  bounded number of graphs, about ``2 * log2(max_length / 16)``. The batch dimension is dynamic
  (one graph per bucket, whatever the number of rows). With ``TextEncoder(cuda_graphs=True)`` on
  CUDA each bucket's batch is instead padded to a fixed number of rows (``token_budget // bucket``)
  and compiled with ``mode="reduce-overhead"``, i.e. CUDA graphs over static shapes: that pays
  only where passes are small enough for launch overhead to matter; at the H200's default
  262k-token passes it ran 53% padding against eager's 17% (BENCHMARKS.md, GPU). With packed rows
  (``TextEncoder(packing=...)``, the default on CUDA) ``PackedCompiledRunner`` compiles one graph whose row
  length is dynamic, attention ``varlen``: no buckets, no padding (309-324k tokens/s on an H100).
* ``onnx``: the model exported once with ``torch.onnx.export`` (the dynamo exporter; dynamic
  batch and sequence axes) into a cache folder keyed by the model's files and the torch and
  onnxruntime versions, then run by ONNX Runtime (CPU provider; CUDA when the device is a GPU
  and onnxruntime-gpu is installed). Needs the ``onnx`` extra (``pip install corpus-etl[onnx]``).
  sentence-transformers' own ``backend="onnx"`` and optimum were not used: optimum-onnx pins
  transformers < 4.58, and this project runs transformers 5.

Every path returns the same ``last_hidden_state`` as eager within float32 rounding (the parity
tests check cosine >= 1 - 1e-4 on MiniLM and the tiny Qwen3); the ONNX path also checks a few
texts against eager when it loads and refuses to run when they differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

_LOG = logging.getLogger(__name__)

BACKENDS = ("eager", "compile", "onnx")
CACHE_ENV = "CORPUS_ETL_CACHE"
_COMPILE_LOCK = threading.Lock()


def length_buckets(max_length: int, *, per_doubling: int = 2, multiple: int = 8, smallest: int = 16) -> list[int]:
    """Sequence lengths the compiled path pads to: ``smallest * 2**(k / per_doubling)`` rounded up to
    ``multiple``, up to ``max_length`` (always the last bucket)."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    out: set[int] = set()
    k = 0
    while True:
        edge = min(max_length, int(math.ceil(smallest * 2 ** (k / per_doubling) / multiple) * multiple))
        out.add(edge)
        if edge >= max_length:
            return sorted(out)
        k += 1


def bucket_of(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` (``length`` itself past the last bucket)."""
    for b in buckets:
        if b >= length:
            return b
    return length


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "corpus-etl")


class CompiledRunner:
    """``(input_ids, mask) -> last_hidden_state`` through ``torch.compile``; inputs already padded to a bucket.

    ``static_rows``: pad every batch to this many rows for a bucket (``rows(bucket)``), for CUDA
    graphs; otherwise the batch dimension is marked dynamic. ``compile_seconds`` adds up the wall
    time of the first call of each new shape (compilation plus one forward pass).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        buckets: Sequence[int],
        token_budget: int,
        static_rows: bool = False,
        mode: str | None = None,
        pad_id: int = 0,
    ) -> None:
        self.model = model
        self.buckets = list(buckets)
        self.token_budget = token_budget
        self.static_rows = static_rows
        self.pad_id = pad_id
        self.compile_seconds = 0.0
        self.shapes: set[tuple[int, int]] = set()
        import torch._dynamo.config as dynamo_config

        # One graph per bucket (and per row count with static rows): raise the recompile limit
        # above that, or dynamo falls back to eager past the default 8.
        wanted = 4 * len(self.buckets) + 8
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < wanted:
                setattr(dynamo_config, name, wanted)
        self.compiled = torch.compile(model, dynamic=False, mode=mode)

    def rows(self, bucket: int) -> int:
        return max(1, self.token_budget // bucket)

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[0]
        if self.static_rows:
            want = self.rows(input_ids.shape[1])
            if n < want:  # padded rows hold one pad token each (an all-zero mask could give NaN)
                extra = want - n
                input_ids = torch.cat([input_ids, input_ids.new_full((extra, input_ids.shape[1]), self.pad_id)])
                pad_mask = mask.new_zeros((extra, mask.shape[1]))
                pad_mask[:, 0] = 1
                mask = torch.cat([mask, pad_mask])
        else:
            torch._dynamo.mark_dynamic(input_ids, 0)
            torch._dynamo.mark_dynamic(mask, 0)
        shape = (input_ids.shape[0] if self.static_rows else -1, input_ids.shape[1])
        first = shape not in self.shapes
        started = time.perf_counter()
        with _COMPILE_LOCK if first else contextlib.nullcontext():
            hidden = self.compiled(input_ids=input_ids, attention_mask=mask).last_hidden_state
            if first:
                if hidden.is_cuda:
                    torch.cuda.synchronize(hidden.device)
                self.shapes.add(shape)
                took = time.perf_counter() - started
                self.compile_seconds += took
                # Compiling a bucket takes seconds to minutes: say so, or a long start looks hung.
                _LOG.info("compiled shape %s in %.1f s (%d shapes, %.0f s so far)", shape, took,
                          len(self.shapes), self.compile_seconds)  # fmt: skip
        if self.static_rows and hidden.is_cuda:
            hidden = hidden.clone()  # CUDA graph outputs are overwritten by the next replay
        return hidden[:n]


# torch.compile's ``dynamic`` for packed rows. None (automatic, the default): the first pass specialises
# ``longest`` and the next value compiles again with it symbolic; on an H100, cold, 52 s then 61 s
# (BENCHMARKS.md, GPU 2026-11-27). True makes sizes symbolic from the first call, so one compile would do;
# not measured on a GPU yet (bench/gpu_embed.py's ``packed-compiled-dynamic`` variant sets it).
PACKED_COMPILE_DYNAMIC: bool | None = None


class PackedCompiledRunner:
    """``(input_ids, position_ids, cu_seq_lens, longest) -> hidden (T, H)`` for one packed row through
    ``torch.compile``, attention ``varlen`` (``transforms.models.varlen``).

    The row length and the number of texts are dynamic dimensions, so one graph serves passes of any
    size and there is no padding to buckets. ``longest`` (the kernel's ``max_seqlen``, which sizes its
    grid) is rounded up to a length bucket; a new value recompiles at most once, after which dynamo
    keeps it symbolic. ``compile_seconds`` adds up the calls that compiled a graph (``compiles`` counts them).
    """

    def __init__(self, model: torch.nn.Module, *, max_length: int) -> None:
        self.model = model
        self.buckets = length_buckets(max_length)
        self.compile_seconds = 0.0
        self.compiles = 0
        self.shapes: set[int] = set()
        self.compiled = torch.compile(model, dynamic=PACKED_COMPILE_DYNAMIC)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, cu: torch.Tensor, longest: int) -> torch.Tensor:
        from transforms.models import varlen

        if input_ids.shape[1] < 2:  # a size-1 dimension cannot stay dynamic: one 1-token text runs eagerly
            out = self.model(input_ids=input_ids, position_ids=positions, use_cache=False,
                             **varlen.forward_kwargs(cu, longest))  # fmt: skip
            return out.last_hidden_state[0]
        # maybe_: a pass of one text has a 2-long cu, which dynamo may specialise rather than fail on
        for tensor, dim in ((input_ids, 1), (positions, 1), (cu, 0)):
            torch._dynamo.maybe_mark_dynamic(tensor, dim)
        from torch._dynamo.utils import counters

        longest = bucket_of(longest, self.buckets)
        # The first two values of longest may compile (the graph, then the recompile that makes it symbolic):
        # one thread at a time, so a worker's threads do not compile the same graph side by side.
        maybe = longest not in self.shapes and len(self.shapes) < 2
        with _COMPILE_LOCK if maybe else contextlib.nullcontext():
            graphs, started = counters["stats"]["unique_graphs"], time.perf_counter()
            out = self.compiled(
                input_ids=input_ids, position_ids=positions, use_cache=False, **varlen.forward_kwargs(cu, longest)
            )
            hidden = out.last_hidden_state[0]
            if counters["stats"]["unique_graphs"] > graphs:  # this call compiled (dynamo's process-wide count)
                if hidden.is_cuda:
                    torch.cuda.synchronize(hidden.device)
                took = time.perf_counter() - started
                self.compiles += 1
                self.compile_seconds += took
                # Compiling takes seconds to minutes: say so, or a worker's start looks hung.
                _LOG.info("compiled packed rows (longest %d) in %.1f s (%d graphs, %.0f s so far)", longest, took,
                          self.compiles, self.compile_seconds)  # fmt: skip
        self.shapes.add(longest)
        return hidden


class _LastHidden(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def onnx_cache_key(model_path: str, revision: str, dtype: torch.dtype) -> str:
    import onnxruntime

    blob = "\n".join([os.path.abspath(model_path), revision, str(dtype), torch.__version__, onnxruntime.__version__, "v1"])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def export_onnx(model: torch.nn.Module, path: str, *, pad_id: int, padding_side: str = "right") -> float:
    """Export ``model`` (input_ids, attention_mask → last_hidden_state) to ``path``; returns the seconds taken.

    Written into a temporary folder beside the target and renamed, so concurrent workers of one
    machine never read half a file (the last rename wins; the files are the same).
    """
    started = time.perf_counter()
    folder = os.path.dirname(path)
    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    device = next(model.parameters()).device
    ids = torch.full((2, 16), 1000, dtype=torch.long, device=device)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    if padding_side == "left":
        ids[1, :5], mask[1, :5] = pad_id, 0
    else:
        ids[1, 11:], mask[1, 11:] = pad_id, 0
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    tmp = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(folder) or ".")
    try:
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                _LastHidden(model).eval(),
                (ids, mask),
                os.path.join(tmp, "model.onnx"),
                dynamo=True,
                input_names=["input_ids", "attention_mask"],
                output_names=["last_hidden_state"],
                dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                optimize=True,
                verbose=False,
            )
        if os.path.isdir(folder):
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return time.perf_counter() - started


class OnnxRunner:
    """``(input_ids, mask) -> last_hidden_state`` through ONNX Runtime (the model exported once, cached).

    ``export_seconds``: the export this load did (0.0 when the cache had it); ``session_seconds``:
    building the ONNX Runtime session.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        model_path: str,
        revision: str,
        device: torch.device,
        pad_id: int,
        padding_side: str = "right",
        threads: int | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError(
                "--backend onnx needs onnxruntime, onnx and onnxscript: pip install 'corpus-etl[onnx]'"
            ) from exc
        self.device = device
        dtype = next(model.parameters()).dtype
        folder = os.path.join(cache_dir(), "onnx", onnx_cache_key(model_path, revision, dtype))
        path = os.path.join(folder, "model.onnx")
        self.export_seconds = 0.0
        if not os.path.exists(path):
            _LOG.info("exporting %s to ONNX in %s", model_path, folder)
            self.export_seconds = export_onnx(model, path, pad_id=pad_id, padding_side=padding_side)
        self.path = path
        started = time.perf_counter()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.session_seconds = time.perf_counter() - started

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.session.run(
            None,
            {"input_ids": input_ids.cpu().numpy().astype("int64"), "attention_mask": mask.cpu().numpy().astype("int64")},
        )[0]
        return torch.from_numpy(out).to(self.device)


def describe(runner: Any) -> dict[str, Any]:
    """One-time costs of a runner, for logs and benchmarks."""
    if isinstance(runner, CompiledRunner):
        return {"backend": "compile", "compile_s": round(runner.compile_seconds, 2), "shapes": len(runner.shapes),
                "buckets": runner.buckets}  # fmt: skip
    if isinstance(runner, PackedCompiledRunner):
        return {"backend": "compile", "packing": True, "compile_s": round(runner.compile_seconds, 2),
                "graphs": runner.compiles}  # fmt: skip
    if isinstance(runner, OnnxRunner):
        return {"backend": "onnx", "export_s": round(runner.export_seconds, 2),
                "session_s": round(runner.session_seconds, 2), "path": runner.path}  # fmt: skip
    return {"backend": "eager"}

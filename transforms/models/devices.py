"""What the two models share: device and precision choice, token budgets, loading, out-of-memory recovery."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from transforms.models import liger

T = TypeVar("T")
R = TypeVar("R")

_LOG = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")


class DeviceUnavailableError(RuntimeError):
    """The asked-for device is not on this machine."""


def resolve_device(device: str) -> torch.device:
    """Map ``auto|cpu|cuda[:N]`` to a torch device.

    ``cuda`` without a GPU is an error, never a silent CPU fallback: a job sized
    for a GPU would otherwise run for days on a CPU before anyone noticed.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"--device {device} was asked for but CUDA is not available on this worker "
                "(torch.cuda.is_available() is False); use --device cpu or auto, or run on GPU workers"
            )
        return torch.device(device)
    raise ValueError(f"unknown device {device!r}; expected one of {DEVICE_CHOICES} or cuda:N")


def default_dtype(device: torch.device) -> torch.dtype:
    """Weights' dtype under ``--precision auto``: bf16 on GPUs that support it, fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


PRECISIONS = ("auto", "fp32", "bf16", "fp16", "bf16-mixed")
_WEIGHTS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_WEIGHT_NAMES = {dtype: name for name, dtype in _WEIGHTS.items()}


@dataclasses.dataclass(frozen=True)
class Precision:
    """What a model computes in: its weights' dtype, and for ``bf16-mixed`` the dtype that
    ``torch.autocast`` runs matrix products in (layer norms, softmax and pooling stay fp32)."""

    weights: torch.dtype
    autocast: torch.dtype | None = None

    def context(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """Autocast for this precision (a no-op without one). Autocast state is per thread, so
        this is entered in the thread that runs the forward pass."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    @property
    def name(self) -> str:
        """The ``--precision`` choice this resolves to: ``bf16-mixed``, ``fp32``, ``bf16`` or ``fp16``."""
        if self.autocast is not None:
            return "bf16-mixed"
        return _WEIGHT_NAMES.get(self.weights, str(self.weights))

    def describe(self) -> str:
        name = str(self.weights).removeprefix("torch.")
        return f"{name} weights, {str(self.autocast).removeprefix('torch.')} autocast" if self.autocast else name


def check_precision(precision: str, *, backend: str = "eager") -> None:
    """``--precision`` is known, and runs with ``--backend`` (ONNX Runtime runs its exported graph as it is)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if backend == "onnx" and precision == "bf16-mixed":
        raise ValueError("--backend onnx runs the exported graph in the weights' dtype; --precision bf16-mixed "
                         "needs --backend eager or compile")  # fmt: skip


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX).

    Elsewhere oneDNN still accepts bf16 but converts to fp32 on the way, so it buys nothing.
    """
    cpu = torch.cpu
    return any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_precision(precision: str, device: torch.device, *, cpu_mixed: bool = False) -> Precision:
    """The ``--precision`` setting on ``device``.

    ``auto``: bf16 weights on GPUs with bf16 (``default_dtype``), fp32 on other GPUs; on CPU fp32,
    or ``bf16-mixed`` when ``cpu_mixed`` (the model measured within 1e-4 cosine of fp32 in it, as
    the encoder) and the CPU multiplies bf16 in hardware (``cpu_has_native_bf16``). Measured on a
    Zen 4 core with MiniLM: 1.75x the fp32 forward pass (weights prepacked), vectors within 3.4e-5 cosine (BENCHMARKS.md).
    """
    check_precision(precision)
    if precision == "bf16-mixed":
        return Precision(torch.float32, torch.bfloat16)
    if precision != "auto":
        return Precision(_WEIGHTS[precision])
    if device.type == "cpu" and cpu_mixed and cpu_has_native_bf16():
        return Precision(torch.float32, torch.bfloat16)
    return Precision(default_dtype(device))


def default_token_budget(model: torch.nn.Module, device: torch.device, *, cpu_budget: int = 2048) -> int:
    """Tokens per forward pass, from free GPU memory and the model's width and depth.

    On CPU, 2048: in whole index jobs 512, 1024 and 4096 were no faster (within noise; BENCHMARKS.md, Issue 13).
    Activation memory of one token through one layer is roughly ``hidden * 12`` values
    at peak (attention projections, MLP intermediate), kept for one layer at a time under
    inference mode; half the free memory is used, leaving room for the allocator.
    """
    if device.type != "cuda":
        return cpu_budget
    config = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 1024))
    inter = int(getattr(config, "intermediate_size", hidden * 4))
    free, _ = torch.cuda.mem_get_info(device)
    bytes_per_value = 2
    per_token = (hidden * 6 + inter * 3) * bytes_per_value
    budget = int(free * 0.5 / per_token)
    return max(1024, min(budget, GPU_FORWARD_TOKENS))


# The most tokens of one forward pass on a GPU (default_token_budget's cap; BENCHMARKS.md, GPU).
GPU_FORWARD_TOKENS = 262_144
# Without --max-batch-tokens, Beam batches are sized as if forward passes held this many tokens
# (GPU_FORWARD_TOKENS where the model steps will run on a GPU: TokenBudgets.from_flag).
DEFAULT_FORWARD_TOKENS = 8192
# A Beam batch holds this many forward passes' worth: enough to sort by length inside it.
PASSES_PER_BATCH = 4


@dataclasses.dataclass(frozen=True)
class TokenBudgets:
    """The two token budgets of inference, both from ``--max-batch-tokens`` (``from_flag``).

    ``forward``: padded tokens (longest row x rows) of one forward pass; ``None`` lets the model
    choose at load time from free GPU memory (``default_token_budget``; 2048 on CPU).
    ``batch``: tokens of the elements in one Beam batch handed to ``run_inference``, which cuts
    it into forward passes; never below ``max_length``, so the longest element fits alone.
    """

    forward: int | None = None
    batch: int = PASSES_PER_BATCH * DEFAULT_FORWARD_TOKENS

    def __post_init__(self) -> None:
        if self.forward is not None and self.forward < 1:
            raise ValueError(f"--max-batch-tokens must be positive, got {self.forward}")
        if self.batch < 1:
            raise ValueError(f"the batch token budget must be positive, got {self.batch}")

    @classmethod
    def from_flag(cls, max_batch_tokens: int | None, max_length: int, *, gpu: bool = False) -> TokenBudgets:
        """``gpu``: the model steps will run on a GPU (``expects_gpu``). Without ``--max-batch-tokens`` a GPU
        chooses passes of up to ``GPU_FORWARD_TOKENS`` at load time, after the Beam batches are fixed; batches
        sized for CPU passes (32,768 tokens) would hand it passes an eighth of that: with them, the index job on
        an H100 ran at a third of the encoder's own rate (BENCHMARKS.md, "GPU: the index job end to end")."""
        forward = max_batch_tokens or (GPU_FORWARD_TOKENS if gpu else DEFAULT_FORWARD_TOKENS)
        return cls(forward=max_batch_tokens, batch=max(PASSES_PER_BATCH * forward, max_length))


def expects_gpu(device: str, accelerator: str | None = None) -> bool:
    """Whether the model steps will run on a GPU, as far as the machine building the job can tell:
    ``--device cuda[:N]``; or ``auto`` with an ``--accelerator`` hint (Dataflow's GPU workers) or a GPU
    here (the DirectRunner's workers are this machine). Only batch sizes follow from it (``TokenBudgets``)."""
    if device.startswith("cuda"):
        return True
    return device == "auto" and (bool(accelerator) or torch.cuda.is_available())


# The process's torch threads as chosen (set_cpu_threads) or first found: an encoder with CPU workers then
# sets torch's to 1, so torch.get_num_threads() no longer tells.
_CPU_THREADS: list[int] = []


def set_cpu_threads(threads: int) -> None:
    """Torch's intra-op threads for this process (``--cpu-threads``, before a model loads), which ``cpu_threads``
    answers from now on: a job's setting holds for its encoder even where an earlier job's encoder, in the same
    process, had set torch's threads to 1."""
    torch.set_num_threads(threads)
    _CPU_THREADS[:] = [threads]


def cpu_threads() -> int:
    """The process's torch threads as last set by ``set_cpu_threads``, or else torch's count when first asked,
    before any encoder set it to 1 (the encoder's default ``cpu_workers``)."""
    if not _CPU_THREADS:
        _CPU_THREADS.append(torch.get_num_threads())
    return _CPU_THREADS[0]


_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_DEVICE_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def device_lock(device: torch.device) -> Iterator[None]:
    """Held around a model's batch on a CUDA device: one batch at a time per device in this process, whichever
    model and thread runs it, with that device made current (Triton kernels and ``empty_cache`` act on the current
    device, and a process may hold copies on several GPUs: ``place_on_gpu``). Forward passes are sized from free
    memory for one pass at a time (``default_token_budget``), and a process may call a model from several threads:
    Beam's worker threads, or the callers of a model shared across processes (``large_model``). A no-op on CPU,
    whose encoder divides the cores among its own single-thread passes."""
    if device.type != "cuda":
        yield
        return
    key = f"cuda:{device.index or 0}"
    with _DEVICE_LOCKS_GUARD:
        lock = _DEVICE_LOCKS.setdefault(key, threading.Lock())
    with lock, torch.cuda.device(device):
        yield


GPU_CLAIMS_FILE = "corpus-etl-gpu-claims-{uid}.json"  # per user: another's file in /tmp may be unwritable


def gpus_for(device: str) -> int:
    """How many GPUs of this machine a model with ``--device device`` may be placed on (``place_on_gpu``):
    all of them for ``auto`` and ``cuda``, none for ``cpu`` or ``cuda:N``, which name one place."""
    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


def place_on_gpu(device: torch.device, key: str, *, gpus: int | None = None, folder: str | None = None) -> torch.device:
    """The GPU of this machine a new copy of model ``key`` goes on, for ``cuda`` without an index.

    Several GPUs: the one holding the fewest live copies of ``key`` (their processes still run), ties taken in
    turn, counted machine-wide in ``GPU_CLAIMS_FILE`` under an exclusive lock in the temp folder, where Beam's
    ``multi_process_shared`` coordinates the processes of a machine too. So one model per process spreads over the
    GPUs, and ``--share-model machine``'s one copy per GPU (``TokenBatchedHandler.model_copies``) gets one each.
    Processes in other pid namespaces (containers sharing the temp folder) may read as ended or as some live
    process of this one; the counts are then approximate and the turns still spread the copies. One GPU:
    ``cuda:0``, no file. ``cuda:N`` and CPU devices are returned as they are.
    """
    if device.type != "cuda" or device.index is not None:
        return device
    count = torch.cuda.device_count() if gpus is None else gpus
    if count <= 1:
        return torch.device("cuda", 0)
    try:
        gpu = _claim(os.path.join(folder or tempfile.gettempdir(), GPU_CLAIMS_FILE.format(uid=os.getuid())), key, count)
    except OSError as exc:  # an unwritable temp folder must not fail the load: spread by process id instead
        gpu = os.getpid() % count
        _LOG.warning("could not count the copies on this machine's GPUs (%s); cuda:%d by process id", exc, gpu)
    return torch.device("cuda", gpu)


def _claim(path: str, key: str, count: int) -> int:
    import fcntl

    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        try:
            with open(path, encoding="utf-8") as f:
                claims = json.load(f)
        except (FileNotFoundError, ValueError):  # none yet, or unreadable: start afresh
            claims = {}
        entry = claims.get(key) or {}
        turn = int(entry.get("turn", 0)) % count
        live = {gpu: [pid for pid in entry.get("pids", {}).get(str(gpu), []) if _alive(pid)] for gpu in range(count)}
        gpu = min(((turn + k) % count for k in range(count)), key=lambda g: len(live[g]))
        live[gpu].append(os.getpid())
        claims[key] = {"turn": (gpu + 1) % count, "pids": {str(g): pids for g, pids in live.items() if pids}}
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(claims, f)
        os.replace(path + ".tmp", path)  # whole or not at all, should this process die here
    return gpu


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class TorchModel:
    """Base of the encoder and the reranker: cheap, picklable construction; ``load()`` reads.

    Shared: ``device`` (``auto``: CUDA when present), ``precision`` (``--precision``,
    ``resolve_precision``; ``dtype``, when given, pins the weights' dtype without autocast and wins),
    ``attn_implementation``, ``token_budget``, the padded tokens of one forward pass
    (default from free GPU memory, 2048 on CPU; never below the longest input), and ``kernels``
    (``"liger"``: Liger-Kernel's fused Qwen3 kernels on CUDA, put in at load, or an error saying why they cannot
    run; ``"auto"``: the same where they can, else none; ``transforms.models.liger``).
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: torch.dtype | str | None = None,
        token_budget: int | None = None,
        attn_implementation: str | None = None,
        precision: str = "auto",
        kernels: str = "none",
    ) -> None:
        check_precision(precision)
        self.kernels = liger.check(kernels)
        self.kernels_patched = 0
        self.model_id = model
        self.device_name = device
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.precision_setting = precision
        self.token_budget_override = token_budget
        self.attn_implementation = attn_implementation
        self._model: torch.nn.Module | None = None
        self.prepacked = 0

    def _load_weights(self, auto_class: Any, path: str, longest_input: int) -> torch.nn.Module:
        """Weights onto the device, eval mode; sets ``device`` and ``token_budget``."""
        from transforms.progress import disable_library_progress_bars

        disable_library_progress_bars()  # one bar per worker process is noise in job logs
        self._resolve_compute()
        self.device = place_on_gpu(self.device, self.model_id)  # once per copy: the GPU it holds
        if self.device.type == "cuda":  # for what the load itself launches (this thread; batches: device_lock)
            torch.cuda.set_device(self.device)
        kwargs: dict[str, Any] = {"dtype": self.precision.weights}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        self._model = auto_class.from_pretrained(path, **kwargs).to(self.device).eval()
        if liger.resolve(self.kernels, self._model) == "liger":  # before any compiling: inductor traces them
            try:
                self.kernels_patched = liger.apply(self._model)
            except ImportError as exc:  # installed, but it (or the Triton it needs) does not import
                if self.kernels != "auto":
                    raise
                # auto asks for the kernels where they run: a broken install loads the model as it is, counted
                # "none" in the job's summary, rather than failing every worker of the job
                _LOG.warning("--kernels auto: liger-kernel is installed but does not import (%s: %s); %s loads "
                             "without its kernels", type(exc).__name__, exc, self.model_id)  # fmt: skip
        budget = self.token_budget_override or default_token_budget(self._model, self.device)
        self.token_budget = max(budget, longest_input)
        return self._model

    def _resolve_compute(self) -> None:
        """``device`` and ``precision`` from the settings (cheap; ``_load_weights`` calls it too)."""
        self.device = resolve_device(self.device_name)
        if self.dtype is not None:
            self.precision = Precision(self.dtype)
        else:
            self.precision = resolve_precision(self.precision_setting, self.device, cpu_mixed=self.auto_cpu_mixed())

    def _prepack(self) -> None:
        """On CPU in bf16, pack the Linear layers' weights for oneDNN once (``transforms.models.prepack``);
        called by a model's ``load`` where its forward passes run the transformers model eagerly."""
        from transforms.models import prepack

        if prepack.applies(self.device, self.precision.weights, self.precision.autocast):
            self.prepacked = prepack.prepack_linears(self.model, rows_hint=self.token_budget)

    def compute_info(self) -> dict[str, str]:
        """How this loaded model computes, for the job's counters: ``precision`` (the resolved name),
        ``layout`` (``packed`` rows or ``padded`` passes) and ``kernels`` (``liger`` where they were put in). A method, not attributes, so that it also answers
        through the proxy of a model shared across processes (Beam's ``large_model``)."""
        return {"precision": self.precision.name, "layout": "packed" if getattr(self, "packing", False) else "padded",
                "kernels": "liger" if self.kernels_patched else "none"}

    def describe_compute(self) -> str:
        """The precision, and the prepacked layers if any, for the worker's load log line."""
        text = self.precision.describe()
        if self.kernels_patched:
            text += f", Liger kernels in {self.kernels_patched} modules"
        return f"{text}, {self.prepacked} linear layers prepacked for oneDNN" if self.prepacked else text

    def auto_cpu_mixed(self) -> bool:
        """Whether ``--precision auto`` may run this model bf16-mixed on a CPU with bf16 in hardware:
        only where its parity with fp32 was measured (the encoder), so not by default."""
        return False

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The precision's autocast around a forward pass (``Precision.context``)."""
        return self.precision.context(self.device)

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            raise RuntimeError(f"{type(self).__name__}.load() must be called first")
        return self._model


# What torch's CPU allocator raises (a RuntimeError) when an allocation is refused
_CPU_ALLOCATOR_FAILURE = "DefaultCPUAllocator: can't allocate memory"


def is_oom(exc: BaseException) -> bool:
    """An allocation failure that a smaller batch may avoid: CUDA's out of memory, torch's CPU allocator
    refusing a tensor, or Python's ``MemoryError`` (numpy's padding). (A process the kernel's OOM killer
    ends raises nothing: the runner sees a lost worker.)"""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or _CPU_ALLOCATOR_FAILURE in text)


def run_splitting_on_oom(
    fn: Callable[[Sequence[T]], list[R]],
    items: Sequence[T],
) -> tuple[list[R | None], list[tuple[int, str]]]:
    """Run ``fn`` over ``items``; on out-of-memory split the batch in halves and retry.

    Returns one result per item (``None`` for items that failed) and the failures as
    ``(index, reason)``. A single item that still runs out of memory is reported, not
    raised: the caller sends it to the dead-letter output and the job goes on.
    Errors other than out-of-memory propagate unchanged.
    """
    results: list[R | None] = [None] * len(items)
    failures: list[tuple[int, str]] = []
    stack: list[tuple[int, int]] = [(0, len(items))]
    while stack:
        lo, hi = stack.pop()
        if lo >= hi:
            continue
        try:
            out = fn(items[lo:hi])
        except Exception as exc:  # noqa: BLE001 - filtered by is_oom below
            if not is_oom(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if hi - lo == 1:
                failures.append((lo, f"out of memory on a single element: {exc}".splitlines()[0]))
                continue
            mid = (lo + hi) // 2
            _LOG.warning("out of memory on a batch of %d; retrying as %d + %d", hi - lo, mid - lo, hi - mid)
            stack.append((mid, hi))
            stack.append((lo, mid))
            continue
        results[lo:hi] = out
    return results, sorted(failures)


def budget_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indexes sorted by length, cut into batches whose padded size (longest × count) fits the budget.

    Sorting first keeps similar lengths together, so padding is small; an element longer
    than the budget still gets a batch of its own.
    """
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batch and lengths[i] * (len(batch) + 1) > token_budget:  # ascending: i is the longest
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches


# A CPU encoder cuts a batch into a multiple of this many forward passes (``even_passes``): passes run one
# per core, so 1, 2 or 4 workers all finish a batch together.
CPU_PASS_MULTIPLE = 4


def even_passes(lengths: Sequence[int], token_budget: int, multiple: int) -> list[list[int]]:
    """``budget_batches``, then, when its pass count is not a multiple of ``multiple``, the same
    sorted indexes cut into the next multiple of passes of even token weight (an element goes to the
    pass where its middle falls: the rule of ``inference.batching.cut_group``, which cuts Beam batches
    under a summed-weight limit; here the limit is padded tokens, checked after the cut), each still
    within ``token_budget``.

    Why: a CPU encoder runs a batch's passes one per core, and 13 full passes on 2 cores take 7
    rounds, the last with one core idle; 16 passes of 13/16 the size take 6.5 rounds' work in 8
    even rounds (BENCHMARKS.md, "Forward passes in multiples of four"). The cut depends on
    the lengths, the budget and ``multiple`` only, never on the number of workers, so the
    vectors are bitwise the same with 1, 2 or 4 workers. A batch too light to give every pass at
    least an eighth of the budget, or one whose even cut would overflow a pass, keeps its
    greedy passes.
    """
    greedy = budget_batches(lengths, token_budget)
    want = -(-len(greedy) // multiple) * multiple
    total = sum(lengths)
    if want == len(greedy) or want > len(lengths) or total < want * (token_budget // 8):
        return greedy
    order = [i for batch in greedy for i in batch]  # sorted by length
    target = total / want
    passes: list[list[int]] = [[] for _ in range(want)]
    done = 0
    for i in order:
        passes[min(want - 1, int((done + lengths[i] / 2) // target))].append(i)
        done += lengths[i]
    passes = [p for p in passes if p]
    if any(lengths[p[-1]] * len(p) > token_budget for p in passes):  # each pass is sorted: p[-1] is its longest
        return greedy
    return passes


def run_in_token_budget(
    items: Sequence[T],
    token_budget: int,
    forward: Callable[[list[T]], list[R]],
    size: Callable[[T], int] = len,
) -> tuple[list[R | None], list[tuple[int, str]]]:
    """``forward`` over length-sorted, budget-sized batches of ``items``, results back in input order.

    ``size(item)`` is an item's length in tokens (default ``len``: items are token id lists).
    Out-of-memory batches are split and retried (``run_splitting_on_oom``); elements that fail
    alone come back as ``None`` with ``(index, reason)`` in the failures.
    """
    out: list[R | None] = [None] * len(items)
    failures: list[tuple[int, str]] = []
    for batch in budget_batches([size(x) for x in items], token_budget):
        results, fails = run_splitting_on_oom(lambda b: forward([items[i] for i in b]), batch)
        for i, r in zip(batch, results):
            out[i] = r
        failures.extend((batch[j], reason) for j, reason in fails)
    return out, sorted(failures)

"""The base of the two model handlers: load once per worker process, batch by tokens."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from transforms.models.devices import TokenBudgets, TorchModel, gpus_for, set_cpu_threads

_LOG = logging.getLogger(__name__)

# Set by tests: each load_model appends "<pid> <torch threads> <model id>" to this file, so a test can
# check that a worker process loads a model once, whatever the number of bundles, and its threads.
LOAD_LOG_ENV = "CORPUS_ETL_LOAD_LOG"
NAMESPACE = "corpus_etl"
# Counters "<stage>_tokens_in_<precision>": tokens each worker ran in the precision it resolved
# (--precision auto differs by worker hardware); read back by ``tokens_by_precision``.
PRECISION_COUNTER = "{stage}_tokens_in_{precision}"
# Counters "<stage>_tokens_packed" / "<stage>_tokens_padded": how an encoder's forward passes ran them
# (--packing auto differs by worker device); read back by ``tokens_by_layout``.
LAYOUT_COUNTER = "{stage}_tokens_{layout}"
LAYOUTS = ("packed", "padded")
# Counter "<stage>_tokens_liger": tokens run with Liger's kernels (--kernels auto differs by worker device and by
# whether liger-kernel is installed there); read back by ``tokens_by_kernels``.
LIGER_COUNTER = "{stage}_tokens_liger"


def count_compute(stage: str, info: dict[str, str], tokens: int, *, layout: bool = True) -> None:
    """Count ``tokens`` under the precision (and, with ``layout``, the packed or padded passes) that the
    model resolved on this worker: ``info`` is its ``TorchModel.compute_info()``."""
    precision = PRECISION_COUNTER.format(stage=stage, precision=info["precision"].replace("-", "_"))
    Metrics.counter(NAMESPACE, precision).inc(tokens)
    if layout:
        Metrics.counter(NAMESPACE, LAYOUT_COUNTER.format(stage=stage, layout=info["layout"])).inc(tokens)
    if info.get("kernels") == "liger":
        Metrics.counter(NAMESPACE, LIGER_COUNTER.format(stage=stage)).inc(tokens)


def tokens_by_layout(counters: dict[str, int] | None, stage: str) -> dict[str, int] | None:
    """From a job's counters: tokens run in packed rows and in padded passes at ``stage`` (None without counters)."""
    if counters is None:
        return None
    names = {layout: LAYOUT_COUNTER.format(stage=stage, layout=layout) for layout in LAYOUTS}
    return {layout: counters[name] for layout, name in names.items() if counters.get(name)}


def tokens_by_kernels(counters: dict[str, int] | None, stage: str) -> dict[str, int] | None:
    """From a job's counters: tokens run with Liger's kernels (``liger``) and without (``none``) at ``stage``."""
    by_precision = tokens_by_precision(counters, stage)
    if counters is None or by_precision is None:
        return None
    liger = counters.get(LIGER_COUNTER.format(stage=stage), 0)
    return {name: n for name, n in (("liger", liger), ("none", sum(by_precision.values()) - liger)) if n}


def tokens_by_precision(counters: dict[str, int] | None, stage: str) -> dict[str, int] | None:
    """From a job's counters: tokens per resolved precision at ``stage`` (None without counters)."""
    if counters is None:
        return None
    prefix = PRECISION_COUNTER.format(stage=stage, precision="")
    return {k.removeprefix(prefix).replace("_", "-"): v for k, v in sorted(counters.items()) if k.startswith(prefix) and v}


class TokenBatchedHandler(ModelHandler):
    """``RunInference`` handler of a ``TorchModel``.

    * The model is built from picklable arguments and loaded in ``load_model``, which Beam
      calls once per worker process: ``RunInference`` keeps the result in a ``Shared`` handle
      used by the process's threads and bundles.
    * Beam batches weigh at most ``budgets.batch`` tokens by ``element_weight``.
      ``RunInferenceByTokens`` composes them (the same on every run); a plain
      ``RunInference(handler)`` batches by the same weights. The model cuts each batch again
      into forward passes of its ``token_budget`` (``budgets.forward``).
    """

    def __init__(
        self,
        model_class: type[TorchModel],
        model_args: dict[str, Any],
        *,
        budgets: TokenBudgets,
        element_weight: Callable[[Any], int],
        progress_interval_s: float = 30.0,
        large_model: bool = False,
        cpu_threads: int | None = None,
    ) -> None:
        # Beam 2.77's BatchElements takes no ``max_batch_weight`` (ModelHandler forwards it and
        # RunInference fails); with ``element_size_fn`` its batch sizes are summed weights, so
        # max_batch_size is the token target.
        super().__init__(
            min_batch_size=1, max_batch_size=budgets.batch, element_size_fn=element_weight, large_model=large_model
        )
        self.budgets = budgets
        self.element_weight = element_weight
        self._model_class = model_class
        self._model_args = {**model_args, "token_budget": budgets.forward}
        self._progress_interval_s = progress_interval_s
        self.cpu_threads = cpu_threads

    @property
    def max_batch_weight(self) -> int:
        return self.budgets.batch

    def model_copies(self) -> int:
        """Copies per worker machine when the model is shared across its processes (``large_model``): one per
        GPU of the machine where the model may go on any (``--device auto|cuda``; each copy takes its own,
        ``devices.place_on_gpu``), else one. Beam asks on the worker as the model loads, and sends each batch
        to the copies in turn. Not shared: one per process, Beam's default."""
        if not self.share_model_across_processes():
            return 1
        return max(1, gpus_for(self._model_args.get("device", "auto")))

    def load_model(self) -> Any:
        if self.cpu_threads:
            # Process-wide, before the model loads: the encoder's --cpu-workers default reads it (cpu_threads).
            set_cpu_threads(self.cpu_threads)
        threads = torch.get_num_threads()  # before the load: a CPU encoder with --cpu-workers sets 1 for its passes
        model = self._model_class(**self._model_args).load()
        _LOG.info(
            "loaded %s %s on %s (%s) in process %d (%d tokens per forward pass)",
            self._model_class.__name__, model.model_id, model.device, model.describe_compute(), os.getpid(),
            model.token_budget,
        )
        if os.environ.get(LOAD_LOG_ENV):
            with open(os.environ[LOAD_LOG_ENV], "a", encoding="utf-8") as f:
                f.write(f"{os.getpid()} {threads} {model.model_id}\n")
        return model

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

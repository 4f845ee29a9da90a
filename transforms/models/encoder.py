"""Text embedding: a model-agnostic torch encoder (no Beam here: ``transforms.inference.embed``).

The encoder reproduces what sentence-transformers does with a repository (pooling,
normalisation, prompts and maximum length all read from the repository's own files),
so Qwen3-Embedding gets last-token pooling with left padding and its query prompt,
and MiniLM gets mean pooling, without a line of model-specific code.

Why not call ``SentenceTransformer.encode``: it batches by element count, so one long
text pads a whole batch. Here texts are tokenised once, sorted by length, and cut into
forward passes by a padded-token budget (``max_len * n <= budget``); every vector is
independent of its batch neighbours (masked pooling, per-row positions), which the
parity tests check against single-text encoding.

``packing`` (``--packing``; ``None``, auto: on for CUDA with bf16/fp16 weights, ``resolve_packing``) runs a
forward pass as one row of concatenated texts with positions restarting at 0 for each, no attention
mask and no cache. No pad token is computed. The texts are kept apart by the attention:
``varlen`` by default (``transforms.models.varlen``: PyTorch's FlashAttention-2 variable-length kernel,
told the boundaries; on an H100, 1.23-1.56x the padded path eager and 1.44x compiled, BENCHMARKS.md),
or transformers' own routes that read the boundaries from the positions (``flex_attention``: a
sparse block mask, 0.47x the padded path on an H200; ``sdpa``: a dense mask, quadratic in the row,
only fit for tests). Models that ignore the positions would mix texts silently under those, so
``load()`` checks packed against padded vectors and refuses the setting when they differ.

``backend`` (``--backend``) picks how a padded batch runs: ``eager`` (transformers as loaded),
``compile`` (``torch.compile`` over bucketed lengths; CUDA graphs only with ``cuda_graphs=True``; with packing one
graph whose row length is dynamic) or ``onnx`` (ONNX Runtime); see ``transforms.models.fast``. ``overlap=True`` (the default on CUDA) prepares the
next batch (padding, pinned host memory, the non-blocking copy to the device) in a second
thread while the current one runs. ``kernels="liger"`` (``--kernels``; CUDA, Qwen3) puts Liger-Kernel's
fused RMSNorm, rotary and SwiGLU kernels into the loaded model; ``"auto"`` does where they can run
(``transforms.models.liger``); the default here is ``"none"``, the jobs' flag defaults to ``auto``.

On CPU, ``cpu_workers`` forward passes run at once (``0``: the process's torch threads as ``--cpu-threads``
last set them, or else as found before an encoder set them to 1, ``devices.cpu_threads``; the index job's
default; ``None``: 1, one pass at a time over all threads, for the processes that also run other torch
models, e.g. the label job's reranker), each on one thread: a pass of a small encoder is a few hundred ms
of GEMMs whose OpenMP threads meet at a barrier after every op, and on a busy machine one descheduled
thread stalls the others (150 long documents: 5.5-11 s against 8-25 s, CPU time 10.5-11.6 s against
13-23 s, bitwise the same vectors). The encoder then sets torch's intra-op threads to 1 for the process,
once, at load: switching them back and forth around each batch cost ~0.8 s a call in the job (oneDNN
re-creates its kernels). On CPU a batch is cut into a multiple of four passes of even weight
(``devices.even_passes``), so that 1, 2 or 4 workers end a batch together; the cut does not depend on
``cpu_workers``, nor do the vectors.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from transforms.models import liger, varlen
from transforms.models.devices import (
    CPU_PASS_MULTIPLE,
    TorchModel,
    check_precision,
    cpu_threads,
    device_lock,
    even_passes,
    is_oom,
    run_splitting_on_oom,
)
from transforms.models.fast import BACKENDS, CompiledRunner, OnnxRunner, PackedCompiledRunner, bucket_of, length_buckets
from transforms.models.settings import EmbeddingSpec, final_token_to_append, load_tokenizer
from transforms.text.tokens import tokenize_ids

_LOG = logging.getLogger(__name__)

QWEN3_INSTRUCTION_FORMAT = "Instruct: {task}\nQuery:"


class TextEncoder(TorchModel):
    """Encodes texts to L2-normalised float32 vectors, optionally truncated to ``dim`` (Matryoshka).

    ``precision`` (``--precision``): ``auto`` runs bf16-mixed on CPUs that multiply bf16 in
    hardware (fp32 weights, matrix products in bf16 under autocast; MiniLM on long documents:
    1.75x the fp32 forward pass, vectors within 3.4e-5 cosine of fp32's), fp32 on other CPUs and
    bf16 weights on GPUs (``transforms.models.devices.resolve_precision``). Computing in bf16 on a CPU
    with ``backend="eager"``, the Linear weights are prepacked for oneDNN at load
    (``transforms.models.prepack``; ``prepacked`` counts them).

    Construction is cheap and picklable; ``load()`` reads the tokenizer and weights. ``model``
    is the job's ``EmbeddingSpec`` (settings read once, in the driver), or an id or directory,
    read at load time with ``dim`` and ``max_length``. Documents get the repository's document
    prompt (none for Qwen3-Embedding); queries get its query prompt, or
    ``Instruct: {query_instruction}\\nQuery:`` when an instruction is given (``""``: no prompt).
    """

    def __init__(
        self,
        model: EmbeddingSpec | str,
        *,
        device: str = "auto",
        dtype: torch.dtype | str | None = None,
        dim: int | None = None,
        max_length: int | None = None,
        query_instruction: str | None = None,
        token_budget: int | None = None,
        packing: bool | None = None,
        attn_implementation: str | None = None,
        backend: str = "eager",
        overlap: bool | None = None,
        cpu_workers: int | None = None,
        cuda_graphs: bool = False,
        precision: str = "auto",
        kernels: str = "none",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        kernels = liger.check(kernels, backend)  # auto with onnx: none (the exported graph runs, not the patch)
        if packing:
            # Padding-free rows need attention that keeps texts apart: varlen by default (transforms.models.varlen)
            attn_implementation = attn_implementation or varlen.NAME
            _check_packing_backend(backend, attn_implementation)
        check_precision(precision, backend=backend)
        self.spec = model if isinstance(model, EmbeddingSpec) else None
        super().__init__(
            self.spec.model if self.spec else model,
            device=device,
            dtype=dtype,
            token_budget=token_budget,
            attn_implementation=attn_implementation,
            precision=precision,
            kernels=kernels,
        )
        self._spec_args = {"dim": dim, "max_length": max_length}
        self.query_instruction = query_instruction
        self.append_id: int | None = None  # settled at load() (final_token_to_append)
        self.packing_setting = packing
        self.packing = bool(packing)  # settled at load() when None (auto)
        self.backend = backend
        self.overlap_setting = overlap
        if cpu_workers is not None and cpu_workers < 0:
            raise ValueError(f"--cpu-workers must be >= 0 (0: torch's thread count), got {cpu_workers}")
        self.cpu_workers_setting = cpu_workers
        self.cuda_graphs = cuda_graphs
        self._runner: CompiledRunner | OnnxRunner | None = None

    # -- loading -------------------------------------------------------------------------
    def auto_cpu_mixed(self) -> bool:
        # Parity with fp32 within 1e-4 cosine (tests/test_precision.py); the ONNX graph runs its own dtype.
        return self.backend != "onnx"

    def load(self) -> TextEncoder:
        from transformers import AutoModel

        spec = self.spec or EmbeddingSpec.read(self.model_id, **self._spec_args)
        self.spec = spec
        self.settings = spec.settings
        self.max_length = spec.max_length
        self.dim = spec.dim
        self.dimension = spec.size
        # Last-token pooling reads position -1, which left padding makes every row's last token.
        kwargs = {"padding_side": "left"} if spec.settings.pooling == "lasttoken" else {}
        self.tokenizer = load_tokenizer(spec.path, **kwargs)
        self._resolve_compute()
        self.packing = resolve_packing(
            self.packing_setting, self.device, self.precision.weights, self.backend, self.attn_implementation
        )
        if self.packing and self.packing_setting is None:
            self.attn_implementation = varlen.NAME
        if self.attn_implementation == varlen.NAME:
            varlen.register()
        self._load_weights(AutoModel, spec.path, spec.max_length)
        self.append_id = final_token_to_append(self.tokenizer, self.model.config, spec.settings.pooling)
        if getattr(self.model.config, "use_cache", False):
            # Decoder configs (Qwen3) turn the KV cache on, and an encoder never reads it back: on the
            # H200 the 0.6B held ~30 GB of keys and values per 262k-token pass (BENCHMARKS.md, GPU).
            # The config is what every path reads (eager, compiled, the ONNX export).
            self.model.config.use_cache = False
        self.overlap = self.device.type == "cuda" if self.overlap_setting is None else self.overlap_setting
        cpu = self.device.type == "cpu"
        setting = self.cpu_workers_setting
        self.cpu_workers = (cpu_threads() if setting == 0 else setting or 1) if cpu else 1
        self._pool = None
        if self.cpu_workers > 1 and self.backend == "eager" and not self.packing:
            from concurrent.futures import ThreadPoolExecutor

            torch.set_num_threads(1)  # for the process, once (see the module docstring)
            self._pool = ThreadPoolExecutor(self.cpu_workers, thread_name_prefix="encoder")
        self.buckets: list[int] | None = None
        pad_id = self.tokenizer.pad_token_id or 0
        if self.backend == "eager":
            # compile and onnx trace the transformers model as loaded (inductor's freezing packs by itself)
            self._prepack()
        self._packed_runner: PackedCompiledRunner | None = None
        if self.backend == "compile" and self.packing:
            # One row of texts: no length buckets to pad to; the row length is a dynamic dimension.
            self._packed_runner = PackedCompiledRunner(self.model, max_length=self.max_length)
        elif self.backend == "compile":
            self.buckets = length_buckets(self.max_length)
            # CUDA graphs need static shapes, so every pass of a bucket is padded to token_budget // bucket
            # rows: 53% padding at the H200's 262k-token passes, where launch overhead is negligible
            # anyway (BENCHMARKS.md, GPU). Off unless asked for; passes then keep a dynamic row count.
            graphs = self.cuda_graphs and self.device.type == "cuda"
            self._runner = CompiledRunner(
                self.model, buckets=self.buckets, token_budget=self.token_budget, static_rows=graphs,
                mode="reduce-overhead" if graphs else None, pad_id=pad_id,
            )  # fmt: skip
        elif self.backend == "onnx":
            self._runner = OnnxRunner(
                self.model, model_path=spec.path, revision=spec.revision, device=self.device, pad_id=pad_id,
                padding_side=self.tokenizer.padding_side,
            )  # fmt: skip
            self._check_backend()
        if self.packing:
            self._check_packing()
        return self

    def _check_backend(self) -> None:
        """The fast path's vectors of a few texts must match eager's, or the backend is refused."""
        texts = ["a b c", "The capital of France is Paris; its river is the Seine.", "x " * 40]
        ids = self.tokenize(texts)
        runner, self._runner = self._runner, None
        eager = np.stack(self._forward(ids))
        self._runner = runner
        fast = np.stack(self._forward(ids))
        cosine = float((eager * fast).sum(axis=1).min())
        if not cosine >= 1 - 1e-4:
            raise ValueError(f"{self.model_id}: --backend {self.backend} gives other vectors than eager "
                             f"(cosine {cosine:.5f}); run with --backend eager")  # fmt: skip

    def _check_packing(self) -> None:
        """Packed and padded vectors of a few texts must agree, or packing is refused."""
        texts = ["a b c", "The capital of France is Paris; its river is the Seine.", "x"]
        ids = self.tokenize(texts)
        attn = self.model.config._attn_implementation
        if attn == varlen.NAME:  # varlen runs packed rows only: the padded reference runs sdpa
            self.model.set_attn_implementation("sdpa")
        try:
            padded = np.stack(self._forward(ids))
        finally:
            if attn == varlen.NAME:
                self.model.set_attn_implementation(attn)
        packed = np.stack(self._forward_packed(ids))
        cosine = float((padded * packed).sum(axis=1).min())
        floor = 0.999 if self.model.dtype == torch.float32 else 0.99
        if not cosine >= floor:
            attn = getattr(self.model.config, "_attn_implementation", "?")
            raise ValueError(
                f"{self.model_id}: packing is not supported with attention {attn!r} (packed vs padded cosine "
                f"{cosine:.3f} < {floor}: the texts of a packed row attend to each other); run without packing"
            )

    def describe_compute(self) -> str:
        text = super().describe_compute()
        if self.packing:
            text += f", packed rows ({self.model.config._attn_implementation} attention)"
        return text + (f", --backend {self.backend}" if self.backend != "eager" else "")

    # -- text preparation ------------------------------------------------------------------
    def prompt(self, is_query: bool) -> str:
        if not is_query:
            return self.settings.document_prompt
        if self.query_instruction is None:
            return self.settings.query_prompt
        # "" asks for no prompt at all (as sentence-transformers' prompt=""), not the model's default
        return QWEN3_INSTRUCTION_FORMAT.format(task=self.query_instruction) if self.query_instruction else ""

    def tokenize(self, texts: Sequence[str], *, is_query: bool = False) -> list[list[int]]:
        """Token ids of ``texts`` with the prompt, truncated to ``max_length`` (``tokenize_ids``)."""
        prompt = self.prompt(is_query)
        append = self.append_id
        ids = tokenize_ids(
            self.tokenizer, [prompt + t for t in texts], truncation=True,
            max_length=self.max_length - (append is not None), padding=False, return_attention_mask=False,
        )  # fmt: skip
        if append is not None:  # the final token the tokenizer does not add (final_token_to_append)
            ids = [x + [append] for x in ids]
        return ids

    def count_tokens(self, texts: Sequence[str], *, is_query: bool = False) -> list[int]:
        return [len(ids) for ids in self.tokenize(texts, is_query=is_query)]

    # -- inference -----------------------------------------------------------------------
    def encode(self, texts: Sequence[str], *, is_query: bool = False) -> np.ndarray:
        """Vectors for ``texts`` in order; raises on a text that cannot be encoded even alone."""
        vectors, failures = self.encode_ids(self.tokenize(texts, is_query=is_query))
        if failures:
            raise RuntimeError(f"could not encode {len(failures)} texts: {failures[0][1]}")
        return np.stack(vectors) if vectors else np.zeros((0, self.dimension), np.float32)

    def encode_ids(self, ids: Sequence[list[int]]) -> tuple[list[np.ndarray | None], list[tuple[int, str]]]:
        """Vectors for pre-tokenised inputs; failures (out of memory alone) are returned, not raised.

        Batches are length-sorted and cut by the padded-token budget (with ``compile``, lengths
        count as their bucket's). With ``overlap``, the next batch is padded, pinned and copied
        in a second thread while the current one runs.
        """
        return self._encode([len(x) for x in ids], lambda batch: [ids[i] for i in batch])

    def encode_texts(
        self, texts: Sequence[str], lengths: Sequence[int], *, is_query: bool = False
    ) -> tuple[list[np.ndarray | None], list[tuple[int, str]]]:
        """``encode_ids`` for texts whose token counts are known (a chunk's ``n_tokens``): batches are
        cut by ``lengths`` and each is tokenised only when it is prepared, so with ``overlap`` the
        tokenisation of the next batch runs while the current one is on the device."""
        return self._encode(list(lengths), lambda batch: self.tokenize([texts[i] for i in batch], is_query=is_query))

    def embed_batch(
        self, texts: Sequence[str], lengths: Sequence[int] | None = None, *, is_query: bool = False
    ) -> tuple[list[np.ndarray | None], list[tuple[int, str]], int]:
        """One Beam batch: ``(vectors, failures, tokens)``, the handler's single call per batch.

        With ``lengths`` (a chunk's ``n_tokens``) and ``overlap``, ``encode_texts``: each pass is tokenised
        while the previous one runs; otherwise the texts are tokenised first (``encode_ids``). On CUDA one
        batch runs at a time per device: passes are sized from free memory for one at a time, and a model
        shared across processes (Beam's ``large_model``) serves its callers from several threads.
        """
        with device_lock(self.device):
            if lengths is not None and self.overlap and not is_query:
                # The tokens counted as each pass is tokenised (once per pass, OOM retries included): the model's
                # own, as on the other path, not the chunker's ``lengths`` that cut the passes.
                counted: list[int] = []

                def fetch(batch: list[int]) -> list[list[int]]:
                    ids = self.tokenize([texts[i] for i in batch], is_query=is_query)
                    counted.append(sum(len(x) for x in ids))
                    return ids

                vectors, failures = self._encode(list(lengths), fetch)
                return vectors, failures, sum(counted)
            ids = self.tokenize(texts, is_query=is_query)
            vectors, failures = self.encode_ids(ids)
            return vectors, failures, sum(len(x) for x in ids)

    def _encode(
        self, lengths: list[int], fetch: Any
    ) -> tuple[list[np.ndarray | None], list[tuple[int, str]]]:
        forward = self._forward_packed if self.packing else self._forward
        prepare_tensors = self._prepare_packed if self.packing else self._prepare
        forward_prepared = self._forward_packed_prepared if self.packing else self._forward_prepared
        if self.buckets:
            lengths = [bucket_of(n, self.buckets) for n in lengths]
        # On CPU, passes in multiples of CPU_PASS_MULTIPLE, whatever cpu_workers is (even_passes says why).
        multiple = CPU_PASS_MULTIPLE if self.device.type == "cpu" and not self.packing else 1
        batches = even_passes(lengths, self.token_budget, multiple)
        out: list[np.ndarray | None] = [None] * len(lengths)
        failures: list[tuple[int, str]] = []

        def run(batch: list[int], prepared: Any = None) -> None:
            batch_ids = fetch(batch) if prepared is None else prepared[0]

            def call(sub: Sequence[int]) -> list[np.ndarray]:
                if prepared is not None and len(sub) == len(batch):
                    return forward_prepared(*prepared[1])
                where = {i: k for k, i in enumerate(batch)}
                return forward([batch_ids[where[i]] for i in sub])

            results, fails = run_splitting_on_oom(call, batch)
            for i, r in zip(batch, results):
                out[i] = r
            failures.extend((batch[j], reason) for j, reason in fails)

        def prepare(batch: list[int]) -> tuple[list[list[int]], tuple[Any, ...]]:
            batch_ids = fetch(batch)
            return batch_ids, prepare_tensors(batch_ids)

        if self._pool is not None and len(batches) > 1:
            with _POOL_LOCK:  # one encode at a time on the workers: the cores are theirs
                for _ in self._pool.map(run, batches):
                    pass
        elif self.overlap and len(batches) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(1, thread_name_prefix="encoder-prep") as prep:
                pending = prep.submit(prepare, batches[0])
                for k, batch in enumerate(batches):
                    try:
                        prepared = pending.result()
                    except Exception as exc:  # noqa: BLE001 - filtered by is_oom
                        if not is_oom(exc):
                            raise
                        # Out of memory pinning or copying this pass ahead: run it as a serial pass does, its
                        # tensors made when it runs and split in halves on out-of-memory, not the Beam batch failed.
                        _LOG.warning("out of memory preparing a pass of %d texts ahead; running it unprepared",
                                     len(batch))  # fmt: skip
                        prepared = None
                    if k + 1 < len(batches):
                        pending = prep.submit(prepare, batches[k + 1])
                    run(batch, prepared)
        else:
            for batch in batches:
                run(batch)
        return out, sorted(failures)

    def _prepare(self, ids: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``input_ids`` and mask on the device (to the batch's bucket with ``compile``).

        On CUDA the host tensors are pinned and copied without blocking, so this can run in a
        second thread while the device computes the previous batch.
        """
        longest = max(len(x) for x in ids)
        target = bucket_of(longest, self.buckets) if self.buckets else longest
        padded = self.tokenizer.pad(
            {"input_ids": list(ids)}, padding="max_length", max_length=target, return_tensors="pt"
        )
        input_ids, mask = padded["input_ids"], padded["attention_mask"]
        if self.device.type == "cuda":
            input_ids, mask = input_ids.pin_memory(), mask.pin_memory()
            return input_ids.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)
        return input_ids, mask

    @torch.inference_mode()
    def _forward(self, ids: Sequence[list[int]]) -> list[np.ndarray]:
        return self._forward_prepared(*self._prepare(ids))

    @torch.inference_mode()
    def _forward_prepared(self, input_ids: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
        with self.autocast():
            if self._runner is not None:
                hidden = self._runner(input_ids, mask)
            else:
                hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return self._finish(pool(hidden, mask, self.settings.pooling))

    def _prepare_packed(self, ids: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """One row of concatenated texts, positions restarting per text, and the boundaries (``cu_seq_lens``)
        on the device, plus the longest text; pinned and copied without blocking on CUDA, as ``_prepare``."""
        lengths = [len(seq) for seq in ids]
        # np.fromiter over the chained lists, not torch.tensor of a flattened Python list: the list costs this
        # thread several times longer under the GIL, while the other thread launches the running pass's kernels
        total = sum(lengths)
        flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total))[None]
        cu = varlen.boundaries(lengths)
        starts = torch.repeat_interleave(cu[:-1].long(), torch.tensor(lengths))
        positions = (torch.arange(flat.shape[1]) - starts)[None]
        tensors = (flat, positions, cu)
        if self.device.type == "cuda":
            tensors = tuple(t.pin_memory().to(self.device, non_blocking=True) for t in tensors)
        return (*tensors, max(lengths))

    @torch.inference_mode()
    def _forward_packed(self, ids: Sequence[list[int]]) -> list[np.ndarray]:
        return self._forward_packed_prepared(*self._prepare_packed(ids))

    @torch.inference_mode()
    def _forward_packed_prepared(
        self, flat: torch.Tensor, positions: torch.Tensor, cu: torch.Tensor, longest: int
    ) -> list[np.ndarray]:
        """One packed row through the model: no mask, no cache; with ``varlen`` the boundaries go to the
        attention as transformers' flash kwargs, otherwise transformers reads them from the positions."""
        with self.autocast():
            if self._packed_runner is not None:
                hidden = self._packed_runner(flat, positions, cu, longest)
            else:
                # use_cache=False matters: transformers reads packed boundaries from the positions only
                # when there is no mask and no cache; Qwen3's config enables the cache, and with it the
                # texts of a row silently attend to each other (cosine ~0.1-0.3 to the padded vectors).
                kwargs = varlen.forward_kwargs(cu, longest) if self.model.config._attn_implementation == varlen.NAME else {}
                hidden = self.model(input_ids=flat, position_ids=positions, use_cache=False, **kwargs)
                hidden = hidden.last_hidden_state[0]
        return self._finish(pool_packed(hidden, (cu[1:] - cu[:-1]).long(), self.settings.pooling))

    def _finish(self, pooled: torch.Tensor) -> list[np.ndarray]:
        pooled = pooled.float()
        if self.dim is not None:
            pooled = pooled[:, : self.dim]
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return list(pooled.cpu().numpy())


def resolve_packing(
    setting: bool | None, device: torch.device, weights: torch.dtype, backend: str, attn_implementation: str | None
) -> bool:
    """Whether forward passes run packed rows. ``None`` (``--packing auto``): where varlen's kernel runs, i.e.
    on CUDA with bf16/fp16 weights, eager or compiled, attention unset or varlen, transformers >= 4.53. On an H100 that was
    1.23-1.56x the padded path eager and 1.44x compiled (BENCHMARKS.md, GPU). Padded elsewhere: on
    CPU varlen falls back to a dense mask, and the encoder's workers run padded passes."""
    if setting is not None:
        return setting
    return (
        device.type == "cuda"
        and weights in (torch.bfloat16, torch.float16)
        and backend in ("eager", "compile")
        and attn_implementation in (None, varlen.NAME)
        and varlen.available()
    )


def _check_packing_backend(backend: str, attn_implementation: str | None) -> None:
    if backend == "onnx" or (backend == "compile" and attn_implementation != varlen.NAME):
        raise ValueError(
            f"packing runs with --backend eager, or compile with attn_implementation={varlen.NAME!r}; "
            f"got backend {backend!r} with {attn_implementation!r}"
        )


_POOL_LOCK = threading.Lock()


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states to one vector per row; padding never contributes."""
    if mode == "lasttoken":
        # Index of the last real token, for either padding side.
        last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "cls":
        first = mask.argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(1).values
    raise ValueError(f"unknown pooling mode {mode!r}")


def pool_packed(hidden: torch.Tensor, lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """``pool`` for one packed row: ``hidden`` is (sum(lengths), H), texts back to back."""
    ends = lengths.cumsum(0)
    if mode == "lasttoken":
        return hidden[ends - 1]
    if mode == "cls":
        return hidden[ends - lengths]
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
    out = hidden.new_zeros((len(lengths), hidden.shape[1]))
    if mode == "mean":
        return out.index_add_(0, segment, hidden) / lengths.unsqueeze(1).to(hidden.dtype)
    if mode == "max":
        index = segment.unsqueeze(1).expand_as(hidden)
        return out.scatter_reduce_(0, index, hidden, reduce="amax", include_self=False)
    raise ValueError(f"unknown pooling mode {mode!r}")

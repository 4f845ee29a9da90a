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

``packing=True`` (opt-in, not measured on a GPU yet) runs a forward pass as one row of
concatenated texts with positions restarting at 0 for each, no attention mask and no cache:
transformers then reads the boundaries from the positions and keeps texts apart
(block-diagonal attention: a sparse block mask with ``attn_implementation="flex_attention"``,
the GPU route, whose parity is tested on CPU through inductor; a dense mask with sdpa, which is
quadratic in the row and only fit for tests). No pad token
is computed. Models that ignore the positions would mix texts silently, so ``load()``
checks packed against padded vectors and refuses the setting when they differ.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from transforms.models.devices import TorchModel, run_in_token_budget
from transforms.models.settings import EmbeddingSpec, load_tokenizer

_LOG = logging.getLogger(__name__)

QWEN3_INSTRUCTION_FORMAT = "Instruct: {task}\nQuery:"


class TextEncoder(TorchModel):
    """Encodes texts to L2-normalised float32 vectors, optionally truncated to ``dim`` (Matryoshka).

    Construction is cheap and picklable; ``load()`` reads the tokenizer and weights. ``model``
    is the job's ``EmbeddingSpec`` (settings read once, in the driver), or an id or directory,
    read at load time with ``dim`` and ``max_length``. Documents get the repository's document
    prompt (none for Qwen3-Embedding); queries get its query prompt, or
    ``Instruct: {query_instruction}\\nQuery:`` when an instruction is given.
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
        packing: bool = False,
        attn_implementation: str | None = None,
    ) -> None:
        self.spec = model if isinstance(model, EmbeddingSpec) else None
        super().__init__(
            self.spec.model if self.spec else model,
            device=device,
            dtype=dtype,
            token_budget=token_budget,
            attn_implementation=attn_implementation,
        )
        self._spec_args = {"dim": dim, "max_length": max_length}
        self.query_instruction = query_instruction
        self.packing = packing

    # -- loading -------------------------------------------------------------------------
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
        self._load_weights(AutoModel, spec.path, spec.max_length)
        if self.packing:
            self._check_packing()
        return self

    def _check_packing(self) -> None:
        """Packed and padded vectors of a few texts must agree, or packing is refused."""
        texts = ["a b c", "The capital of France is Paris; its river is the Seine.", "x"]
        ids = self.tokenize(texts)
        padded = np.stack(self._forward(ids))
        packed = np.stack(self._forward_packed(ids))
        cosine = float((padded * packed).sum(axis=1).min())
        floor = 0.999 if self.model.dtype == torch.float32 else 0.99
        if not cosine >= floor:
            attn = getattr(self.model.config, "_attn_implementation", "?")
            raise ValueError(
                f"{self.model_id}: packing is not supported with attention {attn!r} (packed vs padded cosine "
                f"{cosine:.3f} < {floor}: the texts of a packed row attend to each other); run without packing"
            )

    # -- text preparation ------------------------------------------------------------------
    def prompt(self, is_query: bool) -> str:
        if not is_query:
            return self.settings.document_prompt
        if self.query_instruction:
            return QWEN3_INSTRUCTION_FORMAT.format(task=self.query_instruction)
        return self.settings.query_prompt

    def tokenize(self, texts: Sequence[str], *, is_query: bool = False) -> list[list[int]]:
        prompt = self.prompt(is_query)
        enc = self.tokenizer(
            [prompt + t for t in texts],
            truncation=True,
            max_length=self.max_length,
            padding=False,
            return_attention_mask=False,
        )
        return enc["input_ids"]

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
        """Vectors for pre-tokenised inputs; failures (out of memory alone) are returned, not raised."""
        return run_in_token_budget(ids, self.token_budget, self._forward_packed if self.packing else self._forward)

    @torch.inference_mode()
    def _forward(self, ids: Sequence[list[int]]) -> list[np.ndarray]:
        padded = self.tokenizer.pad({"input_ids": list(ids)}, padding=True, return_tensors="pt")
        input_ids = padded["input_ids"].to(self.device)
        mask = padded["attention_mask"].to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return self._finish(pool(hidden, mask, self.settings.pooling))

    @torch.inference_mode()
    def _forward_packed(self, ids: Sequence[list[int]]) -> list[np.ndarray]:
        """One row of concatenated texts, positions restarting per text, no mask, no cache."""
        lengths = torch.tensor([len(seq) for seq in ids])
        flat = torch.tensor([t for seq in ids for t in seq], dtype=torch.long)
        positions = torch.cat([torch.arange(n) for n in lengths.tolist()])
        # use_cache=False matters: transformers reads packed boundaries from the positions only
        # when there is no mask and no cache; Qwen3's config enables the cache, and with it the
        # texts of a row silently attend to each other (cosine ~0.1-0.3 to the padded vectors).
        hidden = self.model(
            input_ids=flat[None].to(self.device), position_ids=positions[None].to(self.device), use_cache=False
        ).last_hidden_state[0]
        return self._finish(pool_packed(hidden, lengths.to(self.device), self.settings.pooling))

    def _finish(self, pooled: torch.Tensor) -> list[np.ndarray]:
        pooled = pooled.float()
        if self.dim is not None:
            pooled = pooled[:, : self.dim]
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return list(pooled.cpu().numpy())


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

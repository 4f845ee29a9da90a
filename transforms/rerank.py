"""Qwen3-Reranker relevance labels: a scorer and its Beam ``ModelHandler``.

The score of a (query, document) pair is the model card's: the pair is formatted as
``<Instruct>: ...\\n<Query>: ...\\n<Document>: ...``, wrapped in the card's chat prefix and
suffix, and scored as P(yes) = softmax over the ("no", "yes") logits at the last position.
Token ids are those of the card's ``process_inputs`` (same tokenizer call, same truncation),
and the parity tests compare against the card's code run verbatim.

What is different is only how the work is done:

* the card computes full-vocabulary logits at every position (151669 x hidden per token,
  a third of the FLOPs of the 0.6B model); here the base model's last hidden state at the
  last position is multiplied by the two output rows for "no" and "yes";
* pairs are sorted by length and cut into forward passes by a padded-token budget
  (``max_len * n <= budget``), so one long document does not pad a whole batch; left
  padding, masking and relative positions (RoPE) make each score independent of its batch;
* a forward pass that runs out of memory is split in halves and retried; a pair that fails
  alone is reported (and becomes a ``DeadLetter`` in the pipeline), not raised.

Room left for later (GPU): all pairs of one query share the prompt up to ``<Document>:``
(~90 of ~390 tokens for a 20-token query and a 300-token document). Scoring them from one
cached KV prefix would save that share of the linear FLOPs. The safe way in: take the head
from the card's own ids (``encode_pairs``) and share it only where every pair's ids start
with it (truncation cuts from the end, so only pairs cut into the head fall back), give
document tokens explicit positions ``len(head) + j`` and mask the pads between head and
document. ``score_ids`` / ``_forward`` are the only places that would change. Not done yet:
correctness first, and its gain needs measuring on a GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from apache_beam.ml.inference.base import ModelHandler

from transforms.gpu import default_dtype, default_token_budget, resolve_device, run_in_token_budget
from transforms.models import resolve_model
from transforms.progress import reporter
from transforms.types import DeadLetter, Judgement, RerankPair

_LOG = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
PROMPT_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
PAIR_FORMAT = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"


def format_instruction(instruction: str | None, query: str, doc: str) -> str:
    """The card's ``format_instruction``: the user turn of one pair."""
    if instruction is None:
        instruction = DEFAULT_INSTRUCTION
    return PAIR_FORMAT.format(instruction=instruction, query=query, doc=doc)


class Qwen3Reranker:
    """Scores (query, document) pairs with a Qwen3-Reranker checkpoint.

    Construction is cheap and picklable; ``load()`` reads the tokenizer and weights.
    ``max_length`` bounds prefix + pair + suffix, as the card's ``max_length`` does.
    ``token_budget`` is the padded tokens of one forward pass (default: from free GPU memory,
    2048 on CPU), never less than ``max_length``.
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: torch.dtype | str | None = None,
        max_length: int = 8192,
        instruction: str | None = None,
        token_budget: int | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        self.model_id = model
        self.device_name = device
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.max_length = max_length
        self.instruction = instruction
        self.token_budget_override = token_budget
        self.attn_implementation = attn_implementation
        self._model: torch.nn.Module | None = None

    # -- loading -------------------------------------------------------------------------
    def load(self) -> Qwen3Reranker:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(self.model_id)
        self.device = resolve_device(self.device_name)
        dtype = self.dtype or default_dtype(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.prefix_ids: list[int] = self.tokenizer.encode(PROMPT_PREFIX, add_special_tokens=False)
        self.suffix_ids: list[int] = self.tokenizer.encode(PROMPT_SUFFIX, add_special_tokens=False)
        self.pair_max_length = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.pair_max_length < 1:
            raise ValueError(
                f"max_length {self.max_length} leaves no room for a pair after the prompt's "
                f"{len(self.prefix_ids) + len(self.suffix_ids)} tokens"
            )
        kwargs: dict[str, Any] = {"dtype": dtype}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        self._model = model.to(self.device).eval()

        self.no_id = self.tokenizer.convert_tokens_to_ids("no")
        self.yes_id = self.tokenizer.convert_tokens_to_ids("yes")
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else self.tokenizer.eos_token_id

        # The two rows of the output projection that the score reads, in (no, yes) order.
        head = self._model.get_output_embeddings()
        rows = torch.tensor([self.no_id, self.yes_id], device=self.device)
        self._head_weight = head.weight.detach().index_select(0, rows)
        bias = getattr(head, "bias", None)
        self._head_bias = None if bias is None else bias.detach().index_select(0, rows)

        self.token_budget = self.token_budget_override or default_token_budget(self._model, self.device)
        self.token_budget = max(self.token_budget, self.max_length)
        return self

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            raise RuntimeError("Qwen3Reranker.load() must be called before scoring")
        return self._model

    # -- inputs --------------------------------------------------------------------------
    def format(self, query: str, doc: str, instruction: str | None = None) -> str:
        return format_instruction(self._instruction(instruction), query, doc)

    def _instruction(self, instruction: str | None) -> str | None:
        return instruction if instruction is not None else self.instruction

    def encode_pairs(
        self, pairs: Sequence[tuple[str, str]], instruction: str | None = None
    ) -> list[list[int]]:
        """Token ids of each pair, as the card's ``process_inputs`` builds them before padding."""
        if self._model is None:
            raise RuntimeError("Qwen3Reranker.load() must be called before encoding")
        if not pairs:
            return []
        texts = [self.format(q, d, instruction) for q, d in pairs]
        enc = self.tokenizer(
            texts,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=self.pair_max_length,
        )
        return [self.prefix_ids + ids + self.suffix_ids for ids in enc["input_ids"]]

    def count_tokens(self, pair: tuple[str, str], instruction: str | None = None) -> int:
        """Tokens the model reads for one pair (prompt included, after truncation)."""
        return len(self.encode_pairs([pair], instruction)[0])

    # -- scoring -------------------------------------------------------------------------
    def score(self, pairs: Sequence[tuple[str, str]], instruction: str | None = None) -> list[float]:
        """P(yes) of each (query, document) pair, in input order.

        Raises ``RuntimeError`` when a pair cannot be scored even alone (out of memory);
        ``score_ids`` reports such pairs instead.
        """
        scores, failures = self.score_ids(self.encode_pairs(pairs, instruction))
        if failures:
            index, reason = failures[0]
            raise RuntimeError(
                f"could not score {len(failures)} of {len(pairs)} pairs (first: #{index}: {reason})"
            )
        return [float(s) for s in scores]  # type: ignore[arg-type]

    def score_ids(self, ids: Sequence[list[int]]) -> tuple[list[float | None], list[tuple[int, str]]]:
        """Scores of pre-encoded pairs in input order; ``None`` (and a failure entry) for a pair
        that ran out of memory alone."""
        return run_in_token_budget(ids, self.token_budget, self._forward)

    @torch.inference_mode()
    def _forward(self, ids: Sequence[list[int]]) -> list[float]:
        """P(yes) for one padded batch: base model, last position, two output rows."""
        width = max(len(seq) for seq in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            # Left padding, as the card's tokenizer does: column -1 is every row's last token.
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
        base = self.model.get_decoder()
        hidden = base(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
        ).last_hidden_state[:, -1]
        logits = hidden @ self._head_weight.T
        if self._head_bias is not None:
            logits = logits + self._head_bias
        # log_softmax then exp, as the card does; in fp32 whatever the model dtype.
        return torch.log_softmax(logits.float(), dim=1)[:, 1].exp().tolist()


# -- Beam ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PairTokenEstimate:
    """Cheap token count of a ``RerankPair`` for Beam's batch weights (no tokenizer).

    Characters / ``chars_per_token`` plus the fixed prompt (~70 Qwen3 tokens with the default
    instruction), capped at ``max_length``. English runs at ~4 characters per token; 3 errs on
    the side of smaller batches.
    """

    chars_per_token: float = 3.0
    prompt_tokens: int = 80
    max_length: int = 8192

    def __call__(self, pair: RerankPair) -> int:
        chars = len(pair.query) + len(pair.doc_text)
        return min(self.prompt_tokens + math.ceil(chars / self.chars_per_token), self.max_length)


class RerankModelHandler(ModelHandler[RerankPair, Judgement | DeadLetter, Qwen3Reranker]):
    """``RunInference`` handler: ``RerankPair`` → ``Judgement`` (teacher score = P(yes)).

    The scorer is loaded once per worker process and shared by its threads (RunInference keeps
    it in a ``Shared`` handle). Beam batches are sized by estimated tokens
    (``max_batch_tokens``, from characters: cheap, no tokenizer on the batching path); inside, pairs are tokenised, sorted and cut again by the forward
    pass's padded-token budget (``token_budget``). A pair that runs out of memory even alone
    comes back as a ``DeadLetter(stage="rerank")``; the rest of its batch is scored.
    ``inference_args={"instruction": ...}`` overrides the instruction for a call.
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str | None = None,
        max_length: int = 8192,
        instruction: str | None = None,
        token_budget: int | None = None,
        max_batch_tokens: int = 65536,
        chars_per_token: float = 3.0,
        attn_implementation: str | None = None,
        progress_interval_s: float = 30.0,
        large_model: bool = False,
    ) -> None:
        # Beam 2.77's BatchElements takes no ``max_batch_weight`` (ModelHandler accepts it and
        # RunInference then fails with a TypeError); with ``element_size_fn`` its batch sizes are
        # summed weights, so min = max = the token target gives batches of ~max_batch_tokens.
        # The estimate is capped at max_length, so one pair never exceeds the target alone.
        batch_tokens = max(max_batch_tokens, max_length)
        super().__init__(
            min_batch_size=batch_tokens,
            max_batch_size=batch_tokens,
            element_size_fn=PairTokenEstimate(chars_per_token=chars_per_token, max_length=max_length),
            large_model=large_model,
        )
        self._scorer_args: dict[str, Any] = dict(
            model=model,
            device=device,
            dtype=dtype,
            max_length=max_length,
            instruction=instruction,
            token_budget=token_budget,
            attn_implementation=attn_implementation,
        )
        self._progress_interval_s = progress_interval_s

    def load_model(self) -> Qwen3Reranker:
        args = dict(self._scorer_args)
        scorer = Qwen3Reranker(args.pop("model"), **args).load()
        _LOG.info(
            "loaded reranker %s on %s (max_length %d, token budget %d)",
            scorer.model_id,
            scorer.device,
            scorer.max_length,
            scorer.token_budget,
        )
        return scorer

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        unknown = set(inference_args or {}) - {"instruction"}
        if unknown:
            raise ValueError(
                f"RerankModelHandler takes only 'instruction' as inference_args, not {sorted(unknown)}"
            )

    def run_inference(
        self,
        batch: Sequence[RerankPair],
        model: Qwen3Reranker,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[Judgement | DeadLetter]:
        if not batch:  # BatchElements emits an empty batch when one element outweighs its target
            return []
        instruction = (inference_args or {}).get("instruction")
        ids = model.encode_pairs([(p.query, p.doc_text) for p in batch], instruction)
        scores, failures = model.score_ids(ids)
        reasons = dict(failures)
        reporter("rerank", self._progress_interval_s).add(pairs=len(batch), tokens=sum(len(x) for x in ids))
        results: list[Judgement | DeadLetter] = []
        for i, (pair, score) in enumerate(zip(batch, scores)):
            if score is None:
                results.append(
                    DeadLetter.of(
                        "rerank", reasons[i], f"{pair.query_id}/{pair.doc_id}", dataclasses.asdict(pair)
                    )
                )
            else:
                results.append(
                    Judgement(
                        query_id=pair.query_id,
                        doc_id=pair.doc_id,
                        teacher_score=float(score),
                        first_stage_score=pair.first_stage_score,
                        first_stage_rank=pair.first_stage_rank,
                    )
                )
        return results

    def get_metrics_namespace(self) -> str:
        return "corpus_etl"

    def get_num_bytes(self, batch: Sequence[RerankPair]) -> int:
        return sum(len(p.query) + len(p.doc_text) for p in batch)

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

* pairs of one query share the prompt up to ``<Document>:`` (system prompt, instruction and
  query: ~90 of ~390 tokens for a 20-token query and a 300-token document). That head is run
  once per forward pass and its key/value cache is gathered for every row, whose document
  tokens then continue at positions ``len(head) + j`` (``share_prefix``, opt-in). The
  head is cut from the card's own ids (the longest common prefix with the query's head
  text, so a pair truncated into its query simply shares less), and rows are grouped by
  their head's actual tokens: the split can change how much is shared, never a score.
  It is off by default: on 2 CPU cores it ran 14% fewer tokens for 5% less time in a direct
  A/B and stayed within noise end to end; on an H100 and an H200 it took 0.96 and 1.05 of the
  time (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from transforms.models.devices import TorchModel, device_lock, run_in_token_budget
from transforms.models.settings import hand_over_tokenizer, load_tokenizer, resolve_model
from transforms.types import first_line

_LOG = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
PROMPT_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
PAIR_FORMAT = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"
# The part of a pair that all of a query's documents share: up to the colon. The space before
# the document is not in it: Qwen's pre-tokenizer joins it to the document's first word.
HEAD_FORMAT = PAIR_FORMAT.split("{doc}")[0].rstrip(" ")


def format_instruction(instruction: str | None, query: str, doc: str) -> str:
    """The card's ``format_instruction``: the user turn of one pair."""
    if instruction is None:
        instruction = DEFAULT_INSTRUCTION
    return PAIR_FORMAT.format(instruction=instruction, query=query, doc=doc)


class Qwen3Reranker(TorchModel):
    """Scores (query, document) pairs with a Qwen3-Reranker checkpoint.

    Construction is cheap and picklable; ``load()`` reads the tokenizer and weights.
    ``max_length`` bounds prefix + pair + suffix, as the card's ``max_length`` does.
    ``token_budget`` is the padded tokens of one forward pass (default: from free GPU memory,
    2048 on CPU), never less than ``max_length``. ``share_prefix`` runs each query's prompt
    head once per forward pass instead of once per pair (same scores, fewer FLOPs).
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
        share_prefix: bool = False,
        precision: str = "auto",
        kernels: str = "none",
    ) -> None:
        super().__init__(
            model, device=device, dtype=dtype, token_budget=token_budget, attn_implementation=attn_implementation,
            precision=precision, kernels=kernels,
        )
        self.max_length = max_length
        self.instruction = instruction
        self.share_prefix = share_prefix

    # -- loading -------------------------------------------------------------------------
    def load(self) -> Qwen3Reranker:
        from transformers import AutoModelForCausalLM

        path = resolve_model(self.model_id)
        self.tokenizer = load_tokenizer(path, padding_side="left")
        self.prefix_ids: list[int] = self.tokenizer.encode(PROMPT_PREFIX, add_special_tokens=False)
        self.suffix_ids: list[int] = self.tokenizer.encode(PROMPT_SUFFIX, add_special_tokens=False)
        self.pair_max_length = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.pair_max_length < 1:
            raise ValueError(
                f"max_length {self.max_length} leaves no room for a pair after the prompt's "
                f"{len(self.prefix_ids) + len(self.suffix_ids)} tokens"
            )
        self._load_weights(AutoModelForCausalLM, path, self.max_length)
        self._prepack()  # leaves the output projection alone: the score reads two of its rows below

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

        return self

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

    def head_lengths(
        self, pairs: Sequence[tuple[str, str]], ids: Sequence[list[int]], instruction: str | None = None
    ) -> list[int]:
        """For each pair, how many leading ids (of ``encode_pairs``) its query's pairs share.

        The head is the card prefix plus ``<Instruct>: ...\\n<Query>: ...\\n<Document>:``; a
        pair's head length is the common prefix of its ids with that head's ids, at most all
        but the last id (the score is read there). Always at least the card prefix.
        """
        task = self._instruction(instruction)
        task = DEFAULT_INSTRUCTION if task is None else task
        heads: dict[str, list[int]] = {}
        out: list[int] = []
        for (query, _), seq in zip(pairs, ids):
            head = heads.get(query)
            if head is None:
                text = HEAD_FORMAT.format(instruction=task, query=query)
                head = heads[query] = self.prefix_ids + self.tokenizer(text)["input_ids"]
            out.append(min(len(os.path.commonprefix([seq, head])), len(seq) - 1))
        return out

    def count_tokens(self, pair: tuple[str, str], instruction: str | None = None) -> int:
        """Tokens the model reads for one pair (prompt included, after truncation)."""
        return len(self.encode_pairs([pair], instruction)[0])

    # -- scoring -------------------------------------------------------------------------
    def score(self, pairs: Sequence[tuple[str, str]], instruction: str | None = None) -> list[float]:
        """P(yes) of each (query, document) pair, in input order.

        Raises ``RuntimeError`` when a pair cannot be scored even alone (out of memory);
        ``score_ids`` reports such pairs instead.
        """
        ids = self.encode_pairs(pairs, instruction)
        heads = self.head_lengths(pairs, ids, instruction) if self.share_prefix else None
        scores, failures = self.score_ids(ids, heads)
        if failures:
            index, reason = failures[0]
            raise RuntimeError(
                f"could not score {len(failures)} of {len(pairs)} pairs (first: #{index}: {reason})"
            )
        return [float(s) for s in scores]  # type: ignore[arg-type]

    def score_batch(
        self, pairs: Sequence[tuple[str, str]], instruction: str | None = None
    ) -> tuple[list[float | None], list[tuple[int, str]], int]:
        """One Beam batch: ``(scores, failures, tokens)``, the handler's single call per batch (so it also runs
        through the proxy of a model shared across processes). The prompt heads are shared when the reranker
        was built with ``share_prefix``; on CUDA one batch runs at a time per device (``device_lock``)."""
        with device_lock(self.device):
            ids = self.encode_pairs(pairs, instruction)
            heads = self.head_lengths(pairs, ids, instruction) if self.share_prefix else None
            scores, failures = self.score_ids(ids, heads)
            return scores, failures, sum(len(x) for x in ids)

    def score_ids(
        self, ids: Sequence[list[int]], head_lengths: Sequence[int] | None = None
    ) -> tuple[list[float | None], list[tuple[int, str]]]:
        """Scores of pre-encoded pairs in input order; ``None`` (and a failure entry) for a pair
        that ran out of memory alone.

        With ``head_lengths`` (see ``head_lengths``), rows whose first ``h`` ids are equal share
        one run of those ids per forward pass. Forward passes hold at most ``token_budget``
        padded tokens, counted over the whole pair, shared or not.
        """
        if head_lengths is None:
            return run_in_token_budget(ids, self.token_budget, self._forward)
        rows = list(zip(ids, head_lengths))
        return run_in_token_budget(rows, self.token_budget, self._forward_shared, size=lambda row: len(row[0]))

    @torch.inference_mode()
    def _forward(self, ids: Sequence[list[int]]) -> list[float]:
        """P(yes) for one padded batch: base model, last position, two output rows."""
        # Left padding, as the card's tokenizer does: column -1 is every row's last token.
        input_ids, mask, _ = self._left_pad(ids, [0] * len(ids))
        base = self.model.get_decoder()
        with self.autocast():
            hidden = base(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
            ).last_hidden_state[:, -1]
        return self._p_yes(hidden)

    @torch.inference_mode()
    def _forward_shared(self, rows: Sequence[tuple[list[int], int]]) -> list[float]:
        """P(yes) for one batch of ``(ids, head_length)``: each distinct head once, then the rest.

        Pass 1 runs the distinct heads (left padded, positions from 0) and keeps their key/value
        cache; the cache is gathered to one head per row. Pass 2 runs each row's remaining ids
        at positions ``len(head) + j``, attending to its own head and masked from the pads, so a
        row sees exactly the tokens and positions of the one-pass forward.
        """
        keys: dict[tuple[int, ...], int] = {}
        which = [keys.setdefault(tuple(seq[:h]), len(keys)) for seq, h in rows]
        if len(keys) == len(rows):  # nothing shared in this pass: one plain pass is cheaper
            return self._forward([seq for seq, _ in rows])
        heads = list(keys)
        head_ids, head_mask, head_pos = self._left_pad(heads, [0] * len(heads))
        tail_ids, tail_mask, tail_pos = self._left_pad(
            [seq[h:] for seq, h in rows], [len(heads[k]) for k in which]
        )
        index = torch.tensor(which, dtype=torch.long)
        base = self.model.get_decoder()
        device = self.device
        with self.autocast():
            out = base(
                input_ids=head_ids.to(device),
                attention_mask=head_mask.to(device),
                position_ids=head_pos.to(device),
                use_cache=True,
            )
            cache = _cache_of(out)
            cache.reorder_cache(index.to(device))  # one copy of its head's keys/values per row
            _freeze(cache)
            hidden = base(
                input_ids=tail_ids.to(device),
                attention_mask=torch.cat([head_mask[index], tail_mask], dim=1).to(device),
                position_ids=tail_pos.to(device),
                use_cache=True,
                **{_cache_argument(base): cache},
            ).last_hidden_state[:, -1]
        return self._p_yes(hidden)

    def _left_pad(
        self, seqs: Sequence[Sequence[int]], starts: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ids, attention mask and position ids (``start + j``; 0 on pads), left padded."""
        width = max(len(seq) for seq in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        positions = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, (seq, start) in enumerate(zip(seqs, starts)):
            n = len(seq)
            input_ids[row, width - n :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - n :] = 1
            positions[row, width - n :] = torch.arange(start, start + n)
        return input_ids, mask, positions

    def _p_yes(self, hidden: torch.Tensor) -> list[float]:
        logits = hidden @ self._head_weight.T
        if self._head_bias is not None:
            logits = logits + self._head_bias
        # log_softmax then exp, as the card does; in fp32 whatever the model dtype.
        return torch.log_softmax(logits.float(), dim=1)[:, 1].exp().tolist()


def _freeze(cache: Any) -> None:
    """Make a cached head read-only for the pass that reads it (transformers >= 5 caches).

    A plain cache appends every layer's new keys and values and keeps them to the end of the
    pass: for a 64k-token pass of the 0.6B model, ~7 GiB in bf16 (64k x 28 layers x 2 x 8 KV
    heads x 128 x 2 bytes) that nothing reads again.
    Frozen, each layer gets head + new and drops it after attention. Older caches (without
    ``layers``) are left as they are: same scores, more memory.
    """
    try:
        frozen = _frozen_layer_class()
    except ImportError:
        return
    for layer in getattr(cache, "layers", ()):
        if type(layer) is frozen.__base__:
            layer.__class__ = frozen  # same state (keys, values), read-only update


@functools.cache
def _frozen_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class _FrozenLayer(DynamicLayer):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return _FrozenLayer


def _cache_argument(model: torch.nn.Module) -> str:
    """The forward argument that takes a KV cache: ``cache`` from transformers 5.2x, before
    that ``past_key_values`` (the project supports both)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _probe_hub(model: str, hint: str) -> None:
    """A hub id that is not in the local cache: one request, no retries, or a clear error.

    transformers' own download retries five times with backoff (~30 s offline) before failing.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return  # cached: loads without the network
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"cannot load reranker {model!r}: not in the local cache and HF_HUB_OFFLINE is set {hint}")
    from huggingface_hub import model_info

    try:
        model_info(model, timeout=10)
    except Exception as exc:  # noqa: BLE001 - any failure here means the weights cannot be had
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"cannot load reranker {model!r}: {first} {hint}") from exc


def check_reranker(model: str, max_length: int | None = None) -> None:
    """Refuse, before any Beam work, a reranker that cannot be loaded or is not a yes/no causal LM,
    and a ``max_length`` (``--max-length``) that leaves no token for a pair after the prompt.

    Reads only the config and tokenizer files (local directory, hub cache, or the hub when it
    is reachable): a missing model offline, a wrong id, or an embedding model fails here in
    seconds with one ``ValueError`` naming the id and what to do, not in every worker later.
    """
    from transformers import AutoConfig
    from transformers.utils import cached_file

    path = resolve_model(model)
    hint = (f"(offline or a wrong id? pass a local directory with --reranker PATH, or download it first: "
            f"huggingface-cli download {model})")
    if not os.path.isdir(path):
        _probe_hub(model, hint)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = load_tokenizer(path, padding_side="left")  # as Qwen3Reranker.load, which it is handed to
        weights = [
            cached_file(path, name, _raise_exceptions_for_missing_entries=False)
            for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
        ]
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load reranker {model!r}: {first_line(exc)} {hint}") from exc
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForCausalLM") for a in architectures):
        raise ValueError(
            f"reranker {model!r} is not a causal language model (architectures: {', '.join(architectures) or '?'}); "
            "--reranker needs a Qwen3-Reranker, which answers yes/no, e.g. Qwen/Qwen3-Reranker-0.6B"
        )
    for word in ("yes", "no"):
        if tokenizer.convert_tokens_to_ids(word) in (None, tokenizer.unk_token_id):
            raise ValueError(f"reranker {model!r}: its tokenizer has no single token {word!r}; not a Qwen3-Reranker")
    if not any(weights):
        raise ValueError(f"reranker {model!r} has config files but no weights (model.safetensors)")
    if max_length is not None:  # as Qwen3RerankerHandler.load counts it, where it would fail on every worker
        prompt = sum(len(tokenizer.encode(part, add_special_tokens=False)) for part in (PROMPT_PREFIX, PROMPT_SUFFIX))
        if max_length - prompt < 1:
            raise ValueError(f"--max-length {max_length} leaves no room for a pair after the prompt's {prompt} tokens")
    hand_over_tokenizer(tokenizer, path, padding_side="left")  # an in-process job's reranker loads it once

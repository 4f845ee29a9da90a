"""Qwen3Reranker against the Qwen3-Reranker model card's own code, and its Beam handler.

The reference below is the card's scoring code, verbatim apart from being wrapped in a
class (so the tokenizer, model and ``max_length`` it closes over are per instance): full
logits from ``AutoModelForCausalLM``, last position, log_softmax over ("no", "yes").
Weights are a tiny random model (tests/qwen_fixtures.py) with the real tokenizer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import apache_beam as beam
import pytest
import torch
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to

from tests import recording
from tests.qwen_reference import CardReference, format_instruction  # noqa: F401
from transforms.inference.rerank import PairTokenEstimate, RerankByQuery, RerankModelHandler
from transforms.models.devices import TokenBudgets, budget_batches
from transforms.models.reranker import DEFAULT_INSTRUCTION, HEAD_FORMAT, Qwen3Reranker
from transforms.types import DEAD, DeadLetter, Judgement, QueryPairs, RerankPair

TOL = 1e-4
# The card pads with max_length and padding=True; transformers warns about it on every call.
pytestmark = pytest.mark.filterwarnings("ignore:`max_length` is ignored when `padding`")


# -- data --------------------------------------------------------------------------------------
QUERIES = [
    "What is the capital of China?",
    "Explain gravity",
    "how do I cancel a subscription mid-cycle",
    "Qu'est-ce que la gravité ?",
]
_RNG = random.Random(7)
_WORDS = (
    "the capital of China is Beijing gravity force attracts two bodies towards each other weight physical "
    "objects planets sun billing cycle cancel subscription refund 2025 café 北京 naïve\n"
).split(" ")
DOCS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other. It gives weight to physical objects "
    "and is responsible for the movement of planets around the sun.",
    "y",
    "",
    *(" ".join(_RNG.choices(_WORDS, k=n)) for n in (3, 17, 40, 90)),
]
PAIRS = [(QUERIES[i % len(QUERIES)], doc) for i, doc in enumerate(DOCS)]


@pytest.fixture(scope="module")
def reference(qwen3_reranker_dir):
    return CardReference(qwen3_reranker_dir)


@pytest.fixture(scope="module")
def ref_scores(reference):
    """The card's scores of PAIRS, computed once as one padded batch (full logits are costly)."""
    return reference.scores(PAIRS)


@pytest.fixture(scope="module")
def reranker(qwen3_reranker_dir):
    return Qwen3Reranker(str(qwen3_reranker_dir), device="cpu", dtype=torch.float32).load()


def _close(got, want, tol=TOL):
    assert len(got) == len(want)
    diffs = [abs(a - b) for a, b in zip(got, want)]
    assert max(diffs) <= tol, f"max |diff| {max(diffs):.2e} > {tol}: {got} vs {want}"


# -- parity --------------------------------------------------------------------------------------
def test_scores_spread(ref_scores):
    """The random model separates pairs (otherwise parity at 1e-4 would prove little)."""
    assert max(ref_scores) - min(ref_scores) > 0.05


def test_single_pairs_match_card(reference, reranker):
    for pair in PAIRS:
        _close(reranker.score([pair]), reference.scores([pair]))


@pytest.mark.parametrize("share_prefix", [True, False])
def test_mixed_length_batch_matches_card(ref_scores, reranker, share_prefix):
    scorer = copy.copy(reranker)
    scorer.share_prefix = share_prefix
    _close(scorer.score(PAIRS), ref_scores)


# -- shared prompt head ----------------------------------------------------------------------------
# Every query with every document: candidates of one query share their prompt head.
GRID = [(q, d) for q in QUERIES for d in DOCS]


@pytest.fixture(scope="module")
def grid_ref_scores(reference):
    return reference.scores(GRID)


@pytest.fixture(scope="module")
def shared(reranker):
    """The same loaded model, scoring with shared prompt heads."""
    scorer = copy.copy(reranker)
    scorer.share_prefix = True
    return scorer


def test_head_is_the_prompt_up_to_the_document(reranker):
    ids = reranker.encode_pairs(GRID)
    heads = reranker.head_lengths(GRID, ids)
    for (query, doc), seq, h in zip(GRID, ids, heads):
        head_text = reranker.tokenizer.decode(seq[:h])
        assert head_text.endswith(f"<Query>: {query}\n<Document>:"), head_text
        assert reranker.tokenizer.decode(seq[h:]).startswith(" " + doc[:4])
    distinct = {tuple(seq[:h]) for seq, h in zip(ids, heads)}
    assert len(distinct) == len(QUERIES)  # one head per query, shared by its documents


def test_shared_heads_match_card(grid_ref_scores, shared):
    _close(shared.score(GRID), grid_ref_scores)
    # Shuffled, and cut into several forward passes that mix heads of different lengths.
    order = list(range(len(GRID)))
    random.Random(3).shuffle(order)
    small = copy.copy(shared)
    small.token_budget = 700
    ids = small.encode_pairs([GRID[i] for i in order])
    batches = budget_batches([len(x) for x in ids], small.token_budget)
    assert len(batches) > 2
    assert any(len({GRID[order[i]][0] for i in b}) > 1 for b in batches)
    got = small.score([GRID[i] for i in order])
    _close([got[order.index(i)] for i in range(len(GRID))], grid_ref_scores)


def test_shared_forward_runs_each_head_once(shared, reranker):
    scorer = shared
    base = scorer.model.get_decoder()
    widths: list[tuple[int, int]] = []
    hook = base.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        scorer.score(GRID)
        assert [rows for rows, _ in widths] == [len(QUERIES), len(GRID)]
        widths.clear()
        reranker.score(GRID)  # without sharing (the default): one pass of whole pairs
        assert [rows for rows, _ in widths] == [len(GRID)]
        widths.clear()
        scorer.score(GRID)
    finally:
        hook.remove()
    # One pass of the 4 distinct heads, one of the 32 rows' remaining tokens.
    assert [rows for rows, _ in widths] == [len(QUERIES), len(GRID)]
    ids = scorer.encode_pairs(GRID)
    heads = scorer.head_lengths(GRID, ids)
    assert widths[1][1] == max(len(x) - h for x, h in zip(ids, heads))


def test_shared_head_cache_is_not_extended(shared):
    """The head's cache is read, not grown: a pass keeps no per-layer keys of the documents."""
    from transformers.cache_utils import DynamicLayer

    from transforms.models import reranker as rerank

    seen = []
    freeze = rerank._freeze

    def spy(cache):
        freeze(cache)
        seen.append(cache)

    rerank._freeze = spy
    try:
        shared.score(GRID[:8])
    finally:
        rerank._freeze = freeze
    (cache,) = seen
    head = max(h for h in shared.head_lengths(GRID[:8], shared.encode_pairs(GRID[:8])))
    assert all(isinstance(layer, DynamicLayer) and layer.keys.shape[-2] == head for layer in cache.layers)
    assert type(cache.layers[0]) is not DynamicLayer


def test_pair_cut_into_its_query_shares_less(reference, qwen3_reranker_dir):
    max_length = 64
    reference = copy.copy(reference)
    reference.max_length = max_length
    ours = Qwen3Reranker(
        str(qwen3_reranker_dir), device="cpu", dtype=torch.float32, max_length=max_length, share_prefix=True
    ).load()
    long_query = "why " * 40
    pairs = [(long_query, "a"), (long_query, "b"), *GRID[:4]]
    ids = ours.encode_pairs(pairs)
    heads = ours.head_lengths(pairs, ids)
    assert all(len(ours.prefix_ids) <= h < len(x) for x, h in zip(ids, heads))
    assert ids[0] == ids[1]  # both cut inside the query: the documents never made it in
    # What is shared is what is left of the head: everything before the card's suffix.
    assert heads[0] == heads[1] == len(ids[0]) - len(ours.suffix_ids)
    full_head = ours.prefix_ids + ours.tokenizer(HEAD_FORMAT.format(instruction=DEFAULT_INSTRUCTION, query=long_query))["input_ids"]
    assert heads[0] < len(full_head)
    _close(ours.score(pairs), reference.scores(pairs))


def test_score_is_independent_of_batch_composition(reranker):
    alone = [reranker.score([pair])[0] for pair in PAIRS]
    _close(reranker.score(PAIRS), alone)
    _close(reranker.score(PAIRS[::-1])[::-1], alone)
    _close(reranker.score(PAIRS[1::2]), alone[1::2])
    # A small budget cuts the sorted pairs into several forward passes (a copy shares the model).
    small = copy.copy(reranker)
    small.token_budget = 300
    assert len(budget_batches([len(x) for x in small.encode_pairs(PAIRS)], small.token_budget)) > 1
    _close(small.score(PAIRS), alone)


def test_encode_pairs_is_card_process_inputs(reference, reranker):
    inputs = reference.process_inputs([format_instruction(None, q, d) for q, d in PAIRS])
    want = [row[mask.bool()].tolist() for row, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    assert reranker.encode_pairs(PAIRS) == want
    assert [reranker.count_tokens(pair) for pair in PAIRS] == [len(ids) for ids in want]


def test_format_is_card_format(reranker):
    assert reranker.format("q", "d") == format_instruction(None, "q", "d")
    assert reranker.format("q", "d", "Find code") == format_instruction("Find code", "q", "d")


def test_custom_instruction(reference, ref_scores, reranker, qwen3_reranker_dir):
    task = "Given a question about physics, retrieve passages that define the term"
    want = reference.scores(PAIRS, task)
    _close(reranker.score(PAIRS, instruction=task), want)
    assert Qwen3Reranker(str(qwen3_reranker_dir), instruction=task).instruction == task
    default = copy.copy(reranker)
    default.instruction = task
    _close(default.score(PAIRS), want)
    assert max(abs(a - b) for a, b in zip(want, ref_scores)) > 1e-3  # the instruction matters


def test_truncation_keeps_prefix_and_suffix(reference, qwen3_reranker_dir):
    max_length = 64
    reference = copy.copy(reference)  # the card's code with its max_length set to 64
    reference.max_length = max_length
    ours = Qwen3Reranker(str(qwen3_reranker_dir), device="cpu", dtype=torch.float32, max_length=max_length).load()
    ids = ours.encode_pairs(PAIRS)
    assert max(len(x) for x in ids) == max_length
    assert all(x[: len(ours.prefix_ids)] == ours.prefix_ids and x[-len(ours.suffix_ids) :] == ours.suffix_ids for x in ids)
    _close(ours.score(PAIRS), reference.scores(PAIRS))


def test_max_length_must_leave_room(qwen3_reranker_dir):
    with pytest.raises(ValueError, match="no room"):
        Qwen3Reranker(str(qwen3_reranker_dir), device="cpu", max_length=40).load()


def test_empty_and_unloaded(reranker, qwen3_reranker_dir):
    assert reranker.score([]) == []
    with pytest.raises(RuntimeError, match="load"):
        Qwen3Reranker(str(qwen3_reranker_dir)).score(PAIRS[:1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_raises(qwen3_reranker_dir):
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        Qwen3Reranker(str(qwen3_reranker_dir), device="cuda").load()


def test_constructor_is_cheap_and_picklable(qwen3_reranker_dir):
    import pickle

    handler = RerankModelHandler(str(qwen3_reranker_dir), device="cpu", budgets=TokenBudgets.from_flag(4096, 8192))
    kwargs = pickle.loads(pickle.dumps(handler)).batch_elements_kwargs()
    # Token-weighted batches: sizes are summed estimates, 4 forward passes' worth, never below max_length.
    assert (kwargs["min_batch_size"], kwargs["max_batch_size"]) == (1, 16384)
    assert isinstance(kwargs["element_size_fn"], PairTokenEstimate)
    beam.BatchElements(**kwargs)  # the kwargs are ones Beam's batching accepts
    assert pickle.loads(pickle.dumps(Qwen3Reranker("x")))._model is None


def test_pair_token_estimate_is_in_the_right_range(reranker):
    estimate = PairTokenEstimate()
    for i, (query, doc) in enumerate(PAIRS):
        pair = RerankPair("q", query, f"d{i}", doc, 0.0, 1)
        true = reranker.count_tokens((query, doc))
        assert true * 0.7 <= estimate(pair) <= true * 2 + 10, (true, estimate(pair))


# -- Beam ----------------------------------------------------------------------------------------
def _rerank_pairs() -> list[RerankPair]:
    return [
        RerankPair(
            query_id=f"q{i % len(QUERIES)}",
            query=query,
            doc_id=f"d{i}",
            doc_text=doc,
            first_stage_score=1.0 - i / 10,
            first_stage_rank=i + 1,
        )
        for i, (query, doc) in enumerate(PAIRS)
    ]


def _judgement_equals(expected: Judgement, actual: Judgement) -> bool:
    if not isinstance(actual, Judgement):
        return False
    same_ids = dataclasses.replace(actual, teacher_score=expected.teacher_score) == expected
    return same_ids and abs(actual.teacher_score - expected.teacher_score) <= 1e-5


def test_run_inference_pipeline(ref_scores, qwen3_reranker_dir):
    pairs = _rerank_pairs()  # PAIRS, in order
    expected = [
        Judgement(p.query_id, p.doc_id, s, p.first_stage_score, p.first_stage_rank) for p, s in zip(pairs, ref_scores)
    ]
    # Small budgets, so the pairs arrive in several Beam batches and several forward passes.
    budgets = TokenBudgets(forward=600, batch=600)
    estimate = PairTokenEstimate(max_length=512)
    assert sum(estimate(p) for p in pairs) > budgets.batch
    handler = _RecordingReranker(str(qwen3_reranker_dir), device="cpu", dtype="float32", max_length=512, budgets=budgets)
    recording.reset()
    with TestPipeline() as p:
        judged = p | beam.Create(pairs) | RunInference(handler)
        assert_that(judged, equal_to(expected, equals_fn=_judgement_equals))
    recording.assert_within_budgets(budgets.batch, budgets.forward)
    assert len(recording.BATCH_WEIGHTS) >= 2
    assert sum(recording.BATCH_WEIGHTS) == sum(estimate(p) for p in pairs)
    assert sum(rows for rows, _ in recording.PASSES) == len(pairs)


class _RecordingReranker(recording.Recording, RerankModelHandler):
    pass


def _grid_pairs() -> list[RerankPair]:
    return [
        RerankPair(f"q{i // len(DOCS)}", query, f"d{i % len(DOCS)}", doc, 1.0 - (i % len(DOCS)) / 10, i % len(DOCS) + 1)
        for i, (query, doc) in enumerate(GRID)
    ]


class _FailingQuery(RerankModelHandler):
    """A handler whose batches fail (not out of memory) when they hold ``query_id``."""

    def __init__(self, *args, query_id: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.query_id = query_id

    def run_inference(self, batch, model, inference_args=None):
        if any(group.query_id == self.query_id for group in batch):
            raise ValueError(f"broken batch with {self.query_id}")
        return super().run_inference(batch, model, inference_args)


def test_rerank_by_query_pipeline(grid_ref_scores, qwen3_reranker_dir):
    pairs = _grid_pairs()
    expected = [
        Judgement(p.query_id, p.doc_id, s, p.first_stage_score, p.first_stage_rank) for p, s in zip(pairs, grid_ref_scores)
    ]
    shuffled = pairs[:]
    random.Random(5).shuffle(shuffled)
    handler = RerankModelHandler(
        str(qwen3_reranker_dir), device="cpu", dtype="float32", max_length=512, share_prefix=True,
        budgets=TokenBudgets(batch=1500),
    )
    with TestPipeline() as p:
        out = p | beam.Create(shuffled) | RerankByQuery(handler)
        assert_that(out["results"], equal_to(expected, equals_fn=_judgement_equals), label="judgements")
        assert_that(out[DEAD], equal_to([]), label="no dead letters")


def test_rerank_by_query_dead_letters_every_pair_of_a_failed_batch(grid_ref_scores, qwen3_reranker_dir):
    pairs = _grid_pairs()
    expected = [
        Judgement(p.query_id, p.doc_id, s, p.first_stage_score, p.first_stage_rank)
        for p, s in zip(pairs, grid_ref_scores)
        if p.query_id != "q2"
    ]
    # A weight below one query's: each query is a batch of its own, and only q2's fails.
    handler = _FailingQuery(
        str(qwen3_reranker_dir), device="cpu", dtype="float32", max_length=512, share_prefix=True, query_id="q2",
        budgets=TokenBudgets(batch=100),
    )
    with TestPipeline() as p:
        out = p | beam.Create(pairs) | RerankByQuery(handler)
        assert_that(out["results"], equal_to(expected, equals_fn=_judgement_equals), label="judgements")
        letters = out[DEAD] | beam.Map(lambda d: (d.stage, d.source, d.reason, json.loads(d.record)))
        reason = "inference failed for its batch: ValueError: broken batch with q2"
        assert_that(
            letters,
            equal_to([("rerank", f"q2/{p.doc_id}", reason, {"query_id": "q2", "doc_id": p.doc_id}) for p in pairs
                      if p.query_id == "q2"]),
            label="dead letters",
        )


def test_handler_answers_a_query_group_with_a_list(grid_ref_scores, reranker, qwen3_reranker_dir):
    pairs = _grid_pairs()
    groups = [QueryPairs(f"q{i}", tuple(pairs[i * len(DOCS) : (i + 1) * len(DOCS)])) for i in range(len(QUERIES))]
    handler = RerankModelHandler(str(qwen3_reranker_dir), device="cpu")
    out = list(handler.run_inference([groups[0], pairs[-1], groups[1]], reranker))
    assert [type(x) for x in out] == [list, Judgement, list]
    got = [j.teacher_score for j in out[0]] + [out[1].teacher_score] + [j.teacher_score for j in out[2]]
    want = grid_ref_scores[: len(DOCS)] + grid_ref_scores[-1:] + grid_ref_scores[len(DOCS) : 2 * len(DOCS)]
    _close(got, want)
    assert [j.doc_id for j in out[2]] == [p.doc_id for p in groups[1].pairs]
    assert PairTokenEstimate()(groups[0]) == sum(PairTokenEstimate()(p) for p in groups[0].pairs)
    assert handler.get_num_bytes([groups[0]]) == sum(len(p.query) + len(p.doc_text) for p in groups[0].pairs)


def test_judgement_matcher_rejects_a_wrong_score():
    a = Judgement("q", "d", 0.5, 1.0, 1)
    assert _judgement_equals(a, dataclasses.replace(a, teacher_score=0.5 + 1e-6))
    assert not _judgement_equals(a, dataclasses.replace(a, teacher_score=0.51))
    assert not _judgement_equals(a, dataclasses.replace(a, doc_id="e"))
    with pytest.raises(BeamAssertException):
        equal_to([a], equals_fn=_judgement_equals)([dataclasses.replace(a, teacher_score=0.6)])


# -- out of memory -------------------------------------------------------------------------------
class OOMAbove:
    """Stands in for ``Qwen3Reranker._forward`` / ``_forward_shared``: out of memory above
    ``max_tokens`` padded tokens (rows are id lists, or ``(ids, head_length)``)."""

    def __init__(self, forward, max_tokens: int):
        self.forward, self.max_tokens, self.calls = forward, max_tokens, []

    def __call__(self, ids):
        padded = max(len(x[0] if isinstance(x, tuple) else x) for x in ids) * len(ids)
        self.calls.append((len(ids), padded))
        if padded > self.max_tokens:
            raise torch.OutOfMemoryError(f"CUDA out of memory (fake: {padded} padded tokens)")
        return self.forward(ids)


@pytest.mark.parametrize("forward", ["_forward_shared", "_forward"])
def test_oom_splits_and_dead_letters_a_single_pair(reranker, qwen3_reranker_dir, ref_scores, forward):
    pairs = _rerank_pairs()
    scorer = copy.copy(reranker)
    scorer.share_prefix = forward == "_forward_shared"
    scorer.token_budget = 100_000  # one forward pass for the whole batch, so the fake sees it first
    lengths = [len(x) for x in scorer.encode_pairs([(p.query, p.doc_text) for p in pairs])]
    longest = max(range(len(pairs)), key=lengths.__getitem__)
    # Every pair fits alone except the longest.
    limit = lengths[longest] - 1
    assert sorted(lengths)[-2] <= limit
    fake = OOMAbove(getattr(scorer, forward), limit)
    setattr(scorer, forward, fake)

    handler = RerankModelHandler(str(qwen3_reranker_dir), device="cpu")
    out = list(handler.run_inference(pairs, scorer))

    assert fake.calls[0] == (len(pairs), max(lengths) * len(pairs))  # one pass first, then halves
    assert len(fake.calls) > 3 and fake.calls[-1][0] <= 2
    assert [type(x) for x in out] == [DeadLetter if i == longest else Judgement for i in range(len(pairs))]
    letter = out[longest]
    assert letter.stage == "rerank" and "out of memory" in letter.reason
    assert letter.source == f"{pairs[longest].query_id}/{pairs[longest].doc_id}"
    assert json.loads(letter.record)["doc_id"] == pairs[longest].doc_id
    _close([j.teacher_score for i, j in enumerate(out) if i != longest], [s for i, s in enumerate(ref_scores) if i != longest])

    with pytest.raises(RuntimeError, match="could not score 1 of"):
        scorer.score([(p.query, p.doc_text) for p in pairs])


def test_other_errors_propagate(reranker):
    scorer = copy.copy(reranker)

    def broken(ids):
        raise ValueError("not an OOM")

    scorer._forward = scorer._forward_shared = broken
    with pytest.raises(ValueError, match="not an OOM"):
        scorer.score(PAIRS[:2])


# -- GPU -----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_card_on_cpu(ref_scores, qwen3_reranker_dir):
    want = ref_scores
    fp32 = Qwen3Reranker(str(qwen3_reranker_dir), device="cuda", dtype=torch.float32).load()
    _close(fp32.score(PAIRS), want, tol=1e-3)  # TF32/SDPA kernels differ from CPU's
    bf16 = Qwen3Reranker(str(qwen3_reranker_dir), device="cuda").load()
    assert bf16.model.dtype == torch.bfloat16
    _close(bf16.score(PAIRS), want, tol=5e-2)
    alone = [bf16.score([pair])[0] for pair in PAIRS]
    _close(bf16.score(PAIRS), alone, tol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_shared_heads_match_card(grid_ref_scores, qwen3_reranker_dir):
    fp32 = Qwen3Reranker(str(qwen3_reranker_dir), device="cuda", dtype=torch.float32, share_prefix=True).load()
    _close(fp32.score(GRID), grid_ref_scores, tol=1e-3)
    bf16 = Qwen3Reranker(str(qwen3_reranker_dir), device="cuda", share_prefix=True).load()
    _close(bf16.score(GRID), grid_ref_scores, tol=5e-2)


class _NaNForTheFirstPair:
    """The real reranker, except that the first pair's score comes back NaN (its logits overflowed in fp16)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def score_batch(self, pairs, instruction=None):
        scores, failures, tokens = self.inner.score_batch(pairs, instruction)
        return [float("nan"), *scores[1:]], failures, tokens

    def compute_info(self):
        return self.inner.compute_info()


def test_a_nan_score_is_a_dead_letter_not_grade_0(reranker, qwen3_reranker_dir):
    from transforms.inference.rerank import NON_FINITE

    pairs = _grid_pairs()[:3]
    out = list(RerankModelHandler(str(qwen3_reranker_dir), device="cpu").run_inference(pairs,
                                                                                     _NaNForTheFirstPair(reranker)))
    assert [type(x) for x in out] == [DeadLetter, Judgement, Judgement]
    assert (out[0].stage, out[0].source, out[0].reason) == ("rerank", f"{pairs[0].query_id}/{pairs[0].doc_id}", NON_FINITE)

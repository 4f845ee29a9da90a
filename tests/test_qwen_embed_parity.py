"""TextEncoder against the Qwen3-Embedding model card's own code.

The reference is the card's transformers usage: ``AutoTokenizer(padding_side='left')``,
``AutoModel``, ``last_token_pool``, ``get_detailed_instruct`` for queries, ``F.normalize``;
for Matryoshka dimensions, truncate then normalise. The model is a tiny random Qwen3Model
with the real tokenizer and the repository's sentence-transformers files
(tests/qwen_fixtures.py); tolerance 1e-4 in fp32.
"""

from __future__ import annotations

import os
import random
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoModel, AutoTokenizer

from transforms.models.encoder import TextEncoder

TOL = 1e-4
DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"


# -- the model card's code ---------------------------------------------------------------------
def last_token_pool(last_hidden_states: Tensor,
                 attention_mask: Tensor) -> Tensor:
    left_padding = (attention_mask[:, -1].sum() == attention_mask.shape[0])
    if left_padding:
        return last_hidden_states[:, -1]
    else:
        sequence_lengths = attention_mask.sum(dim=1) - 1
        batch_size = last_hidden_states.shape[0]
        return last_hidden_states[torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths]


def get_detailed_instruct(task_description: str, query: str) -> str:
    return f'Instruct: {task_description}\nQuery:{query}'


class CardReference:
    def __init__(self, path):
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side='left')
        self.model = AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def embed(self, input_texts, max_length=8192, dim=None):
        batch_dict = self.tokenizer(
            input_texts,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch_dict.to(self.model.device)
        outputs = self.model(**batch_dict)
        embeddings = last_token_pool(outputs.last_hidden_state, batch_dict['attention_mask'])
        if dim is not None:
            embeddings = embeddings[:, :dim]  # MRL: truncate, then normalise
        embeddings = F.normalize(embeddings, p=2, dim=1)
        return embeddings.numpy()


# -- data --------------------------------------------------------------------------------------
_RNG = random.Random(11)
_WORDS = (
    "the capital of China is Beijing gravity force attracts two bodies towards each other weight "
    "physical objects planets sun 2025 café 北京 naïve Straße\n"
).split(" ")
DOCS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other. It gives weight to physical "
    "objects and is responsible for the movement of planets around the sun.",
    "y",
    "",
    *(" ".join(_RNG.choices(_WORDS, k=n)) for n in (4, 25, 60, 120)),
]
QUERIES = ["What is the capital of China?", "Explain gravity", "où est Pékin ? 2025"]


@pytest.fixture(scope="module")
def reference(qwen3_embedding_dir):
    return CardReference(qwen3_embedding_dir)


@pytest.fixture(scope="module")
def encoder(qwen3_embedding_dir):
    return TextEncoder(str(qwen3_embedding_dir), device="cpu", dtype=torch.float32).load()


def _close(got: np.ndarray, want: np.ndarray, tol: float = TOL) -> None:
    assert got.dtype == np.float32
    assert got.shape == want.shape, (got.shape, want.shape)
    assert float(np.abs(got - want).max()) <= tol, float(np.abs(got - want).max())


# -- parity --------------------------------------------------------------------------------------
def test_single_texts_match_card(reference, encoder):
    for text in DOCS:
        _close(encoder.encode([text]), reference.embed([text]))


def test_mixed_length_batch_matches_card_and_single_texts(reference, encoder):
    batch = encoder.encode(DOCS)
    _close(batch, reference.embed(DOCS))
    singles = np.concatenate([encoder.encode([text]) for text in DOCS])
    _close(batch, singles)
    _close(encoder.encode(DOCS[::-1])[::-1], singles)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)


def test_queries_get_the_default_prompt(reference, encoder):
    want = reference.embed([get_detailed_instruct(DEFAULT_TASK, q) for q in QUERIES])
    _close(encoder.encode(QUERIES, is_query=True), want)
    assert float(np.abs(encoder.encode(QUERIES) - want).max()) > 1e-3  # documents get no prompt


def test_queries_with_a_custom_instruction(reference, qwen3_embedding_dir):
    task = "Given a question, retrieve passages written in French"
    encoder = TextEncoder(str(qwen3_embedding_dir), device="cpu", dtype=torch.float32, query_instruction=task).load()
    _close(encoder.encode(QUERIES, is_query=True), reference.embed([get_detailed_instruct(task, q) for q in QUERIES]))
    _close(encoder.encode(DOCS[:3]), reference.embed(DOCS[:3]))  # documents are unaffected


@pytest.mark.parametrize("dim", [32, 48])
def test_matryoshka_dimensions(reference, qwen3_embedding_dir, dim):
    encoder = TextEncoder(str(qwen3_embedding_dir), device="cpu", dtype=torch.float32, dim=dim).load()
    assert encoder.dimension == dim
    got = encoder.encode(DOCS)
    _close(got, reference.embed(DOCS, dim=dim))
    full = reference.embed(DOCS)
    assert float(np.abs(got - full[:, :dim]).max()) > 1e-3  # renormalised, not a plain prefix
    queries = [get_detailed_instruct(DEFAULT_TASK, q) for q in QUERIES]
    _close(encoder.encode(QUERIES, is_query=True), reference.embed(queries, dim=dim))


def test_truncation_keeps_the_final_endoftext(reference, qwen3_embedding_dir):
    encoder = TextEncoder(str(qwen3_embedding_dir), device="cpu", dtype=torch.float32, max_length=16).load()
    ids = encoder.tokenize(DOCS)
    assert max(len(x) for x in ids) == 16 and all(x[-1] == 151643 for x in ids)
    _close(encoder.encode(DOCS), reference.embed(DOCS, max_length=16))


def test_a_tokenizer_without_the_endoftext_post_processor_still_ends_on_it(reference, qwen3_embedding_dir, tmp_path,
                                                                            encoder, caplog):
    """A Qwen3-Embedding checkpoint saved with the tokenizer as first published (no post-processor appending
    <|endoftext|>): the encoder appends it, truncated inputs included, and the vectors are the current ones."""
    from tests.qwen_offline import _write_tokenizer

    for name in os.listdir(qwen3_embedding_dir):
        os.symlink(qwen3_embedding_dir / name, tmp_path / name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.unlink(tmp_path / name)
    _write_tokenizer(tmp_path, padding_side="left", append_eos=False)
    assert AutoTokenizer.from_pretrained(tmp_path)("yes")["input_ids"] == [9693]  # as first published
    old = TextEncoder(str(tmp_path), device="cpu", dtype=torch.float32).load()
    assert "does not end inputs with <|endoftext|>" in caplog.text
    assert old.tokenize(["yes"]) == [[9693, 151643]] and old.count_tokens(DOCS) == encoder.count_tokens(DOCS)
    _close(old.encode(DOCS), reference.embed(DOCS))
    _close(old.encode(QUERIES, is_query=True), encoder.encode(QUERIES, is_query=True))
    short = TextEncoder(str(tmp_path), device="cpu", dtype=torch.float32, max_length=16).load()
    assert all(len(x) <= 16 and x[-1] == 151643 for x in short.tokenize(DOCS))
    _close(short.encode(DOCS), reference.embed(DOCS, max_length=16))
    assert encoder.append_id is None  # the current tokenizer appends it itself


def test_a_qwen3_folder_without_pooling_files_is_mean_pooled_and_says_so(qwen3_embedding_dir, tmp_path, caplog):
    """Without modules.json (a base LM, or Qwen3-Embedding copied without sentence-transformers' files) the
    model is mean-pooled, as sentence-transformers would: silent, that is a wrong index. Said once a process."""
    from transforms.models.settings import EmbeddingSpec

    for name in os.listdir(qwen3_embedding_dir):
        if name not in ("modules.json", "1_Pooling", "2_Normalize", "config_sentence_transformers.json"):
            os.symlink(qwen3_embedding_dir / name, tmp_path / name)
    with caplog.at_level("WARNING", logger="transforms.models.settings"):
        for _ in range(2):
            assert EmbeddingSpec.read(str(tmp_path)).settings.pooling == "mean"
        assert EmbeddingSpec.read(str(qwen3_embedding_dir)).settings.pooling == "lasttoken"
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: a Qwen3 model without sentence-transformers' pooling files (modules.json): it is mean-pooled "
        "with no query prompt, not Qwen3-Embedding's last-token pooling and instruction; copy the whole "
        "Qwen3-Embedding repository if that is what this is"
    ]


def test_count_tokens_and_dimension(reference, encoder):
    want = [len(reference.tokenizer(text)["input_ids"]) for text in DOCS]
    assert encoder.count_tokens(DOCS) == want
    assert encoder.tokenize(["yes"]) == [[9693, 151643]]  # the repository's EOS post-processor applies
    assert encoder.dimension == 64


# -- GPU -----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_card_on_cpu(reference, qwen3_embedding_dir):
    want = reference.embed(DOCS)
    fp32 = TextEncoder(str(qwen3_embedding_dir), device="cuda", dtype=torch.float32).load()
    assert not fp32.packing  # no varlen kernel in fp32: padded passes
    _close(fp32.encode(DOCS), want, tol=1e-3)  # TF32/SDPA kernels differ from CPU's
    bf16 = TextEncoder(str(qwen3_embedding_dir), device="cuda", packing=False).load()
    got = bf16.encode(DOCS)
    assert (got * want).sum(axis=1).min() > 0.99  # cosine to the fp32 reference
    singles = np.concatenate([bf16.encode([text]) for text in DOCS])
    assert (got * singles).sum(axis=1).min() > 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copies_are_placed_on_a_gpu_and_batches_run_there(qwen3_embedding_dir):
    """``cuda`` gets a GPU index at load (``place_on_gpu``), and a Beam batch (``embed_batch``, under ``device_lock``,
    which makes that device current) gives the vectors ``encode`` gives."""
    encoder = TextEncoder(str(qwen3_embedding_dir), device="cuda").load()
    assert encoder.device.index is not None and encoder.device.index < torch.cuda.device_count()
    lengths = [len(ids) for ids in encoder.tokenize(DOCS)]
    vectors, failures, tokens = encoder.embed_batch(DOCS, lengths)
    assert failures == [] and tokens == sum(lengths)
    got = np.stack(vectors)
    assert got.shape == (len(DOCS), encoder.dimension)
    assert float((got * encoder.encode(DOCS)).sum(axis=1).min()) > 0.999  # bf16 passes cut another way


# -- packed rows (padding-free) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def packed(qwen3_embedding_dir):
    return TextEncoder(str(qwen3_embedding_dir), device="cpu", dtype=torch.float32, packing=True).load()


def test_packed_rows_match_card(reference, packed):
    _close(packed.encode(DOCS), reference.embed(DOCS))
    queries = [get_detailed_instruct(DEFAULT_TASK, q) for q in QUERIES]
    _close(packed.encode(QUERIES, is_query=True), reference.embed(queries))


def test_packed_rows_are_independent_of_their_neighbours(reference, packed):
    """A small budget packs the texts into several rows, in another order: same vectors."""
    import copy

    small = copy.copy(packed)
    small.token_budget = 64
    calls: list[int] = []
    forward = small._forward_packed
    small._forward_packed = lambda ids: calls.append(len(ids)) or forward(ids)
    _close(small.encode(DOCS[::-1])[::-1], reference.embed(DOCS))
    assert len(calls) > 2 and max(calls) >= 3  # several rows, and rows hold several texts


def test_packed_rows_default_to_varlen_attention(packed):
    assert packed.attn_implementation == "varlen"
    assert packed.model.config._attn_implementation == "varlen"


def test_unpacked_positions_would_mix_texts(qwen3_embedding_dir, packed):
    """What the load-time check guards against: one row, positions not restarted (sdpa reads the
    boundaries from the positions alone)."""
    sdpa = TextEncoder(
        str(qwen3_embedding_dir), device="cpu", dtype=torch.float32, packing=True, attn_implementation="sdpa"
    ).load()
    ids = sdpa.tokenize(DOCS[:3])
    flat = torch.tensor([t for seq in ids for t in seq])[None]
    with torch.inference_mode():
        hidden = sdpa.model(input_ids=flat, use_cache=False).last_hidden_state[0]
    wrong = F.normalize(hidden[torch.tensor([len(x) for x in ids]).cumsum(0) - 1], dim=1).numpy()
    right = np.stack(sdpa._forward_packed(ids))
    assert float(np.abs(wrong - right).max()) > 1e-2
    _close(right, np.stack(packed._forward_packed(ids)))  # sdpa's dense mask and varlen agree


def test_compiled_packed_rows_match_card(reference, qwen3_embedding_dir):
    """``--backend compile`` with packing: varlen attention, the row length a dynamic dimension, so
    rows of every size run one graph (no recompilation per row length)."""
    encoder = TextEncoder(str(qwen3_embedding_dir), device="cpu", dtype=torch.float32, packing=True,
                          backend="compile").load()  # fmt: skip
    from torch._dynamo.utils import counters

    _close(encoder.encode(DOCS), reference.embed(DOCS))
    # one graph at most: none when an earlier test of this process compiled the same one (dynamo reuses it
    # for another instance of the model, whose weights are graph inputs)
    compiles = encoder._packed_runner.compiles
    assert compiles <= 1
    counters.clear()
    encoder.token_budget = 64  # rows of other lengths and text counts
    calls: list[int] = []
    forward = encoder._forward_packed_prepared
    encoder._forward_packed_prepared = lambda flat, *rest: calls.append(flat.shape[1]) or forward(flat, *rest)
    _close(encoder.encode(DOCS[::-1])[::-1], reference.embed(DOCS))
    assert len(set(calls)) > 2  # several row lengths ...
    assert counters["stats"]["unique_graphs"] == 0  # ... and not one graph compiled for them
    # a row of one token cannot keep a dynamic length: it runs eagerly, same vector
    assert len(encoder.tokenize([""])[0]) == 1
    _close(np.stack(encoder._forward_packed(encoder.tokenize([""]))), reference.embed([""]))
    assert counters["stats"]["unique_graphs"] == 0 and encoder._packed_runner.compiles == compiles


@pytest.mark.slow
def test_packed_rows_with_flex_attention_match_card(reference, qwen3_embedding_dir):
    """The GPU route for packing (flex_attention: a sparse block mask from the positions),
    compiled by inductor for the CPU here (~30 s): same vectors as the card's padded code."""
    encoder = TextEncoder(
        str(qwen3_embedding_dir), device="cpu", dtype=torch.float32, packing=True, attn_implementation="flex_attention"
    ).load()
    assert encoder.model.config._attn_implementation == "flex_attention"
    _close(encoder.encode(DOCS), reference.embed(DOCS))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_cuda_packed_varlen_matches_card(reference, qwen3_embedding_dir, backend):
    """FlashAttention's variable-length kernel (bf16 on CUDA), eager and compiled."""
    bf16 = TextEncoder(str(qwen3_embedding_dir), device="cuda", backend=backend).load()
    assert bf16.packing and bf16.attn_implementation == "varlen"  # the default on a GPU (--packing auto)
    got, want = bf16.encode(DOCS), reference.embed(DOCS)
    assert float((got * want).sum(axis=1).min()) > 0.99
    padded = TextEncoder(str(qwen3_embedding_dir), device="cuda", packing=False).load().encode(DOCS)
    assert float((got * padded).sum(axis=1).min()) > 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_packed_flex_attention_matches_card(reference, qwen3_embedding_dir):
    bf16 = TextEncoder(
        str(qwen3_embedding_dir), device="cuda", packing=True, attn_implementation="flex_attention"
    ).load()
    got, want = bf16.encode(DOCS), reference.embed(DOCS)
    assert float((got * want).sum(axis=1).min()) > 0.99


@pytest.mark.parametrize(("parallelism", "want"), [("false", [188, 256, 256]), ("0", [188, 256, 256]),
                                                   ("true", [700]), (None, [700])])  # fmt: skip
def test_long_lists_tokenise_in_slices_where_the_rust_pool_is_off(encoder, monkeypatch, parallelism, want):
    """Past 256 texts ``tokenize`` runs slices on a thread pool when TOKENIZERS_PARALLELISM turns the
    tokenizer's own pool off, and leaves it to that pool otherwise: same ids, same order."""
    import transforms.text.tokens as module

    texts = [f"{i} " + DOCS[i % len(DOCS)] for i in range(700)]
    one_call = encoder.tokenizer(texts, truncation=True, max_length=encoder.max_length)["input_ids"]
    calls: list[int] = []
    run = encoder.tokenizer.__class__.__call__
    monkeypatch.setattr(encoder.tokenizer.__class__, "__call__", lambda self, x, **kw: calls.append(len(x)) or run(self, x, **kw))
    monkeypatch.setattr(module, "_tokenize_threads", lambda: 2)
    if parallelism is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", parallelism)
    assert encoder.tokenize(texts) == one_call
    assert sorted(calls) == want


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_tokenises_on_its_own_threads(encoder):
    """A pool made before a fork has no threads in the child: the child makes its own, or it would hang."""
    texts = [f"{i} " + DOCS[i % len(DOCS)] for i in range(600)]
    want = encoder.tokenize(texts)  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 when its ids match
        try:
            os._exit(0 if encoder.tokenize(texts) == want else 3)
        finally:
            os._exit(4)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung tokenising")
    assert os.waitstatus_to_exitcode(status) == 0


def test_an_empty_instruction_sends_the_query_as_it_is(reference, qwen3_embedding_dir):
    # sentence-transformers' prompt="" : no prompt at all (it had fallen back to the model's default prompt)
    encoder = TextEncoder(str(qwen3_embedding_dir), device="cpu", dtype=torch.float32, query_instruction="").load()
    _close(encoder.encode(QUERIES, is_query=True), reference.embed(QUERIES))


def test_a_dim_below_qwen3_s_smallest_matryoshka_size_is_refused(qwen3_embedding_dir, minilm_path):
    from transforms.models.settings import EmbeddingSpec

    with pytest.raises(ValueError, match=r"^--dim 16 is below 32: Qwen3-Embedding was trained for Matryoshka sizes 32\.\."):
        EmbeddingSpec.read(str(qwen3_embedding_dir), dim=16)
    assert EmbeddingSpec.read(str(qwen3_embedding_dir), dim=32).size == 32
    assert EmbeddingSpec.read(minilm_path, dim=16).size == 16  # other models: truncation is the user's call

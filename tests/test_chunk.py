"""Chunk boundaries, offsets and token accounting, on the real MiniLM tokenizer."""

from __future__ import annotations

import json
import random

import pytest

from transforms.models.settings import EmbeddingSpec
from transforms.text.chunk import ChunkSettings, load_chunker
from transforms.types import DeadLetter, Document, title_prefix

WORDS = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen twenty".split()  # each is a single WordPiece token


def spans(words: list[str]) -> list[tuple[int, int]]:
    out, pos = [], 0
    for w in words:
        out.append((pos, pos + len(w)))
        pos += len(w) + 1
    return out


def test_windows_and_offsets_are_exact(minilm_path):
    # 10 tokens per chunk, 2 of them [CLS]/[SEP]: windows of 8 words, overlap 2 -> step 6.
    chunker = load_chunker(minilm_path, ChunkSettings(chunk_tokens=10, chunk_overlap=2))
    text = " ".join(WORDS)
    chunks = chunker.chunk(Document("d", text))
    s = spans(WORDS)
    expected = [(0, 8), (6, 14), (12, 20)]
    assert [(c.char_start, c.char_end) for c in chunks] == [(s[a][0], s[b - 1][1]) for a, b in expected]
    assert [c.text for c in chunks] == [" ".join(WORDS[a:b]) for a, b in expected]
    assert [c.chunk_index for c in chunks] == [0, 1, 2]
    assert [c.n_tokens for c in chunks] == [10, 10, 10]
    assert [c.n_chunks for c in chunks] == [3, 3, 3]
    assert all(c.embed_text == c.text and c.doc_id == "d" for c in chunks)


def test_title_is_prefixed_and_counted(minilm_path):
    chunker = load_chunker(minilm_path, ChunkSettings(chunk_tokens=11, chunk_overlap=0))
    doc = Document("d", " ".join(WORDS[:12]), title="numbers")
    chunks = chunker.chunk(doc)
    # "numbers\n" is one token: windows of 11 - 2 - 1 = 8 words.
    assert [c.text for c in chunks] == [" ".join(WORDS[:8]), " ".join(WORDS[8:12])]
    assert [c.embed_text for c in chunks] == ["numbers\n" + c.text for c in chunks]
    assert all(c.title == "numbers" for c in chunks)


def test_no_chunk_exceeds_its_budget_on_real_text(minilm_path, sample_dir):
    import pyarrow.parquet as pq

    chunker = load_chunker(minilm_path, ChunkSettings(chunk_tokens=64, chunk_overlap=16))
    rows = pq.read_table(sample_dir["corpus"]).to_pylist()
    rng = random.Random(0)
    for row in rng.sample(rows, 10):
        doc = Document(row["id"], row["text"], title=row["title"])
        chunks = chunker.chunk(doc)
        assert chunks[0].char_start == 0 or not doc.text[: chunks[0].char_start].strip()
        for a, b in zip(chunks, chunks[1:]):
            assert a.char_start < b.char_start < a.char_end  # windows overlap and move forward
        for c in chunks:
            assert c.text == doc.text[c.char_start : c.char_end]
            # what the model will actually see fits the window: nothing is silently truncated
            assert len(chunker.tokenizer(c.embed_text)["input_ids"]) <= 64 + 1
        assert not doc.text[chunks[-1].char_end :].strip()  # the whole text is covered


def test_chunks_at_the_models_limit_are_shortened_until_the_model_reads_all_of_them(minilm_path, sample_dir,
                                                                                     monkeypatch):
    """At --chunk-tokens 256 (MiniLM's limit) a window that starts inside a word reads as a token more on its
    own, and the model would drop the chunk's last token; those chunks lose a token, and no other chunk changes."""
    import pyarrow.parquet as pq

    import transforms.text.chunk as chunk_module

    rows = pq.read_table(sample_dir["corpus"]).to_pylist()
    docs = [Document(row["id"], row["text"], title=row["title"]) for row in rows]
    chunker = load_chunker(minilm_path, ChunkSettings(chunk_tokens=256, chunk_overlap=32))

    def model_reads(c) -> int:
        return len(chunker.tokenizer(c.embed_text)["input_ids"])

    fitted = [c for doc in docs for c in chunker.chunk(doc)]
    monkeypatch.setattr(chunk_module, "FIT_CHECK_TOKENS", -(10**6))  # the windows as counted, unchecked
    counted = [c for doc in docs for c in chunker.chunk(doc)]
    assert len(fitted) == len(counted) > 300
    over = [i for i, c in enumerate(counted) if model_reads(c) > 256]
    assert over, "no window came out over the limit: the corpus no longer tests this"
    assert max(model_reads(c) for c in fitted) <= 256
    assert [i for i, (a, b) in enumerate(zip(fitted, counted)) if a != b] == over
    for i in over:
        a, b = fitted[i], counted[i]
        assert (a.char_start, a.text) == (b.char_start, b.text[: len(a.text)]) and a.char_end < b.char_end
        assert model_reads(a) <= 256


def test_chunking_off_truncates_at_model_length_and_says_so(minilm_path):
    chunker = load_chunker(minilm_path, ChunkSettings(chunk_tokens=0, chunk_overlap=0))
    long_doc = Document("long", " ".join(WORDS * 20))  # 400 tokens > MiniLM's 256
    short_doc = Document("short", "one two three")
    (long_chunk,) = chunker.chunk(long_doc)
    (short_chunk,) = chunker.chunk(short_doc)
    assert long_chunk.truncated and long_chunk.n_tokens == 256
    assert long_chunk.text == long_doc.text[: long_chunk.char_end]
    assert len(long_chunk.text.split()) == 254  # 256 minus [CLS] and [SEP]
    assert not short_chunk.truncated and short_chunk.text == short_doc.text and short_chunk.n_tokens == 5


def test_a_title_that_fills_the_chunk_is_a_dead_letter_naming_the_row(minilm_path):
    chunker = load_chunker(minilm_path, ChunkSettings(chunk_tokens=10, chunk_overlap=0))
    doc = Document("d", "text", title="a very long title indeed", metadata={"lang": "en"}, source="f.parquet", row=6)
    assert chunker.chunk(doc) == DeadLetter(
        stage="chunk",
        # "a very long title indeed\n" is 5 tokens, [CLS] and [SEP] 2 more: 3 of 10 are left
        reason="the title (5 tokens) and the model's special tokens leave 3 tokens of a 10-token chunk for text "
               "(at least 8 needed)",
        source="row 7 of f.parquet",
        record='{"id": "d", "lang": "en", "text": "text", "title": "a very long title indeed"}',
    )  # fmt: skip


def test_without_a_title_the_dead_letter_blames_the_models_tokens(minilm_path):
    chunker = load_chunker(minilm_path, ChunkSettings(chunk_tokens=10, chunk_overlap=0))
    chunker.settings = ChunkSettings(chunk_tokens=9, chunk_overlap=0)  # settings no pre-flight checked
    result = chunker.chunk(Document("d", "one two three", source="f.parquet", row=0))
    assert isinstance(result, DeadLetter)
    assert result.reason == "the model's special tokens leave 7 tokens of a 9-token chunk for text (at least 8 needed)"


@pytest.mark.parametrize("chunk_tokens", [64, 0])  # 0: whole documents, which are no exception
@pytest.mark.parametrize("text", ["\x00\x00", "\u200b", "\ufeff"])
def test_a_text_without_tokens_is_a_dead_letter_naming_the_row_and_holding_the_text(minilm_path, text, chunk_tokens):
    chunker = load_chunker(minilm_path, ChunkSettings(chunk_tokens=chunk_tokens, chunk_overlap=0))
    result = chunker.chunk(Document("nul", text, source="/tmp/ri/rows.parquet", row=2))
    assert result == DeadLetter(
        stage="chunk", reason="text has no tokens", source="row 3 of /tmp/ri/rows.parquet",
        record=json.dumps({"id": "nul", "text": text}, sort_keys=True),
    )  # fmt: skip


def test_chunks_too_small_for_the_models_own_tokens_are_refused_before_the_job(minilm_path):
    """MiniLM adds [CLS] and [SEP]: a chunk needs 2 + 8 tokens, else every document would be a dead letter."""
    spec = EmbeddingSpec.read(minilm_path)
    message = ("--chunk-tokens 9 leaves 7 tokens for text after the model's 2 special and prompt tokens (at least 8 "
               "needed); pass --chunk-tokens 10 or more (0: one chunk per document, truncated)")  # fmt: skip
    with pytest.raises(ValueError) as refused:
        ChunkSettings(chunk_tokens=9, chunk_overlap=0).check_model(spec)
    assert str(refused.value) == message
    with pytest.raises(ValueError) as refused:  # a worker's chunker refuses them too
        load_chunker(spec, ChunkSettings(chunk_tokens=9, chunk_overlap=0))
    assert str(refused.value) == message
    ChunkSettings(chunk_tokens=10, chunk_overlap=0).check_model(spec)
    ChunkSettings(chunk_tokens=0, chunk_overlap=0).check_model(spec)  # whole documents: no window
    with pytest.raises(ValueError, match="maximum input length 256"):
        ChunkSettings(chunk_tokens=512, chunk_overlap=0).check_model(spec)


@pytest.mark.parametrize("tokens,overlap", [(-1, 0), (10, 10), (10, -1)])
def test_bad_settings_are_refused(tokens, overlap):
    with pytest.raises(ValueError):
        ChunkSettings(tokens, overlap)


def test_chunks_longer_than_the_model_are_refused(minilm_path):
    with pytest.raises(ValueError, match="maximum input length 256"):
        load_chunker(minilm_path, ChunkSettings(chunk_tokens=512, chunk_overlap=0))


def _long_texts() -> list[str]:
    """Real and awkward long documents: stdlib source (code and prose), one unbroken 'word' that spans
    the cut, runs of spaces, combining accents, CJK without spaces, and texts just around the limit."""
    import argparse
    import inspect
    import json

    texts = [inspect.getsource(argparse)[:30_000], inspect.getsource(json)[:8_000]]
    texts.append("abc" * 3000 + " tail words here")  # one pre-token of thousands of tokens
    texts.append("x " * 100 + "Q" * 4000)  # a few short words, then a huge one
    texts.append("word   " * 600 + "\n\n\n" * 50)
    texts.append("cafe\u0301 na\u0308ive " * 400)  # combining marks (NFD)
    texts.append("漢字かな交じり文。" * 400)
    texts += [" ".join(WORDS[i % 20] for i in range(n)) for n in (253, 254, 255, 300, 2000)]
    # WordPiece reads a word of over 100 characters as one [UNK]: a first cut that lands 95 characters
    # into such a word (after ~230 words) sees its pieces instead, which is why the last words never count.
    from transforms.text.chunk import CHARS_PER_TOKEN_GUESS

    cut = CHARS_PER_TOKEN_GUESS * (254 + 16)  # the first prefix of MiniLM's 254-token budget
    filler = " ".join(WORDS[i % 20] for i in range(230))
    texts.append(filler + " " * (cut - 95 - len(filler)) + "a" * 150 + " " + " ".join(WORDS * 5))
    return texts


@pytest.mark.parametrize("which", ["minilm", "qwen3"])
def test_chunking_off_tokenises_a_prefix_and_gives_the_whole_texts_chunk(which, minilm_path, qwen3_embedding_dir,
                                                                          monkeypatch):
    """One chunk per document tokenises only a prefix of a long text; the chunk (cut, tokens, flag)
    must be exactly what tokenising the whole text gives."""
    from transforms.text import chunk as chunk_module

    path = minilm_path if which == "minilm" else str(qwen3_embedding_dir)
    settings = ChunkSettings(chunk_tokens=0, chunk_overlap=0)
    chunker = load_chunker(path, settings, max_length=256)  # the tiny Qwen3's own limit is 32k
    seen: list[int] = []
    tokenize = chunker.tokenizer.__class__.__call__

    def spy(self, text, *args, **kwargs):
        seen.append(len(text))
        return tokenize(self, text, *args, **kwargs)

    docs = [Document(f"d{i}", t, title="A title" if i % 2 else None) for i, t in enumerate(_long_texts())]
    monkeypatch.setattr(chunker.tokenizer.__class__, "__call__", spy)
    got = [chunker.chunk(d) for d in docs]
    longest = max(seen)
    monkeypatch.setattr(chunk_module, "CHARS_PER_TOKEN_GUESS", 10**9)  # the reference: whole texts
    want = [chunker.chunk(d) for d in docs]
    assert got == want
    assert sum(c[0].truncated for c in got) >= 8  # most are cut, so the prefix path was taken ...
    assert longest < len(docs[0].text)  # ... and the longest document was never tokenised whole


@pytest.mark.parametrize("parallelism", ["false", "true"])
def test_chunking_a_list_gives_each_documents_chunks(minilm_path, sample_dir, monkeypatch, parallelism):
    """``chunk_many`` tokenises all texts in one call (in slices on threads when the Rust pool is off) and
    must give exactly ``chunk``'s answer for each document: chunks, dead letters (a title that leaves no
    room, a text with no tokens), in order."""
    import pyarrow.parquet as pq

    import transforms.text.tokens as tokens

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", parallelism)
    monkeypatch.setattr(tokens, "_TOKENIZE_SLICE", 16)  # slices of 16 documents: several on the thread pool
    chunker = load_chunker(minilm_path, ChunkSettings(chunk_tokens=64, chunk_overlap=16))
    rows = pq.read_table(sample_dir["corpus"]).to_pylist()
    docs = [Document(r["id"], r["text"], title=r["title"]) for r in rows]
    docs[3] = Document("long-title", "some text", title=" ".join(WORDS * 4))
    docs[5] = Document("blank", "   ")
    want = [chunker.chunk(d) for d in docs]
    got = chunker.chunk_many(docs)
    assert got == want
    assert isinstance(got[3], DeadLetter) and isinstance(got[5], DeadLetter)
    assert sum(len(x) for x in got if not isinstance(x, DeadLetter)) > len(docs)  # long texts: several chunks each


@pytest.mark.parametrize("which", ["minilm", "qwen3"])
def test_a_chunk_keeps_the_combining_marks_after_its_last_character(which, minilm_path, qwen3_embedding_dir):
    """Text in NFD ("e" + U+0301): Qwen's NFC normaliser composes "é" and maps it to the "e" alone, MiniLM strips
    the accent and maps it to nothing. A chunk cut at its last token's end lost the accent the model read."""
    import unicodedata

    path = minilm_path if which == "minilm" else str(qwen3_embedding_dir)
    text = unicodedata.normalize("NFD", "un café naïf au déjà-vu résumé " * 12 + "fin café")
    assert "e\u0301" in text
    for settings in (ChunkSettings(chunk_tokens=16, chunk_overlap=0), ChunkSettings(chunk_tokens=24, chunk_overlap=4)):
        chunks = load_chunker(path, settings, max_length=256).chunk(Document("d", text))
        assert chunks[-1].char_end == len(text) and chunks[-1].text.endswith("cafe\u0301")
        for c in chunks:
            assert c.text == text[c.char_start : c.char_end]
            assert not unicodedata.category(text[c.char_end : c.char_end + 1] or "x").startswith("M"), c.text
        if settings.chunk_overlap == 0:  # every character but the spaces between chunks is in one
            assert "".join(text[a.char_end : b.char_start] for a, b in zip(chunks, chunks[1:])).strip() == ""
    # one chunk per document, truncated: its text ends where the model's input does, accent included
    (whole,) = load_chunker(path, ChunkSettings(chunk_tokens=0, chunk_overlap=0), max_length=8).chunk(
        Document("d", text)
    )
    assert whole.truncated and not unicodedata.category(text[whole.char_end]).startswith("M")


def test_a_long_title_keeps_steps_of_half_a_window_not_one_token(minilm_path):
    # 24 tokens per chunk, 2 special, overlap 10: untitled windows of 22 words, step 12. A 12-token title leaves
    # windows of 10 words: the overlap of 10 made that steps of 1 token (191 chunks of 200 words); now 5 (39).
    chunker = load_chunker(minilm_path, ChunkSettings(chunk_tokens=24, chunk_overlap=10))
    words = [WORDS[i % len(WORDS)] for i in range(200)]
    title = " ".join(WORDS[:12])
    assert chunker._count(title_prefix(title)) == 12
    chunks = chunker.chunk(Document("d", " ".join(words), title=title))
    s = spans(words)
    expected = [(a, a + 10) for a in range(0, 191, 5)]
    assert [(c.char_start, c.char_end) for c in chunks] == [(s[a][0], s[b - 1][1]) for a, b in expected]
    untitled = chunker.chunk(Document("d", " ".join(words)))
    assert [(c.char_start, c.char_end) for c in untitled][:2] == [(s[0][0], s[21][1]), (s[12][0], s[33][1])]


def test_a_qwen3_tokenizer_without_the_endoftext_post_processor_chunks_as_the_current_one(qwen3_embedding_dir,
                                                                                           tmp_path, sample_dir):
    """A Qwen3-Embedding checkpoint saved with the tokenizer as first published: the encoder appends
    <|endoftext|> itself (``final_token_to_append``), so chunks must leave it room. They come out as the current
    tokenizer's, which adds it: at the model's limit the encoder reads every token of each chunk, and a
    truncated document ends where the encoder's input does."""
    import os

    import pyarrow.parquet as pq

    from tests.qwen_offline import _write_tokenizer
    from transforms.models.encoder import TextEncoder

    for name in os.listdir(qwen3_embedding_dir):
        if name not in ("tokenizer.json", "tokenizer_config.json"):
            os.symlink(qwen3_embedding_dir / name, tmp_path / name)
    _write_tokenizer(tmp_path, padding_side="left", append_eos=False)
    rows = pq.read_table(sample_dir["corpus"]).to_pylist()[:12]
    docs = [Document(row["id"], row["text"], title=row["title"]) for row in rows]
    limit = 48
    got = {}
    for settings in (ChunkSettings(chunk_tokens=limit, chunk_overlap=8), ChunkSettings(chunk_tokens=0)):
        old = load_chunker(str(tmp_path), settings, max_length=limit)
        new = load_chunker(str(qwen3_embedding_dir), settings, max_length=limit)
        assert old.fixed_tokens == new.fixed_tokens == 1
        got[settings.chunk_tokens] = [c for d in docs for c in old.chunk(d)]
        assert got[settings.chunk_tokens] == [c for d in docs for c in new.chunk(d)]
    windows, whole = got[limit], got[0]
    assert len(windows) > 5 * len(docs) and sum(c.truncated for c in whole) > len(docs) / 2
    encoder = TextEncoder(str(tmp_path), device="cpu", max_length=limit).load()
    assert encoder.append_id == 151643
    for chunks in (windows, whole):
        inputs = encoder.tokenize([c.embed_text for c in chunks])
        assert max(map(len, inputs)) == limit
        for c, ids in zip(chunks, inputs):  # the encoder reads all of the chunk's text, then <|endoftext|>
            assert ids == old.tokenizer(title_prefix(c.title) + c.text)["input_ids"] + [151643], c

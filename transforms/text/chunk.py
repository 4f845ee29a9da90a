"""Chunking documents by the embedding model's own tokens.

A window of ``chunk_tokens`` counts everything the model will see: special tokens, the
document prompt and the title prefix, so no chunk is silently truncated by the model.
Windows overlap by ``chunk_overlap`` tokens. Character offsets come from the fast
tokenizer's offset mapping, so ``chunk.text == document.text[char_start:char_end]``.
"""

from __future__ import annotations

import dataclasses
import time
import unicodedata
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.io.parquet import row_position
from transforms.models.settings import (
    EmbeddingSpec,
    final_token_to_append,
    hand_over_tokenizer,
    load_tokenizer,
    read_json,
)
from transforms.progress import count_time
from transforms.text.tokens import tokenize_ids
from transforms.types import DEAD, Chunk, DeadLetter, Document, title_prefix

MIN_WINDOW_TOKENS = 8
# Documents tokenised in one call by the chunking step (ChunkDocuments).
CHUNK_BATCH = 64
# Characters per token to start a long document's prefix at (English runs ~4-5); the prefix doubles when short.
CHARS_PER_TOKEN_GUESS = 6
# Chunks of --chunk-tokens within this many tokens of the model's limit are tokenised again as the encoder
# will (Chunker._fit): a window's text read on its own can be a token or two longer than the window.
FIT_CHECK_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class ChunkSettings:
    chunk_tokens: int = 512  # 0: one chunk per document, truncated at the model's maximum length
    chunk_overlap: int = 64

    def __post_init__(self) -> None:
        if self.chunk_tokens < 0:
            raise ValueError(f"--chunk-tokens must be >= 0, got {self.chunk_tokens}")
        if self.chunk_tokens and not 0 <= self.chunk_overlap < self.chunk_tokens:
            raise ValueError(
                f"--chunk-overlap must be in [0, --chunk-tokens), got {self.chunk_overlap} with "
                f"--chunk-tokens {self.chunk_tokens}"
            )

    def check_limit(self, max_length: int, fixed_tokens: int | None = None) -> None:
        """Chunks must fit the model and leave room for text: ``ValueError`` saying what to pass when they do not.

        ``fixed_tokens``: what the model adds to every input (special tokens, document prompt;
        ``fixed_token_count``); when given, a chunk must keep at least ``MIN_WINDOW_TOKENS`` of text
        after them, or every document would be a dead letter: refused here, before the job, instead.
        """
        if self.chunk_tokens > max_length:
            raise ValueError(
                f"--chunk-tokens {self.chunk_tokens} is more than the model's maximum input length {max_length}; "
                f"pass --chunk-tokens {max_length} or less (0: one chunk per document, truncated)"
            )
        if fixed_tokens is not None and self.chunk_tokens and self.chunk_tokens - fixed_tokens < MIN_WINDOW_TOKENS:
            raise ValueError(
                f"--chunk-tokens {self.chunk_tokens} leaves {self.chunk_tokens - fixed_tokens} tokens for text after "
                f"the model's {fixed_tokens} special and prompt tokens (at least {MIN_WINDOW_TOKENS} needed); pass "
                f"--chunk-tokens {fixed_tokens + MIN_WINDOW_TOKENS} or more (0: one chunk per document, truncated)"
            )

    def check_model(self, spec: EmbeddingSpec) -> None:
        """``check_limit`` against the model of ``spec``: its maximum length, then (reading its tokenizer,
        only when chunking) the tokens it adds to every chunk. The job's pre-flight calls this."""
        self.check_limit(spec.max_length)
        if self.chunk_tokens:
            tokenizer = load_tokenizer(spec.path)
            fixed = fixed_token_count(tokenizer, spec.settings.document_prompt, appended_token_count(spec, tokenizer))
            hand_over_tokenizer(tokenizer, spec.path)  # to an in-process job's chunker (load_chunker)
            self.check_limit(spec.max_length, fixed)


def fixed_token_count(tokenizer: Any, document_prompt: str = "", appended: int = 0) -> int:
    """Tokens the model adds around every document: specials (e.g. [CLS]/[SEP], Qwen3's EOS), the prompt, and
    ``appended``: the tokens the encoder adds after the tokenizer's (``appended_token_count``)."""
    prompt = len(tokenizer(document_prompt, add_special_tokens=False)["input_ids"]) if document_prompt else 0
    return tokenizer.num_special_tokens_to_add(pair=False) + prompt + appended


def appended_token_count(spec: EmbeddingSpec, tokenizer: Any) -> int:
    """1 where the encoder appends a final token the tokenizer does not add (a Qwen3-Embedding checkpoint saved
    with the tokenizer as first published: ``transforms.models.settings.final_token_to_append``), else 0.

    Read from the model's ``config.json`` alone, so chunking loads no weights; the encoder warns of it."""
    if spec.settings.pooling != "lasttoken":  # the only pooling it applies to: most models read no file here
        return 0
    config = read_json(spec.path, "config.json")
    if not isinstance(config, dict):
        return 0
    appended = final_token_to_append(tokenizer, SimpleNamespace(**config), spec.settings.pooling, warn=False)
    return int(appended is not None)


class Chunker:
    """Pure chunking logic around a tokenizer (no Beam), so it is tested directly."""

    def __init__(
        self, tokenizer: Any, settings: ChunkSettings, max_length: int, document_prompt: str = "", appended: int = 0,
    ) -> None:
        """``appended``: tokens the encoder adds after the tokenizer's own (``appended_token_count``)."""
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("chunking needs a fast tokenizer (offset mapping)")
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_length = max_length
        self.document_prompt = document_prompt
        self.appended = appended
        self.fixed_tokens = fixed_token_count(tokenizer, document_prompt, appended)
        settings.check_limit(max_length, self.fixed_tokens)

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def chunk_many(self, docs: Sequence[Document]) -> list[list[Chunk] | DeadLetter]:
        """``chunk`` of each document, their texts tokenised in one call: the Rust tokenizer runs a list on
        its own threads (or ``tokenize_ids`` slices it on threads where that pool is off), where one call per
        document runs on one core. The chunks are the same as ``chunk``'s (tested)."""
        if self.settings.chunk_tokens == 0 or len(docs) < 2:  # whole documents: _head_offsets tokenises prefixes
            return [self.chunk(doc) for doc in docs]
        offsets = tokenize_ids(
            self.tokenizer, [doc.text for doc in docs], field="offset_mapping", add_special_tokens=False,
            return_offsets_mapping=True,
        )  # fmt: skip
        return [self.chunk(doc, doc_offsets) for doc, doc_offsets in zip(docs, offsets)]

    def chunk(self, doc: Document, offsets: Sequence[tuple[int, int]] | None = None) -> list[Chunk] | DeadLetter:
        """The document's chunks, or a ``DeadLetter`` naming its row when it has none: a title that leaves
        fewer than ``MIN_WINDOW_TOKENS`` of a chunk for text, or a text the tokenizer reads as no tokens
        (NULs, zero-width spaces). ``offsets``: the text's token offsets, when already computed (``chunk_many``)."""
        prefix = title_prefix(doc.title)
        if self.settings.chunk_tokens == 0:
            whole = self._whole(doc, prefix)
            return whole if isinstance(whole, DeadLetter) else [whole]
        prefix_tokens = self._count(prefix)  # the same for every chunk of the document
        window = self.settings.chunk_tokens - self.fixed_tokens - prefix_tokens
        if window < MIN_WINDOW_TOKENS:
            # Only a title can get here: check_limit refuses settings that leave too little room without one.
            fixed = "special and prompt tokens" if self.document_prompt else "special tokens"
            what = f"the title ({prefix_tokens} tokens) and the model's {fixed}" if prefix else f"the model's {fixed}"
            reason = (f"{what} leave {max(window, 0)} tokens of a {self.settings.chunk_tokens}-token chunk for "
                      f"text (at least {MIN_WINDOW_TOKENS} needed)")  # fmt: skip
            return _dead_letter(doc, reason)
        if offsets is None:
            offsets = self.tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        n = len(offsets)
        if n == 0:
            return _dead_letter(doc, "text has no tokens")
        step = self._step(window)
        # Starts 0, step, 2*step ... up to the first window that reaches the end of the text.
        windows = [(s, min(s + window, n)) for s in range(0, max(n - window, 0) + step, step)]

        def at(index: int, start: int, end: int) -> Chunk:
            char_start = offsets[start][0]
            char_end = _through_marks(doc.text, offsets[end - 1][1], offsets[end][0] if end < n else len(doc.text))
            text = doc.text[char_start:char_end]
            return Chunk(
                doc_id=doc.doc_id,
                chunk_index=index,
                text=text,
                char_start=char_start,
                char_end=char_end,
                n_tokens=(end - start) + self.fixed_tokens + prefix_tokens,
                embed_text=prefix + text,
                title=doc.title,
                metadata=doc.metadata,
                n_chunks=len(windows),
            )

        chunks = [at(index, start, end) for index, (start, end) in enumerate(windows)]
        if self.settings.chunk_tokens > self.max_length - FIT_CHECK_TOKENS:
            chunks = self._fit(chunks, windows, at)
        return chunks

    def _inputs_length(self, chunk: Chunk) -> int:
        """Tokens of the chunk as the encoder tokenises it: the prompt and the text with the special tokens."""
        return len(self.tokenizer(self.document_prompt + chunk.embed_text)["input_ids"]) + self.appended

    def _fit(self, chunks: list[Chunk], windows: list[tuple[int, int]], at) -> list[Chunk]:
        """Chunks near the model's limit, each shortened by a token at a time until the model reads all of it.

        A window counts the document's tokens, but its text is tokenised again on its own: a window
        that starts inside a word reads it as a word start ("##ing" becomes "ing", or two tokens), so a
        full window can come out a token over. At the model's limit the encoder would drop that last
        token, and the vector would not cover the chunk's text. Only such chunks change (later windows
        keep their starts), so an index built before this keeps every other chunk.
        """
        lengths = [len(ids) + self.appended for ids in tokenize_ids(
            self.tokenizer, [self.document_prompt + c.embed_text for c in chunks], add_special_tokens=True,
        )]  # fmt: skip
        fitted = list(chunks)
        for index, ((start, end), length) in enumerate(zip(windows, lengths)):
            while length > self.max_length and end - start > 1:
                end -= 1
                fitted[index] = at(index, start, end)
                length = self._inputs_length(fitted[index])
        return fitted

    def _step(self, window: int) -> int:
        """Tokens from one chunk's start to the next: the window less ``--chunk-overlap``. A title shrinks the
        window, not the overlap, and a long one left steps of one token (a chunk per token of text); so with a
        title the step is at least half the window (or the step without a title, when that is smaller)."""
        overlap = self.settings.chunk_overlap
        step = window - min(overlap, window - 1)
        untitled = self.settings.chunk_tokens - self.fixed_tokens
        return max(step, min(untitled - min(overlap, untitled - 1), -(-window // 2)))

    def _whole(self, doc: Document, prefix: str) -> Chunk | DeadLetter:
        embed_text = prefix + doc.text
        budget = self.max_length - self.fixed_tokens - self._count(prefix)  # tokens left for the text
        offsets, more = self._head_offsets(doc.text, max(budget, 1))
        if not offsets:
            return _dead_letter(doc, "text has no tokens")
        truncated = more or len(offsets) > budget  # a title can leave budget <= 0
        # Where the model's truncation will cut, mapped back into the document text.
        kept = max(budget, 1)
        next_start = offsets[kept][0] if len(offsets) > kept else len(doc.text)
        char_end = _through_marks(doc.text, offsets[kept - 1][1], next_start) if truncated else len(doc.text)
        n_tokens = min(len(offsets), budget) + self.max_length - budget
        return Chunk(
            doc_id=doc.doc_id,
            chunk_index=0,
            text=doc.text[:char_end],
            char_start=0,
            char_end=char_end,
            n_tokens=n_tokens,
            embed_text=embed_text,
            title=doc.title,
            metadata=doc.metadata,
            truncated=truncated,
        )

    def _head_offsets(self, text: str, budget: int) -> tuple[list[tuple[int, int]], bool]:
        """The offsets of the text's first tokens (all of them, or at least the first ``budget + 1`` when
        there are more) and whether there are more than ``budget``.

        A long document is tokenised only as far as it must be: a prefix of the text, doubled until
        more than ``budget`` tokens come before its last two words. Tokenisers split text into words
        (pre-tokens) and tokenise each on its own, so cutting the text changes at most its last words'
        tokens: the tokens before them are the whole text's (tested against whole-text tokenisation,
        awkward texts included). On the 1,479 long documents of ``bench/index_cpu.py`` (up to 2,142
        tokens, 256 kept) chunking took 0.73 s instead of 0.94 s; the saving grows with the length.
        """
        limit = CHARS_PER_TOKEN_GUESS * (budget + 16)
        while limit < len(text):
            enc = self.tokenizer(text[:limit], add_special_tokens=False, return_offsets_mapping=True)
            words = enc.word_ids()
            if words and words[-1] is not None:
                last = words[-1]
                stable = next((i for i, w in enumerate(words) if w is None or w >= last - 1), len(words))
                if stable > budget:  # the token after the first ``budget`` is the whole text's too
                    return enc["offset_mapping"][: budget + 1], True
            limit *= 2
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return offsets, len(offsets) > budget


def _through_marks(text: str, char_end: int, limit: int) -> int:
    """``char_end`` moved past the combining marks (category M) that follow it before ``limit`` (the next
    token's start). A tokenizer whose normaliser composes (Qwen's NFC: "e" + U+0301 -> "é") maps the composed
    character to its base alone, and one that strips accents (MiniLM) maps the mark to no token: cut at the
    token's end, a chunk would lose the mark ("café" in NFD read as "cafe") though the model read it."""
    while char_end < limit and unicodedata.category(text[char_end]).startswith("M"):
        char_end += 1
    return char_end


def _dead_letter(doc: Document, reason: str) -> DeadLetter:
    """A chunk-stage dead letter: named by its row, holding the document as the read stage's letters hold
    the row (id, text, title when there is one, metadata columns), so it can be fixed and fed again."""
    where = row_position(doc.source, doc.row) if doc.row >= 0 else doc.source
    record = {**doc.metadata, "id": doc.doc_id, "text": doc.text}
    if doc.title is not None:
        record["title"] = doc.title
    return DeadLetter.of("chunk", reason, where, record)


def load_chunker(model: EmbeddingSpec | str, settings: ChunkSettings, max_length: int | None = None) -> Chunker:
    """A chunker for the model's tokenizer; ``model`` is the job's ``EmbeddingSpec`` (or an id,
    read here, with ``max_length`` overriding the model's limit)."""
    spec = model if isinstance(model, EmbeddingSpec) else EmbeddingSpec.read(model, max_length=max_length)
    tokenizer = load_tokenizer(spec.path)
    # Whole documents are tokenised here on purpose (to find windows); silence the
    # "sequence longer than the model's maximum" warning that would fire for each one.
    tokenizer.model_max_length = 1 << 40
    appended = appended_token_count(spec, tokenizer)
    return Chunker(tokenizer, settings, spec.max_length, spec.settings.document_prompt, appended)


class _ChunkDocuments(beam.DoFn):
    def __init__(self, spec: EmbeddingSpec, settings: ChunkSettings) -> None:
        self.spec = spec
        self.settings = settings
        self.chunks = Metrics.counter("corpus_etl", "chunks")
        self.tokens = Metrics.counter("corpus_etl", "tokens")
        self.truncated = Metrics.counter("corpus_etl", "documents_truncated")
        self.rejected = Metrics.counter("corpus_etl", "documents_rejected_by_chunker")
        self.token_dist = Metrics.distribution("corpus_etl", "chunk_tokens")

    def setup(self) -> None:
        self.chunker = load_chunker(self.spec, self.settings)

    def start_bundle(self) -> None:
        self.seconds = 0.0

    def finish_bundle(self) -> None:
        count_time("chunk", self.seconds)  # once a bundle: a counter update per document would cost more

    def process(self, docs: list[Document]):
        started = time.perf_counter()
        results = self.chunker.chunk_many(docs)
        self.seconds += time.perf_counter() - started
        for result in results:
            if isinstance(result, DeadLetter):
                self.rejected.inc()
                yield beam.pvalue.TaggedOutput(DEAD, result)
                continue
            for chunk in result:
                self.chunks.inc()
                self.tokens.inc(chunk.n_tokens)
                self.token_dist.update(chunk.n_tokens)
                if chunk.truncated:
                    self.truncated.inc()
                yield chunk


class ChunkDocuments(beam.PTransform):
    """``Document`` → ``Chunk`` (main) and ``DeadLetter`` (tag ``dead_letter``)."""

    def __init__(self, spec: EmbeddingSpec, settings: ChunkSettings) -> None:
        super().__init__()
        self.spec = spec
        self.settings = settings

    def expand(self, docs):
        # Lists of documents, so their texts are tokenised in one call (Chunker.chunk_many): the chunk step of
        # bench/gpu_index.py's 8,192 documents took 3.9-4.0 s instead of 6.8-7.4 s on 2 cores (BENCHMARKS.md).
        batches = docs | "Batch" >> beam.BatchElements(min_batch_size=CHUNK_BATCH, max_batch_size=CHUNK_BATCH)
        result = batches | "Chunk" >> beam.ParDo(_ChunkDocuments(self.spec, self.settings)).with_outputs(
            DEAD, main="chunks"
        )
        return {"chunks": result.chunks, DEAD: result[DEAD]}

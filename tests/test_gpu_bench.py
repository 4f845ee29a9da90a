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

"""``bench/gpu_embed.py`` runs on CPU with the tiny Qwen3 (``--tiny --device cpu``): the GPU table's code path.

The compiled variants but one are left out here (compile parity: tests/test_fast_paths.py and
tests/test_qwen_embed_parity.py); a GPU machine runs every variant with ``make bench-gpu``.
"""

from __future__ import annotations


def test_gpu_embed_smoke_run_prints_one_table(qwen3_embedding_dir, capsys):
    from bench.gpu_embed import main

    main(["--tiny", "--device", "cpu", "--docs", "6", "--doc-tokens", "20,40",
          "--variants", "loop,padded,packed,packed-job,packed-compiled-dynamic,packed-liger",
          "--model-dir", str(qwen3_embedding_dir)])  # fmt: skip
    out = capsys.readouterr().out
    table = out.split("| method |")[-1]
    assert "| method | wall s | throughput | tokens/s | MFU |" in out
    assert "transformers loop" in table and "padded batches" in table and "packed rows, varlen, next" not in table
    assert "packed rows, varlen, 8192 token budget" in table  # eager (no overlap on CPU)
    # timed as the index job calls the encoder (embed_batch, token counts given): the same vectors
    job = [r for r in table.splitlines() if "as the index job calls it" in r]
    assert len(job) == 1 and float(job[0].split("|")[-2]) >= 0.9999, table
    # torch.compile(dynamic=True): one graph, the same vectors as the padded reference (last column)
    dynamic = [r for r in table.splitlines() if "torch.compile(dynamic=True)" in r]
    assert len(dynamic) == 1 and "(1 graphs," in dynamic[0] and float(dynamic[0].split("|")[-2]) >= 0.9999, table
    assert "| failed" not in table


def test_gpu_profile_smoke_run_with_packed_rows(capsys):
    """The model-only profile a GPU lease runs (``bench/gpu_profile.py --packed``), on the tiny config."""
    from bench.gpu_profile import main

    main(["--tiny", "--device", "cpu", "--tokens", "512", "--packed", "--liger"])
    out = capsys.readouterr().out
    rows = out.split("| case | ms |")[-1]
    assert "varlen, one packed row of" in rows and "no padding), eager" in rows and "torch.compile |" in rows
    # Liger's rows need CUDA: on CPU they are one failure line, and the other rows stand
    assert "Liger kernels | failed: ValueError: Liger's kernels are Triton kernels for CUDA" in out


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


def test_gpu_index_smoke_run_indexes_every_document(qwen3_embedding_dir, tmp_path, capsys):
    """The whole-job GPU bench (``bench/gpu_index.py``) on CPU with the tiny Qwen3: a real ``corpus-etl index``
    subprocess whose summary becomes the row; every document (20, the long corpus's first ones) is a point."""
    from bench.gpu_index import main

    main(["--tiny", "--device", "cpu", "--docs", "20", "--backends", "eager", "--chunk-tokens", "4096",
          "--model-dir", str(qwen3_embedding_dir), "--workdir", str(tmp_path),
          "--job-args", "", "--job-args", "--share-model machine"])  # fmt: skip
    rows = capsys.readouterr().out.strip().splitlines()[-2:]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [(c[0], c[1], c[7], c[-1]) for c in cells] == [
        ("eager", "20", "20", "process"),  # a CPU job: one copy per process
        ("eager `--share-model machine`", "20", "20", "machine"),
    ], rows


def test_gpu_attention_smoke_run_reports_every_route(capsys):
    """``bench/gpu_attention.py`` on CPU: the CUDA-only kernels become rows with their error, flex_attention runs."""
    from bench.gpu_attention import main

    main(["--device", "cpu", "--tokens", "300", "--flex"])
    table = capsys.readouterr().out.split("| route | ms |")[-1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    assert len(rows) == 6, table
    flex = [r for r in rows if r.startswith("| flex_attention")]
    assert len(flex) == 1 and "failed" not in flex[0], table


def test_label_bench_runs_with_qwen3_embedders(tmp_path, capsys):
    """``bench/label.py --embedder`` (what a GPU lease runs with ``--device cuda --embedder 0.6b``), on CPU with
    the tiny configs: the whole label job over a Qwen3 index, every query's top 3 scored."""
    from bench.label import main

    main(["--embedder", "tiny", "--reranker", "tiny", "--queries", "3", "--top-k", "3", "--workdir", str(tmp_path)])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["tiny", "3", "9"], row


def test_gpu_rerank_smoke_run_with_a_liger_row(qwen3_reranker_dir, capsys):
    """``bench/gpu_rerank.py --liger`` on CPU with the tiny reranker: the card's loop and our three rows, scores
    equal to ours within float rounding; the Liger row needs CUDA, so here it is a failure line in the table."""
    from bench.gpu_rerank import main

    main(["--smoke", "--liger", "--model-dir", str(qwen3_reranker_dir)])
    table = capsys.readouterr().out.split("| method |")[-1]
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("|---")]
    assert [r.split("|")[1].strip().split(", ")[0] for r in rows] == [
        "model card loop (6 pairs a batch",
        *["Qwen3Reranker (ours)"] * 4,
    ], table
    assert all(float(r.split("|")[-2]) < 1e-4 for r in rows[:4]), table
    assert "head shared, Liger kernels | failed: ValueError: Liger's kernels are Triton kernels for CUDA" in rows[4]

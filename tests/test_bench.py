"""What the CPU benchmarks print and write, without running them (they take minutes)."""

from __future__ import annotations

from bench.scaling import fit_line, title


def test_scaling_gives_no_fit_through_one_size():
    """`bench/scaling.py --sizes 50` printed 'wall ≈ 4.5 s + 89.5 s per 1k documents': a line through one point."""
    assert fit_line({50: 8.9}) == "Least-squares fit: none (one size; a line needs two or more)."


def test_scaling_fit_is_the_least_squares_line():
    assert fit_line({3000: 35.0, 1000: 15.0, 2000: 25.0}) == (
        "Least-squares fit: wall ≈ 5.0 s + 10.0 s per 1k documents."
    )


def test_scaling_section_title_names_the_sizes_run():
    """The default sizes keep BENCHMARKS.md's section; other sizes no longer write under its title."""
    assert title([20000, 1000, 5000]) == "Index job scaling on CPU (1k, 5k, 20k documents)"
    assert title([200, 1000, 1500]) == "Index job scaling on CPU (200, 1k, 1,500 documents)"


def test_store_comparison_never_rounds_a_slower_edge_to_0x():
    """At 1,000 points Edge reopened in 0.09 s against local mode's 0.03 s: the line said 'reopen 0x faster'."""
    from bench.store import comparison

    edge = {"upsert_per_s": 10884.0, "exact_p50_ms": 1.5, "delete_ms": 3.1, "reopen_s": 0.09}
    local = {"upsert_per_s": 1052.0, "exact_p50_ms": 16.4, "delete_ms": 448.5, "reopen_s": 0.03}
    assert comparison(1000, edge, local) == (
        "At 1,000 points Edge vs local mode (above 1x Edge is faster): upsert 10.3x, exact p50 10.9x, delete 145x, "
        "reopen 0.33x."
    )


def test_store_section_names_the_installed_qdrant_edge():
    from importlib.metadata import version

    from bench.store import edge_version

    assert edge_version() == version("qdrant-edge-py")


def test_a_recorded_command_line_can_be_pasted_back():
    import shlex

    from bench.common import command

    argv = ["--write", "--title", "## Index throughput on CPU: {corpus} documents (Intel)", "--docs", "300"]
    line = command("bench/index_cpu.py", argv)
    assert (
        line
        == "python bench/index_cpu.py --write --title '## Index throughput on CPU: {corpus} documents (Intel)' --docs 300"
    )
    assert shlex.split(line) == ["python", "bench/index_cpu.py", *argv]


def test_the_op_counter_counts_every_linear_and_attention_flop_of_a_forward():
    """bench/cpu_peak.py's split of the forward: FLOPs from each call's shapes, every call seen, patches undone."""
    import torch
    import torch.nn.functional as F
    from transformers import BertConfig, BertModel

    from bench.cpu_peak import OpCounter

    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    bert = BertModel(config, add_pooling_layer=False).eval()
    batch, length = 3, 7
    counter = OpCounter()
    with counter.count(), torch.no_grad():
        bert(
            input_ids=torch.randint(0, 100, (batch, length)), attention_mask=torch.ones(batch, length, dtype=torch.long)
        )
    assert (F.linear, F.scaled_dot_product_attention) == (
        torch._C._nn.linear,
        torch._C._nn.scaled_dot_product_attention,
    )

    linears = [m for m in bert.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 6 * 2  # q, k, v, attention output, intermediate, output: per layer
    rows = batch * length
    assert counter.linear_flops == sum(2 * rows * m.in_features * m.out_features for m in linears)
    assert sum(counter.shapes.values()) == len(linears)
    assert counter.shapes[(rows, 32, 64)] == 2 and counter.shapes[(rows, 64, 32)] == 2
    # scores and weighted sum: 2 products of (batch, heads, L, d) x (L, d) per layer
    assert counter.attention_flops == 2 * 4 * batch * 4 * length * length * (32 // 4)
    assert counter.linear_s > 0 and counter.attention_s > 0


def test_the_long_corpus_cut_short_is_its_first_documents():
    """``long_documents(limit=n)`` (the GPU index smoke run asks for 20) stops parsing the stdlib early, and gives
    what the whole corpus starts with."""
    from bench.index_cpu import long_documents

    first = long_documents(limit=3)
    more = long_documents(limit=12)
    assert len(first) == 3 and len(more) == 12 and more[:3] == first
    assert len({d["id"] for d in more}) == 12 and all(len(d["text"].split()) >= 60 for d in more)


def test_the_cpu_usage_report_sums_each_file_and_ranks_by_cpu(tmp_path):
    """``tests/cpu_usage.py``: a test's CPU is its own plus its reaped children's, files ranked by their sum."""
    import json

    from tests.cpu_usage import report

    rows = [{"id": "tests/test_a.py::one", "self": 2.0, "children": 0.0, "wall": 3.0},
            {"id": "tests/test_b.py::two", "self": 1.0, "children": 9.0, "wall": 4.0},
            {"id": "tests/test_a.py::three", "self": 1.0, "children": 1.0, "wall": 1.0}]  # fmt: skip
    (tmp_path / "11.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (tmp_path / "12.jsonl").write_text(json.dumps(rows[2]) + "\n")
    assert report(str(tmp_path)).splitlines() == [
        "3 tests, 14 CPU s (tests' own and their reaped children's), 8 s of wall time summed over tests",
        "",
        "  CPU s   own  child  wall s  file",
        "     10     1      9       4  tests/test_b.py",
        "      4     3      1       4  tests/test_a.py",
        "",
        "  CPU s  wall s  test",
        "     10       4  tests/test_b.py::two",
        "      2       3  tests/test_a.py::one",
        "      2       1  tests/test_a.py::three",
    ]

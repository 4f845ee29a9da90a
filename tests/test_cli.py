"""The ``corpus-etl`` command as a user meets it: start-up imports, one-line errors and exit statuses.

Every test runs the command in a process of its own, as a shell would, and checks the exact line on stderr
and the exit status documented in the README. Most fork it from a process that has imported the jobs' modules
once (``tests/forked_cli.py``: ~8 s of imports fewer a command); ``fresh=True`` runs ``python -m
pipelines.cli`` itself, for what only a fresh interpreter shows (output written while importing, settings a
library reads at import), and the start-up tests probe real interpreters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import flags
from pipelines.errors import EXIT_FAILED, EXIT_PARTIAL, EXIT_USAGE
from tests.forked_cli import ForkedCli

REPO = Path(__file__).resolve().parent.parent
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
HEAVY = ("torch", "apache_beam", "qdrant_client", "transformers")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORPUS_ETL_TEST_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false", **extra)
    return env


_FORKED: list[ForkedCli] = []  # one per module, started by the first forked command


@pytest.fixture(scope="module", autouse=True)
def _close_forked_cli():
    yield
    while _FORKED:
        _FORKED.pop().close()


def cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 300, fresh: bool = False
        ) -> subprocess.CompletedProcess:  # fmt: skip
    if fresh:
        return subprocess.run(
            [sys.executable, "-m", "pipelines.cli", *argv],
            cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=timeout,
        )
    if not _FORKED:
        _FORKED.append(ForkedCli(_env()))
    return _FORKED[0].run(list(argv), env=env or _env(), timeout=timeout)


def one_line(result: subprocess.CompletedProcess) -> str:
    """stderr, which must be exactly one line."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- start-up --------------------------------------------------------------------------------
_PROBE = """
import json, sys
from pipelines.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exc:
    status = exc.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.stdin.read())))
print(json.dumps({"status": status, "heavy": heavy}), file=sys.stderr)
"""


def _probe(*argv: str, env: dict[str, str] | None = None) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], input=json.dumps(HEAVY), cwd=REPO, env=env or _env(),
        capture_output=True, text=True, timeout=120,
    )
    return json.loads(result.stderr.splitlines()[-1])


@pytest.mark.parametrize("command", ["index", "label", "search", "evaluate", "sample-data", "dump", "copy", "prune-collections"])
def test_help_imports_no_torch_beam_or_qdrant(command):
    assert _probe(command, "--help") == {"status": 0, "heavy": []}


def test_a_job_on_the_embedded_store_imports_no_qdrant_client(tmp_path, minilm_path):
    """qdrant-client is the server path's client (``--qdrant-url``): a job on ``--qdrant-path`` runs without it,
    workers included (DirectRunner runs them in the driver here), about a second less of every process's start."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["gzip files", "csv readers and writers"]}), corpus)
    store = ["--collection", "c", "--qdrant-path", str(tmp_path / "q"), "--model", minilm_path]
    index = _probe("index", "--input", str(corpus), *store, "--chunk-tokens", "0", "--device", "cpu")
    assert index == {"status": 0, "heavy": ["apache_beam", "torch", "transformers"]}
    assert _probe("search", *store, "--device", "cpu", "gzip") == {"status": 0, "heavy": ["apache_beam", "torch", "transformers"]}


@pytest.mark.parametrize(
    "argv",
    [
        ["index", "--input", "x.parquet"],  # --collection missing
        ["label", "--queries", "q.parquet", "--out", "o", "--top-k", "many"],
        ["search", "--collection", "c"],  # no query
        ["evaluate", "--collection", "c", "--queries", "q.jsonl"],  # --qrels missing
        ["index", "--input", "x", "--collection", "c", "-x"],  # a short flag Beam cannot take
    ],
)
def test_argument_errors_import_no_torch_beam_or_qdrant(argv):
    assert _probe(*argv) == {"status": EXIT_USAGE, "heavy": []}


_LABEL_REQUIRED = ["--queries", "q.parquet", "--out", "o", "--collection", "c"]


@pytest.mark.parametrize(
    ("extra", "refused"),
    [
        (["--eval-fractoin", "0.9"], "--eval-fractoin 0.9 (did you mean --eval-fraction?)"),
        (["--temp-location=gs://b/t"], "--temp-location=gs://b/t (did you mean --temp_location?)"),
        (["--skip-bad-files"], "--skip-bad-files (not a flag of corpus-etl label, nor a Beam pipeline option)"),
        (["--no_such_option", "1"], "--no_such_option 1 (not a flag of corpus-etl label, nor a Beam pipeline option)"),
        (["stray"], "stray (a value without a flag)"),
        # on a runner that hands unknown options on, a near miss is still refused
        (["--runner", "DataflowRunner", "--eval_fraction", "0.5"], "--eval_fraction 0.5 (did you mean --eval-fraction?)"),
    ],
)
def test_a_flag_beam_would_drop_is_a_usage_error(extra, refused, capsys):
    # Beam discards what it cannot parse with a warning, and the job ran on without it
    with pytest.raises(SystemExit) as exc:
        flags.split_beam_args(flags.label_parser(), _LABEL_REQUIRED + extra)
    assert exc.value.code == EXIT_USAGE
    assert capsys.readouterr().err.splitlines()[-1] == f"corpus-etl label: error: unrecognized arguments: {refused}"


def test_beam_options_pass_and_a_bad_beam_value_is_said_in_our_usage(capsys, caplog):
    beam = ["--runner", "DirectRunner", "--direct_num_workers", "2", "--direct_running_mode=multi_processing"]
    assert flags.split_beam_args(flags.label_parser(), _LABEL_REQUIRED + beam)[1] == beam
    # Dataflow keeps options it does not define for the service (as Beam's runner does), with a warning
    unknown = ["--runner", "DataflowRunner", "--some_service_option", "x"]
    assert flags.split_beam_args(flags.label_parser(), _LABEL_REQUIRED + unknown)[1] == unknown
    assert "--some_service_option: not Beam pipeline options this SDK defines" in caplog.text
    with pytest.raises(SystemExit):
        flags.split_beam_args(flags.label_parser(), _LABEL_REQUIRED + ["--direct_num_workers", "two"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "corpus-etl label: error: Beam pipeline option argument --direct_num_workers: invalid int value: 'two'"
    )


def test_top_level_usage_and_unknown_command():
    assert _probe("--help") == {"status": 0, "heavy": []}
    result = cli("reindex")
    assert result.returncode == EXIT_USAGE
    assert result.stderr.splitlines()[0] == "corpus-etl: error: unknown command 'reindex'"


# -- help texts ------------------------------------------------------------------------------
PARSERS = [flags.index_parser, flags.label_parser, flags.search_parser, flags.evaluate_parser, flags.sample_parser,
           flags.prune_parser, flags.dump_parser, flags.copy_parser]


@pytest.mark.parametrize("make_parser", PARSERS, ids=lambda f: f.__name__)
def test_every_option_has_help_and_shows_its_default_once(make_parser):
    parser = make_parser()
    for action in parser._actions:
        assert action.help, f"{parser.prog} {action.option_strings or action.dest} has no help"
        text = parser._get_formatter()._get_help_string(action) % {"default": action.default, "prog": parser.prog}
        assert text.count("(default") <= 1, text
        assert "(default: None)" not in text, text
    assert "(default: None)" not in parser.format_help()


def test_help_names_the_exit_statuses():
    out = cli("index", "--help").stdout
    assert "exit status:\n    0  success\n    1  the job failed\n    2  usage or pre-flight error" in out
    assert "\n  130  interrupted (Ctrl-C)" in out


def test_the_reranker_instruction_in_help_is_the_one_used():
    from transforms.models.reranker import DEFAULT_INSTRUCTION

    assert flags.DEFAULT_RERANK_INSTRUCTION == DEFAULT_INSTRUCTION


def test_the_precisions_in_help_are_the_ones_the_models_take():
    from transforms.models.devices import PRECISIONS

    assert flags.PRECISIONS == PRECISIONS


def test_the_kernels_in_help_are_the_ones_the_models_take():
    from transforms.models.liger import KERNELS

    assert flags.KERNELS == KERNELS


def test_a_hub_warning_is_printed_once():
    """huggingface_hub logs through its own handler and the root one: after setup_logging, only once."""
    code = (
        "import logging\nfrom pipelines.common import setup_logging\nsetup_logging()\n"
        "import huggingface_hub.utils.logging as hub_logging\n"
        "hub_logging.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.stderr.count("Retrying in 1s [Retry 1/5].") == 1, result.stderr


# -- errors for people: one line, documented status -------------------------------------------
def test_unreachable_store_names_the_url_with_credentials_redacted():
    result = cli("search", "--collection", "c", "--model", MINILM, "--qdrant-url", "http://admin:s3cret@127.0.0.1:9", "hi",
                 fresh=True)  # a real interpreter: nothing printed while importing the command's modules
    assert one_line(result) == (
        "corpus-etl search: error: cannot reach Qdrant at http://***@127.0.0.1:9: [Errno 111] Connection refused; "
        "is the server running?"
    )
    assert result.returncode == EXIT_USAGE
    assert "s3cret" not in result.stdout + result.stderr


def test_unreachable_store_over_grpc():
    result = cli("search", "--collection", "c", "--model", MINILM, "--qdrant-url", "http://127.0.0.1:9", "--qdrant-grpc",
                 "hi")
    line = one_line(result)  # gRPC's own error text is a multi-line repr: only its code and details are kept
    assert line.startswith("corpus-etl search: error: cannot reach Qdrant at http://127.0.0.1:9: UNAVAILABLE: "), line
    assert line.endswith("; is the server running?"), line
    assert result.returncode == EXIT_USAGE


def test_verbose_adds_the_traceback_before_the_line():
    result = cli("search", "-v", "--collection", "c", "--model", MINILM, "--qdrant-url", "http://admin:s3cret@127.0.0.1:9",
                 "hi")
    assert result.returncode == EXIT_USAGE
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("corpus-etl search: error: cannot reach Qdrant at http://***@127.0.0.1:9")
    assert "s3cret" not in result.stderr


def test_locked_store_folder_names_the_folder(tmp_path):
    from transforms.io.edge_store import EdgeStore
    from transforms.io.store import CollectionSpec

    folder = tmp_path / "store"
    EdgeStore(str(folder), shards=1).ensure_collection("c", CollectionSpec(384))
    shard = folder / "c" / "shard-000"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from qdrant_edge import EdgeShard\ns = EdgeShard.load({str(shard)!r})\n"
         "print('locked', flush=True)\nimport sys; sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = cli("search", "--collection", "c", "--model", MINILM, "--qdrant-path", str(folder),
                     "--store-lock-wait", "0.5", "hi")  # fmt: skip
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert one_line(result) == (
        f"corpus-etl search: error: store folder {folder} is in use by another process: c/shard-000 stayed locked for "
        "0s; wait for the other job to finish (jobs writing different collections can run together), or raise "
        "--store-lock-wait"
    )
    assert result.returncode == EXIT_USAGE


def test_model_not_loadable_offline_names_the_model(sample_dir, tmp_path):
    result = cli("index", "--input", sample_dir["corpus"], "--collection", "c", "--model", "nosuch/model",
                 "--qdrant-path", str(tmp_path / "q"))
    line = one_line(result)
    assert line.startswith("corpus-etl index: error: cannot load model nosuch/model: "), line
    assert line.endswith(" (offline? set --model to a local directory)"), line
    assert result.returncode == EXIT_USAGE
    assert not (tmp_path / "q").exists()  # nothing written


def test_model_folder_without_a_model_names_it(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    result = cli("search", "--collection", "c", "--model", str(empty), "--qdrant-path", str(tmp_path / "q"), "hi")
    # the store check comes first (it is fast): make the collection exist so that the model is loaded
    assert one_line(result) == (
        f"corpus-etl search: error: collection 'c' does not exist at edge:{tmp_path / 'q'}; "
        "check --collection, or build it with `corpus-etl index`"
    )
    from transforms.io.edge_store import EdgeStore
    from transforms.io.store import CollectionSpec

    EdgeStore(str(tmp_path / "q")).ensure_collection("c", CollectionSpec(4))
    result = cli("search", "--collection", "c", "--model", str(empty), "--qdrant-path", str(tmp_path / "q"), "hi")
    line = one_line(result)
    assert line.startswith(f"corpus-etl search: error: cannot load model {empty}: "), line
    assert line.endswith(" (offline? set --model to a local directory)"), line
    assert result.returncode == EXIT_USAGE


def test_input_glob_matching_nothing(tmp_path):
    pattern = str(tmp_path / "nope" / "*.parquet")
    result = cli("index", "--input", pattern, "--collection", "c", "--model", MINILM, "--qdrant-path", str(tmp_path / "q"))
    assert one_line(result) == (
        f"corpus-etl index: error: --input: no files match {pattern!r}; check the path or glob (local or gs://)"
    )
    assert result.returncode == EXIT_USAGE


def test_input_missing_a_column(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "body": "text"}]), path)
    result = cli("index", "--input", str(path), "--collection", "c", "--model", MINILM, "--qdrant-path", str(tmp_path / "q"),
                 fresh=True)  # a real interpreter: nothing printed while importing the job's modules
    assert one_line(result) == (
        f"corpus-etl index: error: --input: 1 of 1 input file(s) cannot be read ({path}: missing column(s) text; "
        "the file has: id, body); fix or remove them, or pass --skip-bad-files to index the others"
    )
    assert result.returncode == EXIT_USAGE


@pytest.mark.parametrize(
    ("input_", "flag", "output"),
    [
        ("self.parquet", "--dead-letter", "self.parquet"),  # the job would overwrite its input
        ("self.parquet", "--dead-letter", "./sub/../self.parquet"),  # the same file, written another way
        ("*.parquet", "--dead-letter", "dead.parquet"),  # every later run would read the dead letters
        ("*", "--summary-out", "summary.json"),
        ("link.parquet", "--dead-letter", "self.parquet"),  # a link to it: found among the files listed
    ],
)
def test_an_output_the_input_matches_is_refused_before_anything_is_written(tmp_path, input_, flag, output):
    docs = tmp_path / "self.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "text": "hello"}]), docs)
    before = docs.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.parquet").symlink_to(docs)
    pattern, path = str(tmp_path / input_), str(tmp_path / output)
    result = cli("index", "--input", pattern, "--collection", "c", "--model", MINILM, "--chunk-tokens", "0",
                 "--qdrant-path", str(tmp_path / "q"), flag, path)  # fmt: skip
    assert one_line(result) == (
        f"corpus-etl index: error: {flag} {path} is an input file: --input {pattern!r} matches it; "
        f"write {flag} outside the input"
    )
    assert result.returncode == EXIT_USAGE
    assert docs.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["link.parquet", "self.parquet", "sub"]


@pytest.mark.parametrize("flag", ["--dead-letter", "--summary-out"])
def test_an_output_under_a_file_is_refused_before_anything_is_written(tmp_path, flag):
    # Before: the job ran to its end, then failed (status 1) with "FileExistsError: ... File exists".
    docs = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "text": "hello"}]), docs)
    path = str(tmp_path / "docs.parquet" / "out.json")
    result = cli("index", "--input", str(docs), "--collection", "c", "--model", MINILM, "--chunk-tokens", "0",
                 "--qdrant-path", str(tmp_path / "q"), flag, path)  # fmt: skip
    assert one_line(result) == (
        f"corpus-etl index: error: {flag} {path}: {docs} is a file, not a folder; write {flag} elsewhere"
    )
    assert result.returncode == EXIT_USAGE and not (tmp_path / "q").exists()


@pytest.mark.parametrize(("runner", "hint"), [("FlinkRunnr", " (did you mean FlinkRunner?)"), ("Bogus", "")])
def test_an_unknown_runner_is_a_usage_error(tmp_path, runner, hint):
    # Before: Beam's ValueError came from its runners' package and read as a failed job (status 1).
    result = cli("index", "--input", str(tmp_path / "*.parquet"), "--collection", "c", "--model", MINILM,
                 "--qdrant-path", str(tmp_path / "q"), "--runner", runner)  # fmt: skip
    assert one_line(result).startswith(f"corpus-etl index: error: --runner {runner}: unknown runner{hint}; Beam's runners: ")
    assert result.returncode == EXIT_USAGE


def test_evaluate_queries_file_missing(tmp_path):
    result = cli("evaluate", "--collection", "c", "--model", MINILM, "--qdrant-path", str(tmp_path / "q"),
                 "--queries", str(tmp_path / "queries.jsonl"), "--qrels", str(tmp_path / "qrels.tsv"))
    assert one_line(result) == (
        f"corpus-etl evaluate: error: --queries {tmp_path / 'queries.jsonl'}: cannot read it (No such file or "
        "directory); check the path"
    )
    assert result.returncode == EXIT_USAGE


def test_invalid_flag_values_are_usage_errors(tmp_path):
    result = cli("index", "--input", "x.parquet", "--collection", "c", "--chunk-tokens", "64", "--chunk-overlap", "64")
    assert one_line(result) == (
        "corpus-etl index: error: --chunk-overlap must be in [0, --chunk-tokens), got 64 with --chunk-tokens 64"
    )
    assert result.returncode == EXIT_USAGE


def test_chunks_too_small_for_the_models_own_tokens_are_refused_before_anything_is_created(tmp_path):
    """Else every document is a dead letter blaming a title it may not have, in a new empty collection."""
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "text": "hello world"}]), path)
    result = cli("index", "--input", str(path), "--collection", "small", "--model", MINILM, "--device", "cpu",
                 "--chunk-tokens", "5", "--chunk-overlap", "0", "--qdrant-path", str(tmp_path / "q"))  # fmt: skip
    assert one_line(result) == (
        "corpus-etl index: error: --chunk-tokens 5 leaves 3 tokens for text after the model's 2 special and prompt "
        "tokens (at least 8 needed); pass --chunk-tokens 10 or more (0: one chunk per document, truncated)"
    )
    assert result.returncode == EXIT_USAGE
    assert not (tmp_path / "q").exists()


def test_alias_that_names_a_collection_is_refused_before_the_job(sample_dir, tmp_path):
    from transforms.io.edge_store import EdgeStore
    from transforms.io.store import CollectionSpec

    EdgeStore(str(tmp_path / "q")).ensure_collection("live", CollectionSpec(384))
    result = cli("index", "--input", sample_dir["corpus"], "--collection", "v2", "--alias", "live", "--model", MINILM,
                 "--qdrant-path", str(tmp_path / "q"), "--chunk-tokens", "128")
    assert one_line(result) == (
        f"corpus-etl index: error: --alias 'live' is the name of a collection at edge:{tmp_path / 'q'}, not an "
        "alias; choose another --alias"
    )
    assert result.returncode == EXIT_USAGE


def test_an_unreadable_gate_file_is_refused_before_the_job(sample_dir, tmp_path):
    """Not found after an hour of embedding, with the collection written: status 2, nothing created."""
    missing = tmp_path / "queries.jsonl"
    result = cli("index", "--input", sample_dir["corpus"], "--collection", "v2", "--alias", "live", "--model", MINILM,
                 "--qdrant-path", str(tmp_path / "q"), "--chunk-tokens", "128", "--gate-queries", str(missing), "--gate-qrels",
                 sample_dir["qrels"])  # fmt: skip
    assert one_line(result) == (
        f"corpus-etl index: error: --gate-queries {missing}: cannot read it (No such file or directory); check the path"
    )
    assert result.returncode == EXIT_USAGE
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("top_k", ["-3", "0"])
def test_search_refuses_a_top_k_below_one_before_opening_anything(top_k, tmp_path):
    """A slice would give all but the last 3 candidates for -3, and nothing for 0, with status 0."""
    result = cli("search", "--collection", "c", "--model", MINILM, "--qdrant-path", str(tmp_path / "q"),
                 "--top-k", top_k, "hi")  # fmt: skip
    assert one_line(result) == f"corpus-etl search: error: --top-k must be >= 1, got {top_k}"
    assert result.returncode == EXIT_USAGE
    assert not (tmp_path / "q").exists()


def test_ctrl_c_inside_a_running_job_is_interrupted_with_status_130(capsys, caplog):
    """SIGINT raises KeyboardInterrupt in the thread running a step; Beam re-raises it as
    RuntimeError("KeyboardInterrupt [while running 'STEP']"), which must not read as a failed job."""
    import argparse
    import logging

    import apache_beam as beam

    from pipelines.cli import _run

    caplog.set_level(logging.CRITICAL, logger="apache_beam.runners.common")  # as setup_logging does

    def embed(_):
        raise KeyboardInterrupt

    def job():
        with beam.Pipeline() as p:
            _ = p | beam.Create([1]) | "EmbedChunks" >> beam.Map(embed)

    assert _run("index", job, False, argparse.Namespace()) == 130
    assert capsys.readouterr().err == "corpus-etl index: interrupted\n"

    def from_a_worker():  # across a process boundary only the message is left, no exception chain
        raise RuntimeError("KeyboardInterrupt [while running 'EmbedChunks/RunInference']")

    assert _run("index", from_a_worker, False, argparse.Namespace()) == 130
    assert capsys.readouterr().err == "corpus-etl index: interrupted\n"

    def failed():  # a step's own error stays a failed job
        raise RuntimeError("ValueError: bad batch [while running 'EmbedChunks/RunInference']")

    assert _run("index", failed, False, argparse.Namespace()) == EXIT_FAILED


# -- API keys --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "target"),
    [("search", ["--collection", "c", "--qdrant-url", "http://user:pw@qdrant.example:6333"]),
     # README: plain http to another host is refused (status 2) unless --allow-insecure-api-key; copy's --to-url too
     ("copy", ["--collection", "c", "--qdrant-path", "{tmp}", "--to-url", "http://user:pw@qdrant.example:6333"])],
)  # fmt: skip
def test_api_key_over_plain_http_to_a_remote_host_is_refused_without_imports(command, target, tmp_path):
    env = _env(QDRANT_KEY="k")
    argv = [command, *(t.format(tmp=tmp_path) for t in target), "--qdrant-api-key-env", "QDRANT_KEY",
            *(["hi"] if command == "search" else [])]  # fmt: skip
    result = cli(*argv, env=env)
    assert one_line(result) == (
        f"corpus-etl {command}: error: --qdrant-api-key-env QDRANT_KEY would send the API key unencrypted to "
        "http://***@qdrant.example:6333; use an https:// URL, or pass --allow-insecure-api-key if the network is trusted"
    )
    assert result.returncode == EXIT_USAGE
    assert _probe(*argv, env=env) == {"status": EXIT_USAGE, "heavy": []}


@pytest.mark.parametrize("command", ["dump", "copy"])
def test_every_command_takes_verbose(command, tmp_path):
    """README: every command has -v (the traceback before the one line)."""
    target = ["--out", str(tmp_path / "x.parquet")] if command == "dump" else ["--to-path", str(tmp_path / "t")]
    result = cli(command, "--collection", "nope", "--qdrant-path", str(tmp_path / "store"), *target, "-v")
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"corpus-etl {command}: error: "), result.stderr


def test_api_key_to_loopback_or_with_the_override_goes_on_to_connect():
    env = _env(QDRANT_KEY="k")
    for url, extra in (("http://127.0.0.1:9", []), ("http://localhost:9", []), ("http://127.0.0.1:9", ["--allow-insecure-api-key"])):
        result = cli("search", "--collection", "c", "--model", MINILM, "--qdrant-url", url, "--qdrant-api-key-env",
                     "QDRANT_KEY", *extra, "hi", env=env)
        assert result.returncode == EXIT_USAGE
        assert one_line(result).startswith(f"corpus-etl search: error: cannot reach Qdrant at {url}: "), result.stderr


def test_api_key_variable_not_set():
    result = cli("search", "--collection", "c", "--qdrant-url", "https://qdrant.example:6333",
                 "--qdrant-api-key-env", "CORPUS_ETL_TEST_UNSET_KEY", "hi")
    assert one_line(result) == (
        "corpus-etl search: error: --qdrant-api-key-env CORPUS_ETL_TEST_UNSET_KEY: the environment variable "
        "CORPUS_ETL_TEST_UNSET_KEY is not set"
    )
    assert result.returncode == EXIT_USAGE


# -- whole jobs: partial (3) and failed (1) ----------------------------------------------------
@pytest.fixture()
def corpus_with_a_bad_row(tmp_path) -> str:
    path = tmp_path / "docs.parquet"
    rows = [{"id": "a", "text": "hello world"}, {"id": None, "text": "no id"}, {"id": "b", "text": "a second doc"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.slow
def test_dead_letters_finish_with_status_3_and_every_phase_reports_progress(corpus_with_a_bad_row, tmp_path):
    dead = tmp_path / "dead.jsonl"
    result = cli("index", "--input", corpus_with_a_bad_row, "--collection", "c", "--model", MINILM, "--chunk-tokens", "0",
                 "--qdrant-path", str(tmp_path / "q"), "--dead-letter", str(dead), "--progress-interval", "30",
                 fresh=True)  # a real interpreter: the progress bars are off only if set before the imports
    assert result.returncode == EXIT_PARTIAL, result.stderr
    assert result.stderr.splitlines()[-1] == f"corpus-etl index: partial: 1 dead letter(s) in {dead}"
    assert "Traceback" not in result.stderr
    # a 3-document job still shows every phase once, though it is far shorter than the interval
    for phase in ("[read]", "[chunk]", "[embed]", "[write]"):
        assert sum(phase in line for line in result.stderr.splitlines()) == 1, (phase, result.stderr)
    assert "points written   2 in " in result.stdout
    assert "Loading weights" not in result.stderr and "it/s]" not in result.stderr  # no tqdm bars in batch logs


@pytest.mark.slow
def test_a_failing_job_is_one_line_with_status_1(corpus_with_a_bad_row, tmp_path):
    result = cli("index", "--input", corpus_with_a_bad_row, "--collection", "c", "--model", MINILM, "--chunk-tokens", "0",
                 "--qdrant-path", str(tmp_path / "q"), "--dead-letter", "/proc/corpus-etl/dead.jsonl")
    assert result.returncode == EXIT_FAILED
    errors = [line for line in result.stderr.splitlines() if " INFO " not in line]
    assert errors == [
        "corpus-etl index: error: the job failed: FileNotFoundError: [Errno 2] No such file or directory: "
        "'/proc/corpus-etl' [while running 'WriteDeadLetters/Write'] (-v shows the traceback)"
    ]


def test_alias_refused_after_the_job_is_partial_and_shown_in_the_summary():
    from pipelines.index import IndexConfig, _partial, format_summary

    config = IndexConfig(input="x.parquet", collection="v2", model=MINILM, alias="live", dead_letter="dead.jsonl")
    refused = "the collection holds no points"
    assert _partial({"dead_letters": 0}, config, None) is None
    assert _partial({"dead_letters": 2}, config, refused) == (
        f"2 dead letter(s) in dead.jsonl; --alias live not switched to v2: {refused}"
    )
    summary = {"collection": "v2", "qdrant": "edge:/q", "model": MINILM, "vector_size": 384, "counters": {},
               "status": "alias_refused", "documents_unchanged": 0, "chunks_embedded": 0, "chunks_reused": 0,
               "points_in_collection": 0, "dead_letter": None, "deletion": None,
               "alias": {"name": "live", "previous": "v1", "refused": refused, "gate": None},
               "elapsed_s": 1.0, "documents_per_s": 0.0, "tokens_per_s": 0.0, "precision": "auto",
               "precision_computed": {}}  # fmt: skip
    lines = format_summary(summary).splitlines()
    assert f"  alias            REFUSED, live stays on v1: {refused}" in lines
    assert "  precision        auto (nothing run)" in lines
    assert "live -> v2" not in format_summary(summary)


def test_an_interrupted_job_says_so_in_its_summary():
    """--summary-out of a job stopped by Ctrl-C: ``interrupted`` (status 130), not ``failed`` with a
    KeyboardInterrupt for its error, nor no summary at all (multi_processing's interrupt is a bare one)."""
    from pipelines.common import ended_early
    from pipelines.errors import JobInterrupted

    assert ended_early(JobInterrupted("interrupted; 2 local worker process(es) killed")) == {"status": "interrupted"}
    assert ended_early(RuntimeError("KeyboardInterrupt [while running 'EmbedChunks/RunInference']")) == {
        "status": "interrupted"}
    assert ended_early(ValueError("cannot reach http://u:pw@h:1")) == {
        "status": "failed", "error": "cannot reach http://***@h:1"}


def _worker_entry(message: str, location: str, severity: str = "INFO") -> Any:
    from apache_beam.portability.api import beam_fn_api_pb2

    return beam_fn_api_pb2.LogEntry(severity=getattr(beam_fn_api_pb2.LogEntry.Severity, severity), message=message,
                                    log_location=location, thread="MainThread")  # fmt: skip


def test_multi_processing_workers_log_lines_read_as_the_in_process_ones(caplog):
    """DirectRunner multi_processing forwards each worker's records as 'Worker: <LogEntry proto>' records of
    Beam's job-service logger: the progress lines (INFO) were dropped, Beam's start-up warnings shown as protos."""
    import logging

    from apache_beam.portability.api import beam_fn_api_pb2
    from apache_beam.runners.portability.local_job_service import BeamFnLoggingServicer

    import transforms.progress
    from pipelines import common

    site = "/venv/lib/python3.11/site-packages/apache_beam"
    entries = [
        _worker_entry("[embed] 6s chunks=128 (22.2/s)", f"{transforms.progress.__file__}:48"),
        _worker_entry("No semi_persistent_directory found: ...", f"{site}/runners/worker/sdk_worker_main.py:421",
                      "WARN"),
        _worker_entry("Discarding unparseable args: ['--pipeline_type_check']", f"{site}/options/x.py:570", "WARN"),
        _worker_entry("Creating state cache", f"{site}/runners/worker/sdk_worker.py:10"),
        _worker_entry("Error processing instruction 3", f"{site}/runners/worker/sdk_worker.py:20", "ERROR"),
        _worker_entry("a library's warning", "/venv/lib/python3.11/site-packages/qdrant_client/x.py:5", "WARN"),
    ]
    logger = logging.getLogger(common.WORKER_LOGS)
    previous = logger.filters[:]
    caplog.set_level(logging.DEBUG, logger=common.WORKER_LOGS)
    try:
        for verbose in (False, True):
            logger.filters[:] = [common.WorkerLogs(verbose)]
            caplog.clear()
            BeamFnLoggingServicer().Logging([beam_fn_api_pb2.LogEntry.List(log_entries=entries)])
            logger.info("Grpc server started at localhost on port 1")  # the job service's own: not shown
            shown = [(r.levelname, r.name, r.getMessage()) for r in caplog.records]
            if not verbose:
                assert shown == [("INFO", "worker transforms.progress", "[embed] 6s chunks=128 (22.2/s)"),
                                 ("WARNING", "worker qdrant_client.x", "a library's warning")]  # fmt: skip
            else:  # -v: everything the workers sent, still one message a line
                assert len(shown) == len(entries) and all("severity" not in m for _, _, m in shown)
    finally:
        logger.filters[:] = previous

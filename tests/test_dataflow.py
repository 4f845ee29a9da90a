"""The real Dataflow jobs, built without submitting them: ``--dry_run=True`` and ``--template_location``.

The builds run ``corpus-etl`` in one subprocess (its own process group, killed on a hard
timeout: a stuck credentials lookup or staging must fail the test, never hang it), with the
options a user passes, ``gs://`` against gcp-storage-emulator and no Application Default
Credentials (as in tests/test_gcs.py). The store is a TCP listener that counts connections
(it must see none) and the input glob matches nothing: building a job needs neither.

Then, on DirectRunner, the job as a template builds it runs its pre-flight checks in the
workers (``transforms.io.preflight.LaunchChecks``): it creates the collection and indexes, and
a wrong name or a missing input fails the job with the driver's message.
"""

from __future__ import annotations

import base64
import bz2
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-qdrant-key-4711"
ACCELERATOR = "type:nvidia-l4;count:1;install-nvidia-driver"
IMAGE = "us-central1-docker.pkg.dev/test-project/corpus-etl/corpus-etl-gpu:2.77.0"
BUILD_TIMEOUT_S = 240

# Runs every command of a JSON list in one process (imports paid once); no ADC lookup (~30 s of retries).
_BUILDER = r"""
import json, sys
from apache_beam.internal.gcp import auth
auth._Credentials._credentials_init = True
auth._Credentials._credentials = None
from pipelines.cli import main
statuses = []
for argv in json.loads(sys.stdin.read()):
    try:
        statuses.append(main(argv))
    except SystemExit as exc:
        statuses.append(exc.code)
print("STATUSES " + json.dumps(statuses), flush=True)
"""


def _dataflow_options(**extra: str) -> list[str]:
    options = {
        "runner": "DataflowRunner", "project": "test-project", "region": "us-central1",
        "temp_location": "gs://bucket/tmp", "sdk_container_image": IMAGE, "experiments": "use_runner_v2",
        "sdk_location": "container", **extra,
    }  # fmt: skip
    return [f"--{k}={v}" for k, v in options.items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Listener:
    """A TCP port that accepts and counts connections: the "store" a build must never touch."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _run_builds(commands: list[list[str]], env: dict[str, str]) -> tuple[list[int], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _BUILDER], cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(json.dumps(commands), timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"building the Dataflow jobs took over {BUILD_TIMEOUT_S}s (killed):\n{out[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    match = re.search(r"^STATUSES (.*)$", out, re.M)
    assert match, out[-4000:]
    return json.loads(match[1]), out


@pytest.fixture(scope="module")
def built(tmp_path_factory, minilm_path, qwen3_reranker_dir):
    """Every job of this module, built once: dry runs of index and label (GPU hints), index on CPU
    (no hints), and the index template staged into the storage emulator."""
    from gcp_storage_emulator.server import create_server
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    tmp = tmp_path_factory.mktemp("dataflow")
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
    server.start()
    store = _Listener()
    qdrant = ["--qdrant-url", f"https://127.0.0.1:{store.port}", "--qdrant-api-key-env", "QDRANT_API_KEY"]
    gpu = ["--accelerator", "nvidia-l4:1", "--model-min-ram", "16GB"]
    index = ["index", "--input", "gs://bucket/docs/*.parquet", "--collection", "docs-20261124", "--model", minilm_path,
             "--chunk-tokens", "256", "--dead-letter", "gs://bucket/runs/dead.jsonl", *qdrant]  # fmt: skip
    label = ["label", "--queries", "gs://bucket/logs/*.parquet", "--out", "gs://bucket/labels",
             "--reranker", str(qwen3_reranker_dir), "--collection", "docs", "--model", minilm_path, *qdrant]  # fmt: skip
    jobs = {name: str(tmp / f"{name}.json") for name in ("index", "label", "index_cpu", "label_run")}
    label_run = ["label", "--queries", "gs://bucket/logs/*.parquet", "--out", "gs://bucket/labels-run",
                 "--reranker", str(qwen3_reranker_dir), "--candidates", "gs://bucket/runs/bm25.trec",
                 "--corpus", "gs://bucket/docs/*.parquet"]  # fmt: skip
    commands = [
        [*index, *gpu, *_dataflow_options(dry_run="True", dataflow_job_file=jobs["index"])],
        [*label, *gpu, *_dataflow_options(dry_run="True", dataflow_job_file=jobs["label"])],
        [*index, *_dataflow_options(dry_run="True", dataflow_job_file=jobs["index_cpu"])],
        [*index, *gpu, *_dataflow_options(template_location="gs://bucket/templates/index.json")],
        [*label_run, *_dataflow_options(dry_run="True", dataflow_job_file=jobs["label_run"])],
    ]
    env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "QDRANT_API_KEY": SECRET,
           "HF_HUB_OFFLINE": "1", "NO_GCE_CHECK": "True", "PYTHONPATH": str(REPO)}  # fmt: skip
    try:
        statuses, out = _run_builds(commands, env)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", env["STORAGE_EMULATOR_HOST"])
            client = storage.Client(project="test", credentials=AnonymousCredentials())
            blobs = {b.name: b.download_as_bytes() for b in client.list_blobs("bucket")}
    finally:
        server.stop()
        store.close()
    yield {"statuses": statuses, "out": out, "jobs": jobs, "blobs": blobs, "store_connections": store.connections,
           "store_url": f"https://127.0.0.1:{store.port}"}


# -- reading a job --------------------------------------------------------------------------
def _pipeline(job_file: str) -> dict:
    return json.loads(Path(job_file).read_text())["pipeline"]


def _leaves(pipeline: dict) -> dict[str, dict[str, bytes] | None]:
    """Leaf transform name → the resource hints of its environment (urn → value); None for a
    runner primitive (GroupByKey, Impulse, Flatten), which runs in no SDK environment."""
    components = pipeline["components"]
    hints = {
        env_id: {urn: base64.b64decode(v) for urn, v in env.get("resourceHints", {}).items()}
        for env_id, env in components["environments"].items()
    }
    return {
        t["uniqueName"]: hints[t["environmentId"]] if t.get("environmentId") else None
        for t in components["transforms"].values()
        if not t.get("subtransforms")
    }


def _under(leaves: dict[str, dict[str, bytes] | None], prefix: str) -> dict[str, dict[str, bytes]]:
    """The SDK steps under ``prefix`` (runner primitives left out)."""
    found = {name: h for name, h in leaves.items() if (name == prefix or name.startswith(prefix + "/")) and h is not None}
    assert found, f"no step under {prefix}: {sorted(leaves)}"
    return found


GPU_HINTS = {"beam:resources:accelerator:v1": ACCELERATOR.encode(), "beam:resources:min_ram_bytes:v1": b"16000000000"}


def _texts(blob: bytes, depth: int = 0):
    """``blob`` and everything base64 / bz2 / zlib inside it (pickled DoFns are bz2 in base64)."""
    yield blob
    if depth > 3:
        return
    for run in re.findall(rb"[A-Za-z0-9+/]{64,}={0,2}", blob):
        try:
            raw = base64.b64decode(run + b"=" * (-len(run) % 4))
        except ValueError:
            continue
        for unpack in (bz2.decompress, zlib.decompress, lambda b: b):
            try:
                inner = unpack(raw)
            except Exception:  # noqa: BLE001 - not this encoding
                continue
            yield from _texts(inner, depth + 1)
            break


def _contains(blob: bytes, needle: str) -> bool:
    return any(needle.encode() in text for text in _texts(blob))


# -- the builds -----------------------------------------------------------------------------
def test_builds_succeed_without_store_or_input(built):
    assert built["statuses"] == [0, 0, 0, 0, 0], built["out"][-4000:]
    assert built["store_connections"] == 0  # never connected to the store
    assert "[built: dry run]" in built["out"] and "counters         unavailable" in built["out"]
    assert not any(name.startswith("docs/") for name in built["blobs"])  # the input never existed


def test_index_job_steps_and_hints(built):
    leaves = _leaves(_pipeline(built["jobs"]["index"]))
    for step in ("LaunchChecks/CheckStore", "LaunchChecks/Check[input]", "ReadDocuments/", "ChunkDocuments/",
                 "SkipUnchanged/", "EmbedChunks/", "WriteToQdrant/Upsert", "WriteDeadLetters/"):  # fmt: skip
        assert any(name.startswith(step) for name in leaves), (step, sorted(leaves))
    embed = _under(leaves, "EmbedChunks")
    assert all(h == GPU_HINTS for h in embed.values()), embed
    assert any("RunInference" in name for name in embed)
    for step in ("LaunchChecks", "ReadDocuments", "ChunkDocuments", "SkipUnchanged", "WriteToQdrant",
                 "WriteDeadLetters"):  # fmt: skip
        assert not any(_under(leaves, step).values()), step
    assert not any(h for name, h in leaves.items() if not name.startswith("EmbedChunks/"))


def test_label_job_steps_and_hints(built):
    leaves = _leaves(_pipeline(built["jobs"]["label"]))
    for prefix in ("RetrieveFromIndex/EmbedQueries", "Rerank"):
        hinted = _under(leaves, prefix)
        assert all(h == GPU_HINTS for h in hinted.values()), hinted
    for step in ("LaunchChecks", "ReadQueryLog", "RetrieveFromIndex/SearchIndex", "WriteDatasets", "WriteDeadLetters"):
        assert not any(_under(leaves, step).values()), step


def test_label_job_from_a_run_file_checks_its_inputs_in_the_workers(built):
    leaves = _leaves(_pipeline(built["jobs"]["label_run"]))
    for step in ("LaunchChecks/Check[queries]", "LaunchChecks/Check[candidates]", "LaunchChecks/Check[corpus]",
                 "ReadCorpus/", "RetrieveFromRun/", "Rerank/"):  # fmt: skip
        assert any(name.startswith(step) for name in leaves), (step, sorted(leaves))
    assert not any(leaves.values())  # no --accelerator: no hints


def test_cpu_job_has_no_hints(built):
    leaves = _leaves(_pipeline(built["jobs"]["index_cpu"]))
    assert "EmbedChunks/EmbedByTokens/SplitDeadLetters/FlatMap(_split)" in leaves
    assert not any(leaves.values())


def test_no_secret_in_jobs_or_staged_files(built):
    files = {name: Path(path).read_bytes() for name, path in built["jobs"].items()}
    files.update(built["blobs"])
    # The scanner sees inside the pickled DoFns (the store's URL is only there), and the key is in none.
    assert built["store_url"].encode() not in files["index"] and _contains(files["index"], built["store_url"])
    assert _contains(files["index"], "QDRANT_API_KEY")  # the variable's name: the key goes by reference
    leaked = [name for name, blob in files.items() if _contains(blob, SECRET)]
    assert leaked == []


def test_template_staged_into_the_bucket(built):
    blobs = built["blobs"]
    template = json.loads(blobs["templates/index.json"])
    pool = template["environment"]["workerPools"][0]
    assert {i["containerImage"] for i in pool["sdkHarnessContainerImages"]} == {IMAGE}
    assert len(pool["sdkHarnessContainerImages"]) == 2  # the default environment and the GPU one
    staged = [name for name in blobs if name.startswith("tmp/") and name.endswith("/pipeline.pb")]
    assert len(staged) == 1
    from apache_beam.portability.api import beam_runner_api_pb2

    proto = beam_runner_api_pb2.Pipeline.FromString(blobs[staged[0]])
    hinted = {t.unique_name for t in proto.components.transforms.values()
              if proto.components.environments[t.environment_id].resource_hints}  # fmt: skip
    assert hinted and all(name.startswith("EmbedChunks") for name in hinted)
    assert template["environment"]["sdkPipelineOptions"]["options"]["template_location"].startswith("gs://bucket/")


# -- the pre-flight checks run in the workers (DirectRunner) ----------------------------------
def _small_corpus(sample_dir: dict[str, str], path: Path, n: int = 6) -> str:
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(sample_dir["corpus"]).slice(0, n), path)
    return str(path)


def test_template_job_checks_and_creates_the_store_in_the_workers(sample_dir, minilm_path, tmp_path):
    from apache_beam.testing.test_pipeline import TestPipeline

    from pipelines import index
    from transforms.io.edge_store import EdgeStore
    from transforms.io.qdrant import QdrantConfig
    from transforms.text.chunk import ChunkSettings

    corpus = _small_corpus(sample_dir, tmp_path / "corpus.parquet")
    config = index.IndexConfig(input=corpus, collection="docs-1", model=minilm_path,
                               qdrant=QdrantConfig(path=str(tmp_path / "q")),
                               chunking=ChunkSettings(0, 0))  # fmt: skip
    p = TestPipeline()
    assert index.build_checked_pipeline(config, p) == 384
    assert not os.path.exists(tmp_path / "q" / "docs-1")  # nothing created while building
    p.run().wait_until_finish()
    assert EdgeStore(str(tmp_path / "q")).count("docs-1") == 6

    EdgeStore(str(tmp_path / "q")).point_alias("live", "docs-1")
    aliased = index.IndexConfig(input=corpus, collection="live", model=minilm_path,
                                qdrant=QdrantConfig(path=str(tmp_path / "q")), chunking=ChunkSettings(0, 0))
    p = TestPipeline()
    index.build_checked_pipeline(aliased, p)
    with pytest.raises(Exception, match=r"pre-flight check of the store failed: PreflightError: --collection 'live' is an alias"):
        p.run().wait_until_finish()

    missing = index.IndexConfig(input=str(tmp_path / "none-*.parquet"), collection="docs-2", model=minilm_path,
                                qdrant=QdrantConfig(path=str(tmp_path / "q")), chunking=ChunkSettings(0, 0))
    p = TestPipeline()
    index.build_checked_pipeline(missing, p)
    with pytest.raises(Exception, match=r"pre-flight check of --input failed: FileNotFoundError: no files match"):
        p.run().wait_until_finish()


def test_label_template_job_checks_the_index_in_the_workers(sample_dir, minilm_path, qwen3_reranker_dir, tmp_path):
    from apache_beam.testing.test_pipeline import TestPipeline

    from pipelines import label
    from transforms.io.qdrant import QdrantConfig

    config = label.LabelConfig(queries=sample_dir["query_log"], out=str(tmp_path / "out"),
                               reranker=str(qwen3_reranker_dir), collection="absent", model=minilm_path,
                               qdrant=QdrantConfig(path=str(tmp_path / "q")))  # fmt: skip
    p = TestPipeline()
    label.build_checked_pipeline(config, p)
    with pytest.raises(Exception, match=r"pre-flight check of the store failed: ValueError: collection 'absent'"):
        p.run().wait_until_finish()
    assert not os.path.exists(tmp_path / "out" / "manifest.json")

"""Nightly blue/green reindex on Dataflow, with Airflow's Beam operator, then retention.

    copy_previous (incremental mode) -> index (Dataflow; waits, then the guarded alias switch) -> prune

- **index** writes tonight's collection ``docs-YYYYMMDD`` and switches the alias ``docs`` to it only when every
  guard passes (points written, dead letters under --max-rejected-fraction, every input read, the quality gate
  against the current target). A refused switch exits 3: the task fails (alert), the alias stays on the last
  good collection, searches never see the new one.
- **fresh** mode (default) builds tonight's collection from nothing: every chunk is embedded. **incremental**
  mode first copies the alias's current target into tonight's name (Qdrant's snapshot API, single-node server),
  then the index job embeds only what changed since (fingerprints; --delete-missing removes the documents the
  input no longer holds); the gate still compares tonight's collection with last night's.
- **prune** keeps the --keep most recent ``docs-YYYYMMDD`` collections and always the alias target; it runs
  whatever the index task did (``all_done``), since it never deletes the target nor tonight's collection.

Needs: apache-airflow-providers-apache-beam and -google, corpus-etl installed on the Airflow workers (the driver
runs there: it reads the model's files for the settings digest, builds the job, waits, switches the alias), the
variable QDRANT_API_KEY in their environment when the server has a key, and network from them to Qdrant.
Not run where it was written (no Airflow, no GCP): `python -m py_compile` only. See infra/schedule/README.md.
"""

from __future__ import annotations

import datetime
import os

from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.operators.python import PythonOperator
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
from airflow.providers.google.cloud.operators.dataflow import DataflowConfiguration

PROJECT = os.environ.get("CORPUS_ETL_PROJECT", "my-project")
REGION = os.environ.get("CORPUS_ETL_REGION", "us-central1")
BUCKET = os.environ.get("CORPUS_ETL_BUCKET", "corpus")
QDRANT_URL = os.environ.get("CORPUS_ETL_QDRANT_URL", "https://qdrant.internal:6333")
WORKER_IMAGE = os.environ.get("CORPUS_ETL_WORKER_IMAGE", f"{REGION}-docker.pkg.dev/{PROJECT}/corpus-etl/corpus-etl-gpu:TAG")
ALIAS = "docs"
KEEP = 7
MODE = os.environ.get("CORPUS_ETL_MODE", "fresh")  # fresh | incremental
INDEX_JOB = os.path.join(os.path.dirname(__file__), "index_job.py")
TONIGHT = ALIAS + "-{{ ds_nodash }}"  # the naming prune-collections reads: <alias>-YYYYMMDD[-suffix]


def copy_previous(alias: str, new: str) -> str | None:
    """Tonight's collection as a copy of the alias's target (snapshot, recovered under the new name).

    Nothing to copy on the first night (no alias yet: the index job builds fresh); a rerun of the night
    finds ``new`` already there and goes on from it (the index job is idempotent).
    """
    from qdrant_client import QdrantClient

    client = QdrantClient(url=QDRANT_URL, api_key=os.environ.get("QDRANT_API_KEY"), timeout=600)
    current = {a.alias_name: a.collection_name for a in client.get_aliases().aliases}.get(alias)
    if current is None or client.collection_exists(new):
        return None
    snapshot = client.create_snapshot(collection_name=current, wait=True)
    # A single-node server reads its own snapshot folder; a cluster: upload the snapshot and recover from a URL.
    client.recover_snapshot(new, location=f"file:///qdrant/snapshots/{current}/{snapshot.name}", wait=True)
    client.delete_snapshot(collection_name=current, snapshot_name=snapshot.name)
    return current


index_options = {
    # corpus-etl index (README "Commands", "Reindexing")
    "input": f"gs://{BUCKET}/docs/*.parquet",
    "collection": TONIGHT,
    "alias": ALIAS,
    "model": "Qwen/Qwen3-Embedding-0.6B",
    "device": "cuda",
    "accelerator": "nvidia-l4:1",  # a GPU on the embedding step only (Dataflow right fitting)
    "model-min-ram": "16GB",
    "qdrant-url": QDRANT_URL,
    "qdrant-api-key-env": "QDRANT_API_KEY",
    "gate-queries": f"gs://{BUCKET}/eval/queries.jsonl",
    "gate-qrels": f"gs://{BUCKET}/eval/qrels.tsv",
    "dead-letter": f"gs://{BUCKET}/runs/{{{{ ds }}}}/dead.jsonl",
    "summary-out": f"gs://{BUCKET}/runs/{{{{ ds }}}}/summary.json",
    **({"delete-missing": True} if MODE == "incremental" else {}),
    # Beam / Dataflow
    "temp_location": f"gs://{BUCKET}/tmp",
    "sdk_container_image": WORKER_IMAGE,
    "sdk_location": "container",
    "experiments": "use_runner_v2",
    "max_num_workers": 8,
}

with DAG(
    dag_id="corpus_etl_nightly_reindex",
    schedule="0 2 * * *",
    start_date=datetime.datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,  # two nights never write at once
    default_args={"retries": 0},  # a failed night is looked at, not retried blindly (reruns are safe, though)
    tags=["corpus-etl"],
) as dag:
    index = BeamRunPythonPipelineOperator(
        task_id="index",
        runner="DataflowRunner",
        py_file=INDEX_JOB,
        py_interpreter="python3",
        pipeline_options=index_options,
        dataflow_config=DataflowConfiguration(
            job_name="corpus-etl-index-{{ ds_nodash }}", project_id=PROJECT, location=REGION,
            wait_until_finished=True,
        ),
    )
    prune = BashOperator(
        task_id="prune",
        trigger_rule="all_done",
        bash_command=(
            f"corpus-etl prune-collections --alias {ALIAS} --keep {KEEP} "
            f"--qdrant-url {QDRANT_URL} --qdrant-api-key-env QDRANT_API_KEY"
        ),
    )
    if MODE == "incremental":
        copy = PythonOperator(task_id="copy_previous", python_callable=copy_previous,
                              op_kwargs={"alias": ALIAS, "new": TONIGHT})
        copy >> index
    index >> prune

"""infra/ against the code and the test environment: pinned versions, Flex Template metadata, scripts, manifests.

Nothing here builds an image or talks to a cloud; these checks keep the files from drifting away from the
flags and the versions the tests run with.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import flags
from pipelines.flex_template import FILES, metadata, parameter_name, to_cli_argv

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def _version(package: str) -> str:
    return importlib.metadata.version(package).split("+")[0]  # torch 2.13.0+cpu -> 2.13.0


def _arg(dockerfile: Path, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", dockerfile.read_text(), re.M)
    assert match, f"{dockerfile} has no ARG {name}"
    return match[1]


def test_worker_requirements_are_the_tested_versions():
    pins = [line.split("#")[0].strip() for line in (INFRA / "requirements-worker.txt").read_text().splitlines()]
    pins = [p for p in pins if p]
    assert len(pins) >= 10
    for pin in pins:
        name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[a-z,]+\])?==(\S+)", pin).groups()
        assert _version(name) == version, f"{pin}: the tests run with {name} {_version(name)}"
    # every runtime dependency of the package is pinned (torch: by the Dockerfiles)
    required = {re.split(r"[<>=\[;]", r)[0].strip().lower().replace("_", "-")
                for r in importlib.metadata.requires("corpus-etl") if "extra ==" not in r}  # fmt: skip
    pinned = {re.split(r"[=\[]", p)[0].lower().replace("_", "-") for p in pins}
    assert required - pinned == {"torch"}


def test_images_match_the_test_environment():
    gpu, launcher = INFRA / "Dockerfile.gpu", INFRA / "flex-template" / "Dockerfile"
    assert _arg(gpu, "PYTHON_VERSION") == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert _arg(gpu, "BEAM_VERSION") == _version("apache-beam")
    assert _arg(gpu, "TORCH_VERSION") == _arg(launcher, "TORCH_VERSION") == _version("torch")
    python = f"python{sys.version_info.major}{sys.version_info.minor}"
    assert f"dataflow-templates-base/{python}-template-launcher-base" in launcher.read_text()
    for dockerfile in (gpu, launcher):
        assert "requirements-worker.txt" in dockerfile.read_text() and "--no-deps" in dockerfile.read_text()
    # liger-kernel is not in this (CPU) test environment: the GPU image pins the version that ran on a GPU
    carried = re.search(r"liger-kernel==(\S+)", (REPO / "bench" / "gpu_wheels.sh").read_text())
    assert _arg(gpu, "LIGER_VERSION") == carried[1]


@pytest.mark.parametrize("command", ["index", "label"])
def test_flex_template_metadata_is_generated_from_the_flags(command):
    on_disk = json.loads((REPO / FILES[command]).read_text())
    assert on_disk == metadata(command), (
        f"regenerate: python -m pipelines.flex_template metadata {command} > {FILES[command]}"
    )
    parser = flags.index_parser() if command == "index" else flags.label_parser()
    every_flag = {o[2:].replace("-", "_") for a in parser._actions for o in a.option_strings
                  if o.startswith("--") and a.dest != "help"}  # fmt: skip
    assert {p["name"] for p in on_disk["parameters"]} == every_flag
    required = {p["name"] for p in on_disk["parameters"] if not p["isOptional"]}
    assert required == ({"input", "collection"} if command == "index" else {"queries", "out"})


def test_launcher_arguments_become_the_cli_flags():
    parser = flags.index_parser()
    argv = to_cli_argv(parser, [
        "--input=gs://b/docs/*.parquet", "--collection=docs-20261124", "--qdrant_url=https://q:6333",
        "--metadata_columns=a,b", "--force=true", "--delete_missing=false", "--chunk_tokens=256",
        "--accelerator=nvidia-l4:1", "--runner=DataflowRunner", "--template_location=gs://b/job_object",
        "--sdk_container_image=img",
    ])  # fmt: skip
    assert argv == ["--input=gs://b/docs/*.parquet", "--collection=docs-20261124", "--qdrant-url=https://q:6333",
                    "--metadata-columns=a,b", "--force", "--chunk-tokens=256", "--accelerator=nvidia-l4:1",
                    "--runner=DataflowRunner", "--template_location=gs://b/job_object", "--sdk_container_image=img"]
    args, beam_args = flags.split_beam_args(parser, argv)
    assert (args.qdrant_url, args.force, args.delete_missing, args.chunk_tokens) == ("https://q:6333", True, False, 256)
    assert args.accelerator == "type:nvidia-l4;count:1;install-nvidia-driver"
    assert beam_args == ["--runner=DataflowRunner", "--template_location=gs://b/job_object", "--sdk_container_image=img"]
    with pytest.raises(SystemExit, match="expected true or false"):
        to_cli_argv(parser, ["--force=yes"])


def test_launcher_refuses_to_run_a_job_itself(monkeypatch):
    from pipelines.flex_template import main

    monkeypatch.setenv("CORPUS_ETL_COMMAND", "index")
    with pytest.raises(SystemExit, match="passes --template_location"):
        main(["--input=x", "--collection=c", "--runner=DataflowRunner"])
    monkeypatch.setenv("CORPUS_ETL_COMMAND", "search")
    with pytest.raises(SystemExit, match="CORPUS_ETL_COMMAND must be one of"):
        main([])


def test_build_and_launch_script():
    script = INFRA / "flex-template" / "build_and_launch.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    known = {p["name"] for c in FILES for p in metadata(c)["parameters"]} | {"sdk_container_image", "sdk_location"}
    used = set(re.findall(r"[~^](\w+)=", text))
    assert used and used <= known, used - known
    for path in ("infra/Dockerfile.gpu", "infra/flex-template/Dockerfile", FILES["index"], FILES["label"]):
        assert path in text


def test_flink_manifest():
    import yaml

    manifest = yaml.safe_load((INFRA / "flink" / "flink-deployment.yaml").read_text())
    assert manifest["kind"] == "FlinkDeployment" and manifest["apiVersion"] == "flink.apache.org/v1beta1"
    containers = {c["name"]: c for c in manifest["spec"]["taskManager"]["podTemplate"]["spec"]["containers"]}
    pool = containers["beam-worker-pool"]
    assert pool["args"] == ["--worker_pool"] and pool["ports"][0]["containerPort"] == 50000
    assert pool["image"].endswith("corpus-etl-gpu:TAG")
    readme = (INFRA / "flink" / "README.md").read_text()
    version = manifest["spec"]["flinkVersion"].removeprefix("v").replace("_", ".")  # v1_20 -> 1.20
    from apache_beam.options.pipeline_options import FlinkRunnerOptions

    assert version in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS
    assert f"--flink_version {version}" in readme and f"beam_flink{version}_job_server:{_version('apache-beam')}" in readme
    assert "--environment_type EXTERNAL --environment_config localhost:50000" in readme


def test_schedule_dag_passes_only_known_flags():
    dag = INFRA / "schedule" / "nightly_reindex_dag.py"
    tree = ast.parse(dag.read_text())
    options = next(n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                   and getattr(n.targets[0], "id", "") == "index_options")  # fmt: skip
    keys = {k.value for k in options.keys if isinstance(k, ast.Constant)}
    keys |= {k.value for d in ast.walk(options) if isinstance(d, ast.Dict) for k in d.keys if isinstance(k, ast.Constant)}
    ours = {o[2:] for a in flags.index_parser()._actions for o in a.option_strings if o.startswith("--")}
    beam = {"temp_location", "sdk_container_image", "sdk_location", "experiments", "max_num_workers"}
    assert keys - beam <= ours, keys - beam - ours
    assert {"collection", "alias", "input"} <= keys
    for path in (dag, INFRA / "schedule" / "index_job.py", INFRA / "flex-template" / "main.py"):
        compile(path.read_text(), str(path), "exec")


def test_readme_points_at_infra():
    readme = (REPO / "README.md").read_text()
    for path in ("infra/Dockerfile.gpu", "infra/flex-template/build_and_launch.sh", "infra/flex-template/metadata.json",
                 "infra/flink/README.md", "infra/flink/flink-deployment.yaml", "infra/schedule/nightly_reindex_dag.py"):
        assert path in readme, path
        assert (REPO / path).exists(), path


def test_parameter_names():
    parser = flags.index_parser()
    names = [parameter_name(a) for a in parser._actions if a.option_strings and a.dest != "help"]
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in names) and len(names) == len(set(names))

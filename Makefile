# corpus-etl: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU torch: this workplace's pip finds the +cpu wheel in its local wheel folder. Elsewhere PyPI's
# Linux wheel is the multi-GB CUDA build: `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_DIR ?= demo_data
QDRANT_PATH ?= ./qdrant_data
DEMO_MODEL ?= sentence-transformers/all-MiniLM-L6-v2
PYTEST_ARGS ?=
# Test files run on this many processes (pytest-xdist, a file's tests together so that its module
# fixtures are built once): one per core, at most 4.
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))

.DEFAULT_GOAL := help
.PHONY: help install demo demo-label test lint bench-cpu bench-label bench-prefix bench-store bench-reindex bench-scaling bench-threads bench-tokenizer bench-precision bench-cpu-peak bench-gpu clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml setup.py | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed ## create the venv and install the package with dev tools (CPU torch)

demo: install ## build a real-text sample corpus, index it on DirectRunner into ./qdrant_data (offline MiniLM), search it
	$(BIN)/corpus-etl sample-data --out $(DEMO_DIR)
	$(BIN)/corpus-etl index --input $(DEMO_DIR)/corpus.parquet --collection demo --model $(DEMO_MODEL) \
	    --qdrant-path $(QDRANT_PATH) --title-column title --metadata-columns n_members \
	    --chunk-tokens 256 --chunk-overlap 32 \
	    --dead-letter $(DEMO_DIR)/dead_letters.jsonl --summary-out $(DEMO_DIR)/index_summary.json
	$(BIN)/corpus-etl search --collection demo --model $(DEMO_MODEL) --qdrant-path $(QDRANT_PATH) --top-k 5 \
	    "how do I parse command line arguments"
	$(BIN)/corpus-etl evaluate --collection demo --model $(DEMO_MODEL) --qdrant-path $(QDRANT_PATH) \
	    --queries $(DEMO_DIR)/queries.jsonl --qrels $(DEMO_DIR)/qrels/test.tsv --out $(DEMO_DIR)/metrics.json

DEMO_RERANKER ?= $(DEMO_DIR)/tiny-qwen3-reranker
demo-label: demo ## offline label job on the demo index, with a tiny RANDOM-weight Qwen3 reranker (labels are meaningless)
	$(BIN)/python -m tests.qwen_offline reranker --out $(DEMO_RERANKER)
	$(BIN)/corpus-etl label --queries $(DEMO_DIR)/query_log.parquet --out $(DEMO_DIR)/labels \
	    --reranker $(DEMO_RERANKER) --collection demo --model $(DEMO_MODEL) --qdrant-path $(QDRANT_PATH) \
	    --top-k 10 --label-thresholds 0.2,0.35 --device cpu --summary-out $(DEMO_DIR)/label_summary.json

test: install ## run the test suite (CPU; GPU tests skip without CUDA; PYTEST_WORKERS=0 for one process)
	$(BIN)/python -m pytest --numprocesses $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install ## ruff
	$(BIN)/ruff check pipelines transforms tests bench infra

bench-cpu: install ## index throughput: ours (and at --precision fp32) vs a plain sentence-transformers script (fp32, bf16 autocast) vs Beam's ml.rag, short and long documents (writes BENCHMARKS.md; ~20 min)
	$(BIN)/python bench/index_cpu.py --write --contestants ours,script,script-bf16,beam --ours default,precision=fp32

bench-label: install ## label pipeline pairs/s on CPU (writes BENCHMARKS.md)
	$(BIN)/python bench/label.py --write

bench-prefix: install ## reranker shared prompt head vs whole pairs, A/B (writes BENCHMARKS.md; ~6 min on 2 cores)
	$(BIN)/python bench/rerank_prefix.py --write

bench-store: install ## embedded store: qdrant-client local mode vs Qdrant Edge at 100k points (writes BENCHMARKS.md; ~10 min, 7-10 of them local mode's upserts and searches)
	$(BIN)/python bench/store.py --points 100000 --write

bench-reindex: install ## incremental reindex of 5,000 real-text documents vs a full index (writes BENCHMARKS.md; ~8 min at fp32)
	$(BIN)/python bench/reindex.py --write

bench-scaling: install ## index job wall time and tokens/s at 1k, 5k and 20k documents (writes BENCHMARKS.md; ~5 min)
	$(BIN)/python bench/scaling.py --write

bench-threads: install ## torch threads per worker process: W busy workers with cores/W threads vs one per core (writes BENCHMARKS.md; ~4 min)
	$(BIN)/python bench/worker_threads.py --write

bench-precision: install ## --precision on CPU: speed and parity with fp32 of the encoder (fp32, bf16-mixed, bf16) and the reranker (writes BENCHMARKS.md; ~7 min)
	$(BIN)/python bench/precision.py --write
	$(BIN)/python bench/precision.py --reranker --pairs 16 --repeats 3 --write

bench-cpu-peak: install ## the fp32 encoder split into Linear layers, attention and the rest, against this CPU's own GEMM rate, long and short documents (writes BENCHMARKS.md; ~3 min)
	$(BIN)/python bench/cpu_peak.py --corpus long --write
	$(BIN)/python bench/cpu_peak.py --corpus short --docs 1896 --write

bench-tokenizer: install ## Qwen's and MiniLM's tokenisers on CPU, one core and the Rust pool (writes BENCHMARKS.md)
	$(BIN)/python bench/tokenizer.py --write

bench-gpu: ## GPU machines only, with their CUDA torch (GPU_PYTHON=python): embedding, reranking, both jobs end to end (writes BENCHMARKS.md)
	@$(GPU_PYTHON) -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null || { \
	    echo "bench-gpu: needs a CUDA GPU and GPU_PYTHON (now '$(GPU_PYTHON)') with a CUDA build of torch; on CPU use the other bench-* targets" >&2; \
	    exit 2; }
	$(GPU_PYTHON) bench/gpu_embed.py --size 0.6b --write
	$(GPU_PYTHON) bench/gpu_rerank.py --size 0.6b --liger --write
	$(GPU_PYTHON) bench/rerank_prefix.py --device cuda --candidates 100 --write
	$(GPU_PYTHON) bench/gpu_index.py --size 0.6b --write
	$(GPU_PYTHON) bench/label.py --device cuda --embedder 0.6b --reranker 0.6b --queries 25 --copies 8 --top-k 50 --write

GPU_PYTHON ?= python

clean: ## remove the venv, demo data and the local Qdrant folder
	rm -rf $(VENV) $(DEMO_DIR) $(QDRANT_PATH) .pytest_cache

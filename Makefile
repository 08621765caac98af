# vldeformer — the two commands a fresh machine needs are `make demo` and `make test`.
# TORCH_SPEC is installed before the project: the default is the CPU build that lies on
# disk on our dev/CI machines; a GPU host overrides it, e.g. `make install-gpu TORCH_SPEC=torch==2.5.1`.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
HOST       ?= 127.0.0.1
PORT       ?= 8000
DEMO_DIR   ?= data/demo
DEMO_MODEL ?= model/assets/demo/decomposed
DEMO_TEACHER ?= model/assets/demo/teacher
PYTEST_ARGS ?=

BIN := $(VENV)/bin
PY  := $(BIN)/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help install install-dev install-gpu lint format test coverage demo demo-data demo-index \
        demo-model bench bench-paper bench-queries bench-rerank bench-indexer bench-search bench-filter bench-service bench-runtime bench-ray bench-shapes bench-ivfpq gpu-check clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	@touch $@

$(VENV)/.installed-dev: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed  ## create .venv and install the project

install-dev: $(VENV)/.installed-dev  ## create .venv and install the project with the dev extra

install-gpu: $(BIN)/activate  ## GPU host: torch from TORCH_SPEC, the project, faiss-gpu-cu12 instead of faiss-cpu
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e .
	$(BIN)/pip uninstall -y faiss-cpu
	$(BIN)/pip install --no-deps "faiss-gpu-cu12>=1.8"
	@touch $(VENV)/.installed

lint: install-dev  ## ruff, formatting, mypy (indexer, service), hadolint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy indexer service
	$(BIN)/hadolint Dockerfile

format: install-dev  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install-dev lint  ## lint, then the whole test suite
	$(BIN)/pytest $(PYTEST_ARGS)

coverage: install-dev  ## the test suite with line coverage per package (model, indexer, service)
	$(BIN)/pytest --cov=model --cov=indexer --cov=service --cov-report=term $(PYTEST_ARGS)

demo-data: install  ## regenerate the demo gallery from its seed (seconds)
	$(PY) -m model.synthetic --out $(DEMO_DIR) --preset demo

demo-index: demo-data  ## build the demo index with the indexer CLI
	@test -f $(DEMO_MODEL)/config.json || { echo "The demo model is not built yet: run 'make demo-model' (about 70 min on 2 cores)."; exit 1; }
	$(BIN)/vldeformer-index build --model $(DEMO_MODEL) --images $(DEMO_DIR)/gallery.jsonl \
	    --captions $(DEMO_DIR)/captions.jsonl --out data/index

demo: demo-index  ## install, build the demo gallery and index, serve on http://$(HOST):$(PORT)
	@echo ""
	@echo "Serving vldeformer on http://$(HOST):$(PORT)/  (Ctrl-C stops it)"
	@echo "  curl -s -X POST http://$(HOST):$(PORT)/search/images -H 'Content-Type: application/json' -d '{\"text\": \"a red circle\", \"k\": 5}'"
	@echo "  curl -s -X POST http://$(HOST):$(PORT)/search/captions -F image=@$$(ls $(DEMO_DIR)/images/*.png | head -1) -F k=5"
	@echo ""
	VLD_MODEL_DIR=$(DEMO_MODEL) VLD_TEACHER_DIR=$(DEMO_TEACHER) VLD_INDEX_ROOT=data/index \
	VLD_HOST=$(HOST) VLD_PORT=$(PORT) $(BIN)/vldeformer-serve

demo-model: install  ## retrain the committed demo teacher + decomposed model (~70 min on 2 CPU cores; resumes if interrupted)
	$(PY) -m model.demo_model --out model/assets/demo

bench-paper: install  ## the paper's claim on the synthetic test split -> BENCHMARKS.md figures
	$(PY) bench/paper_claim.py

bench-rerank: install  ## the served re-ranker: latency, throughput and per-stage ms with and without it
	$(PY) bench/rerank_service.py

bench-queries: install  ## short queries ("a red circle") against the demo gallery: P@10, nDCG@10
	$(PY) bench/query_bench.py

bench-indexer: install  ## indexer throughput (CPU here; --device cuda on a GPU host)
	$(PY) bench/indexer_throughput.py

bench-search: install  ## flat vs approximate search latency / recall at 10K..1M vectors
	$(PY) bench/search_index.py

bench-filter: install  ## filtered search (50%, 5%, 0.1% selectivity) latency / recall at 100K and 1M
	$(PY) bench/filter_search.py

bench-service: install  ## HTTP latency and throughput against a real uvicorn process
	$(PY) bench/service_load.py

bench-runtime: install-dev  ## encoder runtimes on CPU: torch vs ONNX Runtime fp32 / int8 (~15 min on 2 cores)
	$(PY) bench/runtime_bench.py

bench-ray: install-dev  ## local vs Ray engine on the demo gallery: images/s, start-up -> bench/results/ray_engine.json
	$(PY) bench/ray_engine.py

bench-ivfpq: install  ## on-disk IVF-PQ over 10M vectors (d=128): build stages, peak RSS, sizes, recall@10, latency (~10-16 min on 2 cores)
	$(PY) bench/ivfpq_ondisk.py

bench-shapes: install  ## can the demo ViLT's image tower see shapes? (supervised probe, 64 and 96 px)
	$(PY) bench/shape_probe.py --image-size 64
	$(PY) bench/shape_probe.py --image-size 96

gpu-check: install  ## GPU host (after make install-gpu): training, indexer, service figures in <= 8 min -> bench/results/gpu_check.json
	$(PY) bench/gpu_check.py

clean:  ## remove the venv, generated data and caches
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache build *.egg-info

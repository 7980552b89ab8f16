# The embedded default: a venv in .venv, a sqlite Dagster instance in .dagster_home, artifacts in
# .artifacts. `make quickstart` sets everything up and materializes the whole graph;
# `make test` runs the tests (what .ci/run calls).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Quantization runs in an environment of its own (llm_assets/quantize): gptqmodel and Dagster
# require incompatible protobuf versions.
QUANT_VENV := .venv-quant
export DAGSTER_HOME := $(CURDIR)/.dagster_home
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export HF_DATASETS_DISABLE_PROGRESS_BARS := 1
UI_PORT ?= 3000

.PHONY: quickstart install system-packages test test-fast ui plan bench clean mlflow

# pip takes torch (pinned, the CPU build) and uv; uv then resolves and installs the rest many times
# faster than pip. torch==2.13.0 is already there, so nothing asks for another build.
# --compile-bytecode: uv, unlike pip, leaves the bytecode to the first import, and where
# PYTHONDONTWRITEBYTECODE is set (CI containers) no import writes it, so every process compiles
# transformers, Dagster and the rest again (a torchrun rank, a CLI call, the quantization worker).
$(BIN)/llm-assets: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0 'uv>=0.9,<1'
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e '.[dev]'
	touch $@

$(QUANT_VENV)/installed: requirements-quantize.txt pyproject.toml
	$(PYTHON) -m venv $(QUANT_VENV)
	$(QUANT_VENV)/bin/pip install --quiet torch==2.13.0 'uv>=0.9,<1'
	$(QUANT_VENV)/bin/uv pip install --quiet --compile-bytecode --python $(QUANT_VENV)/bin/python -r requirements-quantize.txt
	$(QUANT_VENV)/bin/uv pip install --quiet --python $(QUANT_VENV)/bin/python --no-deps -e .
	touch $@

install: $(BIN)/llm-assets $(QUANT_VENV)/installed

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

# What the tests start besides Python packages (PostgreSQL); does nothing once installed.
system-packages:
	scripts/install-system-packages.sh

quickstart: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/llm-assets plan
	$(BIN)/llm-assets materialize

# Two workers: most of a test's time is single-threaded (Dagster runs, data stages); the slow
# end-to-end tests are scheduled first (llm_assets_tests/conftest.py). A third worker made the
# suite slower (1110 s against 1033 s), and the loop's traffic then crossed a minute window.
# Lint (ruff, configured in pyproject.toml), then `dg check defs`: the code location (llm_assets.definitions, [tool.dg] in pyproject.toml)
# loads as Dagster would load it, on the embedded default instance.
test: install system-packages $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/ruff check .
	$(BIN)/dg check defs
	$(BIN)/python -m pytest -q -ra -n 2

test-fast: install system-packages
	$(BIN)/python -m pytest -q -m "not slow"

ui: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -h 127.0.0.1 -p $(UI_PORT) -w workspace.yaml

# The MLflow UI on the embedded tracking store (docs/tracking.md); MLFLOW_TRACKING_URI names another.
MLFLOW_PORT ?= 5000
mlflow: install
	mkdir -p .mlflow
	$(BIN)/mlflow ui -h 127.0.0.1 -p $(MLFLOW_PORT) --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/.mlflow/mlflow.db}

plan: install
	$(BIN)/llm-assets plan

bench: install
	$(BIN)/python bench/store_throughput.py
	$(BIN)/python bench/dedup_vs_datasketch.py
	$(BIN)/python bench/cleaning_throughput.py
	$(BIN)/python bench/tokenize_throughput.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/stage_overhead.py
	$(BIN)/python bench/cache_rematerialize.py
	$(BIN)/python bench/verify_inputs_overhead.py
	$(BIN)/python bench/rollback_from_sft.py
	$(BIN)/python bench/serve_throughput.py --threads 1
	$(BIN)/python bench/quantize_vs_full_precision.py

clean:
	rm -rf .dagster_home .artifacts .alerts .serve

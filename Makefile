# The two commands a newcomer needs: `make serve` and `make test`.
# Each creates the virtual environment and installs what it needs on first use; later runs reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL_DIR ?= checkpoints

.PHONY: serve test lint typecheck unit data clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.serve-installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[train,dev]'
	touch $@ $(VENV)/.serve-installed

serve: $(VENV)/.serve-installed
	MODEL_DIR=$(MODEL_DIR) $(PY) -m uvicorn app.main:app --host $(HOST) --port $(PORT) --timeout-graceful-shutdown 30

lint: $(VENV)/.dev-installed
	$(PY) -m ruff check .

typecheck: $(VENV)/.dev-installed
	$(PY) -m mypy --explicit-package-bases app models training benchmarks

unit: $(VENV)/.dev-installed
	$(PY) -m pytest -q

test: lint typecheck unit

# Extract the shared training data (../shared/data) into .cache/data for the training commands.
SHARED_DATA ?= ../shared/data
data:
	mkdir -p .cache/data
	for archive in $(SHARED_DATA)/*.tar.gz; do tar -xzf "$$archive" -C .cache/data; done

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache

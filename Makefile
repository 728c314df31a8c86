# The two commands a newcomer needs: `make serve` and `make test`.
# Each creates the virtual environment and installs what it needs on first use; later runs reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL_DIR ?= checkpoints

.PHONY: serve test lint typecheck unit data clean system-tools test-without-system-tools

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
	MODEL_DIR=$(MODEL_DIR) $(PY) -m app.serve --host $(HOST) --port $(PORT)

lint: $(VENV)/.dev-installed
	$(PY) -m ruff check .

typecheck: $(VENV)/.dev-installed
	$(PY) -m mypy --explicit-package-bases app models training benchmarks

unit: $(VENV)/.dev-installed
	$(PY) -m pytest -q

test: lint typecheck unit

# Debian packages that tests call, as COMMAND:PACKAGE (tests/test_external_tools.py holds every tool a
# test or benchmark runs to this list or to the Python environment). Installing them needs root (CI is).
SYSTEM_TOOLS := wrk:wrk docker-compose:docker-compose chromium:chromium chromedriver:chromium-driver
system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; apt-get update -q && apt-get install -y -q $$missing; fi

# The tests that call system tools, on a PATH without them: each must fall back (wrk → locust) or skip.
BARE_PATH := .cache/bare-path
test-without-system-tools: $(VENV)/.dev-installed
	rm -rf $(BARE_PATH) && mkdir -p $(BARE_PATH)
	@hidden=" $(foreach pair,$(SYSTEM_TOOLS),$(firstword $(subst :, ,$(pair)))) "; \
	for dir in $$(echo "$$PATH" | tr ':' ' '); do for tool in "$$dir"/*; do name=$${tool##*/}; \
	  case "$$hidden" in *" $$name "*) continue;; esac; \
	  [ -x "$$tool" ] && [ ! -e $(BARE_PATH)/"$$name" ] && ln -s "$$tool" $(BARE_PATH)/"$$name"; done; done; true
	PATH=$(abspath $(BARE_PATH)) CROSSMODAL_EXPECT_NO_SYSTEM_TOOLS=1 $(PY) -m pytest -q tests/test_external_tools.py \
	  tests/app/test_benchmark_smoke.py tests/app/test_page.py -k "multimodal or without_system_tools or page"

# Extract the shared training data (../shared/data) into .cache/data for the training commands.
SHARED_DATA ?= ../shared/data
data:
	mkdir -p .cache/data
	for archive in $(SHARED_DATA)/*.tar.gz; do tar -xzf "$$archive" -C .cache/data; done

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache

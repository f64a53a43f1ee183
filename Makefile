# Two commands for a new user: `make demo` and `make test`. Each builds .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# torch is pinned first so pip takes the CPU build instead of resolving a multi-GB CUDA one.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

.PHONY: venv demo test clean
venv: $(STAMP)

demo: $(STAMP)
	PYTHONUNBUFFERED=1 $(BIN)/kernelloop up --demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

clean:
	rm -rf .kernelloop .pytest_cache

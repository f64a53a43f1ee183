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

# Speed tables on a CUDA device (eager vs torch.compile vs the best variant per op and shape, then the
# decoder stack's decode and prefill steps with those winners), under docs/results/.
# BENCH_PY: an interpreter that already has CUDA torch (the venv's torch may be the CPU build).
BENCH_PY ?= $(BIN)/python
.PHONY: bench
bench:
	PYTHONUNBUFFERED=1 $(BENCH_PY) -m bench.bench_ops --out docs/results
	PYTHONUNBUFFERED=1 $(BENCH_PY) -m bench.bench_e2e --out docs/results

# The user's step end to end: transformers models of five families, unpatched and served by kernelloop,
# in eager, CUDA-graph and torch.compile regimes (CUDA). LOOP_S > 0 first serves each family beside
# the loop for that many seconds, so kernelloop's column is what the loop itself deployed.
LOOP_S ?= 240
.PHONY: bench-models
bench-models:
	PYTHONUNBUFFERED=1 $(BENCH_PY) -m bench.bench_models --out docs/results --loop-s $(LOOP_S)

# The detector measured like a classifier over the stream simulator (fixed seeds, CPU only).
.PHONY: bench-detector
bench-detector: $(STAMP)
	$(BIN)/python bench/bench_detector.py

# 100 simulated workload processes x 10 kernel.stats windows/s for 60 s into the detector service.
.PHONY: bench-load
bench-load: $(STAMP)
	$(BIN)/python bench/bench_load.py

# The AsyncAPI reference of every subject, from the services' own declarations; a test fails when stale.
.PHONY: asyncapi
asyncapi: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/faststream docs gen shared.asyncapi:build_app --factory -o docs/asyncapi.json

clean:
	rm -rf .kernelloop .pytest_cache

# The two commands a newcomer types: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# CPU build of torch that pip finds on this machine; GPU users: install torch from your
# CUDA index into the venv first, then `make setup` keeps it (it satisfies torch>=2.3).
TORCH  ?= torch==2.13.0

# mamba-ssm's readable reference scan, to test our scan against; installed without its CUDA
# kernels (they need a GPU and minutes of compiling). GPU users: pip install -e ".[cuda]".
MAMBA_REF = $(VENV)/.mamba-reference

.PHONY: demo test setup bench clean

$(BIN)/twin: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

setup: $(BIN)/twin

demo: setup
	$(BIN)/twin demo

$(MAMBA_REF): $(BIN)/twin
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $(BIN)/python -m pip install -q --no-build-isolation --no-deps "mamba-ssm==2.3.2.post1" einops
	@touch $@

test: setup $(MAMBA_REF)
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/biomarker_bench.py
	$(BIN)/python bench/scan_bench.py
	$(BIN)/python bench/simulate_bench.py
	$(BIN)/python bench/evaluate_bench.py

clean:
	rm -rf $(VENV) twin-demo

# Two commands a newcomer needs: `make serve` and `make test`. Each builds .venv on first use.
# `make serve ARGS="--port 9000"` passes flags to ddpm-serve.
# TORCH picks the torch build: the default is the CPU wheel (no multi-GB CUDA download).
# GPU users: `make install TORCH="torch --index-url https://download.pytorch.org/whl/cu124"`
# or install their own torch into .venv first (an importable torch is kept).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install serve test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

serve: install
	$(BIN)/ddpm-serve $(ARGS)

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache

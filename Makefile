# Two commands a newcomer needs: `make serve` and `make test`. Each builds .venv on first use.
# `make serve ARGS="--port 9000"` passes flags to ddpm-serve.
# TORCH is what pip installs for torch (an importable torch already in .venv is kept). The
# default takes torch 2.13.0 from pip's index: PyPI's Linux x86_64 build carries CUDA 13.0
# (several GB). torch's own builds name their index, with the version pinned:
#   make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"    # CPU only
#   make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"  # NVIDIA driver >= 580
# (cu126: drivers from 525, GPUs older than Turing; see docker/Dockerfile).
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

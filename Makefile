# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the pinned CPU environment (requirements/cpu.txt) when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench test-vllm clean

$(STAMP): requirements/cpu.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0    # the CPU build first, so nothing pulls a CUDA torch
	$(BIN)/pip install -q -r requirements/cpu.txt
	$(BIN)/pip install -q --no-deps -e .
	@touch $@

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

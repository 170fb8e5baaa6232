#!/usr/bin/env bash
# The test suite. Sets up ./.venv first if needed (scripts/setup.sh, seconds once installed).
#
#   scripts/test.sh            everything: tests/unit, tests/integration (real commands on the demo
#                              model SmolLM2-135M, CPU) and tests/gpu (skipped without CUDA); CI runs this
#   scripts/test.sh --fast     the unit lane only: tests/unit, tiny random-weight models built in the
#                              tests (a few minutes on a 2-core CPU)
#   scripts/test.sh ARGS...    extra arguments go to pytest as they are, e.g. `--fast -k resume -x`
#                              or a path (`scripts/test.sh tests/unit/test_cli.py`; with --fast too)
#
# Tests run on QLORA_TEST_WORKERS pytest-xdist workers (default 2, one per core of this project's
# machines; 0 runs them in this process), each torch on QLORA_TEST_THREADS threads (default 1: two
# threads per worker measured 1.5x slower here). tests/conftest.py keeps the readers of the shared
# demo run on one worker and the multi-process tests on one worker (xdist_group), and runs the tests
# marked `alone` (signal and kill timing) last, with the other worker idle.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

lane=()
args=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then
    lane=(tests/unit)
  else
    args+=("$arg")
  fi
done
# A path among the arguments narrows --fast's lane instead of adding to it.
for arg in "${args[@]}"; do
  case "$arg" in tests|tests/*) lane=() ;; esac
done

workers=${QLORA_TEST_WORKERS:-2}
parallel=()
if [ "$workers" != "0" ]; then
  parallel=(-n "$workers" --dist loadgroup)
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "${parallel[@]}" "${lane[@]}" "${args[@]}"

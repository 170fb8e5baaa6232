#!/usr/bin/env bash
# llama.cpp for the GGUF checks of `qlora merge` and the tests: PyPI's llama-cpp-python, whose
# sdist vendors llama.cpp's sources, built once with cmake into a wheel that is cached outside the
# checkout (a fresh clone on the same machine installs it in seconds) and installed into ./.venv.
# Idempotent: nothing happens when ./.venv already loads it.
#
#   QLORA_LLAMACPP_CACHE   where built wheels are kept (default ~/.cache/qlora-cli/llama-cpp)
#   QLORA_LLAMACPP_JOBS    parallel compile jobs (default: the number of cores)
#
# Why this route (README, "GGUF and llama.cpp"): the prebuilt binaries on PyPI and npm that carry
# llama.cpp either need a newer glibc than Debian 12's (llama-cpp-py-sync: GLIBC_2.38) or expose
# no quantizer (node-llama-cpp); llama-cpp-python pins one llama.cpp commit and ships ctypes
# bindings generated for exactly it, including llama_model_quantize with an importance matrix.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=${QLORA_LLAMACPP_VERSION:-0.3.36}
PY=.venv/bin/python

if "$PY" - <<PYEOF 2>/dev/null
import llama_cpp, sys
llama_cpp.llama_backend_init()
sys.exit(0 if llama_cpp.__version__ == "$VERSION" else 1)
PYEOF
then
  exit 0
fi

# The wheel is built for this CPU (GGML_NATIVE): its cache folder is named after the CPU's flags.
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-12 || echo generic)
cache=${QLORA_LLAMACPP_CACHE:-$HOME/.cache/qlora-cli/llama-cpp}/$VERSION-$(uname -m)-$flags
mkdir -p "$cache"
wheel=$(ls "$cache"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  echo "setup: building llama.cpp (llama-cpp-python $VERSION from source, once; minutes on 2 cores)"
  started=$(date +%s)
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON ${CMAKE_ARGS:-}" \
  CMAKE_BUILD_PARALLEL_LEVEL=${QLORA_LLAMACPP_JOBS:-$(nproc)} \
    "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps "llama-cpp-python==$VERSION" -w "$cache"
  wheel=$(ls "$cache"/llama_cpp_python-"$VERSION"-*.whl | head -1)
  echo "setup: built $(basename "$wheel") in $(( $(date +%s) - started )) s"
fi
"$PY" -m pip install --quiet --disable-pip-version-check "$wheel"

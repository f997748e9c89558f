#!/usr/bin/env bash
# Build (once) and install llama-cpp-python, the engine that the gguf export's engine test loads.
#
# PyPI ships llama-cpp-python only as a source distribution, so it is compiled here: a CPU build
# (no CUDA/Metal), without -march=native so the cached wheel runs on any x86-64 machine of this
# kind. The wheel is cached in ~/.cache/pqflow/wheels/ and reused, so only the first run pays the
# 20-40 minutes that compiling llama.cpp takes on 2 cores.
#
# usage: bench/llama_cpp_wheel.sh VENV        (e.g. bench/llama_cpp_wheel.sh .venv)
# env:   LLAMA_CPP_VERSION (default 0.3.36), PQFLOW_WHEEL_DIR (default ~/.cache/pqflow/wheels),
#        CMAKE_BUILD_PARALLEL_LEVEL (default 2)
set -euo pipefail

venv="${1:?usage: $0 VENV}"
version="${LLAMA_CPP_VERSION:-0.3.36}"
wheel_dir="${PQFLOW_WHEEL_DIR:-$HOME/.cache/pqflow/wheels}"
py="$venv/bin/python"
[ -x "$py" ] || { echo "no python at $py" >&2; exit 2; }

find_wheel() {
    # wheel names normalise the project name to llama_cpp_python
    ls "$wheel_dir"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n 1
}

mkdir -p "$wheel_dir"
wheel="$(find_wheel || true)"
if [ -z "$wheel" ]; then
    echo "building llama-cpp-python==$version (CPU) into $wheel_dir; this takes a while" >&2
    start=$(date +%s)
    # --no-binary only for llama-cpp-python itself: its build tools (scikit-build-core, cmake) come
    # as wheels; GGML_NATIVE=OFF keeps the wheel portable; the shared 2 cores set the parallelism.
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
        "$py" -m pip wheel --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$version" -w "$wheel_dir"
    echo "built in $(( $(date +%s) - start )) s" >&2
    wheel="$(find_wheel)"
fi
echo "wheel: $wheel" >&2

# the wheel's own dependencies are small pure-python packages (numpy is already there)
"$py" -m pip install --no-deps "$wheel"
"$py" -m pip install "numpy>=1.20" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
"$py" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"

#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-bench, llama-speculative-simple, llama-perplexity, llama-quantize, llama-server) from the
# exact llama.cpp that the installed llama-cpp-python vendors, so our ratios compare like with like.
# Not part of CI: about 6 minutes on 2 cores. Usage: bench/llama_tools.sh [PREFIX]  (default ~/.cache/localrun/llama-tools)
# The benches look for the tools in $LOCALRUN_LLAMA_TOOLS (default: that prefix)/bin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
PREFIX="${1:-${LOCALRUN_LLAMA_TOOLS:-$HOME/.cache/localrun/llama-tools}}"
VERSION="$("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)')"
WORK="$PREFIX/src"
mkdir -p "$WORK" "$PREFIX/bin"
if ! ls -d "$WORK"/llama*python-"$VERSION" >/dev/null 2>&1; then
    "$PY" -m pip download -q --no-binary :all: --no-deps --dest "$WORK" "llama-cpp-python==$VERSION"
    tar -xzf "$WORK"/llama*python-"$VERSION".tar.gz -C "$WORK"
fi
SRC="$(ls -d "$WORK"/llama*python-"$VERSION")/vendor/llama.cpp"
# The same flags as the Makefile's llama-cpp-python build: native, but no AMX on x86 (it faults in some VMs).
NO_AMX=""
[ "$(uname -m)" = x86_64 ] && NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$SRC" -B "$PREFIX/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DBUILD_SHARED_LIBS=OFF \
    -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" >/dev/null
TARGETS=(llama-bench llama-speculative-simple llama-perplexity llama-quantize llama-server)
cmake --build "$PREFIX/build" --config Release -j "$(nproc)" --target "${TARGETS[@]}" >/dev/null
for t in "${TARGETS[@]}"; do cp "$PREFIX/build/bin/$t" "$PREFIX/bin/"; done
echo "llama.cpp tools for llama-cpp-python $VERSION in $PREFIX/bin: ${TARGETS[*]}"

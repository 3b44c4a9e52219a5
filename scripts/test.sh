#!/usr/bin/env bash
# Set up the test environment (reference oracles included) in .venv and run the test suite.
# torch 2.14.1 + torchvision 0.29.1 are installed first, explicitly, so that nothing else pulls another torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# Set up the test environment (reference oracles included) in .venv and run the test suite.
# torch 2.14.1 + torchvision 0.29.1 are installed first, explicitly, so that nothing else pulls another torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
# espeak-ng speaks the sentences of the audio decoding tests (they fall back to a synthetic voice without it).
if ! command -v espeak-ng >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q espeak-ng >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 \
    && apt-get install -y -q espeak-ng >/dev/null 2>&1; }) || echo "espeak-ng not installed: synthetic speech is used"
fi
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest -q "$@"

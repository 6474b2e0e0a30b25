#!/usr/bin/env bash
# Create .venv/ (if missing) and install ftrecycle into it, editable, with the test tools.
# The CPU build of torch is pinned first: asking for plain `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[dev]"

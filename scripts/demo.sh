#!/usr/bin/env bash
# Install, then run the main job: for now `ftrecycle demo` (tiny models made here, transferred, loaded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ftrecycle demo --out ftrecycle-demo --force "$@"

#!/usr/bin/env bash
# Install, then run the main job: the lab (`ftrecycle lab run --preset tiny`), the paper's controlled
# experiments end to end on small models made here. Writes ftrecycle-lab/report.md; a rerun reuses
# finished work. Extra arguments go to `ftrecycle lab run` (e.g. --preset small --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ftrecycle lab run --preset tiny --out ftrecycle-lab "$@"

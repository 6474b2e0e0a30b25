#!/usr/bin/env bash
# Install, then lint, type-check and run every test (slow ones included). Used by .ci/run.
# The numerics tests run a second time under another OpenBLAS kernel: a result that held only
# for one kernel's summation order fails there (a fresh clone on an AMD CPU picks Haswell's).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/ruff format --check src tests benchmarks scripts
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
for kernel in Haswell Zen Sandybridge; do
    echo "numerics tests again under OPENBLAS_CORETYPE=$kernel"
    OPENBLAS_CORETYPE=$kernel .venv/bin/python -m pytest -q -p no:cacheprovider \
        tests/test_determinism.py tests/test_compress.py tests/test_exact.py
done

#!/usr/bin/env bash
# A separate environment for the tools ftrecycle is compared against; never a dependency of ftrecycle.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m venv "$here/.venv-mergekit"
"$here/.venv-mergekit/bin/pip" install -q --upgrade pip
"$here/.venv-mergekit/bin/pip" install -q torch==2.13.0   # the CPU build; install before mergekit
"$here/.venv-mergekit/bin/pip" install -q mergekit==0.1.5
echo "mergekit-yaml: $here/.venv-mergekit/bin/mergekit-yaml"

#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
VENV="${CLADNET_VENV:-.venv}"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/mypy" cladnet controller agent collector
mkdir -p artifacts
exec "$VENV/bin/python" -m pytest -q -rs --junitxml=artifacts/junit.xml "$@"

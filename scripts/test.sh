#!/usr/bin/env bash
# Sets everything up, then runs lint and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench examples
.venv/bin/python -m pytest "$@"

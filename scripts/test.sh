#!/usr/bin/env bash
# The whole test suite with lint and types, on a fresh Debian 12 machine as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy --strict
exec .venv/bin/pytest "$@"

#!/usr/bin/env bash
# The main job end to end, on a fresh Debian 12 machine as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py

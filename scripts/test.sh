#!/usr/bin/env bash
# The test command: sets up .venv, checks lint, runs the fast tests, then the slow ones.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
cd "$root"
ruff check .
ruff format --check .
python -m pytest -m "not slow" "$@"
# Exit code 5 means "no tests collected" (e.g. a -k that selects no slow test).
python -m pytest -m slow "$@" || [ $? -eq 5 ]

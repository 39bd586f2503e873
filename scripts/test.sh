#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# two or more worker processes (pytest-xdist; one per core): most tests run one thread each. `-n 0` runs in
# this process (a pdb session, say); a later -n overrides this one
exec python -m pytest -n "${SEMMAE_TEST_WORKERS:-auto}" --dist worksteal "$@"

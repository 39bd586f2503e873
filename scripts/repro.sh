#!/usr/bin/env bash
# Set everything up (idempotent) and run the whole pipeline on the embedded default: `dvc repro`.
# Extra arguments go to `dvc repro` (e.g. `scripts/repro.sh prepare`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SEMMAE_REQUIRE_FMNIST=1 bash scripts/setup.sh
git rev-parse --git-dir >/dev/null 2>&1 || { echo "[repro] not a git checkout: clone the repository (DVC needs git)" >&2; exit 1; }
export PATH="$PWD/.venv/bin:$PATH"
exec dvc repro "$@"

#!/usr/bin/env bash
# Idempotent setup, sourced by scripts/repro.sh and scripts/test.sh:
#   1. a virtual environment in .venv with this project installed (editable, with test extras);
#      reinstalled only when pyproject.toml changed since the last install;
#   2. the Fashion-MNIST idx files of the embedded default (Debian package dataset-fashion-mnist),
#      installed with apt-get when they are missing and apt is usable.
# Environment: PYTHON (default python3), SEMMAE_FMNIST_DIR (default /usr/share/datasets/fashion-mnist),
# SEMMAE_REQUIRE_FMNIST=1 turns a missing dataset into an error instead of a warning.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
FMNIST_DIR=${SEMMAE_FMNIST_DIR:-/usr/share/datasets/fashion-mnist}

say() { printf '[setup] %s\n' "$*" >&2; }

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  say "Python >= 3.10 is needed ('$PYTHON' is $("$PYTHON" --version 2>&1 || echo missing)); set PYTHON=/path/to/python3.11"
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  say "creating virtual environment .venv"
  "$PYTHON" -m venv .venv
fi
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.semmae-installed 2>/dev/null)" != "$want" ]; then
  # torch's CUDA build (what pip resolves on x86_64) takes ~5.5 GB in the venv: say so up front
  # instead of letting pip die half-way through with "No space left on device".
  need_gb=${SEMMAE_SETUP_NEED_GB:-7}
  avail_kb=$(df -Pk .venv | awk 'NR==2 {print $4}')
  if [ -n "$avail_kb" ] && [ "$avail_kb" -lt $((need_gb * 1024 * 1024)) ]; then
    say "only $((avail_kb / 1024 / 1024)) GB free on the filesystem of $PWD/.venv; installing torch (CUDA build) and the rest needs ~${need_gb} GB. Free some space, or clone the project onto a larger disk, and run again."
    exit 1
  fi
  say "installing the project and its dependencies into .venv (a few minutes the first time; log: .venv/pip.log)"
  if ! .venv/bin/python -m pip install --disable-pip-version-check --no-cache-dir -e ".[test]" >.venv/pip.log 2>&1; then
    grep -v '^WARNING: Location' .venv/pip.log | tail -n 40 >&2
    say "pip install failed (full log: .venv/pip.log)"
    exit 1
  fi
  echo "$want" >.venv/.semmae-installed
else
  say ".venv is up to date"
fi

fmnist_ok() { [ -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ] && [ -f "$FMNIST_DIR/t10k-labels-idx1-ubyte.gz" ]; }
if ! fmnist_ok && [ "$FMNIST_DIR" = /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  apt=""
  if [ "$(id -u)" = 0 ]; then apt="apt-get"; elif sudo -n true 2>/dev/null; then apt="sudo apt-get"; fi
  if [ -n "$apt" ]; then
    say "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    $apt update -qq >/dev/null || true
    DEBIAN_FRONTEND=noninteractive $apt install -y -qq dataset-fashion-mnist >/dev/null || true
  fi
fi
if fmnist_ok; then
  say "Fashion-MNIST found in $FMNIST_DIR"
else
  msg="Fashion-MNIST not found in $FMNIST_DIR. Install it with 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or put the four idx .gz files of Fashion-MNIST in a directory, export SEMMAE_FMNIST_DIR=<dir> and set prepare.root in params.yaml to it."
  if [ "${SEMMAE_REQUIRE_FMNIST:-0}" = 1 ]; then say "$msg"; exit 1; fi
  say "warning: $msg"
fi
